"""lmlab's own checkpoint: one directory, written atomically, verified on load.

Layout of a checkpoint directory:

    model.safetensors   the weights (state_dict names, stored dtype); its header metadata holds
                        "format": "pt", "lmlab_format_version": "1" and "lmlab_crc32": a JSON
                        object {tensor name: CRC32 of the tensor's raw little-endian bytes}
    config.json         {"lmlab_format_version": 1, <ModelConfig.to_dict() fields>,
                         "lmlab_metadata": {free-form JSON from the caller}}
    tokenizer files     copied in as given (tokenizer.json, tokenizer.model, ...), when any
    train_state.pt      added by training code, written through the same `atomic_directory`

Why each piece:
- safetensors, not pickle: loading runs no code, and tensors can be read one at a time from a
  memory map, so a big model is materialized once, on the device it goes to.
- Per-tensor CRC32: safetensors validates the header and the file length, but a flipped bit in
  the data region loads silently. The checksum catches it and names the tensor.
- `atomic_directory`: the checkpoint is written into a hidden sibling directory and renamed into
  place only once every file is written and fsynced, so a crash or an exception mid-save never
  leaves a half-written checkpoint where a good one was.

Training code that adds its own files writes them in the same transaction:

    with atomic_directory(path) as tmp:
        write_checkpoint_files(model, tmp, tokenizer_files, metadata)
        torch.save(train_state, tmp / TRAIN_STATE_FILE)
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from .config import ModelConfig
from .transformer import Transformer

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"  # written by training code, listed here to reserve the name
RESERVED_FILES = (WEIGHTS_FILE, CONFIG_FILE, TRAIN_STATE_FILE)

# keys lmlab adds to config.json next to the ModelConfig fields
VERSION_KEY = "lmlab_format_version"
METADATA_KEY = "lmlab_metadata"
# key of the per-tensor checksums in the safetensors header metadata
CRC_KEY = "lmlab_crc32"

# safetensors dtype names lmlab loads weights from; integer, bool and fp8 tensors are rejected
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

_RESAVE = "re-save it from the model, or restore it from the last good checkpoint"


# --- errors ---------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint cannot be loaded. `path` is the offending file (or directory), `tensor` the
    offending tensor where one is to blame. Subclasses say which kind of problem it is."""

    def __init__(self, message: str, path: str | Path | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.tensor = tensor


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint directory, or a file it must contain, does not exist."""


class CheckpointConfigError(CheckpointError):
    """config.json is not valid JSON, not an lmlab checkpoint config, of a newer format, or
    describes an invalid ModelConfig."""


class CheckpointCorruptError(CheckpointError):
    """model.safetensors is truncated, has a damaged header, or fails its checksums."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the config: a tensor is missing, unexpected, of the wrong shape, or
    not of a floating dtype."""


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a directory whose config.json marks it as an lmlab checkpoint."""
    config = Path(path) / CONFIG_FILE
    try:
        d = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and VERSION_KEY in d


# --- save -----------------------------------------------------------------------------------
def _crc32(t: torch.Tensor) -> int:
    """CRC32 of a CPU tensor's raw bytes, read in place (no copy for a contiguous tensor)."""
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _tensors_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(
                f"tensor {name!r} is on the meta device (never materialized); nothing to save"
            )
        # Tied weights are never two state_dict entries in lmlab (a tied model has no lm_head);
        # two names on one storage means tying was done by hand, which the config cannot express.
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in owner:
                raise ValueError(
                    f"tensors {owner[ptr]!r} and {name!r} share memory; lmlab ties the embeddings "
                    "through ModelConfig.tie_embeddings, set that instead of tying by hand"
                )
            owner[ptr] = name
        # One device-to-host copy for GPU models; CPU tensors are written in place.
        tensors[name] = t.to("cpu").contiguous()
    return tensors


def write_checkpoint_files(
    model: Transformer,
    directory: str | Path,
    tokenizer_files: Iterable[str | Path] = (),
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write model.safetensors, config.json and copies of the tokenizer files into an existing
    `directory`, without atomicity: use inside `atomic_directory`, or call `save_checkpoint`."""
    directory = Path(directory)
    sources = [Path(p) for p in tokenizer_files]
    names = [p.name for p in sources]
    for src in sources:  # check the inputs before writing gigabytes of weights
        if not src.is_file():
            raise FileNotFoundError(f"tokenizer file {src} does not exist (or is not a file)")
        if src.name in RESERVED_FILES:
            raise ValueError(
                f"tokenizer file {src} would overwrite the checkpoint's own {src.name}"
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"several tokenizer files are named {duplicates}; their copies would collide"
        )
    config = {
        VERSION_KEY: FORMAT_VERSION,
        **model.cfg.to_dict(),
        METADATA_KEY: dict(metadata or {}),
    }
    try:
        config_text = json.dumps(config, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint metadata and ModelConfig.meta must be plain JSON values: {e}"
        ) from e

    tensors = _tensors_for_saving(model)
    crcs = {name: _crc32(t) for name, t in tensors.items()}
    header = {
        "format": "pt",
        VERSION_KEY: str(FORMAT_VERSION),
        CRC_KEY: json.dumps(crcs, separators=(",", ":")),
    }
    save_file(tensors, directory / WEIGHTS_FILE, metadata=header)
    (directory / CONFIG_FILE).write_text(config_text)
    for src in sources:
        shutil.copyfile(src, directory / src.name)


def save_checkpoint(
    model: Transformer,
    path: str | Path,
    tokenizer_files: Iterable[str | Path] = (),
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save `model` (its weights in their current dtype, and its config) as the checkpoint
    directory `path`, atomically; copy `tokenizer_files` in under their own names. `metadata` is
    free-form JSON stored in config.json (read it back with `read_metadata`). Anything but an
    empty directory at `path` is replaced only with overwrite=True. Returns the path."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_checkpoint_files(model, tmp, tokenizer_files, metadata)
    return Path(path)


# --- load -----------------------------------------------------------------------------------
def _read_config_dict(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist", path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointNotFoundError(
            f"{file} is missing; restore it from the last good checkpoint or re-save the model "
            "(a Hugging Face model directory must be converted first: `lmlab convert`)",
            file,
        )
    try:
        d = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointConfigError(f"{file} is not valid JSON ({e}); {_RESAVE}", file) from e
    if not isinstance(d, dict):
        raise CheckpointConfigError(
            f"{file} holds a JSON {type(d).__name__}, not an object; {_RESAVE}", file
        )
    version = d.get(VERSION_KEY)
    if version is None:
        raise CheckpointConfigError(
            f"{file} has no {VERSION_KEY!r}: it is not an lmlab checkpoint config. A Hugging Face "
            "checkpoint must be converted with `lmlab convert`; a bare ModelConfig file loads with "
            "ModelConfig.load",
            file,
        )
    if not isinstance(version, int) or version < 1:
        raise CheckpointConfigError(
            f"{file}: {VERSION_KEY}={version!r} is not a valid version; {_RESAVE}", file
        )
    if version > FORMAT_VERSION:
        raise CheckpointConfigError(
            f"{file} is checkpoint format {version}, newer than this lmlab reads "
            f"({FORMAT_VERSION}); upgrade lmlab",
            file,
        )
    return d, file


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the checkpoint at `path` (a checkpoint directory or its config.json),
    without touching the weights."""
    d, file = _read_config_dict(path)
    fields = {k: v for k, v in d.items() if k not in (VERSION_KEY, METADATA_KEY)}
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointConfigError(f"{file} does not describe a valid model: {e}", file) from e


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The free-form metadata that `save_checkpoint(..., metadata=...)` stored."""
    d, file = _read_config_dict(path)
    meta = d.get(METADATA_KEY, {})
    if not isinstance(meta, dict):
        raise CheckpointConfigError(f"{file}: {METADATA_KEY} is not a JSON object; {_RESAVE}", file)
    return meta


def _check_length(file: Path) -> None:
    """Tell a truncated file apart from a damaged one before safetensors' terser errors: the
    first 8 bytes give the header length, the header gives where the data ends."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointCorruptError(
                f"{file} is truncated ({size} bytes, too short for a safetensors header); "
                f"{_RESAVE}",
                file,
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointCorruptError(
                f"{file} is truncated or its header is damaged: the header claims {n} bytes "
                f"but the file has {size} in all; {_RESAVE}",
                file,
            )
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise CheckpointCorruptError(
                f"{file} has a damaged header ({e}); {_RESAVE}", file
            ) from e
    expected = 8 + n + end
    if size < expected:
        raise CheckpointCorruptError(
            f"{file} is truncated: {size} bytes, but its header describes {expected}; {_RESAVE}",
            file,
        )


def _checksums(f: Any, file: Path) -> dict[str, int]:
    meta = f.metadata() or {}
    if CRC_KEY not in meta:
        raise CheckpointCorruptError(
            f"{file} carries no {CRC_KEY!r} checksums, so it cannot be verified (it was not "
            "written by save_checkpoint); load it with verify=False, or re-save it with "
            "save_checkpoint",
            file,
        )
    try:
        crcs = json.loads(meta[CRC_KEY])
        return {str(k): int(v) for k, v in crcs.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointCorruptError(
            f"{file}: the {CRC_KEY!r} checksums are damaged ({e}); {_RESAVE}", file
        ) from e


def _check_structure(f: Any, file: Path, expected: dict[str, torch.Size]) -> None:
    """Compare the file's tensor names, shapes and dtypes (header only) with the model's."""
    found = set(f.keys())
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointMismatchError(
            f"{file} lacks tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} that the "
            f"config requires ({len(missing)} missing): the weights do not match config.json; "
            f"{_RESAVE}",
            file,
            missing[0],
        )
    unexpected = sorted(found - set(expected))
    if unexpected:
        raise CheckpointMismatchError(
            f"{file} has tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} that "
            f"the config has no place for: the weights do not match config.json; {_RESAVE}",
            file,
            unexpected[0],
        )
    for name, shape in expected.items():
        sl = f.get_slice(name)
        stored_shape, stored_dtype = tuple(sl.get_shape()), sl.get_dtype()
        if stored_shape != tuple(shape):
            raise CheckpointMismatchError(
                f"{file}: tensor {name!r} has shape {list(stored_shape)} but config.json implies "
                f"{list(shape)}; was config.json edited after saving? {_RESAVE}",
                file,
                name,
            )
        if stored_dtype not in FLOAT_DTYPES:
            raise CheckpointMismatchError(
                f"{file}: tensor {name!r} has dtype {stored_dtype}, not one of the floating types "
                f"{sorted(FLOAT_DTYPES)} lmlab loads weights from; {_RESAVE}",
                file,
                name,
            )


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Transformer:
    """Load the checkpoint directory `path` into a Transformer on `device`.

    dtype: cast the weights to it; None keeps the stored dtype. verify: check every tensor's
    CRC32 (costs one pass over the bytes; verify=False skips it, the structural checks remain).
    The model is built on the meta device and each tensor is read from the memory-mapped file and
    moved straight to `device`, so weights are materialized once. Raises a CheckpointError
    subclass naming the file (and the tensor) for anything wrong.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype} is not a floating type; use e.g. torch.bfloat16 or torch.float32"
        )
    path = Path(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist", path)
    cfg = read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointNotFoundError(
            f"{file} is missing; restore it from the last good checkpoint, or re-save or "
            "re-convert (`lmlab convert`) the model",
            file,
        )
    _check_length(file)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            _check_structure(f, file, expected)
            crcs = _checksums(f, file) if verify else {}
            for name in tqdm(expected, desc=f"loading {path.name}", unit="tensor", leave=False,
                             disable=None):  # a bar on a terminal, silent in logs and tests
                t = f.get_tensor(name)
                if verify:
                    if name not in crcs:
                        raise CheckpointCorruptError(
                            f"{file} records no checksum for tensor {name!r}; {_RESAVE}", file, name
                        )
                    if _crc32(t) != crcs[name]:
                        raise CheckpointCorruptError(
                            f"{file}: tensor {name!r} fails its CRC32 check, its bytes are "
                            f"corrupted; {_RESAVE}",
                            file,
                            name,
                        )
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
                del t  # free the CPU copy before reading the next tensor
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged file
        raise CheckpointCorruptError(
            f"{file} is damaged or truncated ({e}); {_RESAVE}", file
        ) from e
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer added to Transformer must be rebuilt here
        raise RuntimeError(
            f"load_checkpoint left {left} on the meta device; it needs updating for them"
        )
    return model
