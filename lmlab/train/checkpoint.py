"""Resumable training checkpoints: the model checkpoint plus everything needed to continue exactly.

A run directory holds `checkpoints/step_00000100/`, ... Each is an ordinary lmlab checkpoint
(model.safetensors, config.json with the resolved training config in its metadata, the tokenizer
files), loadable by `lmlab generate`, plus `train_state.pt`:

    step          optimizer steps taken
    tokens        training tokens consumed
    optimizer     the optimizer's state_dict
    scaler        the fp16 gradient scaler's state_dict (or None)
    loader        the data loader's position (PackedLoader.state_dict)
    rng           torch (CPU and every CUDA device), Python and NumPy generator states
    world_size    how many processes trained it

Sharded runs (FSDP, tensor parallel) keep the model and optimizer in torch.distributed.checkpoint
format instead (see train/distributed.py), which reshards on load to any world size.

Every checkpoint is written to a temporary directory and renamed into place (lmlab/atomic.py), so
the newest directory on disk is always complete; old ones are deleted only after a newer one is
in place (keep-last-k rotation).
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_directory
from ..model.checkpoint import TRAIN_STATE_FILE, write_checkpoint_files

CHECKPOINTS = "checkpoints"
STATE_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints of a run, oldest first. Temporary directories of an
    interrupted save are hidden siblings and never match."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def rotate(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints; returns the deleted paths."""
    doomed = [p for _, p in list_checkpoints(out_dir)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# --- RNG states ------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def _tuples(x: Any) -> Any:  # torch.load may give lists where random.setstate wants tuples
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- save / load -------------------------------------------------------------------------------
def save(path: str | Path, model: torch.nn.Module, train_state: dict[str, Any],
         tokenizer_files: Iterable[str | Path] = (), metadata: dict[str, Any] | None = None,
         overwrite: bool = False, write_model: Callable | None = None) -> Path:
    """Write a resumable checkpoint of an unsharded `model` (the plain Transformer, not a DDP
    wrapper) atomically at `path`. write_model(model, directory, tokenizer_files, metadata) writes
    the weights (default: the whole model, `write_checkpoint_files`)."""
    write_model = write_model or write_checkpoint_files
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_model(model, tmp, [Path(p) for p in tokenizer_files], metadata)
        torch.save({"version": STATE_VERSION, **train_state}, tmp / TRAIN_STATE_FILE)
    return Path(path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAIN_STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {TRAIN_STATE_FILE}: it is a model checkpoint, not a resumable "
                                "training checkpoint; start a new run from it with train.init_from instead")
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own file: RNG tuples, numpy names
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{file} has train-state version {state.get('version')!r}; this lmlab reads {STATE_VERSION}")
    return state
