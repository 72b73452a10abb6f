"""A tiny tokenized corpus shared by the training tests: the synthetic corpus (tiny size), a
512-token BPE, token shards with a validation split. Built once per session in a few seconds."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest


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
