"""A preallocated key/value cache for incremental decoding.

One (batch, n_kv_heads, max_len, head_dim) buffer per layer for keys and one for values, filled
left to right; `length` slots are in use. (What a layer caches per token is `cfg.cache_layout`:
multi-head latent attention stores its KV latent and RoPE key in the same two buffers.) A
recurrent layer (linear attention, SSM) caches no tokens: it keeps a fixed-size state per row,
read with `get_state` and replaced with `set_state` (None until the layer first writes it). Rows of a batch share slot indices, so prompts of
different lengths are left-padded, and `valid` marks which slots hold real tokens (padding slots
are never attended to). `n_tokens` counts the real tokens of each row: the next token's position.

Allocating once up front means no reallocation or concatenation per step, and a decode step only
writes one slot per layer. (The paged, block-allocated cache of the serving engine is a separate
structure built for many requests that come and go.)
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for layer in range(cfg.n_layers):
            layout = cfg.cache_layout(layer)
            for buffers, (heads, dim) in zip((self.k, self.v), layout or ((0, 0), (0, 0)), strict=True):
                shape = (batch_size, heads, max_len, dim)
                buffers.append(None if layout is None else torch.zeros(shape, device=device, dtype=dtype))
        self.states: list[dict[str, torch.Tensor] | None] = [None] * cfg.n_layers
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        self.has_padding = False  # a Python flag, so decode steps never sync with the device


    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, H, T, D) at slots [length, length + T); return all in use."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def get_state(self, layer: int) -> dict[str, torch.Tensor] | None:
        """A recurrent layer's state for every row (tensors of leading dim B), None before the first write."""
        return self.states[layer]

    def set_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        self.states[layer] = state

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> None:
        """Check room for n new slots and record which of them hold real tokens (B, n)."""
        if self.length + n > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.length} slots used + {n} new > max_len={self.max_len}; "
                "allocate a larger cache (max_len >= prompt length + max new tokens)"
            )
        if valid is None:
            self.valid[:, self.length : self.length + n] = True
        else:
            self.valid[:, self.length : self.length + n] = valid
            self.has_padding = self.has_padding or not bool(valid.all())

    def advance(self, n: int) -> None:
        """Mark n more slots as used, after every layer has written them."""
        self.n_tokens += self.valid[:, self.length : self.length + n].sum(dim=1)
        self.length += n
