"""lmlab.model: the configurable transformer, its KV cache, checkpoints (lmlab's own and Hugging
Face's), and counts of parameters, FLOPs and cache bytes. Imports nothing else from lmlab."""

from .cache import KVCache, SinkCache
from .checkpoint import (
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
from .config import LinearAttentionConfig, MLAConfig, ModelConfig, MoEConfig, RopeScaling, SSMConfig
from .counting import (
    cache_bytes,
    cache_comparison,
    count_params,
    flops_per_token,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    matmul_params,
    state_bytes_per_sequence,
    summary,
)
from .hub import SUPPORTED_MODEL_TYPES, hf_config_to_lmlab, load_hf, save_hf
from .loading import load, read_any_config
from .transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = [
    "IGNORE_INDEX", "KVCache", "SinkCache", "ModelConfig", "ModelOutput", "RopeScaling", "Transformer", "build_model",
    "LinearAttentionConfig", "MLAConfig", "MoEConfig", "SSMConfig",
    "CheckpointConfigError", "CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError",
    "CheckpointNotFoundError", "atomic_directory", "is_checkpoint", "load_checkpoint", "read_config",
    "read_metadata", "save_checkpoint", "write_checkpoint_files",
    "count_params", "flops_per_token", "forward_flops_per_token", "kv_cache_bytes_per_token",
    "matmul_params", "summary", "cache_bytes", "cache_comparison", "state_bytes_per_sequence",
    "SUPPORTED_MODEL_TYPES", "hf_config_to_lmlab", "load_hf", "save_hf", "load", "read_any_config",
]
