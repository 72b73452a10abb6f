"""The decoder-only transformer: one module whose every variant is a `ModelConfig` field.

    x = embed(ids) * embedding_scale (+ position embedding)
    for each block:  x = x + post_norm(mixer(pre_norm(x)))
                     x = x + post_norm(mlp(pre_norm(x)))
    logits = softcap(final_norm(x) @ W_out)

The mixer of a layer is its `cfg.layer_kind`: softmax attention ("full", "sliding"; multi-head
latent attention when `cfg.mla` is set), linear attention ("linear") or a state-space layer
("mamba"); the MLP is dense or a mixture of experts (`cfg.moe`). Hybrid stacks mix kinds per layer.

Parameter names follow the Hugging Face Llama layout (q_proj, gate_proj, ...), so checkpoint
conversion is mostly renaming and LoRA target patterns read the same as elsewhere.
Build big models on the meta device and initialize once: `build_model(cfg, device=...)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ATTN_IMPLS, Attention, causal_mask
from .cache import KVCache
from .config import ModelConfig
from .loss import linear_cross_entropy
from .mlp import MLP
from .norm import Norm
from .position import alibi_slopes, rope_cos_sin, sinusoidal_embedding

IGNORE_INDEX = -100


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # None when forward(..., return_logits=False)
    loss: torch.Tensor | None = None  # in training mode it includes aux_loss
    aux_loss: torch.Tensor | None = None  # MoE load-balancing + router z-loss, already weighted; None without


def token_mixer(cfg: ModelConfig, layer: int) -> nn.Module:
    """The module that mixes information across positions in this layer. Every kind takes
    (x, rope, masks, cache, alibi) and returns (B, T, d_model)."""
    kind = cfg.layer_kind(layer)
    if kind == "linear":
        from .linear_attention import LinearAttention
        return LinearAttention(cfg, layer)
    if kind == "mamba":
        from .ssm import Mamba, Mamba2
        return (Mamba2 if cfg.ssm.kind == "mamba2" else Mamba)(cfg, layer)
    if cfg.mla is not None:
        from .mla import MultiHeadLatentAttention
        return MultiHeadLatentAttention(cfg, layer)
    return Attention(cfg, layer)


def channel_mixer(cfg: ModelConfig, layer: int) -> nn.Module | None:
    """The per-token feed-forward sublayer: a mixture of experts, a dense MLP, or none."""
    if not cfg.has_mlp(layer):
        return None
    if cfg.is_moe(layer):
        from .moe import MoE
        return MoE(cfg, layer)
    return MLP(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        # Named `attn` for every token mixer, SSMs included, so module paths (and LoRA patterns) keep one shape.
        self.attn_norm = Norm.from_config(cfg) if cfg.pre_norm else None
        self.attn = token_mixer(cfg, layer)
        self.attn_post_norm = Norm.from_config(cfg) if cfg.post_norm else None
        has_mlp = cfg.has_mlp(layer)
        self.mlp_norm = Norm.from_config(cfg) if cfg.pre_norm and has_mlp else None
        self.mlp = channel_mixer(cfg, layer)
        self.mlp_post_norm = Norm.from_config(cfg) if cfg.post_norm and has_mlp else None

    def forward(self, x, rope, masks, cache=None, alibi=None):
        h = self.attn_norm(x) if self.attn_norm is not None else x
        h = self.attn(h, rope, masks, cache, alibi)
        x = x + (self.attn_post_norm(h) if self.attn_post_norm is not None else h)
        if self.mlp is None:
            return x
        h = self.mlp_norm(x) if self.mlp_norm is not None else x
        h = self.mlp(h)
        return x + (self.mlp_post_norm(h) if self.mlp_post_norm is not None else h)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = Norm.from_config(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._rope_tables: dict = {}  # (device, dtype) -> (cos, sin) for positions [0, n): see _rope
        self.init_weights()

    # --- initialization --------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for every matrix; output projections of the residual branches
        scaled by 1/sqrt(2 n_layers) (GPT-2), so the residual stream's variance does not grow
        with depth; biases zero; norms at identity. Free on the meta device."""
        cfg = self.cfg
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, cfg.init_std)
            elif isinstance(module, Norm):
                module.reset_parameters()
        for module in self.modules():  # layers whose parameters need more than the above (experts, SSMs)
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights(cfg.init_std, residual_std)

    def set_attn_impl(self, impl: str) -> Transformer:
        """Switch every layer between "sdpa" (fused kernels) and "reference" (plain math)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attention implementation {impl!r}; choose one of {ATTN_IMPLS}")
        for block in self.blocks:
            if hasattr(block.attn, "impl"):
                block.attn.impl = impl
        return self

    # --- forward ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_logits: bool = True) -> ModelOutput:
        """ids (B, T) -> logits (B, T, vocab) and, with targets (B, T), the mean next-token
        cross-entropy over targets != -100 (targets are already shifted: targets[t] = ids[t+1]).

        cache: a KVCache to read earlier keys/values from and append these to.
        positions: (B, T) token positions; by default counted from the cache and the mask.
        attention_mask: (B, T), 1 for real tokens and 0 for (left) padding; or a boolean
            (B, 1, T, T), True where query t may attend key s, for packed training sequences
            whose documents must not see each other (it is AND-ed with the causal and sliding
            window masks; pass `positions` that restart at each document).
        return_logits: with targets, False skips the logits (ModelOutput.logits is None) and
            computes the loss a chunk of tokens at a time, fused with the output projection
            (model/loss.py): same loss and gradients, far less memory traffic. Training uses it.
        """
        h = self.hidden_states(ids, cache, positions, attention_mask)
        aux = self.aux_loss()
        logits = loss = None
        if targets is not None and not return_logits:
            weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
            loss = linear_cross_entropy(h, weight, targets, self.cfg.logit_softcap, IGNORE_INDEX)
        else:
            logits = self.logits(h)
            if targets is not None:
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if loss is not None and aux is not None and self.training:
            loss = loss + aux  # what is optimized; evaluation (eval mode) reports the plain cross-entropy
        return ModelOutput(logits, loss, aux)

    def aux_loss(self) -> torch.Tensor | None:
        """The sum of the auxiliary losses (MoE balancing, router z-loss) of the last forward pass, or None."""
        terms = [block.mlp.aux_loss for block in self.blocks
                 if block.mlp is not None and getattr(block.mlp, "aux_loss", None) is not None]
        return torch.stack(terms).sum() if terms else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, d_model) -> logits, soft-capped when configured."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        if self.cfg.logit_softcap is not None:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, d_model) that the output head reads."""
        cfg = self.cfg
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        pair_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            if cache is not None:
                raise ValueError("a (B, 1, T, T) attention mask is for packed training sequences and cannot be "
                                 "combined with a KV cache; pass a (B, T) padding mask instead")
            if attention_mask.shape[-2:] != (T, T) or attention_mask.shape[1] != 1:
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not fit ids of "
                                 f"shape {(B, T)}: expected (B, T) or (B, 1, T, T)")
            pair_mask, attention_mask = attention_mask.to(torch.bool), None
        if pair_mask is not None and cfg.recurrent:
            raise ValueError("packed sequences with a document mask cannot go through recurrent layers (linear "
                             "attention, SSM), whose state would carry across documents; pack without doc masks "
                             "(data.doc_mask = false) or train on unpacked sequences")
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if cache is not None:
            cache.reserve(T, valid)
            key_valid = cache.valid if cache.has_padding else None
            n_before = cache.n_tokens
        else:
            key_valid = None if valid is None or bool(valid.all()) else valid
            n_before = torch.zeros(B, dtype=torch.long, device=ids.device)
        bound_known = positions is None  # positions never exceed slots: start + T bounds them
        if cfg.position == "learned":
            last = start + T - 1 if bound_known else int(positions.max())
            if last >= cfg.max_seq_len:
                raise ValueError(
                    f"position {last} is beyond max_seq_len={cfg.max_seq_len} of this model's "
                    "learned position embeddings; shorten the input"
                )
        if positions is None:
            positions = self._positions(n_before, valid, B, T, ids.device)

        x = self.embed(ids)
        if cfg.embedding_scale is not None:
            # in the activation dtype, as the reference implementations round it
            x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif cfg.position == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.d_model).to(x.dtype)

        rope = None
        if cfg.position == "rope":
            rope = self._rope(positions, start + T if bound_known else int(positions.max()) + 1, x.dtype)
        n_k = start + T
        alibi = None
        if cfg.position == "alibi":
            slots = torch.arange(n_k, device=ids.device)
            distance = slots[None, :] - slots[start:, None]  # key minus query: <= 0 where visible
            alibi = alibi_slopes(cfg.n_heads).to(ids.device)[:, None, None] * distance  # (H, T, n_k)
        masks = {}
        if cfg.recurrent:  # which of this call's tokens are real (B, T), or None: padding never enters a state
            masks["valid"] = (cache.valid[:, start:start + T] if cache.has_padding else None) if cache is not None \
                else key_valid
        # the serving engine's packed step (infer/paged.py) masks each group of its rows itself
        layers = () if getattr(cache, "packed", False) else range(cfg.n_layers)
        for layer in layers:
            window = cfg.window_of(layer)
            if window not in masks:
                effective = window if window is not None and window < n_k else None
                if pair_mask is not None:
                    masks[window] = causal_mask(0, T, T, effective, None, ids.device) & pair_mask
                elif key_valid is None and effective is None and (start == 0 or T == 1):
                    masks[window] = None  # plain causal: let the kernel use its fast path
                else:
                    masks[window] = causal_mask(start, T, n_k, effective, key_valid, ids.device)

        for block in self.blocks:
            x = block(x, rope, masks, cache, alibi)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _rope(self, positions: torch.Tensor, bound: int, dtype: torch.dtype):
        """cos/sin for `positions` (all < bound), looked up in a table computed once per device
        and dtype and grown on demand: one gather per step instead of recomputing the angles.
        Dynamic NTK depends on the length, so it is computed afresh each call."""
        cfg = self.cfg
        if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic":
            return rope_cos_sin(cfg, positions, dtype)
        key = (positions.device, dtype)
        table = self._rope_tables.get(key)
        if table is None or table[0].shape[0] < bound:
            n = 256 * -(-bound // 256)
            cos, sin = rope_cos_sin(cfg, torch.arange(n, device=positions.device)[None], dtype)
            table = self._rope_tables[key] = (cos[0, 0], sin[0, 0])
        cos, sin = table
        return cos[positions][:, None], sin[positions][:, None]

    @staticmethod
    def _positions(n_before, valid, B, T, device):
        if valid is None:
            return n_before[:, None] + torch.arange(T, device=device)[None, :]
        # count only real tokens, so a left-padded prompt gets the positions it would have alone
        positions = n_before[:, None] + valid.long().cumsum(dim=1) - 1
        return positions.clamp(min=0)

    # --- utilities -------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, p.dtype)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True) -> Transformer:
    """Build on the meta device (no memory, no wasted init), then materialize once on `device`.
    With init=False the weights are left uninitialized, for a caller that loads them next."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # cast while on meta: memory is allocated once
    if init:
        model.init_weights()
    return model
