"""lmlab.infer: sampling and generation on top of lmlab.model (never lmlab.train).

`sampling` holds the pure, batched next-token functions that the serving engine reuses;
`generate` the KV-cached decode loop: batched `generate` and token-by-token `stream`.
"""

from .generate import Completion, IncrementalDetokenizer, StreamChunk, generate, stream
from .sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    process_logits,
    sample_from_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "Completion",
    "IncrementalDetokenizer",
    "SamplingParams",
    "StreamChunk",
    "apply_repetition_penalty",
    "apply_temperature",
    "generate",
    "min_p_filter",
    "process_logits",
    "sample_from_logits",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
