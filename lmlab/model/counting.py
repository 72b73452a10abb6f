"""Parameter, FLOP and KV-cache counts from a ModelConfig alone, without building the model.

`count_params` mirrors `transformer.py` module by module and is tested to equal
`sum(p.numel())` of the built model over many configs, so a change to the model that is not
reflected here fails a test.

FLOPs follow Kaplan et al. 2020 (sec. 2.1) with the attention term of PaLM (Chowdhery et al.
2022, appendix B): training costs 6 FLOPs per parameter per token (2 forward, 4 backward) plus
12 * n_layers * n_heads * head_dim * seq_len for the attention scores and the weighted sum
(Q K^T and A V, each 2 * seq_len * n_heads * head_dim FLOPs per token forward, times 3 for
training; the full seq_len x seq_len score matrix is counted, as in PaLM, not the causal half).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig


def _norm_params(cfg: ModelConfig, dim: int) -> int:
    # Norm only creates a bias for LayerNorm with norm_bias (see norm.py)
    return dim * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def _layer_params(cfg: ModelConfig) -> int:
    d, hd, h, kv, ff = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v, o weights
    if cfg.qkv_bias:
        attn += h * hd + 2 * kv * hd
    if cfg.attn_out_bias:
        attn += d
    if cfg.qk_norm:
        attn += 2 * hd  # q_norm, k_norm: RMSNorm over head_dim, never a bias
    n_mats = 3 if cfg.mlp_gated else 2  # (gate,) up, down
    mlp = n_mats * d * ff
    if cfg.mlp_bias:
        mlp += (n_mats - 1) * ff + d
    norms = (int(cfg.pre_norm) + int(cfg.post_norm)) * 2 * _norm_params(cfg, d)
    return attn + mlp + norms


def embedding_params(cfg: ModelConfig) -> int:
    """The input lookup tables: token embedding, plus the learned position table if any."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.position == "learned":
        n += cfg.max_seq_len * cfg.d_model
    return n


def count_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Exact number of parameters of `build_model(cfg)`. embeddings=False leaves out the token
    and learned position embedding tables (as Kaplan et al. do) but keeps an untied lm_head; with
    tied embeddings the output projection is the token table and so is left out too."""
    n = cfg.n_layers * _layer_params(cfg) + _norm_params(cfg, cfg.d_model)  # blocks, final norm
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # lm_head
    if embeddings:
        n += embedding_params(cfg)
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """N in "6 N FLOPs per token": every parameter except the input embedding lookups (token and
    learned position tables, which are gathers, not matmuls), with the output projection
    (vocab_size * d_model) counted whether or not it is tied to the token table, since the
    matmul happens either way. Norm weights and biases are included at the same 6 FLOPs each:
    they cost about that (a multiply or add forward, a few backward) and are < 0.1% of N at
    any realistic size, so one uniform rule beats a special case.

    = count_params(cfg, embeddings=False) + (vocab_size * d_model if tie_embeddings else 0)."""
    n = count_params(cfg, embeddings=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


def _attention_context(cfg: ModelConfig, seq_len: int) -> int:
    """Sum over layers of the keys one query attends to: seq_len, or the window where smaller
    (a sliding-window layer never computes scores past its window)."""
    total = 0
    for layer in range(cfg.n_layers):
        window = cfg.window_of(layer)
        total += seq_len if window is None else min(seq_len, window)
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token: 2 * matmul_params(cfg) + 4 * n_heads * head_dim * (sum over
    layers of the attended context: seq_len, or the sliding window where smaller). seq_len
    defaults to cfg.max_seq_len. A third of `flops_per_token`."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len < 0:
        raise ValueError(f"seq_len must be non-negative, got {seq_len}")
    return 2 * matmul_params(cfg) + 4 * cfg.n_heads * cfg.head_dim * _attention_context(
        cfg, seq_len
    )


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward):
        6 * matmul_params(cfg) + 12 * n_layers * n_heads * head_dim * seq_len
    (Kaplan et al. 2020; PaLM appendix B). seq_len defaults to cfg.max_seq_len. Layers with a
    sliding window attend to min(seq_len, window) keys, which replaces seq_len for them.
    Multiply by the tokens trained on for the total compute C ~ 6 N D."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the KV cache grows by per token: 2 (keys and values) * n_layers * n_kv_heads *
    head_dim * bytes per element."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """The headline numbers of a config, as plain ints (for `lmlab info` and logs). FLOPs and
    the per-sequence KV size are at `seq_len` (default cfg.max_seq_len)."""
    seq_len = seq_len or cfg.max_seq_len
    total = count_params(cfg)
    kv_bf16 = kv_cache_bytes_per_token(cfg, torch.bfloat16)
    return {
        "params": total,
        "params_non_embedding": count_params(cfg, embeddings=False),
        "params_embedding": embedding_params(cfg),
        "matmul_params": matmul_params(cfg),
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(cfg, seq_len),
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len),
        "weight_bytes_bf16": 2 * total,
        "weight_bytes_fp32": 4 * total,
        "kv_cache_bytes_per_token_bf16": kv_bf16,
        "kv_cache_bytes_per_token_fp32": kv_cache_bytes_per_token(cfg, torch.float32),
        "kv_cache_bytes_per_sequence_bf16": kv_bf16 * seq_len,  # one sequence of seq_len tokens
    }
