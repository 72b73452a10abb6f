"""Supervised fine-tuning through the one loop: full and adapter runs, exact resume, HF bases, the forgetting
report, the recipe's errors and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.model.loading import load
from lmlab.tune.sft import finetune, held_out_loss, load_finetune_recipe, resolve_finetune


def _losses(out_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


def _cfg(base, data, out, *sets, adapter=None):
    overrides = ["train.steps=6", "train.batch_size=4", "train.log_every=1", "train.eval_every=3",
                 "train.save_every=3", "train.lr=3e-3", "train.sample_tokens=4", "train.threads=1",
                 "data.seq_len=96", "data.limit=120", "data.pretrain_val_batches=2", f"train.out_dir='{out}'", *sets]
    return load_finetune_recipe(None, overrides, model=str(base), data=str(data), adapter=adapter)


@pytest.fixture(scope="module")
def chats(tiny_data) -> Path:
    return tiny_data["root"] / "synth" / "sft" / "train.jsonl"


def test_full_finetuning_learns_and_reports_forgetting(tiny_base, chats, tmp_path):
    cfg = _cfg(tiny_base, chats, tmp_path / "run", "train.steps=12", "train.eval_every=12")
    result = finetune(cfg, progress=False, log=lambda _: None)
    run = result.run
    assert run.step == 12 and run.checkpoint.name == "step_00000012"
    assert (run.checkpoint / "model.safetensors").is_file() and (run.checkpoint / "tokenizer.json").is_file()
    losses = _losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns the assistant turns
    # forgetting: measured on the base's own pretraining shards, before and after, also on disk
    f = result.forgetting
    assert set(f) >= {"before", "after", "change", "data"} and f["change"] == pytest.approx(f["after"] - f["before"])
    assert json.loads((tmp_path / "run" / "forgetting.json").read_text())["after"] == f["after"]
    assert "val_loss" in run.eval and len(run.eval["samples"]) == 2
    assert result.params["trainable"] == result.params["total"]
    # the base checkpoint is untouched and the result loads as a plain model
    tuned, base = load(run.checkpoint), load(tiny_base)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values(),
                                                     strict=True))


def _crash_after_step_3(run_dir: Path) -> None:
    """What a run killed between step 3's checkpoint and the end leaves behind."""
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")


def test_resume_is_exact(tiny_base, chats, tmp_path):
    cfg = _cfg(tiny_base, chats, tmp_path / "run")
    finetune(cfg, progress=False, log=lambda _: None)
    whole, final = _losses(tmp_path / "run"), load(tmp_path / "run" / "checkpoints" / "step_00000006")
    _crash_after_step_3(tmp_path / "run")
    finetune(_cfg(tiny_base, chats, tmp_path / "run"), resume=True, progress=False, log=lambda _: None)
    assert _losses(tmp_path / "run") == whole  # bitwise, CPU float32
    resumed = load(tmp_path / "run" / "checkpoints" / "step_00000006")
    for x, y in zip(final.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_an_hf_base_trains_like_its_lmlab_twin(tiny_base, chats, tmp_path):
    from lmlab.model.hub import save_hf
    from lmlab.tokenizer import tokenizer_files

    hf = tmp_path / "hf"
    save_hf(load(tiny_base), hf)
    for f in tokenizer_files(tiny_base):
        shutil.copy(f, hf / f.name)
    sets = ("data.pretrain_val='none'", "train.steps=4")
    finetune(_cfg(tiny_base, chats, tmp_path / "lm", *sets), progress=False, log=lambda _: None)
    result = finetune(_cfg(hf, chats, tmp_path / "hfrun", *sets), progress=False, log=lambda _: None)
    assert result.forgetting == {"skipped": "data.pretrain_val = 'none'"}
    assert _losses(tmp_path / "hfrun") == pytest.approx(_losses(tmp_path / "lm"), rel=1e-5)


def test_lora_run_checkpoints_only_the_adapter(tiny_base, chats, tmp_path):
    pytest.importorskip("lmlab.tune.lora")
    from lmlab.tune.adapters import load_adapter

    cfg = _cfg(tiny_base, chats, tmp_path / "lora", "adapter.r=4", "train.lr=1e-2", adapter="lora")
    result = finetune(cfg, progress=False, log=lambda _: None)
    ckpt = result.run.checkpoint
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert result.params["trainable"] < 0.2 * result.params["total"]
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train.distributed import DistEnv
    from lmlab.tune import chat_data

    tok = load_tokenizer(tiny_base)
    held = chat_data.split_validation(chat_data.load_conversations(str(chats), limit=120), 0.05, 0)[1]
    batches = chat_data.eval_batches(chat_data.render(tok, held, 96).examples, 96, 4)
    model = load(tiny_base).eval()
    with torch.no_grad():
        before = held_out_loss(model, batches, DistEnv())
        # the adapter loads onto a fresh base and reproduces the held-out loss of the run's final model
        load_adapter(model, ckpt)
        after = held_out_loss(model.eval(), batches, DistEnv())
    assert after == pytest.approx(result.run.eval["val_loss"], rel=1e-5)
    assert after < before  # it learned
    # resume reloads the base and the adapter: same losses as one run
    whole = _losses(tmp_path / "lora")
    _crash_after_step_3(tmp_path / "lora")
    finetune(cfg, resume=True, progress=False, log=lambda _: None)
    assert _losses(tmp_path / "lora") == whole


def test_recipe_errors():
    with pytest.raises(ValueError, match="model.path is not set"):
        resolve_finetune({}, data="x.jsonl")
    with pytest.raises(ValueError, match="data.train is not set"):
        resolve_finetune({}, model="m")
    with pytest.raises(ValueError, match="unknown recipe section"):
        resolve_finetune({"lora": {}}, model="m", data="d")
    with pytest.raises(ValueError, match="did you mean train.lr"):
        resolve_finetune({}, ["data.lr=1"], model="m", data="d")
    with pytest.raises(ValueError, match="move optim.lr"):
        resolve_finetune({"optim": {"lr": 1e-3}}, model="m", data="d")
    with pytest.raises(ValueError, match="needs an \\[adapter\\]"):
        resolve_finetune({"model": {"dtype": "bfloat16"}}, model="m", data="d")
    with pytest.raises(ValueError, match="adapter.method"):
        resolve_finetune({"adapter": {"method": "lorax"}}, model="m", data="d")


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[2] / "recipes").glob("sft-*.toml")),
                         ids=lambda p: p.name)
def test_shipped_finetuning_recipes_are_valid(recipe):
    for adapter, method in ((None, "full"), ("lora", "lora"), ("qlora", "lora"), ("ia3", "ia3")):
        cfg = load_finetune_recipe(recipe, model="base", data="chats.jsonl", adapter=adapter)
        assert cfg.method == method
        assert cfg.data.seq_len >= 2 and cfg.train.lr > 0


def test_recipe_defaults_follow_the_method():
    full = resolve_finetune({}, model="m", data="d")
    assert full.adapter is None and full.train.lr == 2e-5 and full.data.epochs == 1.0
    lora = resolve_finetune({"adapter": {"r": 16}}, model="m", data="d", adapter="dora")
    assert lora.adapter.dora and lora.adapter.r == 16 and lora.train.lr == 2e-4
    assert resolve_finetune({}, model="m", data="d", adapter="qlora").adapter.quantize == "nf4"
    assert resolve_finetune({"adapter": {"r": 4}}, model="m", data="d").adapter is None  # a preset, not a request
    assert resolve_finetune({"adapter": {"method": "ia3"}}, model="m", data="d").adapter.method == "ia3"
    assert resolve_finetune({}, ["train.steps=50"], model="m", data="d").data.epochs == 0  # steps given: they rule
    assert resolve_finetune({}, ["train.steps=50", "data.epochs=2"], model="m", data="d").data.epochs == 2


def test_cli(tiny_base, chats, tmp_path, capsys):
    from lmlab.cli import main

    out = tmp_path / "cli"
    args = ["sft", "--model", str(tiny_base), "--data", str(chats), "--no-progress", "--set", "train.steps=2",
            "--set", f"train.out_dir='{out}'", "--set", "data.limit=40", "--set", "data.seq_len=64",
            "--set", "train.batch_size=2", "--set", "data.pretrain_val_batches=1", "--set", "train.sample_tokens=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "forgetting: pretraining validation loss" in text and "held-out loss" in text
    assert main(args) == 1  # the run exists: refuses without --resume / --overwrite
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["path"] == str(tiny_base)
    assert main(["generate", "--model", str(out / "checkpoints" / "step_00000002"), "--chat", "--prompt", "Hi",
                 "--max-new-tokens", "3", "--temperature", "0", "--no-stream"]) == 0
