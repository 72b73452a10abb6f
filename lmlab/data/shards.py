"""Token shards: a tokenized corpus on disk, split into train and val, ready to be memory-mapped.

The idea is the one of GPT-2-era pretraining pipelines (nanoGPT, llm.c, nanochat): tokenize once,
with a pool of worker processes, into flat arrays of token ids that training reads through
`np.memmap` without parsing anything. Written by hand rather than with `datasets`, because the
point is to show the whole mechanism in one page, and because exact resumption and byte-identical
output need control over every step.

Layout of a shard directory (format version 1):

    meta.json                format, dtype, tokenizer vocab size and fingerprint, separator,
                             the split rule, and per split the list of shards with their counts
    train_000000.bin         raw little-endian token ids (uint16, or uint32 when the vocabulary
                             has more than 65536 ids), no header: np.memmap(path, dtype) reads it
    train_000000.idx.npy     int64 start offset of every document in that shard (first is 0)
    train_000001.bin ...     further shards; then val_000000.bin, val_000000.idx.npy, ...

Rules that make the output reproducible and safe:
- Documents are written in input order; each is followed by the end-of-sequence token (default,
  GPT-2 style: the model learns where a text ends) and/or preceded by the beginning-of-sequence
  token (nanochat style). The separator is recorded in meta.json.
- The train/val split is decided per document from sha256(seed, text), so it depends neither on
  the number of workers nor on chunking, and exact duplicates always fall on the same side.
- A shard holds whole documents: a new shard starts when the next document would take the
  current one past `shard_tokens`; a document longer than that gets a shard of its own.
- Everything is written into a temporary directory that is renamed into place at the end, so a
  crash never leaves half a shard set behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_directory
from .parallel import ordered_map

FORMAT = "lmlab-token-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
UINT16_MAX_VOCAB = 2**16  # ids 0..65535 fit in uint16

# Work units sent to a worker: small enough that the pool stays busy and memory stays flat,
# big enough that pickling overhead is negligible. They do not change the output.
CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 4096


class TokenizerLike(Protocol):
    """What write_shards needs from a tokenizer (lmlab's `Tokenizer` satisfies it). It must be
    picklable to be sent to worker processes."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...  # plain text in, ids out, no special tokens added

    def decode(self, ids: list[int]) -> str: ...


class ShardFormatError(ValueError):
    """A shard directory that is missing, incomplete, corrupted or from another lmlab version."""


class TokenizerMismatchError(ValueError):
    """Shards were written with a different tokenizer than the one they are used with."""


# --- small helpers ----------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian, so
    shards written on one machine read the same on any other."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 that changes whenever the id <-> text mapping changes, so that shards used with
    another tokenizer fail loudly instead of training on garbage.

    A tokenizer may provide its own `fingerprint` (a string, or a method returning one), e.g. the
    hash of its tokenizer.json. Otherwise the fingerprint hashes the vocabulary size, the special
    ids, the pre-tokenization pattern and normalization when the tokenizer has them, and the bytes
    of every token (`token_bytes(i)` when the tokenizer has it, else the UTF-8 of `decode([i])`;
    an id without a token counts as such)."""
    own = getattr(tokenizer, "fingerprint", None)
    if callable(own):
        own = own()
    if isinstance(own, str) and own:
        return own
    header = {name: getattr(tokenizer, name, None)
              for name in ("vocab_size", "bos_id", "eos_id", "pad_id", "pattern", "normalization")}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for i in range(int(tokenizer.vocab_size)):
        raw = _token_bytes(tokenizer, i)
        # length-prefixed, so that no two different vocabularies hash the same byte stream
        h.update(b"\xff\xff\xff\xff" if raw is None else len(raw).to_bytes(4, "little") + raw)
    return "sha256:" + h.hexdigest()


def _token_bytes(tokenizer: Any, i: int) -> bytes | None:
    token_bytes = getattr(tokenizer, "token_bytes", None)
    try:
        if callable(token_bytes):
            return token_bytes(i)
        return tokenizer.decode([i]).encode("utf-8", "surrogatepass")
    except (ValueError, KeyError, IndexError):  # a gap in the ids
        return None


def _special_id(tokenizer: Any, name: str, flag: str) -> int:
    value = getattr(tokenizer, name, None)
    if value is None:
        raise ValueError(
            f"{flag}=True needs the tokenizer's {name}, but it has none; give the tokenizer that "
            f"special token, or pass {flag}=False and separate documents with the other token"
        )
    return int(value)


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """"val" or "train" for one document: the first 8 bytes of sha256(seed, text) read as a
    fraction of 2**64, compared with val_fraction. Deterministic, order-free, duplicate-stable."""
    digest = hashlib.sha256(f"{seed}\x00".encode() + text.encode("utf-8", "surrogatepass")).digest()
    return "val" if int.from_bytes(digest[:8], "little") < val_fraction * 2.0**64 else "train"


# --- tokenizing (runs in the worker processes) --------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """Everything a worker needs besides the texts; picklable."""

    tokenizer: Any
    dtype: str
    seed: int
    val_fraction: float
    prefix: tuple[int, ...]  # bos, when documents start with it
    suffix: tuple[int, ...]  # eos, when documents end with it


@dataclass
class _Encoded:
    """One chunk of documents, tokenized: all ids concatenated, with per-document lengths and
    splits, so a chunk crosses the process boundary as three arrays instead of many lists."""

    tokens: np.ndarray
    lengths: np.ndarray  # int64, one per non-empty document
    is_val: np.ndarray  # bool, one per non-empty document
    empty: int  # documents skipped because they were empty


def _encode_chunk(job: _Job, texts: list[str]) -> _Encoded:
    kept = [t for t in texts if t]
    # one encode per document, single-threaded: the worker processes are the parallelism
    pieces = [np.array([*job.prefix, *job.tokenizer.encode(t), *job.suffix], dtype=np.int64) for t in kept]
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    flat = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    vocab = int(job.tokenizer.vocab_size)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab):
        bad = int(flat.max()) if flat.max() >= vocab else int(flat.min())
        raise ValueError(f"the tokenizer produced id {bad}, outside its vocabulary [0, {vocab}); "
                         "its vocab_size is wrong or the tokenizer is broken")
    is_val = np.array([split_of(t, job.seed, job.val_fraction) == "val" for t in kept], dtype=bool)
    return _Encoded(flat.astype(job.dtype), lengths, is_val, len(texts) - len(kept))


# Each worker process receives the (possibly large) tokenizer once, through the pool initializer,
# rather than once per chunk. This global lives only inside worker processes.
_worker_job: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _worker_job
    _worker_job = job


def _encode_in_worker(texts: list[str]) -> _Encoded:
    assert _worker_job is not None, "worker used without _init_worker"
    return _encode_chunk(_worker_job, texts)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"documents must be str, got {type(text).__name__}: {text!r:.80}")
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(texts: Iterable[str], job: _Job, workers: int) -> Iterator[_Encoded]:
    if workers <= 1:
        for chunk in _chunks(texts):
            yield _encode_chunk(job, chunk)
        return
    yield from ordered_map(_encode_in_worker, _chunks(texts), workers, _init_worker, (job,))


# --- writing ------------------------------------------------------------------------------------

class _SplitWriter:
    """Appends documents to one split's shards, rolling over to a new shard when full."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file: BinaryIO | None = None
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, ids: np.ndarray) -> None:
        if self._file is not None and self._tokens + len(ids) > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._file = open(self.directory / f"{shard_name(self.split, len(self.shards))}.bin", "wb")
        self._starts.append(self._tokens)
        self._file.write(ids.tobytes())
        self._tokens += len(ids)

    def _close_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file.close()
        np.save(self.directory / f"{name}.idx.npy", np.asarray(self._starts, dtype=np.int64))
        self.shards.append({"file": f"{name}.bin", "index": f"{name}.idx.npy",
                            "tokens": self._tokens, "documents": len(self._starts)})
        self._file, self._starts, self._tokens = None, [], 0

    def close(self) -> dict:
        if self._file is not None:
            self._close_shard()
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards), "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()


def write_shards(
    texts: Iterable[str],
    tokenizer: TokenizerLike,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.0005,
    shard_tokens: int = 2**24,
    workers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    add_bos: bool = False,
    add_eos: bool = True,
) -> dict:
    """Tokenize `texts` (any iterable of documents, consumed once, as a stream) into token shards
    at `out_dir`, and return the summary that is also saved as meta.json.

    val_fraction: expected share of documents in the val split, chosen by hash (see `split_of`).
    shard_tokens: tokens per shard at most (a single longer document gets a shard of its own).
    workers: tokenizer processes (default: all CPUs; 1 tokenizes in this process). The output is
      byte-identical for any number of workers.
    add_bos / add_eos: put the tokenizer's bos before / eos after every document.
    Empty documents are skipped (and counted). An existing non-empty `out_dir` is refused
    unless overwrite=True.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if not (add_bos or add_eos):
        raise ValueError("documents need a separator, or packed sequences would run one text into the next "
                         "with nothing to mark the seam: keep add_eos=True and/or set add_bos=True "
                         "(`lmlab data tokenize`: drop --no-eos or add --bos)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    bos = _special_id(tokenizer, "bos_id", "add_bos") if add_bos else None
    eos = _special_id(tokenizer, "eos_id", "add_eos") if add_eos else None
    job = _Job(tokenizer, dtype.str, seed, float(val_fraction),
               prefix=() if bos is None else (bos,), suffix=() if eos is None else (eos,))
    fingerprint = tokenizer_fingerprint(tokenizer)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        writers = {split: _SplitWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
        try:
            empty = _tokenize_into(writers, _encoded_chunks(texts, job, workers), progress)
        except BaseException:
            for writer in writers.values():
                writer.abort()  # close open files; atomic_directory then deletes them
            raise
        splits = {split: writer.close() for split, writer in writers.items()}
        _check_not_empty(splits, empty, val_fraction)
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "dtype": dtype.name, "vocab_size": vocab_size, "tokenizer_fingerprint": fingerprint,
            "separator": {"bos_id": bos, "eos_id": eos},
            "split": {"rule": "sha256(seed, text) < val_fraction", "seed": seed, "val_fraction": val_fraction},
            "shard_tokens": shard_tokens, "empty_documents_skipped": empty,
            "splits": splits,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {"path": str(Path(out_dir)), **meta}


def _tokenize_into(writers: dict[str, _SplitWriter], chunks: Iterator[_Encoded], progress: bool) -> int:
    empty = docs = 0
    with tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for enc in chunks:
            ends = np.cumsum(enc.lengths)
            for end, length, is_val in zip(ends, enc.lengths, enc.is_val, strict=True):
                writers["val" if is_val else "train"].add(enc.tokens[end - length:end])
            empty += enc.empty
            docs += len(enc.lengths)
            bar.update(len(enc.tokens))
            bar.set_postfix(docs=docs, refresh=False)
    return empty


def _check_not_empty(splits: dict, empty: int, val_fraction: float) -> None:
    n_train, n_val = splits["train"]["documents"], splits["val"]["documents"]
    if n_train + n_val == 0:
        skipped = f" ({empty} empty documents were skipped)" if empty else ""
        raise ValueError(f"the corpus has no non-empty documents{skipped}; nothing to tokenize")
    if n_train == 0:
        raise ValueError(f"all {n_val} documents fell into the val split; lower val_fraction "
                         f"(now {val_fraction}) or add documents")
    if n_val == 0 and val_fraction > 0:
        warnings.warn(f"no document of {n_train} fell into the val split (val_fraction={val_fraction}); "
                      "the corpus is too small for this fraction", stacklevel=3)


# --- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One shard file of a split: its token count, document count, and where it lives."""

    path: Path
    index_path: Path
    tokens: int
    documents: int


class TokenShards:
    """A shard directory, opened for reading: metadata checked, shard files memory-mapped on
    demand. `TokenShards(path).tokens("train", 0)` is the first train shard as a numpy array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        if self.meta["dtype"] not in ("uint16", "uint32"):
            raise ShardFormatError(f"{self.path}: unknown token dtype {self.meta['dtype']!r} in {META_FILE}")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.meta["vocab_size"]
        self.fingerprint: str = self.meta["tokenizer_fingerprint"]
        self._shards = {split: self._check_files(split) for split in SPLITS}

    def _check_files(self, split: str) -> list[Shard]:
        shards = []
        for entry in self.meta["splits"][split]["shards"]:
            shard = Shard(self.path / entry["file"], self.path / entry["index"], entry["tokens"], entry["documents"])
            if not shard.path.is_file() or not shard.index_path.is_file():
                raise ShardFormatError(f"{self.path}: {entry['file']} or {entry['index']} is missing; "
                                       "the shard directory is incomplete, write it again")
            expected = shard.tokens * self.dtype.itemsize
            if shard.path.stat().st_size != expected:
                raise ShardFormatError(
                    f"{shard.path} has {shard.path.stat().st_size} bytes, but meta.json says {shard.tokens} "
                    f"{self.dtype.name} tokens ({expected} bytes); the shard is corrupted, write it again")
            shards.append(shard)
        return shards

    def shards(self, split: str) -> list[Shard]:
        if split not in self._shards:
            raise ValueError(f"unknown split {split!r}; shard directories have {list(SPLITS)}")
        return self._shards[split]

    def num_tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards(split))

    def num_documents(self, split: str) -> int:
        return sum(s.documents for s in self.shards(split))

    def tokens(self, split: str, index: int) -> np.ndarray:
        """Shard `index` of `split` as a read-only memory map (nothing is read until used)."""
        return np.memmap(self.shards(split)[index].path, dtype=self.dtype, mode="r")

    def doc_starts(self, split: str, index: int) -> np.ndarray:
        """Start offsets of the documents in shard `index` of `split` (int64, first is 0)."""
        starts = np.load(self.shards(split)[index].index_path)
        shard = self.shards(split)[index]
        if starts.ndim != 1 or len(starts) != shard.documents or (len(starts) and starts[0] != 0):
            raise ShardFormatError(f"{shard.index_path} does not match meta.json; write the shards again")
        return starts

    def documents(self, split: str) -> Iterator[np.ndarray]:
        """Every document of `split` in order, as its token array (separators included)."""
        for i, shard in enumerate(self.shards(split)):
            tokens, starts = self.tokens(split, i), self.doc_starts(split, i)
            ends = np.append(starts[1:], shard.tokens)
            for start, end in zip(starts, ends, strict=True):
                yield np.asarray(tokens[start:end])

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise TokenizerMismatchError unless `tokenizer` is the one these shards were written with."""
        theirs = tokenizer_fingerprint(tokenizer)
        if theirs != self.fingerprint or int(tokenizer.vocab_size) != self.vocab_size:
            raise TokenizerMismatchError(
                f"{self.path} was tokenized with another tokenizer (vocab_size {self.vocab_size}, fingerprint "
                f"{self.fingerprint[:23]}...) than this one (vocab_size {tokenizer.vocab_size}, fingerprint "
                f"{theirs[:23]}...); tokenize the corpus again with this tokenizer, or use the original one")


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"no token shards at {path}: the directory does not exist; "
                                "write shards with `lmlab data tokenize` or lmlab.data.shards.write_shards")
    if not meta_path.is_file():
        raise FileNotFoundError(f"no token shards at {path}: {META_FILE} is missing; "
                                "write shards with `lmlab data tokenize` or lmlab.data.shards.write_shards")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{meta_path} is not valid JSON ({e}); write the shards again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardFormatError(f"{meta_path} does not describe lmlab token shards")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ShardFormatError(f"{path} has shard format version {version}; this lmlab reads up to "
                               f"{FORMAT_VERSION}: upgrade lmlab")
    missing = [k for k in ("dtype", "vocab_size", "tokenizer_fingerprint", "splits") if k not in meta]
    if missing or any(split not in meta["splits"] for split in SPLITS):
        raise ShardFormatError(f"{meta_path} lacks {missing or list(SPLITS)}; write the shards again")
    return meta
