"""Exact resume: a run killed (SIGKILL) or interrupted (SIGINT / SIGTERM) and resumed from its
last checkpoint takes, bit for bit on CPU in float32, the steps of a run never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.train.checkpoint import list_checkpoints
from lmlab.train.metrics import read_metrics


def write_recipe(recipe: dict, path: Path) -> Path:
    # JSON scalars, strings and lists of them are valid TOML values
    path.write_text("".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                            for section, values in recipe.items()))
    return path


def command(recipe_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab", "pretrain", "--recipe", str(recipe_file), "--no-progress", *extra]


def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir) if r["kind"] == "train"]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before the condition held: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.fixture
def reference(tiny_recipe, tmp_path):
    """An uninterrupted 12-step run (with evaluation and doc masking, so resuming must not
    depend on either)."""
    def recipe(out_dir):
        r = tiny_recipe(out_dir, steps=12, save_every=4, eval_every=3, keep_last=3)
        r["data"]["doc_mask"] = True
        return write_recipe(r, tmp_path / f"{Path(out_dir).name}.toml")

    subprocess.run(command(recipe(tmp_path / "reference")), check=True, capture_output=True)
    return recipe, train_losses(tmp_path / "reference")


def test_resume_after_sigkill_is_bitwise_exact(reference, tmp_path):
    recipe, expected = reference
    assert [s for s, _ in expected] == list(range(1, 13))
    file = recipe(tmp_path / "killed")
    proc = subprocess.Popen(command(file), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "killed/checkpoints/step_00000004").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = [s for s, _ in list_checkpoints(tmp_path / "killed")]
    assert done and max(done) < 12  # killed mid-run
    subprocess.run(command(file, "--resume"), check=True, capture_output=True)
    assert train_losses(tmp_path / "killed") == expected  # every step, exact float equality


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_checkpoint_and_resume_is_exact(reference, tmp_path, signum):
    recipe, expected = reference
    out = tmp_path / f"sig{int(signum)}"
    file = recipe(out)
    proc = subprocess.Popen(command(file), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 5, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stopped = max(s for s, _ in list_checkpoints(out))
    assert 5 <= stopped < 12  # a checkpoint at the step where it stopped, not only every 4 steps
    assert train_losses(out)[-1][0] == stopped
    subprocess.run(command(file, "--resume"), check=True, capture_output=True)
    assert train_losses(out) == expected
