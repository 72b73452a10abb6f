"""lmlab.model: the configurable transformer, its cache, and checkpoint conversion."""

from .cache import KVCache
from .config import ModelConfig, RopeScaling
from .transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = ["IGNORE_INDEX", "KVCache", "ModelConfig", "ModelOutput", "RopeScaling", "Transformer", "build_model"]
