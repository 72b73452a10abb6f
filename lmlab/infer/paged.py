"""The paged KV cache of the serving engine (Kwon et al. 2023, "Efficient Memory Management for Large
Language Model Serving with PagedAttention"), and prefix caching on top of it.

Memory is one pool of fixed-size blocks per layer: block b holds the keys and values of `block_size`
consecutive tokens of some sequence. A sequence owns a *block table*, the list of its blocks in order,
so token t lives in slot `table[t // block_size] * block_size + t % block_size`. Sequences grow one
block at a time and give their blocks back when they finish; no sequence reserves room for its
maximum length, so many more sequences fit than with one contiguous buffer each.

`BlockPool` is the allocator: a free list, a reference count per block, and the prefix cache. A full
block of a prompt is registered under a key made of its tokens and its predecessor's identity, so a
later request whose prompt starts with the same tokens takes the same blocks (reference count + 1)
instead of recomputing them. A block whose count drops to zero stays in the cache, at the end of the
free list: it is reused by a prefix hit until it is needed for new data (least recently freed first).
The keys are exact (the block's tokens, not a hash of them), so a hit can never be a collision.

`PagedStep` makes the paged pool look, for one forward pass, like the contiguous `KVCache` the model
already understands: each row's context is gathered from its blocks, left-aligned to the widest row
(`length` slots, padding in front), and the step's new tokens come right after it, right-padded. The
keys of every row are then contiguous in slot order, so the model's causal, sliding-window and ALiBi
masks, all written in slot distances, hold unchanged; new keys and values are written into their
blocks as each layer computes them. Gathering copies each row's context once per layer and step,
which costs the same order of memory traffic as reading it in attention: the right trade for a
readable reference on CPU, where no paged-attention kernel exists.

`PackedStep` is the same view with the rows' new tokens packed end to end into one sequence (1, N), as
serving engines flatten a batch: the projections and MLPs, most of a step's work, then run on the N
real tokens, with no padding and in one pass, however different the rows' lengths (a prompt chunk of
300 tokens beside 30 single-token decodes). Only attention needs the rows apart: `attend` gathers
each group of rows of similar length into the padded layout above, runs the layer's attention kernel
on it, and scatters the outputs back to their packed places. It serves models whose every token mixer
is plain attention (`packable`); the others use `PagedStep`.

Recurrent layers (linear attention, SSM) keep no per-token cache but a fixed-size state per sequence.
The pool holds one state row per *slot*; the engine gives each running request a slot, and a step
gathers its rows' states and writes them back. A row that starts from scratch (no context yet: a new
or a preempted request) reads a zero state, whatever its slot held before. Padding tokens (the right
padding of a step's new tokens) leave a state unchanged, so the state after a step is the state at
each row's last real token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..model.config import ModelConfig


class BlockPool:
    """Block ids 0..num_blocks-1 with reference counts, a free list and a prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = [0] * num_blocks
        # Blocks with no owner, oldest first: the next allocation takes the front. An OrderedDict so that a
        # prefix hit can take a cached block out of the middle in O(1).
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cache: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent uid, tokens) -> block
        self.key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> its key in the cache
        self.uid_of: dict[int, int] = {}  # block -> the identity its successors' keys name
        self._next_uid = 1  # uid 0 stands for "no parent": the first block of a sequence

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks (reference count 1), evicting cached ones if needed; raises when there are fewer."""
        if n > len(self.free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block. Freed blocks go to the back of the free list, the last block of
        a sequence first, so that a prompt's later blocks are evicted before its earlier ones (which more
        requests share)."""
        for block in reversed(blocks):
            if self.refs[block] <= 0:
                raise RuntimeError(f"KV block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def lookup(self, tokens: Sequence[int], max_blocks: int) -> list[int]:
        """The cached blocks holding tokens' first full blocks (at most max_blocks), each now referenced once
        more: the longest prefix of the sequence that is already computed."""
        if not self.prefix_caching:
            return []
        bs, found, parent = self.block_size, [], 0
        for i in range(min(max_blocks, len(tokens) // bs)):
            block = self.cache.get((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            found.append(block)
            parent = self.uid_of[block]
        return found

    def register(self, table: Sequence[int], tokens: Sequence[int], start: int, end: int) -> None:
        """Enter full blocks start..end-1 of a sequence (table, its tokens) into the prefix cache, now that their
        keys and values are computed. A block whose content is already cached under another block stays
        private: the table keeps its own copy, and the first one remains the shared one."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = self.uid_of.get(table[start - 1], None) if start > 0 else 0
        for i in range(start, end):
            block = table[i]
            if parent is None:  # an earlier block was never registered (a duplicate): its successors cannot be
                return
            if block in self.key_of:
                parent = self.uid_of[block]
                continue
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            if key in self.cache:
                parent = None
                continue
            self.cache[key], self.key_of[block] = block, key
            self.uid_of[block], self._next_uid = self._next_uid, self._next_uid + 1
            parent = self.uid_of[block]

    def _evict(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.cache[key]
            del self.uid_of[block]

    def check(self) -> None:
        """Invariants, for tests: every block is either free (count 0) or owned (count > 0), never both."""
        for b in range(self.num_blocks):
            if (b in self.free) != (self.refs[b] == 0) or self.refs[b] < 0:
                raise AssertionError(f"block {b}: refs={self.refs[b]}, free={b in self.free}")
        for key, b in self.cache.items():
            if self.key_of.get(b) != key:
                raise AssertionError(f"prefix cache entry for block {b} is inconsistent")


class PagedKVCache:
    """The per-layer key/value pools: (num_blocks * block_size, n_kv_heads, head_dim) each."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None,
                 dtype: torch.dtype = torch.float32, num_slots: int = 0):
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        for layer in range(cfg.n_layers):
            layout = cfg.cache_layout(layer)
            if layout is None:  # a recurrent layer: its state lives in `states`
                self.k.append(None)
                self.v.append(None)
                continue
            (k_heads, k_dim), (v_heads, v_dim) = layout
            self.k.append(torch.zeros(num_blocks * block_size, k_heads, k_dim, device=device, dtype=dtype))
            self.v.append(torch.zeros(num_blocks * block_size, v_heads, v_dim, device=device, dtype=dtype))
        if cfg.recurrent and num_slots < 1:
            raise ValueError("this model has recurrent layers (linear attention or SSM): give num_slots >= 1, one "
                             "state row per sequence that can run at once")
        self.recurrent = cfg.recurrent
        self.num_slots = num_slots
        # per recurrent layer, its state tensors with one row per slot; allocated at the layer's first write,
        # when their shapes are known
        self.states: list[dict[str, torch.Tensor] | None] = [None] * cfg.n_layers
        self.block_size = block_size
        self.device = device

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_token = sum(h * d for layer in range(cfg.n_layers) for h, d in (cfg.cache_layout(layer) or ()))
        return block_size * per_token * itemsize  # 0 for a model without attention layers

    def step(self, tables: Sequence[Sequence[int]], context: Sequence[int], new: Sequence[int],
             slots: Sequence[int] | None = None) -> PagedStep:
        """A KVCache-like view for one forward pass over rows that each have context[i] tokens already in
        the pool (blocks tables[i]) and feed new[i] tokens now; slots[i] is row i's recurrent-state slot."""
        if self.recurrent and (slots is None or any(s is None for s in slots)):
            raise ValueError("a model with recurrent layers needs a state slot for every row of a step")
        return PagedStep(self, tables, context, new, slots)

    def packed_step(self, tables: Sequence[Sequence[int]], context: Sequence[int], new: Sequence[int]) -> PackedStep:
        """The same pass with the rows' new tokens packed into one sequence, for `packable` models."""
        if self.recurrent:
            raise ValueError("a model with recurrent layers keeps a state per row and cannot run packed steps")
        return PackedStep(self, tables, context, new)


def group_by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of rows (of these lengths) in groups padded to a common length: longest first, a row joins the
    current group while the padding stays below half of the group's slots. So a prompt chunk and many single-token
    decodes go into separate groups, and rows of similar length share one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, group, real = [], [], 0
    for i in order:
        if group and (len(group) + 1) * lengths[group[0]] > 2 * (real + lengths[i]):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += lengths[i]
    if group:
        groups.append(group)
    return groups


def packable(model: torch.nn.Module) -> bool:
    """Whether `PackedStep` can run this model: every token mixer is plain attention (`Attention`, whose kernel
    the step calls per group), without ALiBi (a bias over the whole pass) or a prefix-tuning hook. Recurrent
    layers keep a state per row and MLA caches its own layout: those models run padded `PagedStep`s."""
    from ..model.attention import Attention

    return model.cfg.position != "alibi" and all(
        type(block.attn) is Attention and block.attn.prefix is None for block in model.blocks)


def _slots(table: torch.Tensor, rows: torch.Tensor, token: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool slot of token index `token` of row `rows` (broadcast), given the rows' block tables (B, width)."""
    return table[rows, token // block_size] * block_size + token % block_size


def _tables(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """Block tables as one (B, width) tensor, right-padded with block 0."""
    width = max(1, max((len(t) for t in tables), default=1))
    table = torch.zeros(len(tables), width, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(list(t), dtype=torch.long)
    return table


class PackedStep:
    """One forward pass over rows whose new tokens are packed into a single sequence (see the module docstring).
    Interface of `model.cache.KVCache` as far as `Transformer.hidden_states` uses it, plus `attend`, which
    `Attention` calls instead of its own kernel call when the cache is `packed`. Positions must be passed to the
    model: `positions` (1, N)."""

    packed = True
    length = 0
    has_padding = False

    def __init__(self, pool: PagedKVCache, tables, context, new):
        if min(new, default=0) < 1:
            raise ValueError("every row of a packed step feeds at least one token")
        bs, device = pool.block_size, pool.device
        self.pool, self.n_new = pool, sum(new)
        table = _tables(tables)
        ctx = torch.tensor(list(context), dtype=torch.long)
        n_new = torch.tensor(list(new), dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(new)), n_new)  # (N,) the row of each packed token
        starts = torch.cumsum(n_new, 0) - n_new  # packed index of each row's first new token
        token = ctx[row_of] + torch.arange(self.n_new) - starts[row_of]  # each new token's index in its sequence
        self.positions = token[None].to(device)
        self.write_slots = _slots(table, row_of, token, bs).to(device)
        self.n_tokens = torch.zeros(1, dtype=torch.long, device=device)
        # Attention groups in the padded layout of PagedStep: each row's context left-padded to the group's
        # widest (L slots), then its new tokens right-padded to the group's longest (T slots).
        self.groups = []
        for group in group_by_length(list(new)):
            rows = torch.tensor(group)
            L, T = int(ctx[rows].max()), int(n_new[rows].max())
            c, m = ctx[rows][:, None], n_new[rows][:, None]
            key_token = torch.arange(L + T)[None, :] - (L - c)  # (G, L + T): token index of each key slot
            key_valid = (key_token >= 0) & (key_token < c + m)
            read = torch.where(key_valid, _slots(table, rows[:, None], torch.where(key_valid, key_token, 0), bs), 0)
            query_valid = torch.arange(T)[None, :] < m
            query = torch.where(query_valid, starts[rows][:, None] + torch.arange(T)[None, :], 0)  # packed index
            self.groups.append(_Group(read.to(device), key_valid.to(device), L, T, query.to(device),
                                      query_valid.to(device), bool(key_valid.all())))

    @property
    def batch_size(self) -> int:
        return 1

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> None:
        if n != self.n_new:
            raise ValueError(f"this packed step feeds {self.n_new} tokens, not {n}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (1, H, N, D) in their blocks; `attend` reads them back per group."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        pool_k.index_copy_(0, self.write_slots, k[0].transpose(0, 1).to(pool_k.dtype))
        pool_v.index_copy_(0, self.write_slots, v[0].transpose(0, 1).to(pool_v.dtype))
        return k, v

    def attend(self, layer: int, q: torch.Tensor, window: int | None, kernel) -> torch.Tensor:
        """Attention output (1, H, N, D) for the packed queries q (1, H, N, D): per group, the queries and the
        keys/values (context + new, from the pool) in the padded layout, kernel(q, k, v, mask) on them (the
        layer's `Attention.attend`), and the real outputs scattered back to their packed places."""
        from ..model.attention import causal_mask

        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        flat_q = q[0].transpose(0, 1)  # (N, H, D)
        out = flat_q.new_empty(flat_q.shape)
        for g in self.groups:
            G, S = g.read.shape
            qg = flat_q.index_select(0, g.query.reshape(-1)).view(G, g.T, *flat_q.shape[1:]).transpose(1, 2)
            kg = pool_k.index_select(0, g.read.reshape(-1)).view(G, S, *pool_k.shape[1:]).transpose(1, 2)
            vg = pool_v.index_select(0, g.read.reshape(-1)).view(G, S, *pool_v.shape[1:]).transpose(1, 2)
            effective = window if window is not None and window < S else None
            if g.dense and g.L == 0 and effective is None:
                mask = None  # one prompt chunk from its start (or rows of equal length): the kernel's causal path
            elif effective in g.masks:
                mask = g.masks[effective]
            else:  # built at the first layer that needs it, then shared by the others
                mask = g.masks[effective] = causal_mask(g.L, g.T, S, effective, g.key_valid, q.device)
            y = kernel(qg, kg.to(q.dtype), vg.to(q.dtype), mask).transpose(1, 2)  # (G, T, H, D)
            out.index_copy_(0, g.query[g.query_valid], y[g.query_valid])
        return out.transpose(0, 1)[None]

    def advance(self, n: int) -> None:
        pass  # the engine keeps each sequence's length


@dataclass
class _Group:
    """Rows of a packed step whose attention runs as one padded batch (G rows, L context + T new slots each)."""

    read: torch.Tensor  # (G, L + T) pool slot of every key (padding reads slot 0 and is masked)
    key_valid: torch.Tensor  # (G, L + T)
    L: int
    T: int
    query: torch.Tensor  # (G, T) packed index of each query (padding points at 0 and is dropped)
    query_valid: torch.Tensor  # (G, T)
    dense: bool  # no padding at all
    masks: dict = field(default_factory=dict)  # window (None: full causal) -> (G, 1, T, L + T) boolean mask


class PagedStep:
    """One forward pass's view of the paged pool, with the interface of `model.cache.KVCache` (see the module
    docstring for the slot layout). Slot s < length of row i holds context token s - (length - context[i]);
    slot length + j holds the row's j-th new token."""

    def __init__(self, pool: PagedKVCache, tables, context, new, slots=None):
        bs, device = pool.block_size, pool.device
        L, T = max(context), max(new)
        self.pool, self.length, self.max_len = pool, L, L + T
        if slots is not None:
            self.slots = torch.tensor(list(slots), dtype=torch.long, device=device)
            self.fresh = torch.tensor([c == 0 for c in context], device=device)  # rows that start from zero state
        ctx = torch.tensor(list(context), dtype=torch.long)
        n_new = torch.tensor(list(new), dtype=torch.long)
        # flat slot index of every context token (left-padded: padding reads slot 0, and is masked)
        table = _tables(tables)
        width = table.shape[1]
        token = torch.arange(L)[None, :] - (L - ctx)[:, None]  # (B, L): token index, < 0 for padding
        ctx_valid = token >= 0
        token = token.clamp(min=0)
        self.read_slots = (table.gather(1, token // bs) * bs + token % bs).masked_fill(~ctx_valid, 0).to(device)
        # slots the new tokens are written to (right-padded rows: only the first new[i] are real)
        new_token = ctx[:, None] + torch.arange(T)[None, :]
        new_valid = torch.arange(T)[None, :] < n_new[:, None]
        new_token = torch.where(new_valid, new_token, 0)
        write = table.gather(1, (new_token // bs).clamp(max=width - 1)) * bs + new_token % bs
        self.write_rows, self.write_cols = new_valid.nonzero(as_tuple=True)
        self.write_slots = write[new_valid].to(device)
        # every key of the step, context and new, read back from the pool in one gather (padding reads slot 0)
        self.read_slots = torch.cat((self.read_slots, torch.where(new_valid, write, 0).to(device)), dim=1)
        self.valid = torch.cat((ctx_valid, new_valid), dim=1).to(device)
        self.n_tokens = ctx.to(device)
        self.has_padding = not bool(self.valid.all())
        self.new_valid = new_valid.to(device)
        # a padding token repeats its row's last real position: ignored, and never past the model's range
        last = (ctx + n_new - 1).clamp(min=0)[:, None]
        self.positions = torch.where(new_valid, ctx[:, None] + torch.arange(T)[None, :], last).to(device)

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> None:
        if n != self.max_len - self.length:
            raise ValueError(f"this step feeds {self.max_len - self.length} tokens per row, not {n}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, H, T, D) of the real tokens in their blocks; return context + new,
        gathered from the pool in one copy (B, H, L + T, D)."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        rows, cols = self.write_rows, self.write_cols
        pool_k.index_copy_(0, self.write_slots, k[rows, :, cols].to(pool_k.dtype))
        pool_v.index_copy_(0, self.write_slots, v[rows, :, cols].to(pool_v.dtype))
        if self.length == 0:
            return k, v
        B, S = self.read_slots.shape
        flat = self.read_slots.reshape(-1)
        keys = pool_k.index_select(0, flat).view(B, S, *pool_k.shape[1:]).transpose(1, 2)
        values = pool_v.index_select(0, flat).view(B, S, *pool_v.shape[1:]).transpose(1, 2)
        return keys.to(k.dtype), values.to(v.dtype)

    def get_state(self, layer: int) -> dict[str, torch.Tensor] | None:
        """The recurrent state of this step's rows (gathered from their slots), zero for rows that start fresh;
        None when the layer has never written a state."""
        pooled = self.pool.states[layer]
        if pooled is None:
            return None
        keep = ~self.fresh
        return {name: t.index_select(0, self.slots) * keep.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
                for name, t in pooled.items()}

    def set_state(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        """Write this step's rows' new states into their slots."""
        pooled = self.pool.states[layer]
        if pooled is None:
            pooled = self.pool.states[layer] = {
                name: t.new_zeros(self.pool.num_slots, *t.shape[1:]) for name, t in state.items()}
        for name, t in state.items():
            pooled[name].index_copy_(0, self.slots, t.to(pooled[name].dtype))

    def advance(self, n: int) -> None:
        pass  # the engine keeps each sequence's length
