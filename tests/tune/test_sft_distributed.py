"""`torchrun --nproc_per_node=2 -m lmlab sft` (gloo, CPU) against one process with the same global batch: the
same loss curve, held-out loss and forgetting numbers. SFT batches hold different numbers of assistant tokens,
so this holds only because the loop weighs every token of the global batch equally (train/loop.py
`_micro_weights`), across micro-batches and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.train.metrics import read_metrics

SETTINGS = ["train.steps=4", "train.log_every=1", "train.eval_every=4", "train.save_every=4", "train.lr=3e-3",
            "train.sample_tokens=0", "train.threads=1", "data.seq_len=96", "data.limit=120",
            "data.pretrain_val_batches=2", "schedule.warmup_steps=1"]


def _sft(base: Path, chats: Path, out: Path, nproc: int, batch_size: int, grad_accum: int, *extra: str) -> Path:
    launcher = [sys.executable, "-m", "lmlab"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lmlab"]
    sets = [*SETTINGS, f"train.batch_size={batch_size}", f"train.grad_accum={grad_accum}", f"train.out_dir='{out}'"]
    cmd = [*launcher, "sft", "--model", str(base), "--data", str(chats), "--no-progress", *extra,
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _curve(out: Path) -> tuple[list[float], list[float]]:
    rows = read_metrics(out)
    return ([r["loss"] for r in rows if r["kind"] == "train"], [r["val_loss"] for r in rows if r["kind"] == "eval"])


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_two_processes_follow_one(tiny_base, tiny_data, tmp_path, adapter):
    chats = tiny_data["root"] / "synth" / "sft" / "train.jsonl"
    extra = ("--adapter", adapter) if adapter else ()
    one = _sft(tiny_base, chats, tmp_path / "one", 1, 4, 2, *extra)  # 8 rows a step, in 2 micro-batches
    two = _sft(tiny_base, chats, tmp_path / "two", 2, 2, 2, *extra)  # 2 processes x 2 micro-batches of 2 rows
    (loss1, val1), (loss2, val2) = _curve(one), _curve(two)
    assert len(loss1) == 4 and len(val1) == 1
    assert loss2 == pytest.approx(loss1, rel=1e-5) and val2 == pytest.approx(val1, rel=1e-5)
    f1, f2 = (json.loads((d / "forgetting.json").read_text()) for d in (one, two))
    assert f2["before"] == pytest.approx(f1["before"], rel=1e-6) and f2["after"] == pytest.approx(f1["after"], rel=1e-5)
