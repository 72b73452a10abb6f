"""Linear attention: Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention" (arXiv 2006.16236).

Softmax attention weighs value v_s by exp(q_t . k_s); linear attention replaces that similarity by
a dot product of feature maps, phi(q_t) . phi(k_s). Matrix products then reassociate, and the
causal output of position t is

    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),   S_t = sum_{s<=t} phi(k_s) v_s^T,   z_t = sum_{s<=t} phi(k_s)

so the whole past is summarized by S_t (d_k x d_v) and z_t (d_k) per head: an RNN whose state does
not grow with the context (the paper's "causal masking" and "transformers are RNNs" sections).
phi is elu(x) + 1 by default (the paper's choice: positive, so the normalizer is positive).
`LinearAttentionConfig.normalize=False` drops the denominator (y_t = phi(q_t)^T S_t * head_dim^-0.5,
as unnormalized linear attention and RetNet do; the scale keeps the output's size in check, and
under normalization it would cancel).

Two forms of the same math, chosen by the shape of the call, not by a flag:
- `chunked_linear_attention` (training and prefill, T > 1): the sequence is cut into chunks of
  `chunk_size` tokens; inside a chunk the masked quadratic form (phi(Q) phi(K)^T, lower triangle)
  runs as one matmul, and what came before the chunk enters through the state carried to its start,
  a prefix sum over the chunks' phi(K)^T V. Cost O(T C d + T d^2) instead of O(T^2 d), all matmuls.
  (The chunkwise form of Hua et al. 2022, "Transformer Quality in Linear Time", and of
  flash-linear-attention; Yang et al. 2023, "Gated Linear Attention", section 2.)
- `recurrent_linear_attention` (decoding, T = 1): S += phi(k) v^T, z += phi(k), then read with phi(q).
  Constant memory and time per token, whatever the context length.

Design decisions:
- Grouped-query attention through `n_kv_heads`: S and z depend only on keys and values, so the state
  is kept per key/value head, (B, n_kv_heads, head_dim, head_dim), and the query heads of a group
  read the same state, the way they share a KV cache in softmax attention.
- No RoPE: rotating q and k before a feature map does not give phi(q).phi(k) a relative-position
  form (the rotation does not commute with elu + 1), and the paper uses none; order enters through
  causality itself. `rope` (and `alibi`) are accepted for the common mixer signature and ignored;
  in a hybrid stack the softmax layers still get their positions.
- Sums in float32 (autocast switched off inside): S and z add up thousands of terms, and bf16 sums
  lose the late ones. The cached state is float32 whatever the model's dtype.
- Padding: a token that `masks["valid"]` marks invalid gets phi(k) = 0, so it adds nothing to S or z
  and the state after it equals the state before it (left padding from the batched generator, right
  padding of rows with fewer new tokens). Its own output is meaningless and ignored by the caller;
  eps keeps it finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LinearAttentionConfig, ModelConfig

FEATURE_MAPS = {
    "elu": lambda x: F.elu(x) + 1.0,  # Katharopoulos et al. 2020: positive, smooth, nonzero gradient for x < 0
    "relu": F.relu,
    "identity": lambda x: x,
}


def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: torch.Tensor,
                             z0: torch.Tensor, chunk_size: int, normalize: bool = True,
                             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention over T tokens, a chunk of C tokens at a time, continuing a state.

    q: phi(queries) (B, H, T, d_k); k: phi(keys) (B, H_kv, T, d_k), zero for padding; v (B, H_kv, T, d_v);
    S0 (B, H_kv, d_k, d_v) and z0 (B, H_kv, d_k): the state before the first token. H is a multiple
    of H_kv (query heads h*G .. h*G+G-1 read key/value head h). For chunk n with rows Q_n, K_n, V_n:

        S_(n) = S0 + sum_{m<n} K_m^T V_m            (state carried to the chunk's start)
        num_n = tril(Q_n K_n^T) V_n + Q_n S_(n)
        den_n = tril(Q_n K_n^T) 1   + Q_n z_(n)     (z_(n) = z0 + sum_{m<n} K_m^T 1)
        Y_n   = num_n / (den_n + eps)               (normalize=False: Y_n = num_n)

    which is y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) row by row. Returns (Y (B, H, T, d_v),
    S_T, z_T). T need not be a multiple of C: the last chunk is padded with zero keys, which add nothing.
    """
    B, H, T, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    C = min(chunk_size, T)
    N = -(-T // C)
    if N * C != T:
        pad = (0, 0, 0, N * C - T)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    qc = q.reshape(B, Hkv, G, N, C, dk)
    kc = k.reshape(B, Hkv, 1, N, C, dk)
    vc = v.reshape(B, Hkv, 1, N, C, dv)

    S_after = S0[:, :, None, None] + (kc.transpose(-1, -2) @ vc).cumsum(dim=3)  # (B, Hkv, 1, N, dk, dv)
    S_before = torch.cat((S0[:, :, None, None], S_after[:, :, :, :-1]), dim=3)
    z_after = z0[:, :, None, None] + kc.sum(dim=-2).cumsum(dim=3)  # (B, Hkv, 1, N, dk)
    scores = (qc @ kc.transpose(-1, -2)).tril()  # (B, Hkv, G, N, C, C): causal within the chunk
    y = scores @ vc + qc @ S_before
    if normalize:
        z_before = torch.cat((z0[:, :, None, None], z_after[:, :, :, :-1]), dim=3)
        den = scores.sum(dim=-1, keepdim=True) + qc @ z_before.unsqueeze(-1)  # (B, Hkv, G, N, C, 1)
        y = y / (den + eps)
    y = y.reshape(B, H, N * C, dv)[:, :, :T]
    return y, S_after[:, :, 0, -1], z_after[:, :, 0, -1]


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: torch.Tensor,
                               z0: torch.Tensor, normalize: bool = True,
                               eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RNN form, for decoding (shapes as in `chunked_linear_attention`):

        S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)
        y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)        (normalize=False: y_t = phi(q_t)^T S_t)

    The T steps' states are formed at once as prefix sums, (B, H_kv, T, d_k, d_v): constant work per
    token for the decoding step (T = 1); for long T the chunked form is the one to use. A padding
    token (phi(k) = 0) leaves S and z bit-for-bit unchanged. Returns (Y (B, H, T, d_v), S_T, z_T).
    """
    B, H, T, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    S = S0[:, :, None] + (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(dim=2)  # (B, Hkv, T, dk, dv)
    z = z0[:, :, None] + k.cumsum(dim=2)  # (B, Hkv, T, dk)
    qg = q.reshape(B, Hkv, G, T, 1, dk)
    y = (qg @ S[:, :, None]).squeeze(-2)  # (B, Hkv, G, T, dv)
    if normalize:
        den = (qg @ z[:, :, None, :, :, None]).squeeze(-1)  # (B, Hkv, G, T, 1)
        y = y / (den + eps)
    return y.reshape(B, H, T, dv), S[:, :, -1], z[:, :, -1]


class LinearAttention(nn.Module):
    """The token mixer of a "linear" layer: q/k/v/o projections named as in `Attention` (so checkpoints,
    LoRA patterns and the init read the same), feature map, and the chunked or recurrent form.
    Recurrent state in the cache: {"S": (B, n_kv_heads, head_dim, head_dim), "z": (B, n_kv_heads, head_dim)}."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        la = cfg.linear_attention or LinearAttentionConfig()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.phi = FEATURE_MAPS[la.feature_map]
        self.normalize, self.eps, self.chunk_size = la.normalize, la.eps, la.chunk_size
        # Without the denominator nothing bounds the output's size; with it a scale would cancel.
        self.scale = 1.0 if la.normalize else (cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, masks: dict,
                cache=None, alibi: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        with torch.autocast(x.device.type, enabled=False):  # the state's sums stay float32 under mixed precision
            q, k, v = self.phi(q.float()), self.phi(k.float()), v.float()
            if self.scale != 1.0:
                q = q * self.scale
            valid = masks.get("valid")
            if valid is not None:  # padding adds nothing to the state
                k = k * valid[:, None, :, None].to(k.dtype)
            state = cache.get_state(self.layer) if cache is not None else None
            if state is None:
                S0 = k.new_zeros(B, self.n_kv_heads, self.head_dim, self.head_dim)
                z0 = k.new_zeros(B, self.n_kv_heads, self.head_dim)
            else:
                S0, z0 = state["S"], state["z"]
            if T == 1:
                y, S, z = recurrent_linear_attention(q, k, v, S0, z0, self.normalize, self.eps)
            else:
                y, S, z = chunked_linear_attention(q, k, v, S0, z0, self.chunk_size, self.normalize, self.eps)
        if cache is not None:
            cache.set_state(self.layer, {"S": S, "z": z})
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
