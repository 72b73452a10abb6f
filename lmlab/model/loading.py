"""One entry point for any checkpoint directory: lmlab's own format or a Hugging Face one.

An lmlab checkpoint's config.json carries `lmlab_format_version`; a Hugging Face one carries
`model_type`. Everything that takes `--model DIR` goes through here, so users never have to
convert before they can generate, inspect or evaluate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import CONFIG_FILE, CheckpointNotFoundError, is_checkpoint, load_checkpoint, read_config
from .config import ModelConfig
from .hub import hf_config_to_lmlab, load_hf
from .transformer import Transformer


def _is_hf(path: Path) -> bool:
    try:
        return "model_type" in json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False


def _kind(path: str | Path) -> str:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path} is not a directory; give a checkpoint directory", path)
    if is_checkpoint(path):
        return "lmlab"
    if _is_hf(path):
        return "hf"
    raise CheckpointNotFoundError(
        f"{path / CONFIG_FILE} is neither an lmlab config (no lmlab_format_version) nor a Hugging "
        "Face config (no model_type); point at a directory written by lmlab or by transformers",
        path / CONFIG_FILE,
    )


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load the model in an lmlab or Hugging Face checkpoint directory (dtype None: as stored)."""
    if _kind(path) == "lmlab":
        return load_checkpoint(path, device=device, dtype=dtype)
    return load_hf(path, device=device, dtype=dtype)


def read_any_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an lmlab or Hugging Face checkpoint directory, without reading weights."""
    if _kind(path) == "lmlab":
        return read_config(path)
    return hf_config_to_lmlab(json.loads((Path(path) / CONFIG_FILE).read_text()))
