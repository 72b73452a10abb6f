"""Shared fixtures.

`shared_data` is the folder of real public datasets (tinyshakespeare, GSM8K, ...) that sits beside
the repository as `../shared/data`, or wherever `LMLAB_SHARED_DATA` points. Tests that need it skip
with the reason when it is absent, except under CI (the `CI` environment variable is set), where
an absent folder is a failure: CI always has it, so a skip there would hide a broken setup.

`tiny_data` is a tiny tokenized corpus for training and fine-tuning tests (the synthetic corpus at its
tiny size, a 512-token BPE, token shards with a validation split), built once per session in a few
seconds; `tiny_recipe` is a pretraining recipe for a ~50k-parameter model on it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    return Path(os.environ.get("LMLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        reason = f"real datasets not found at {path} (set LMLAB_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must have them")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    from lmlab.data.shards import write_shards
    from lmlab.data.synthetic import SynthConfig, generate
    from lmlab.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    generate(root / "synth", SynthConfig.from_size("tiny"), progress=False)
    docs = [json.loads(line)["text"] for line in (root / "synth/pretrain/train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.train(docs, vocab_size=512, progress=False)
    tokenizer.save(root / "tok")
    write_shards(docs, tokenizer, root / "shards", val_fraction=0.1, workers=1, progress=False)
    return {"shards": root / "shards", "tokenizer": root / "tok", "root": root}


@pytest.fixture
def tiny_recipe(tiny_data):
    """tiny_recipe(out_dir, **train_settings) -> a recipe dict for a ~50k-parameter model on
    `tiny_data` that takes a fraction of a second per step."""
    return functools.partial(_tiny_recipe, tiny_data)


def _tiny_recipe(data: dict[str, Path], out_dir: Path, **train) -> dict:
    return {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64},
        "data": {"path": str(data["shards"]), "tokenizer": str(data["tokenizer"]), "seq_len": 32},
        "train": {"out_dir": str(out_dir), "steps": 8, "batch_size": 4, "lr": 1e-2, "log_every": 1,
                  "eval_every": 4, "eval_batches": 2, "save_every": 4, "sample_tokens": 4, "threads": 1, **train},
        "schedule": {"name": "cosine", "warmup_steps": 2},
    }


@pytest.fixture(scope="session")
def tiny_base(tiny_data, tmp_path_factory) -> Path:
    """A tiny pretrained lmlab checkpoint (with its tokenizer, and its pretraining data recorded in its
    metadata) for fine-tuning tests: the tiny recipe trained for 6 steps."""
    from lmlab.train.config import resolve
    from lmlab.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny_base")
    recipe = _tiny_recipe(tiny_data, out, steps=6, eval_every=0, save_every=0, sample_tokens=0)
    recipe["model"]["max_seq_len"] = 128
    return pretrain(resolve(recipe), progress=False).checkpoint
