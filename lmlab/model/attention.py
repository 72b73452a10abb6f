"""Causal self-attention: multi-head, grouped-query and multi-query (Ainslie et al. 2023) through
`n_kv_heads`, optional sliding window (Child et al. 2019; Mistral), QK-norm (Dehghani et al.
2023; Qwen3), ALiBi bias, and Gemma 2's tanh soft-capping of the attention logits.

Two implementations of the same math:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention`, which dispatches to fused flash /
  memory-efficient kernels where the hardware has them. Soft-capping cannot be expressed through
  it, so soft-capped layers always use the reference path.
- "reference": the textbook softmax(Q K^T * scale + bias + mask) V in float32, the oracle in tests.

`Attention.prefix` is an optional hook for prefix tuning (tune/prefix.py): when set, the learned keys and
values it returns are put before the sequence's own, after RoPE and after the KV cache update (so the cache never
holds them), and every query sees them. Unset (the default), the code path is the plain one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .norm import Norm
from .position import apply_rope

ATTN_IMPLS = ("sdpa", "reference")


def causal_mask(q_start: int, n_q: int, n_k: int, window: int | None,
                   key_valid: torch.Tensor | None, device=None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, n_q, n_k), True where query slot q may attend key slot k:
    causal (k <= q), inside the window (q - k < window) and not padding. A query always sees its
    own slot, so a padding query's row is never empty (which would give NaN)."""
    q = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    k = torch.arange(n_k, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, None, :n_k]) | (k == q)
    return allowed


def reference_attention(q, k, v, mask, scale: float, softcap: float | None = None,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(cap * tanh(Q K^T * scale / cap) + bias, masked) V, computed in float32."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1).float()
    v = v.repeat_interleave(n_rep, dim=1).float()
    scores = q.float() @ k.transpose(-2, -1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def attention_kernel(q, k, v, mask, scale: float, softcap: float | None = None, alibi: torch.Tensor | None = None,
                     impl: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T * scale + bias, masked) v for q (B, H, T, D) and k, v (B, H or fewer heads, S, D), through
    `impl` ("sdpa", or "reference"; soft-capping always takes the reference path, which SDPA cannot express).
    A mask of None means plain causal from slot 0 when T > 1 (SDPA's fast path) and no mask for one query."""
    T = q.shape[2]
    if mask is None and T > 1 and (impl == "reference" or softcap is not None or alibi is not None):
        mask = causal_mask(0, T, k.shape[2], None, None, q.device)
    if impl == "reference" or softcap is not None:
        return reference_attention(q, k, v, mask, scale, softcap, alibi)
    attn_mask, is_causal = mask, mask is None and T > 1
    if alibi is not None:  # SDPA takes an additive float mask: bias, -inf where masked
        attn_mask = alibi.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def prepend_prefix(k_prefix: torch.Tensor, v_prefix: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, alibi: torch.Tensor | None, n_q: int):
    """Put P learned keys/values (B, n_kv_heads, P, head_dim) before the keys/values k, v (B, n_kv_heads, n_k,
    head_dim), and widen the mask and the ALiBi bias by P leading columns that every query sees: a prefix has
    no position, so no causal or window limit and no ALiBi distance. A mask of None (plain causal from slot 0,
    or a single query that sees everything) is made explicit first, since with the prefix the keys outnumber
    the queries and the kernel's `is_causal` would align the triangle wrongly. Returns (k, v, mask, alibi)."""
    P = k_prefix.shape[2]
    if mask is None and n_q > 1:
        mask = causal_mask(0, n_q, k.shape[2], None, None, k.device)
    if mask is not None:
        mask = torch.cat((mask.new_ones(*mask.shape[:-1], P), mask), dim=-1)
    if alibi is not None:
        alibi = torch.cat((alibi.new_zeros(*alibi.shape[:-1], P), alibi), dim=-1)
    k = torch.cat((k_prefix.to(k.dtype), k), dim=2)
    v = torch.cat((v_prefix.to(v.dtype), v), dim=2)
    return k, v, mask, alibi


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window_of(layer)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.softcap = cfg.attn_softcap
        self.impl = "sdpa"
        # Prefix tuning's hook: batch size -> (keys, values), each (B, n_kv_heads, P, head_dim), or None for no
        # prefix. tune/prefix.py installs an nn.Module (LayerPrefix), so the prefixes are the model's parameters.
        self.prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps, unit_offset=cfg.norm_unit_offset)
            self.k_norm = Norm(cfg.head_dim, "rmsnorm", cfg.norm_eps, unit_offset=cfg.norm_unit_offset)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                masks: dict, cache: KVCache | None = None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if getattr(cache, "packed", False):  # the engine's packed step: it runs attention per group of its rows
            y = cache.attend(self.layer, q, self.window, self.attend)
        else:
            mask = masks[self.window]  # None: plain causal from slot 0, or one query seeing everything
            prefix = self.prefix(B) if self.prefix is not None else None
            if prefix is not None:
                k, v, mask, alibi = prepend_prefix(*prefix, k, v, mask, alibi, T)
            y = self.attend(q, k, v, mask, alibi)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               alibi: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's attention (its implementation, scale and soft-cap) on q, k, v: see `attention_kernel`."""
        return attention_kernel(q, k, v, mask, self.scale, self.softcap, alibi, self.impl)
