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


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _attention_params(cfg: ModelConfig) -> int:
    """Softmax attention with q/k/v/o projections (model/attention.py); linear attention has the same."""
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    n = _linear(d, h * hd, cfg.qkv_bias) + 2 * _linear(d, kv * hd, cfg.qkv_bias) + _linear(h * hd, d, cfg.attn_out_bias)
    if cfg.qk_norm:
        n += 2 * hd  # q_norm, k_norm: RMSNorm over head_dim, never a bias
    return n


def _mla_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention (model/mla.py): the query path (low-rank with a norm, or one
    projection), the joint KV latent + shared RoPE key, its norm, the per-head expansion, o_proj."""
    m, d, h = cfg.mla, cfg.d_model, cfg.n_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank is None:
        q = d * h * qk
    else:  # q_a_proj (biased with qkv_bias, as DeepSeek's attention_bias), q_a_layernorm, q_b_proj
        q = _linear(d, m.q_lora_rank, cfg.qkv_bias) + m.q_lora_rank + m.q_lora_rank * h * qk
    kv = (_linear(d, m.kv_lora_rank + m.qk_rope_head_dim, cfg.qkv_bias) + m.kv_lora_rank  # kv_a_proj_with_mqa, norm
          + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim))  # kv_b_proj
    return q + kv + _linear(h * m.v_head_dim, d, cfg.attn_out_bias)


def _mamba_dims(cfg: ModelConfig) -> dict[str, int]:
    s, d = cfg.ssm, cfg.d_model
    d_inner = s.expand * d
    dims = {"d_inner": d_inner, "dt_rank": s.dt_rank or -(-d // 16)}
    if s.kind == "mamba2":
        dims["n_heads"] = d_inner // s.head_dim
        dims["conv_dim"] = d_inner + 2 * s.n_groups * s.d_state
    return dims


def _ssm_params(cfg: ModelConfig) -> int:
    """Mamba (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) or Mamba-2 (in_proj to z, x, B, C
    and dt; conv1d over x, B, C; dt_bias, A_log, D per head; the gated norm; out_proj)."""
    s, d, dims = cfg.ssm, cfg.d_model, _mamba_dims(cfg)
    di = dims["d_inner"]
    if s.kind == "mamba2":
        nh, conv = dims["n_heads"], dims["conv_dim"]
        return (_linear(d, di + conv + nh, s.proj_bias) + conv * s.d_conv + (conv if s.conv_bias else 0)
                + 3 * nh + di + _linear(di, d, s.proj_bias))
    r = dims["dt_rank"]
    return (_linear(d, 2 * di, s.proj_bias) + di * s.d_conv + (di if s.conv_bias else 0)
            + di * (r + 2 * s.d_state) + _linear(r, di, True) + di * s.d_state + di + _linear(di, d, s.proj_bias))


def _mixer_params(cfg: ModelConfig, layer: int) -> int:
    kind = cfg.layer_kind(layer)
    if kind == "mamba":
        return _ssm_params(cfg)
    if kind != "linear" and cfg.mla is not None:
        return _mla_params(cfg)
    return _attention_params(cfg)


def _dense_mlp_params(cfg: ModelConfig, d_ff: int) -> int:
    n_mats = 3 if cfg.mlp_gated else 2  # (gate,) up, down
    n = n_mats * cfg.d_model * d_ff
    if cfg.mlp_bias:
        n += (n_mats - 1) * d_ff + cfg.d_model
    return n


def _mlp_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    """The feed-forward sublayer: dense, or a mixture of experts (router, experts, shared experts).
    active=True counts only the experts one token runs through (top_k routed + the shared ones)."""
    if not cfg.has_mlp(layer):
        return 0
    if not cfg.is_moe(layer):
        return _dense_mlp_params(cfg, cfg.d_ff)
    m, d = cfg.moe, cfg.d_model
    d_expert = m.d_expert or cfg.d_ff
    experts = m.top_k if active else m.n_experts
    n = d * m.n_experts + experts * (3 if cfg.mlp_gated else 2) * d * d_expert  # router, routed experts
    if m.n_shared_experts:
        n += _dense_mlp_params(cfg, m.n_shared_experts * (m.d_shared or d_expert)) + (d if m.shared_gate else 0)
    return n


def _layer_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    sublayers = 2 if cfg.has_mlp(layer) else 1
    norms = (int(cfg.pre_norm) + int(cfg.post_norm)) * sublayers * _norm_params(cfg, cfg.d_model)
    return _mixer_params(cfg, layer) + _mlp_params(cfg, layer, active) + norms


def embedding_params(cfg: ModelConfig) -> int:
    """The input lookup tables: token embedding, plus the learned position table if any."""
    n = cfg.vocab_size * cfg.d_model
    if cfg.position == "learned":
        n += cfg.max_seq_len * cfg.d_model
    return n


def count_params(cfg: ModelConfig, embeddings: bool = True, active: bool = False) -> int:
    """Exact number of parameters of `build_model(cfg)`. embeddings=False leaves out the token
    and learned position embedding tables (as Kaplan et al. do) but keeps an untied lm_head; with
    tied embeddings the output projection is the token table and so is left out too.
    active=True counts, in mixture-of-experts layers, only the top_k routed experts (and the
    shared ones) that one token passes through: the N that sets an MoE model's compute."""
    n = sum(_layer_params(cfg, i, active) for i in range(cfg.n_layers)) + _norm_params(cfg, cfg.d_model)
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # lm_head
    if embeddings:
        n += embedding_params(cfg)
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """N in "6 N FLOPs per token": every parameter a token is multiplied with, so the input
    embedding lookups (token and learned position tables, which are gathers, not matmuls) are
    left out, the output projection (vocab_size * d_model) is counted whether or not it is tied
    to the token table, and of a mixture of experts only the router, the top_k routed experts and
    the shared experts count. Norm weights and biases are included at the same 6 FLOPs each: they
    cost about that and are < 0.1% of N at any realistic size, so one uniform rule beats a special
    case.

    = count_params(cfg, embeddings=False, active=True) + (vocab_size * d_model if tie_embeddings else 0)."""
    n = count_params(cfg, embeddings=False, active=True)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model
    return n


def _context_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token that grow with the context or the state, beyond the weight matmuls:
    - softmax attention: Q K^T and A V over the attended keys (seq_len, or the window where
      smaller), 2 * n_heads * (qk_dim + v_dim) per key (PaLM's count: the full square, not the
      causal half);
    - linear attention: reading (per query head) and updating (per key/value head) the (d_k x d_v)
      state, 2 * (n_heads + n_kv_heads) * head_dim^2 per token, whatever the length;
    - Mamba: the selective scan's decay, input and readout, 6 * d_inner * d_state per token
      (Mamba-2: 6 * n_heads * head_dim * d_state), whatever the length."""
    total = 0
    for layer in range(cfg.n_layers):
        kind = cfg.layer_kind(layer)
        if kind == "mamba":
            total += 6 * _mamba_dims(cfg)["d_inner"] * cfg.ssm.d_state
        elif kind == "linear":
            total += 2 * (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim * cfg.head_dim
        else:
            window = cfg.window_of(layer)
            keys = seq_len if window is None else min(seq_len, window)
            if cfg.mla is not None:
                m = cfg.mla
                per_key = 2 * cfg.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
            else:
                per_key = 4 * cfg.n_heads * cfg.head_dim
            total += per_key * keys
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token: 2 * matmul_params(cfg) plus the context term (`_context_flops`:
    for plain attention 4 * n_heads * head_dim * the attended context, seq_len or the sliding window
    where smaller). seq_len defaults to cfg.max_seq_len. A third of `flops_per_token`."""
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if seq_len < 0:
        raise ValueError(f"seq_len must be non-negative, got {seq_len}")
    return 2 * matmul_params(cfg) + _context_flops(cfg, seq_len)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward):
        6 * matmul_params(cfg) + 12 * n_layers * n_heads * head_dim * seq_len
    for plain attention (Kaplan et al. 2020; PaLM appendix B); seq_len defaults to cfg.max_seq_len.
    Layers with a sliding window attend to min(seq_len, window) keys; MLA, linear-attention and SSM
    layers have their own context terms (`_context_flops`). Multiply by the tokens trained on for
    the total compute C ~ 6 N D."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the cache grows by per token: over the softmax-attention layers, what `cfg.cache_layout`
    stores (keys and values: 2 * n_kv_heads * head_dim; MLA: kv_lora_rank + qk_rope_head_dim),
    times bytes per element. Recurrent layers add nothing per token (see `state_bytes_per_sequence`)."""
    per_token = sum(h * d for layer in range(cfg.n_layers) for h, d in (cfg.cache_layout(layer) or ()))
    return per_token * _itemsize(dtype)


def state_bytes_per_sequence(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the fixed-size recurrent state one sequence keeps, whatever its length: linear
    attention's (d_k x d_v) matrix and d_k normalizer per key/value head, Mamba's (d_inner x d_state) SSM state
    (Mamba-2: (head_dim x d_state) per head), all kept in float32, and the last d_conv - 1 inputs of
    the causal convolution (Mamba-2: over x, B and C), in the model's `dtype`."""
    total = 0
    for layer in range(cfg.n_layers):
        kind = cfg.layer_kind(layer)
        if kind == "linear":
            total += cfg.n_kv_heads * (cfg.head_dim * cfg.head_dim + cfg.head_dim) * 4  # per key/value head
        elif kind == "mamba":
            dims = _mamba_dims(cfg)
            conv = dims["conv_dim"] if cfg.ssm.kind == "mamba2" else dims["d_inner"]
            total += dims["d_inner"] * cfg.ssm.d_state * 4 + conv * (cfg.ssm.d_conv - 1) * _itemsize(dtype)
    return total


def cache_bytes(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.bfloat16, bounded: bool = False) -> int:
    """The whole cache of one sequence of seq_len tokens in a model run in `dtype`: per-token KV of
    every attention layer plus the recurrent states. bounded=True counts a sliding-window layer's keys
    only up to its window, as a ring buffer or StreamingLLM's cache holds them."""
    total = 0
    for layer in range(cfg.n_layers):
        layout = cfg.cache_layout(layer)
        if layout is None:
            continue
        window = cfg.window_of(layer)
        tokens = min(seq_len, window) if bounded and window is not None else seq_len
        total += tokens * sum(h * d for h, d in layout)
    return total * _itemsize(dtype) + state_bytes_per_sequence(cfg, dtype)


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """The headline numbers of a config, as plain ints (for `lmlab info` and logs). FLOPs and
    the per-sequence cache size are at `seq_len` (default cfg.max_seq_len)."""
    seq_len = seq_len or cfg.max_seq_len
    total = count_params(cfg)
    kv_bf16 = kv_cache_bytes_per_token(cfg, torch.bfloat16)
    out = {
        "params": total,
        "params_non_embedding": count_params(cfg, embeddings=False),
        "params_embedding": embedding_params(cfg),
    }
    if cfg.moe is not None:
        out["params_active"] = count_params(cfg, active=True)
    out.update({
        "matmul_params": matmul_params(cfg),
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(cfg, seq_len),
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len),
        "weight_bytes_bf16": 2 * total,
        "weight_bytes_fp32": 4 * total,
        "kv_cache_bytes_per_token_bf16": kv_bf16,
        "kv_cache_bytes_per_token_fp32": kv_cache_bytes_per_token(cfg, torch.float32),
        "kv_cache_bytes_per_sequence_bf16": kv_bf16 * seq_len,  # one sequence of seq_len tokens
    })
    if cfg.recurrent:
        out["state_bytes_per_sequence_bf16"] = state_bytes_per_sequence(cfg, torch.bfloat16)
    return out


def cache_comparison(cfg: ModelConfig, seq_len: int | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """What one sequence's cache would cost if every layer of this model's shape (d_model, n_layers,
    n_heads, head_dim) were each kind: MHA, GQA (this model's n_kv_heads, or n_heads / 4), MQA, MLA
    (this model's MLA, or DeepSeek-V2's proportions: kv_lora_rank 4 head_dim, RoPE key head_dim / 2),
    sliding window (this model's window, or seq_len / 4, held as a ring buffer), linear attention and
    Mamba (this model's SSM settings, or the defaults). Rows: kind, bytes per token, fixed state bytes
    per sequence, bytes at seq_len, for a model run in `dtype`."""
    seq_len = seq_len or cfg.max_seq_len
    base = cfg.replace(layer_types=None, layer_pattern=None, sliding_window=None, mla=None, moe=None,
                       linear_attention=None, ssm=None)
    h, hd = base.n_heads, base.head_dim
    gqa = cfg.n_kv_heads if 1 < cfg.n_kv_heads < h else max(1, h // 4)
    while h % gqa:
        gqa -= 1
    mla = cfg.mla or {"kv_lora_rank": 4 * hd, "qk_nope_head_dim": hd, "qk_rope_head_dim": max(2, hd // 2 // 2 * 2),
                      "v_head_dim": hd}
    window = cfg.sliding_window or max(1, seq_len // 4)
    variants = {
        "MHA": base.replace(n_kv_heads=h),
        f"GQA ({gqa} kv heads)": base.replace(n_kv_heads=gqa),
        "MQA": base.replace(n_kv_heads=1),
        "MLA": base.replace(n_kv_heads=h, mla=mla),
        f"sliding window ({window}, {base.n_kv_heads} kv heads)": base.replace(sliding_window=window),
        "linear attention": base.replace(layer_types=["linear"] * base.n_layers),
        f"{(cfg.ssm.kind if cfg.ssm else 'mamba').capitalize()} (SSM)":
            base.replace(layer_types=["mamba"] * base.n_layers, ssm=cfg.ssm),
    }
    rows = []
    for name, variant in variants.items():
        rows.append({
            "kind": name,
            "bytes_per_token": kv_cache_bytes_per_token(variant, dtype),
            "state_bytes": state_bytes_per_sequence(variant, dtype),
            "bytes_at_seq_len": cache_bytes(variant, seq_len, dtype, bounded=True),
        })
    return rows
