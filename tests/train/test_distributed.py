"""Two processes on CPU (gloo), launched by torchrun exactly as users launch them, against one
process with the same global batch: DDP, FSDP2 and tensor parallelism give the same loss curve,
and sharded checkpoints resume on a different number of processes.

Tolerances: every strategy computes the same math on the same sequences; what differs is the
order of floating-point sums (gradients averaged across processes by all-reduce or
reduce-scatter, matmuls split in column or row blocks). In float32 that moves a loss by about
1e-6 relative per step and the difference grows slowly through the optimizer, so over 6 steps
1e-4 relative is tight enough to catch any real error (a wrong batch split, a missing gradient
average or a dropped shard each change the losses at 1e-2 or more) and loose enough for rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.train.checkpoint import list_checkpoints
from lmlab.train.metrics import read_metrics

TOLERANCE = 1e-4


def write_recipe(recipe: dict, path: Path) -> Path:
    path.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                            for section, values in recipe.items()))
    return path


def launch(recipe_file: Path, nproc: int, *extra: str) -> None:
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmlab", "pretrain"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lmlab", "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--recipe", str(recipe_file), "--no-progress", *extra], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def curve(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    """The reference: one process, 8 sequences per step."""
    tmp = tmp_path_factory.mktemp("dist")

    def recipe(name: str, strategy: str, batch_size: int, **train) -> Path:
        r = {
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 64},
            "data": {"path": str(tiny_data["shards"]), "tokenizer": str(tiny_data["tokenizer"]), "seq_len": 32},
            "train": {"out_dir": str(tmp / name), "steps": 6, "batch_size": batch_size, "lr": 1e-2, "log_every": 1,
                      "eval_every": 3, "eval_batches": 2, "save_every": 3, "sample_tokens": 0, "threads": 1, **train},
            "schedule": {"name": "cosine", "warmup_steps": 2},
            "distributed": {"strategy": strategy},
        }
        return write_recipe(r, tmp / f"{name}.toml")

    launch(recipe("single", "auto", 8), 1)
    return recipe, tmp, curve(tmp / "single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_two_processes_follow_the_single_process_curve(single, strategy):
    recipe, tmp, reference = single
    # data parallel: 4 sequences on each of 2 processes; tensor parallel: both see all 8
    launch(recipe(strategy, strategy, 8 if strategy == "tp" else 4), 2)
    got = curve(tmp / strategy)
    assert len(got) == len(reference) == 6
    assert got == pytest.approx(reference, rel=TOLERANCE)
    assert reference[-1] < reference[0] - 0.3  # it trained: the comparison is not between two flat lines
    evals = [r for r in read_metrics(tmp / strategy) if r["kind"] == "eval"]
    single_evals = [r for r in read_metrics(tmp / "single") if r["kind"] == "eval"]
    assert [r["val_loss"] for r in evals] == pytest.approx([r["val_loss"] for r in single_evals], rel=TOLERANCE)
    # the final checkpoint is an ordinary one, whatever the strategy
    from lmlab.model.checkpoint import load_checkpoint

    load_checkpoint(tmp / strategy / "checkpoints/step_00000006")


def test_fsdp_checkpoint_resumes_on_one_process_and_back(single, tmp_path):
    recipe, tmp, reference = single
    # 2 FSDP processes for 3 steps, then 1 process for the rest: the curve is the reference's
    launch(recipe("fsdp2to1", "fsdp", 4, steps=3), 2)
    assert (tmp / "fsdp2to1/checkpoints/step_00000003/dcp").is_dir()
    launch(recipe("fsdp2to1", "none", 8), 1, "--resume")
    assert curve(tmp / "fsdp2to1") == pytest.approx(reference, rel=TOLERANCE)
    assert [s for s, _ in list_checkpoints(tmp / "fsdp2to1")] == [3, 6]
    # and a sharded checkpoint resumes sharded on 2 processes too
    launch(recipe("fsdp2to2", "fsdp", 4, steps=3), 2)
    launch(recipe("fsdp2to2", "fsdp", 4), 2, "--resume")
    assert curve(tmp / "fsdp2to2") == pytest.approx(reference, rel=TOLERANCE)
