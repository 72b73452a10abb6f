"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", arXiv 2405.04434, sec. 2.1).

Standard attention caches n_heads * head_dim keys and as many values per token and layer. MLA caches
one low-rank latent per token instead, and expands keys and values from it per head:

    c_kv = RMSNorm(W_DKV h)                      (kv_lora_rank dims: the cached latent)
    k_C  = W_UK c_kv,  v = W_UV c_kv             (per head: qk_nope_head_dim and v_head_dim dims)
    k_R  = RoPE(W_KR h)                          (qk_rope_head_dim dims, one key shared by all heads: cached)
    q    = W_UQ RMSNorm(W_DQ h)  (or W_Q h)      split per head into q_C (no position) and q_R (RoPE)
    score_h(t, s) = (q_C . k_C + q_R . k_R) * scale

RoPE is *decoupled*: rotating k_C would make W_UK depend on the position, and then it could not be
folded into the query (below). So position lives only in the small extra key k_R and query part q_R.

Module names are DeepSeek's / Hugging Face's (q_a_proj = W_DQ, q_a_layernorm, q_b_proj = W_UQ and its
RoPE rows, kv_a_proj_with_mqa = [W_DKV; W_KR], kv_a_layernorm, kv_b_proj = [W_UK; W_UV] per head,
o_proj), so loading a checkpoint is renaming.

Two forms of the same attention:
- naive (training, and any call without a cache): expand k_C and v for every head and key, then
  ordinary softmax attention (the sdpa kernel or the float32 reference of attention.py), with the
  same masks as `Attention` (causal, sliding window, padding, ALiBi bias, soft-capping).
- absorbed (inference with a cache; paper sec. 2.1.2, "W_UK can be absorbed into W_Q, and W_UV into
  W_O"): q_C . (W_UK c_kv) = (W_UK^T q_C) . c_kv, so each query is mapped into latent space once,
  q_lat = W_UK^T q_C, and attends over the cached latents directly; the weighted sum of latents is
  mapped out with W_UV afterwards. With q' = [q_lat; q_R] and k' = [c_kv; k_R] this is multi-query
  attention with a single key/value head, k' and v' = c_kv, so it runs through the same kernel. The
  cache holds only c_kv and k_R: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer,
  whatever the number of heads. Building k' concatenates the cached latent and RoPE key once per layer
  and step, the same order of memory traffic as reading them in attention. (When kv_b_proj is not a
  plain nn.Linear, e.g. wrapped by a LoRA adapter, the cached latents are expanded the naive way.)

The scale is 1/sqrt(qk_nope_head_dim + qk_rope_head_dim), the per-head width of q . k, unless
cfg.attn_scale overrides it (DeepSeek's YaRN checkpoints multiply it by mscale^2; hub_deepseek.py sets
it). YaRN's temperature on cos/sin comes with `rope`, as for every other layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import attention_kernel
from .cache import KVCache
from .config import ModelConfig
from .norm import Norm
from .position import apply_rope


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(..., d) with RoPE pairs interleaved, (x0, x1), (x2, x3), ..., -> the rotate-half layout
    (x0, x2, ..., x1, x3, ...), where dim i pairs with dim i + d/2 (position.apply_rope). Applied to
    both queries and keys, it leaves every q . k unchanged: it only renames the dims."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.kv_lora_rank, self.q_lora_rank = m.kv_lora_rank, m.q_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.rope_interleave = m.rope_interleave
        self.window = cfg.window_of(layer)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.qk_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.impl = "sdpa"
        H, d = cfg.n_heads, cfg.d_model
        # qkv_bias: on the projections from the residual stream, as DeepSeek's attention_bias (the full-rank q_proj,
        # and the up-projections, never have one).
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, m.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = Norm(m.q_lora_rank, "rmsnorm", m.latent_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=cfg.qkv_bias)
        self.kv_a_layernorm = Norm(m.kv_lora_rank, "rmsnorm", m.latent_norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, d, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                masks: dict, cache: KVCache | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, self.qk_dim).transpose(1, 2).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)[:, None]  # (B, 1, T, kv_lora_rank): one "head", as the cache layout says
        k_pe = k_pe[:, None]  # (B, 1, T, qk_rope_head_dim): shared by all heads
        if self.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        if rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        mask = masks[self.window]
        if cache is not None:
            c_kv, k_pe = cache.update(self.layer, c_kv, k_pe)
        # Folding W_UK / W_UV needs kv_b_proj's plain weight; wrapped by an adapter or quantized (tune/), it is
        # run as a module instead, over the cached latents: the same math, more work per step.
        if cache is not None and isinstance(self.kv_b_proj, nn.Linear):
            y = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask, alibi)
        else:
            y = self._naive(q_nope, q_pe, c_kv, k_pe, mask, alibi)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask, alibi) -> torch.Tensor:
        """k_h = [W_UK,h c_kv; k_R], v_h = W_UV,h c_kv for every key, then softmax(q_h . k_h * scale) v_h.
        Returns (B, H, T, v_head_dim)."""
        B, _, n_k, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, n_k, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return self._attend(q, k, v, mask, alibi)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, alibi) -> torch.Tensor:
        """q_lat,h = W_UK,h^T q_C,h; o_lat,h = softmax(([q_lat,h; q_R,h] . [c_kv; k_R]) * scale) c_kv;
        y_h = W_UV,h o_lat,h. Scores equal the naive form's: q_C . (W_UK c_kv) = (W_UK^T q_C) . c_kv.
        c_kv (B, 1, n_k, kv_lora_rank) and k_pe (B, 1, n_k, qk_rope_head_dim) are the whole cache.
        Returns (B, H, T, v_head_dim)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_dim], dim=1)  # (H, nope, r), (H, v, r)
        q_lat = q_nope @ w_uk  # (B, H, T, r): each head's query, read in latent space
        q = torch.cat((q_lat, q_pe), dim=-1)
        k = torch.cat((c_kv, k_pe), dim=-1)  # (B, 1, n_k, r + rope): one key head shared by all query heads
        o_lat = self._attend(q, k, c_kv, mask, alibi)  # (B, H, T, r)
        return o_lat @ w_uv.transpose(1, 2)  # (B, H, T, v)

    def _attend(self, q, k, v, mask, alibi) -> torch.Tensor:
        """Attention with k, v of H heads or 1 (the absorbed form); the conventions of `attention_kernel`."""
        return attention_kernel(q, k, v, mask, self.scale, self.softcap, alibi, self.impl)
