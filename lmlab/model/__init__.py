"""lmlab.model: the configurable transformer, its cache, and checkpoint conversion."""

from .cache import KVCache
from .config import ModelConfig, RopeScaling
from .transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = [
    "IGNORE_INDEX", "KVCache", "ModelConfig", "ModelOutput", "RopeScaling", "Transformer", "build_model",
]

# lmlab's checkpoint directory format and config-only counts
from .checkpoint import (  # noqa: E402
    CheckpointConfigError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    atomic_directory,
    is_checkpoint,
    load_checkpoint,
    read_config,
    read_metadata,
    save_checkpoint,
    write_checkpoint_files,
)
from .counting import (  # noqa: E402
    count_params,
    flops_per_token,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    matmul_params,
    summary,
)
from .hub import SUPPORTED_MODEL_TYPES, hf_config_to_lmlab, load_hf, save_hf  # noqa: E402
from .loading import load, read_any_config  # noqa: E402

__all__ += [
    "SUPPORTED_MODEL_TYPES", "hf_config_to_lmlab", "load_hf", "save_hf", "load", "read_any_config",
    "CheckpointConfigError", "CheckpointCorruptError", "CheckpointError",
    "CheckpointMismatchError", "CheckpointNotFoundError", "atomic_directory", "is_checkpoint",
    "load_checkpoint", "read_config", "read_metadata", "save_checkpoint", "write_checkpoint_files",
    "count_params", "flops_per_token", "forward_flops_per_token", "kv_cache_bytes_per_token",
    "matmul_params", "summary",
]
