"""Benchmark contamination: which evaluation items share an n-gram with a training corpus.

The method of the GPT-3 paper (Brown et al., 2020, appendix C): an evaluation item is flagged
when any of its word 13-grams also occurs in the training data, after normalization that ignores
case, punctuation and whitespace. For each benchmark the report gives the items checked, the
items with any overlap (count and percent), examples with the shared n-gram, and the
distribution of each item's overlap fraction (the share of its distinct n-grams found in
training), which tells a stray common phrase (a small fraction) from a copied item (near 1).

Normalization (both sides): Unicode lowercase; every character that is not a letter or a digit
becomes a space; split on whitespace. So "Don't!" gives the words "don", "t".

An item shorter than n words is checked whole, as in GPT-3 (flagged if its entire word sequence
occurs in training), down to MIN_WORDS = 8 words (GPT-3's smallest n; shorter sequences match by
chance too often); shorter items are counted as `too_short`, never as clean. GPT-3 also lowered n
per dataset to its 5th-percentile item length (clamped to 8..13): pass `n` to do the same.

Efficiency: the evaluation n-grams are hashed (64-bit polynomial hashes of per-word 64-bit
codes) into one sorted array; the training corpus is streamed once, its n-gram hashes computed
a million words at a time with numpy and looked up by binary search. Every hash hit is confirmed
word by word, so a hash collision can never flag an item. Training input: .txt, .jsonl and
.parquet files (optionally .gz) or registered datasets; token shards are out of scope (the
n-grams are over words, and shards hold token ids; check the text the shards were made from).

Why by hand: no maintained library does this check; the code is short and shows the method.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .readers import open_text
from .synthetic import EVAL_TASKS

NGRAM = 13
MIN_WORDS = 8  # shorter items are not checked (GPT-3's smallest n: shorter matches are mostly chance)
FLUSH_WORDS = 1 << 20  # training words hashed per numpy batch
TXT_BLOCK_CHARS = 1 << 20  # a .txt file is read in blocks of whole lines of about this size
HASH_BASE = np.uint64(0x100000001B3)  # odd multiplier of the polynomial hash (mod 2**64)
HIST_EDGES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
# `synthetic-eval`: the synthetic corpus' held-out sets, one report per task
ALIASES = {"synthetic-eval": [f"synthetic:eval-{task}" for task in EVAL_TASKS]}
_NOT_WORD = re.compile(r"[\W_]+")


def normalize(text: str) -> list[str]:
    """Words of `text`: lowercased, every non-alphanumeric character a separator."""
    return _NOT_WORD.sub(" ", text.lower()).split()


# --- hashing -----------------------------------------------------------------------------------

class _Codes:
    """A stable 64-bit code per word (the first 8 bytes of its BLAKE2b), memoized per run."""

    def __init__(self) -> None:
        self.memo: dict[str, int] = {}

    def __call__(self, words: Sequence[str]) -> np.ndarray:
        memo = self.memo
        for w in set(words).difference(memo):
            memo[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        return np.array([memo[w] for w in words], dtype=np.uint64)


def window_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n consecutive codes: sum_j codes[i+j] * BASE**(n-1-j) mod 2**64."""
    m = len(codes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = codes[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            acc = acc * HASH_BASE + codes[j:j + m]
    return acc


# --- the report ----------------------------------------------------------------------------------

@dataclass
class BenchmarkReport:
    """Contamination of one evaluation set. `overlap` holds, per item, the fraction of its
    distinct n-grams found in training (None for items too short to check)."""

    name: str
    n: int
    items: int
    checked: int
    too_short: int
    contaminated: int
    contaminated_items: list[int]
    histogram: dict[str, int]
    examples: list[dict[str, Any]] = field(default_factory=list)
    overlap: list[float | None] = field(default_factory=list, repr=False)

    @property
    def percent(self) -> float:
        return 100.0 * self.contaminated / self.checked if self.checked else 0.0

    def to_dict(self, with_overlap: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["percent"] = round(self.percent, 4)
        if not with_overlap:
            d.pop("overlap")
        return d


def _histogram(fractions: Iterable[float]) -> dict[str, int]:
    labels = ["0"] + [f"({lo:g}, {hi:g}]" if hi < 1 else f"({lo:g}, 1)" for lo, hi in
                      zip(HIST_EDGES[:-1], HIST_EDGES[1:], strict=True)] + ["1"]
    hist = dict.fromkeys(labels, 0)
    for f in fractions:
        if f == 0:
            hist["0"] += 1
        elif f >= 1:
            hist["1"] += 1
        else:
            i = bisect.bisect_left(HIST_EDGES, f) - 1  # (edge_i, edge_i+1]
            hist[labels[1 + i]] += 1
    return hist


# --- the index -----------------------------------------------------------------------------------

@dataclass
class _Table:
    """The evaluation n-grams of one length: hashes sorted, with the item and position of each."""

    hashes: np.ndarray
    owner: np.ndarray
    position: np.ndarray
    found: np.ndarray


class ContaminationIndex:
    """The n-grams of some evaluation sets; `feed` training text into it, then `reports()`.

    An item of at least n words is checked through its distinct n-grams. An item of
    `min_words` to n-1 words is checked whole, as GPT-3 did: it is flagged if its entire word
    sequence occurs in training. Shorter items are reported as too short to check.
    """

    def __init__(self, evals: dict[str, Sequence[str]], n: int = NGRAM, min_words: int = MIN_WORDS) -> None:
        if n < 1 or min_words < 1:
            raise ValueError(f"n and min_words must be at least 1, got n={n}, min_words={min_words}")
        if not evals:
            raise ValueError("give at least one evaluation set")
        self.n, self.min_words = n, min(min_words, n)
        self.codes = _Codes()
        self.names = list(evals)
        self.texts: list[list[str]] = [list(t) for t in evals.values()]
        self.words: list[list[str]] = []  # per global item id
        self.first_item: list[int] = []  # global id of each benchmark's first item
        parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for texts in self.texts:
            self.first_item.append(len(self.words))
            for text in texts:
                gid = len(self.words)
                words = normalize(text)
                self.words.append(words)
                if len(words) < self.min_words:
                    continue
                size = min(len(words), n)
                h = window_hashes(self.codes(words), size)
                first: dict[tuple[str, ...], int] = {}
                for pos in range(len(h)):  # one entry per distinct n-gram of the item
                    first.setdefault(tuple(words[pos:pos + size]), pos)
                keep = np.fromiter(first.values(), dtype=np.int64, count=len(first))
                parts.setdefault(size, []).append((h[keep], np.full(len(keep), gid, dtype=np.int64), keep))
        self.tables: dict[int, _Table] = {}
        for size, chunks in sorted(parts.items()):
            h, o, p = (np.concatenate(c) for c in zip(*chunks, strict=True))
            order = np.argsort(h, kind="stable")
            self.tables[size] = _Table(h[order], o[order], p[order], np.zeros(len(h), dtype=bool))
        self.match: dict[int, str] = {}  # global item id -> the first training n-gram found for it
        self._pending: list[list[str]] = []
        self._pending_words = 0
        self._tail: list[str] = []

    # training side -----------------------------------------------------------------------------

    def feed(self, text: str, continues: bool = False) -> None:
        """Add training text. `continues=True`: it continues the previous piece (the next lines
        of one file), so n-grams spanning the two are checked too."""
        words = normalize(text)
        if continues and self._tail:
            words = self._tail + words
        self._tail = words[-(self.n - 1):] if self.n > 1 else []
        if len(words) >= self.min_words:
            self._pending.append(words)
            self._pending_words += len(words)
            if self._pending_words >= FLUSH_WORDS:
                self.flush()

    def flush(self) -> None:
        """Hash and look up everything fed so far."""
        pending, self._pending, self._pending_words = self._pending, [], 0
        if not pending or not self.tables:
            return
        words = [w for piece in pending for w in piece]
        lengths = np.array([len(p) for p in pending], dtype=np.int64)
        piece_end = np.repeat(np.cumsum(lengths), lengths)  # exclusive end of each word's piece
        codes = self.codes(words)
        for size, table in self.tables.items():
            h = window_hashes(codes, size)
            valid = np.arange(len(h)) + size <= piece_end[: len(h)]  # windows inside one piece only
            idx = np.searchsorted(table.hashes, h)
            idx[idx == len(table.hashes)] = 0
            for i in np.flatnonzero(valid & (table.hashes[idx] == h)):
                self._confirm(table, size, h[i], words[i:i + size])

    def _confirm(self, table: _Table, size: int, h: np.uint64, gram: list[str]) -> None:
        lo = int(np.searchsorted(table.hashes, h, side="left"))
        hi = int(np.searchsorted(table.hashes, h, side="right"))
        for e in range(lo, hi):
            if table.found[e]:
                continue
            gid, pos = int(table.owner[e]), int(table.position[e])
            if self.words[gid][pos:pos + size] == gram:  # not a hash collision
                table.found[e] = True
                self.match.setdefault(gid, " ".join(gram))

    # results -----------------------------------------------------------------------------------

    def overlap_fractions(self) -> list[float | None]:
        """Per global item: the share of its distinct n-grams found in training (None: too short)."""
        self.flush()
        total = np.zeros(len(self.words), dtype=np.int64)
        hit = np.zeros(len(self.words), dtype=np.int64)
        for table in self.tables.values():
            total += np.bincount(table.owner, minlength=len(self.words))
            hit += np.bincount(table.owner[table.found], minlength=len(self.words))
        return [float(h / t) if t else None for h, t in zip(hit, total, strict=True)]

    def reports(self, n_examples: int = 3) -> list[BenchmarkReport]:
        fractions_all = self.overlap_fractions()
        out = []
        for b, name in enumerate(self.names):
            first = self.first_item[b]
            fractions = fractions_all[first:first + len(self.texts[b])]
            checked = [f for f in fractions if f is not None]
            dirty = [i for i, f in enumerate(fractions) if f]
            ranked = sorted(dirty, key=lambda i: (-fractions[i], i))[:n_examples]
            examples = [{"index": i, "overlap": round(fractions[i], 4), "ngram": self.match[first + i],
                         "text": _excerpt(self.texts[b][i])} for i in ranked]
            out.append(BenchmarkReport(
                name=name, n=self.n, items=len(fractions), checked=len(checked),
                too_short=len(fractions) - len(checked), contaminated=len(dirty), contaminated_items=dirty,
                histogram=_histogram(checked), examples=examples, overlap=fractions,
            ))
        return out


def _excerpt(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- inputs --------------------------------------------------------------------------------------

def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value (a record's text fields, chat message contents...)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _feed_file(index: ContaminationIndex, path: Path, bar: tqdm) -> None:
    from .readers import file_format, read_parquet

    kind = file_format(path)
    if kind == "txt":  # streamed in blocks of lines; n-grams across blocks are kept
        with open_text(path) as f:
            block, size, first = [], 0, True
            for line in f:
                block.append(line)
                size += len(line)
                if size >= TXT_BLOCK_CHARS:
                    index.feed("".join(block), continues=not first)
                    bar.update(size)
                    block, size, first = [], 0, False
            index.feed("".join(block), continues=not first)
            bar.update(size)
    elif kind == "jsonl":  # every string of every record, each its own piece
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                bar.update(len(line))
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
                for s in _strings(record):
                    index.feed(s)
    else:
        for text in read_parquet(path, ("text",)):
            index.feed(text)
        bar.update(path.stat().st_size)


def _parse_spec(spec: str) -> tuple[str, str | None]:
    name, _, split = spec.partition(":")
    return name, split or None


def _is_registered(spec: str) -> bool:
    from .sources import SOURCES

    return _parse_spec(spec)[0] in SOURCES


def eval_set(spec: str, *, progress: bool = True) -> tuple[str, list[str]]:
    """(name, item texts) of an evaluation set: a registered dataset `NAME[:SPLIT]` (default
    split: test, else eval, else validation), `synthetic-eval`, or a .jsonl file or directory of
    them (an item is `prompt` + `answer` when present, else all its strings)."""
    from .sources import default_split, get_source, texts

    path = Path(spec)
    if path.exists() and not _is_registered(spec):
        return spec, [_item_text(r) for p in _jsonl_files(path) for r in _read_jsonl(p)]
    name, split = _parse_spec(spec)
    source = get_source(name)
    split = split or default_split(source)
    return f"{name}:{split}", list(texts(name, split, progress=progress))


def _jsonl_files(path: Path) -> list[Path]:
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no .jsonl evaluation file")
    return files


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None


def _item_text(record: Any) -> str:
    if isinstance(record, dict) and "prompt" in record and "answer" in record:
        return f"{record['prompt']}\n{record['answer']}"
    return "\n".join(_strings(record))


def training_inputs(train: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """(files, registered dataset specs) of training inputs; raises for anything else."""
    from .readers import expand_paths

    paths, registered = [], []
    for item in train:
        if Path(item).exists():
            paths.append(Path(item))
        elif _is_registered(str(item)):
            registered.append(str(item))
        else:
            raise FileNotFoundError(f"training input {item} is neither a file or directory nor a registered "
                                    "dataset (NAME[:SPLIT], see `lmlab data list`)")
    return (expand_paths(paths) if paths else []), registered


def scan_training(index: ContaminationIndex, train: Sequence[str | Path], *, progress: bool = True) -> None:
    """Stream training inputs into `index`: files and directories (.txt, .jsonl, .parquet, each
    optionally .gz) or registered datasets `NAME[:SPLIT]` (their `texts`; default split: train)."""
    from .sources import texts

    files, registered = training_inputs(train)
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="scanning training data",
              disable=not progress) as bar:
        for f in files:
            _feed_file(index, f, bar)
    for spec in registered:
        name, split = _parse_spec(spec)
        docs = texts(name, split or "train", progress=progress)
        for text in tqdm(docs, desc=f"scanning {spec}", unit="doc", disable=not progress):
            index.feed(text)


def check_contamination(train: Sequence[str | Path], evals: Sequence[str], *, n: int = NGRAM,
                        min_words: int = MIN_WORDS, n_examples: int = 3, progress: bool = True
                        ) -> list[BenchmarkReport]:
    """Contamination of each evaluation set in `evals` (see `eval_set`; `synthetic-eval` stands
    for the synthetic corpus' held-out tasks) by the training inputs `train` (see `scan_training`)."""
    training_inputs(train)  # a mistyped path fails now, before the evaluation sets are loaded
    specs = [s for spec in evals for s in ALIASES.get(spec, [spec])]
    sets = dict(eval_set(spec, progress=progress) for spec in specs)
    if len(sets) < len(specs):
        raise ValueError(f"an evaluation set is named twice in {evals}")
    index = ContaminationIndex(sets, n=n, min_words=min_words)
    scan_training(index, train, progress=progress)
    return index.reports(n_examples)


def contamination_of_texts(train: Iterable[str], evals: dict[str, Sequence[str]], *, n: int = NGRAM,
                           min_words: int = MIN_WORDS, n_examples: int = 3) -> list[BenchmarkReport]:
    """The same on in-memory texts: each training string is its own document."""
    index = ContaminationIndex(evals, n=n, min_words=min_words)
    for text in train:
        index.feed(text)
    return index.reports(n_examples)


def format_reports(reports: Sequence[BenchmarkReport]) -> str:
    """A plain-text table with examples, for the command line."""
    width = max([len(r.name) for r in reports] + [9])
    lines = [f"{'benchmark':<{width}}  {'items':>7}  {'checked':>7}  {'short':>6}  {'overlap':>7}  {'%':>7}"]
    for r in reports:
        lines.append(f"{r.name:<{width}}  {r.items:>7,}  {r.checked:>7,}  {r.too_short:>6,}  "
                     f"{r.contaminated:>7,}  {r.percent:>6.2f}%")
    for r in reports:
        if not r.contaminated:
            continue
        hist = ", ".join(f"{k}: {v}" for k, v in r.histogram.items() if v)
        lines.append(f"\n{r.name}: overlap fraction of checked items: {hist}")
        for ex in r.examples:
            lines.append(f"  #{ex['index']} ({ex['overlap']:.0%} of its {r.n}-grams) shares \"{ex['ngram']}\"")
            lines.append(f"      {ex['text']}")
    return "\n".join(lines)
