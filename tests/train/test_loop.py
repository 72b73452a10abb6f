"""The one training loop: accumulation, checkpoint rotation, run-directory safety, precisions,
activation checkpointing, evaluation and metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.model.checkpoint import load_checkpoint, read_metadata
from lmlab.train.checkpoint import list_checkpoints
from lmlab.train.config import resolve
from lmlab.train.loop import RunExistsError
from lmlab.train.metrics import read_metrics
from lmlab.train.pretrain import pretrain


def run(recipe: dict, overrides=(), **kwargs):
    return pretrain(resolve(recipe, list(overrides)), progress=False, **kwargs)


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def test_pretrain_learns_and_writes_a_complete_run(tiny_recipe, tmp_path):
    result = run(tiny_recipe(tmp_path / "run", steps=30, eval_every=10, save_every=10, keep_last=2))
    curve = losses(tmp_path / "run")
    assert len(curve) == 30 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 1.0  # from ~ln(512) = 6.2 down by more than a nat
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert len(evals[-1]["samples"]) == 1 and evals[-1]["samples"][0].startswith("Once upon a time")
    # keep-last-2 rotation, and every kept checkpoint is loadable with its resolved config
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [20, 30]
    assert result.checkpoint == tmp_path / "run/checkpoints/step_00000030"
    model = load_checkpoint(result.checkpoint)
    assert model.cfg.vocab_size == 512  # taken from the data
    meta = read_metadata(result.checkpoint)
    assert meta["step"] == 30 and meta["train_config"]["train"]["lr"] == 1e-2
    assert (result.checkpoint / "tokenizer.json").is_file()
    assert (tmp_path / "run/loss.png").stat().st_size > 1000
    assert result.tokens == 30 * 4 * 32


def test_gradient_accumulation_matches_the_large_batch(tiny_recipe, tmp_path):
    # The loader gives micro-batches 4+4 the same windows as one batch of 8; the averaged
    # gradient is then the same up to float32 summation order.
    run(tiny_recipe(tmp_path / "big", batch_size=8, grad_accum=1))
    run(tiny_recipe(tmp_path / "acc", batch_size=4, grad_accum=2))
    big, acc = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert big == pytest.approx(acc, rel=1e-5, abs=1e-5)
    assert big != losses_of_plain_4(tiny_recipe, tmp_path)  # and it is not just the small batch


def losses_of_plain_4(tiny_recipe, tmp_path):
    run(tiny_recipe(tmp_path / "small", batch_size=4, grad_accum=1))
    return losses(tmp_path / "small")


def test_activation_checkpointing_leaves_training_unchanged(tiny_recipe, tmp_path):
    run(tiny_recipe(tmp_path / "plain", steps=5))
    run(tiny_recipe(tmp_path / "ckpt", steps=5, activation_checkpointing=True))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6, abs=1e-6)
    # parameter names are untouched: the checkpoint loads into a plain model
    load_checkpoint(tmp_path / "ckpt/checkpoints/step_00000005")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tiny_recipe, tmp_path, precision):
    run(tiny_recipe(tmp_path / precision, steps=12, precision=precision, eval_every=0, save_every=0))
    curve = losses(tmp_path / precision)
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0] - 0.5
    weights = load_checkpoint(tmp_path / precision / "checkpoints/step_00000012")
    assert next(weights.parameters()).dtype == torch.float32  # master weights stay float32


def test_existing_run_is_never_silently_replaced(tiny_recipe, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", steps=4)
    run(recipe)
    with pytest.raises(RunExistsError, match="--resume to continue"):
        run(recipe)
    run(recipe, overwrite=True)  # explicit: starts over
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [4]
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(tiny_recipe(tmp_path / "empty"), resume=True)


def test_resume_with_more_steps_continues_the_schedule(tiny_recipe, tmp_path):
    run(tiny_recipe(tmp_path / "run", steps=4))
    result = run(tiny_recipe(tmp_path / "run", steps=8), resume=True)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert result.step == 8 and result.tokens == 8 * 4 * 32


def test_metrics_lines_are_json_with_throughput(tiny_recipe, tmp_path):
    run(tiny_recipe(tmp_path / "run", steps=4, log_every=2, peak_flops=1e9))
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    train = [json.loads(x) for x in lines if '"train"' in x]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 and r["lr"] > 0


def test_tensorboard_is_optional_and_named_when_missing(tiny_recipe, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            run(tiny_recipe(tmp_path / "tb", steps=2, tensorboard=True))
        return
    run(tiny_recipe(tmp_path / "tb", steps=2, tensorboard=True))
    assert any((tmp_path / "tb/tensorboard").iterdir())


def test_resume_refuses_a_different_global_batch(tiny_recipe, tmp_path):
    run(tiny_recipe(tmp_path / "run", steps=4, batch_size=4, grad_accum=1))
    with pytest.raises(ValueError, match="tokens per step"):
        run(tiny_recipe(tmp_path / "run", steps=8, batch_size=4, grad_accum=2), resume=True)


def test_eval_batches_zero_evaluates_the_whole_split(tiny_recipe, tmp_path):
    result = run(tiny_recipe(tmp_path / "run", steps=2, eval_batches=0, eval_every=2))
    assert math.isfinite(result.eval["val_loss"])
