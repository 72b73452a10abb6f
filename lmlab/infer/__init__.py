"""lmlab.infer: sampling, generation and serving on top of lmlab.model (never lmlab.train).

`sampling` holds the pure, batched next-token functions that the serving engine reuses;
`generate` the KV-cached decode loop: batched `generate` and token-by-token `stream`;
`engine` the serving engine (paged KV cache in `paged`, continuous batching, prefix caching,
speculative decoding with the rules of `speculative`, constrained output through `constrained`);
`server` the OpenAI-compatible HTTP API over the engine (needs the `serve` extra).
"""

from .engine import Engine, EngineConfig, EngineStats, Request
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
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Request",
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
