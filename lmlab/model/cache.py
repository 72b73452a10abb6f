"""A preallocated key/value cache for incremental decoding.

One (batch, n_kv_heads, max_len, head_dim) buffer per layer for keys and one for values, filled
left to right; `length` slots are in use. (What a layer caches per token is `cfg.cache_layout`:
multi-head latent attention stores its KV latent and RoPE key in the same two buffers.) A
recurrent layer (linear attention, SSM) caches no tokens: it keeps a fixed-size state per row,
read with `get_state` and replaced with `set_state` (None until the layer first writes it).
Rows of a batch share slot indices, so prompts of different lengths are left-padded, and `valid`
marks which slots hold real tokens (padding slots are never attended to). `n_tokens` counts the
real tokens of each row: the next token's position.

Allocating once up front means no reallocation or concatenation per step, and a decode step only
writes one slot per layer. (The paged, block-allocated cache of the serving engine is a separate
structure built for many requests that come and go.)

`SinkCache` has the same interface with bounded memory: StreamingLLM's attention sinks (the first
tokens) plus a window of the most recent ones, for generating past the trained context.
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


# ============================================================================================
# Attention sinks: a bounded cache for streaming past the trained context
# ============================================================================================


class SinkCache:
    """StreamingLLM's cache (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
    Sinks", arXiv 2309.17453): the first `n_sink` tokens (the attention sinks that softmax heads
    park their surplus attention on) and the most recent tokens, the ones between evicted, so memory
    stays constant however long the stream runs. Same interface as `KVCache`.

    Which tokens a query sees: after every forward call the cache keeps the sinks and the
    `window - 1` most recent tokens, so a decoded token (one per call) attends to exactly the sinks
    and the `window` most recent tokens, itself included: the paper's definition. A call with T > 1
    new tokens (prefilling a prompt in chunks) gives its queries between `window` and
    `window + T - 1` recent tokens; at most `chunk` tokens go in per call, and the buffers hold
    n_sink + window - 1 + chunk slots, allocated once.

    Positions are slots in the cache, not places in the text, as in the paper: a model never sees a
    position past max_len - 1, which is what lets a model trained on short sequences keep going.
    With RoPE, the keys kept after an eviction move to lower slots and must be rotated back by the
    distance they moved. The cache stores each key as the attention layer wrote it (rotated at its
    slot then) and records per slot how far it has moved since (`shift`); reads return the key
    rotated by -shift * theta_i. Rotations compose, R(p - s) = R(-s) R(p), so this equals the key
    rotated at its new slot, and since the stored key is never rewritten, no rounding accumulates
    over a long stream (re-rotating in place at every eviction would add one rounding per step).
    Sinks never move and nothing is rotated before the first eviction, so until then reads return
    the buffers themselves and generation equals `KVCache` generation bit for bit. Under multi-head
    latent attention the rotated tensor is the second one (the shared RoPE key). Exactness needs
    frequencies that do not depend on the length: dynamic NTK is exact while max_len stays within
    its original_max_seq_len (it is inactive there) and approximate beyond. ALiBi biases and
    "none" read slot distances: nothing to rotate. Absolute position embeddings (learned,
    sinusoidal) are added to the hidden states, where a kept token's old position cannot be
    replaced, so they are refused. Recurrent layers (linear attention, SSM) keep their state, which
    summarizes the whole stream, untouched.

    Left padding is supported exactly: each row keeps its own first n_sink real tokens and its most
    recent real ones (padding slots are evicted first), and its positions count real tokens only,
    so a row behaves as it would alone. Positions must be the model's default ones (counted from
    the cache), which `Transformer.hidden_states` uses when no `positions` are passed.

    Cost: once full, every call moves the kept slots down (one gather per layer) and reads rotate
    the moved keys: both O(cache size) per layer per step, the same order as attention over it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, n_sink: int, window: int, device=None,
                 dtype: torch.dtype = torch.float32, chunk: int = 1):
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink} (StreamingLLM uses 4)")
        if window < 1:
            raise ValueError(f"window must be >= 1 (the recent tokens a query sees, itself included), got {window}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 (the most new tokens per forward call), got {chunk}")
        if cfg.position in ("learned", "sinusoidal"):
            raise ValueError(
                f"SinkCache cannot re-assign positions with position={cfg.position!r}: absolute position "
                "embeddings are mixed into the hidden states of the kept tokens; use it with a 'rope', "
                "'alibi' or 'none' model"
            )
        self.n_sink, self.window, self.chunk, self.dtype = n_sink, window, chunk, dtype
        self.keep = n_sink + window - 1  # tokens kept between calls: the next query then sees sinks + window
        self.max_len = self.keep + chunk
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for layer in range(cfg.n_layers):
            layout = cfg.cache_layout(layer)
            for buffers, (heads, dim) in zip((self.k, self.v), layout or ((0, 0), (0, 0)), strict=True):
                shape = (batch_size, heads, self.max_len, dim)
                buffers.append(None if layout is None else torch.zeros(shape, device=device, dtype=dtype))
        self.states: list[dict[str, torch.Tensor] | None] = [None] * cfg.n_layers
        self.valid = torch.zeros(batch_size, self.max_len, dtype=torch.bool, device=device)
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.shift = torch.zeros(batch_size, self.max_len, dtype=torch.long, device=device)
        self.length = 0
        self.has_padding = False
        self.evicted = False  # a Python flag: until the first eviction reads are the plain buffers
        # which of the two cached tensors holds RoPE-rotated keys: the keys, or MLA's shared RoPE key
        self._rotated = None if cfg.position != "rope" else (1 if cfg.mla is not None else 0)
        self._inv_freq = None
        if self._rotated is not None:
            from .position import rope_frequencies

            # float64 angles: shift * theta stays exact however far the tokens have moved
            self._inv_freq = rope_frequencies(cfg, self.max_len, device)[0].double()
        self._rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for slots [0, length)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (B, H, T, D) at slots [length, length + T); return all in use,
        the moved RoPE keys rotated to their current slots."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        out = [self.k[layer][:, :, :end], self.v[layer][:, :, :end]]
        if self._rotation is not None and start > 0:
            from .position import apply_rope

            buf = (self.k, self.v)[self._rotated][layer]
            moved = apply_rope(buf[:, :, :start], *self._rotation)
            out[self._rotated] = torch.cat((moved, buf[:, :, start:end]), dim=2)
        return out[0], out[1]

    def get_state(self, layer: int) -> dict[str, torch.Tensor] | None:
        """A recurrent layer's state for every row; recurrent state is never evicted."""
        return self.states[layer]

    def set_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        self.states[layer] = state

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> None:
        """Record which of n new slots hold real tokens (B, n); at most `chunk` per call."""
        if n > self.chunk:
            raise ValueError(
                f"SinkCache takes at most chunk={self.chunk} new tokens per forward call, got {n}; feed longer "
                "inputs in chunks (generate(..., streaming=(n_sink, window, chunk)) does) or build the cache "
                "with a larger chunk"
            )
        new = slice(self.length, self.length + n)
        if valid is None:
            self.valid[:, new] = True
        else:
            self.valid[:, new] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        self.shift[:, new] = 0
        self._rotation = None
        if self.evicted and self._rotated is not None and self.length > 0:
            # -shift * theta_i per slot, in the rotate-half layout of position.apply_rope: (B, 1, length, rotary_dim)
            angles = -self.shift[:, : self.length, None].double() * self._inv_freq
            angles = torch.cat((angles, angles), dim=-1)[:, None]
            self._rotation = angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    def advance(self, n: int) -> None:
        """Mark n more slots as used, after every layer has written them; then evict down to the
        sinks + window - 1 most recent tokens."""
        # Evicting here, after the call, not in `reserve`: the model reads `length` (for its masks and
        # ALiBi distances) before it reserves, so the slots must not move during a call.
        self.n_tokens += self.valid[:, self.length : self.length + n].sum(dim=1)
        self.length += n
        if self.length > self.keep:
            self._evict(self.length - self.keep)

    def _evict(self, need: int) -> None:
        """Free `need` slots in every row: its padding first, then its oldest tokens after the sinks.
        Kept slots move down in order; the tokens dropped before a kept token shift its position."""
        L = self.length
        real = self.valid[:, :L]
        pad = ~real
        movable = real & (real.cumsum(dim=1) > self.n_sink)  # real tokens after the row's first n_sink
        drop_pad = pad.sum(dim=1).clamp(max=need)  # (B,): padding goes first
        drop_real = need - drop_pad
        drop = ((pad & (pad.cumsum(dim=1) <= drop_pad[:, None]))
                | (movable & (movable.cumsum(dim=1) <= drop_real[:, None])))
        kept = L - need
        order = torch.sort(drop.to(torch.uint8), dim=1, stable=True).indices[:, :kept]  # kept slots, in order
        moved = self.shift[:, :L] + (drop & real).cumsum(dim=1)
        self.shift[:, :kept] = moved.gather(1, order)
        self.valid[:, :kept] = real.gather(1, order)
        self.valid[:, kept:] = False
        for buffers in (self.k, self.v):
            for buf in buffers:
                if buf is not None:
                    index = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
                    buf[:, :, :kept] = buf[:, :, :L].gather(2, index)
        self.n_tokens -= drop_real
        self.length = kept
        self.evicted = True
