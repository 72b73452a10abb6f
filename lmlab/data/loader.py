"""The pretraining data loader: packed sequences over memory-mapped token shards, shuffled per
epoch, resumable to the exact batch, split across data-parallel ranks.

Packing (as in GPT-2/nanoGPT pretraining): documents are concatenated with their separator tokens
(see `shards.py`) and cut into windows of seq_len + 1 tokens; a window gives x = window[:-1] and
y = window[1:], so y is already shifted (`model(x, targets=y)`). Window k of a shard starts at
token k * seq_len: consecutive windows share one token, so every token of a shard (except the
tail shorter than a window) is a target exactly once per epoch. No window straddles two shards.

Order: every epoch visits all windows in a fresh permutation drawn from (seed, epoch), so the
data order is a pure function of the seed and the position (epoch, batch). That makes resuming
exact: the state is a handful of integers, not a buffer.

Ranks: step b of an epoch takes the windows order[b*W*B : (b+1)*W*B] (W ranks, B sequences per
rank) and rank r takes the r-th block of B. Ranks thus see disjoint windows that together cover
the epoch (minus fewer than W*B leftover windows, dropped so that every rank takes the same number
of steps), and the global batch of a step does not depend on how it is split across ranks.

Document masking (optional): a packed sequence may hold the end of one document and the start of
the next. With doc_mask=True each batch also carries `doc_ids` (which document each token belongs
to, counted from 0 within the sequence) and `positions` (restarting at 0 at each document start,
the cut-off first document included), and `document_causal_mask` turns doc_ids into the
causal, within-document attention mask of "packing without cross-contamination" (as in
Llama 3's pretraining and flash-attention's variable-length kernels).

Written by hand because a shuffled map-style `torch.utils.data.DataLoader` cannot resume mid-epoch
without replaying the sampler, and because the indexing above is the whole point to read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .shards import TokenShards

STATE_VERSION = 1


class Batch(NamedTuple):
    """One batch of packed sequences, LongTensors of shape (B, T) on the loader's device.

    x: input ids; y: target ids, y[:, t] = the token after x[:, t].
    doc_ids, positions: with doc_mask=True only (else None): per token, the index of its document
      within the sequence (0, 1, ...) and its position within that document's part of the
      sequence (0 at every document start)."""

    x: torch.Tensor
    y: torch.Tensor
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T) from doc_ids (B, T): True where query t may attend key s,
    that is s <= t and both tokens belong to the same document. Same convention as
    `lmlab.model.attention.causal_mask` and `scaled_dot_product_attention`'s boolean attn_mask.
    Every row has at least its diagonal set, so no softmax row is empty."""
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must have shape (batch, seq_len), got {tuple(doc_ids.shape)}")
    T = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (same_doc & causal)[:, None]


def distributed_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when a process group is
    initialized, else (0, 1)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                         f"world_size={world_size}")
    return rank, world_size


class Windows:
    """The windows of seq_len + 1 tokens of one split, numbered 0..count-1 shard after shard:
    `locate(id)` gives a window's shard and offset, `gather(ids)` the batch made of windows."""

    def __init__(self, path: str | Path, split: str, seq_len: int, tokenizer: Any = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.shards = TokenShards(path)
        if tokenizer is not None:
            self.shards.check_tokenizer(tokenizer)
        self.split, self.seq_len = split, seq_len
        sizes = np.array([s.tokens for s in self.shards.shards(split)], dtype=np.int64)
        if sizes.sum() == 0:
            raise ValueError(f"the {split!r} split of {path} has no tokens"
                             + (" (it was written with val_fraction=0)" if split == "val" else ""))
        per_shard = np.maximum(sizes - 1, 0) // seq_len  # window k covers tokens [kT, kT + T]
        if per_shard.sum() == 0:
            raise ValueError(f"seq_len={seq_len} is too long for the {split!r} split of {path}: a sequence needs "
                             f"{seq_len + 1} tokens within one shard, and the largest shard has {sizes.max()}; "
                             "use a smaller seq_len (or larger shards / more data)")
        self.first = np.concatenate([[0], np.cumsum(per_shard)])  # window id of each shard's first window
        self.count = int(self.first[-1])
        self._tokens = [self.shards.tokens(split, i) for i in range(len(sizes))]
        self._starts: list[np.ndarray | None] = [None] * len(sizes)

    def locate(self, window: int) -> tuple[int, int]:
        """(shard index, token offset) of a window id."""
        shard = int(np.searchsorted(self.first, window, side="right")) - 1
        return shard, int(window - self.first[shard]) * self.seq_len

    def gather(self, windows: np.ndarray, doc_mask: bool) -> Batch:
        """The batch made of these windows, on the CPU."""
        T = self.seq_len
        rows = np.empty((len(windows), T + 1), dtype=np.int64)
        doc_ids = np.empty((len(windows), T), dtype=np.int64) if doc_mask else None
        positions = np.empty((len(windows), T), dtype=np.int64) if doc_mask else None
        for i, window in enumerate(windows):
            shard, offset = self.locate(int(window))
            rows[i] = self._tokens[shard][offset:offset + T + 1]
            if doc_mask:
                doc_ids[i], positions[i] = self._segments(shard, offset)
        buf = torch.from_numpy(rows)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        if not doc_mask:
            return Batch(x, y)
        return Batch(x, y, torch.from_numpy(doc_ids), torch.from_numpy(positions))

    def _segments(self, shard: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        starts = self._starts[shard]
        if starts is None:
            starts = self._starts[shard] = self.shards.doc_starts(self.split, shard)
        tokens = np.arange(offset, offset + self.seq_len)
        doc = np.searchsorted(starts, tokens, side="right") - 1  # document of each token
        segment_start = np.maximum(starts[doc], offset)  # a document cut by the window restarts at 0
        return doc - doc[0], tokens - segment_start


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"  # pinned host memory lets the copy overlap with compute
    return Batch(*(None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=pin)
                   for t in batch))


class PackedLoader:
    """Infinite iterator of packed training batches over a shard directory's `split`.

    `next(loader)` gives a `Batch`; epochs follow one another without end (`loader.epoch` says
    which one is running, `len(loader)` is the number of batches per epoch on this rank), since a
    training loop counts steps, not epochs. After k batches, `state_dict()` describes the
    position; a new loader given it by `load_state_dict` yields batch k+1 onwards, bit for bit.

    rank / world_size: default to torch.distributed's when initialized, else 0 / 1.
    shuffle=False visits windows in file order (same epochs, no permutation).
    doc_mask: also return doc_ids and positions (see `Batch`, `document_causal_mask`).
    tokenizer: if given, checked against the fingerprint the shards were written with.
    """

    def __init__(self, path: str | Path, split: str, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, shuffle: bool = True,
                 doc_mask: bool = False, device: str | torch.device = "cpu", tokenizer: Any = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self.windows = Windows(path, split, seq_len, tokenizer)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shuffle, self.doc_mask, self.device = shuffle, doc_mask, torch.device(device)
        self.global_batch = batch_size * self.world_size
        self._per_epoch = self.windows.count // self.global_batch
        if self._per_epoch == 0:
            raise ValueError(
                f"the {split!r} split of {path} has {self.windows.count} windows of seq_len+1 = {seq_len + 1} tokens, "
                f"fewer than one global batch of {self.global_batch} (batch_size {batch_size} x world_size "
                f"{self.world_size}); lower batch_size or seq_len, or add data")
        self.epoch, self.batch_in_epoch = 0, 0  # the position of the next batch to yield
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch on this rank (batch_size * seq_len); times world_size for a step."""
        return self.batch_size * self.seq_len

    def __len__(self) -> int:
        return self._per_epoch

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> Batch:
        batch = self.windows.gather(self.batch_windows(self.epoch, self.batch_in_epoch), self.doc_mask)
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self._per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return _to_device(batch, self.device)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which all ranks together visit the windows in `epoch`."""
        if self._order is None or self._order[0] != epoch:
            n = self.windows.count
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def batch_windows(self, epoch: int, batch: int) -> np.ndarray:
        """Window ids of this rank's `batch`-th batch of `epoch` (see `windows.locate`)."""
        start = (batch * self.world_size + self.rank) * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def state_dict(self) -> dict:
        """The position (and what it is only valid with). Identical on every rank, so rank 0 can
        save it for all; it fits in a checkpoint's train_state."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch_in_epoch, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "windows": self.windows.count}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position saved by `state_dict`. The data, seed, seq_len, shuffle and
        global batch size must match (the split across ranks may differ)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this lmlab reads {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("seed", "shuffle", "seq_len", "global_batch", "windows"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: the saved loader state has {key}={state.get(key)!r} but this loader has "
                    f"{mine[key]!r}; resume with the same data, seed, seq_len and batch_size x world_size")
        if not 0 <= state["batch"] < self._per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state position (epoch {state['epoch']}, batch {state['batch']}) is out "
                             f"of range for {self._per_epoch} batches per epoch")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch"])


class ValidationLoader:
    """The windows of a split, once, in file order, for evaluation: every iteration yields the
    same batches. Ranks take interleaved windows (rank r: windows r, r + W, ...); the last batch
    may be smaller. max_batches caps each pass (a quick estimate on a prefix of the split)."""

    def __init__(self, path: str | Path, split: str, seq_len: int, batch_size: int, *,
                 rank: int | None = None, world_size: int | None = None, doc_mask: bool = False,
                 device: str | torch.device = "cpu", max_batches: int | None = None, tokenizer: Any = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rank, world_size = distributed_rank(rank, world_size)
        self.windows = Windows(path, split, seq_len, tokenizer)
        self.seq_len, self.batch_size, self.doc_mask = seq_len, batch_size, doc_mask
        self.device = torch.device(device)
        self._mine = np.arange(rank, self.windows.count, world_size)
        n = -(-len(self._mine) // batch_size)
        self._len = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Batch]:
        for b in range(self._len):
            windows = self._mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield _to_device(self.windows.gather(windows, self.doc_mask), self.device)


def iter_eval_batches(path: str | Path, split: str, seq_len: int, batch_size: int, **kwargs: Any) -> Iterator[Batch]:
    """One deterministic pass over `split` (see `ValidationLoader` for the keyword arguments)."""
    return iter(ValidationLoader(path, split, seq_len, batch_size, **kwargs))
