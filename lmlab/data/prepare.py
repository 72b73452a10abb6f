"""`lmlab data prepare`: raw text in, a cleaned, deduplicated, tokenized corpus out.

The stages run in this order, each optional, each reporting what it removed or changed:

    read -> normalize -> langid -> quality -> blocklist -> pii -> exact_dedup -> near_dedup -> shards

Normalization comes first so every later rule sees the same text; language identification comes
before the quality rules because those are calibrated for English (stop words, word lengths);
the blocklist and PII scrubbing come before dedup, so that two documents differing only in an
e-mail address are found to be the same; dedup comes last among the filters so that its
in-memory state holds only documents that survived everything else. The per-document stages
(`filters.py`, and the MinHash signature of `dedup.py`) run in worker processes when asked; the
results come back in input order, so the output does not depend on the number of workers.

Streaming: documents flow through as a generator. Near-duplicate removal needs every signature
before it can decide (a cluster's first member may arrive after the others' candidates), so the
surviving documents are spooled to a temporary file, clustered, then replayed into
`shards.write_shards`; memory holds only the signatures (num_perm * 4 bytes per document).

Output: a directory, written atomically, holding the token shards (or, without a tokenizer,
`documents.jsonl`), `report.json` (per stage: documents and characters in and out, removals per
reason and changes per kind, with a few truncated examples) and the same as `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_directory, atomic_file
from .dedup import (
    ExactDeduplicator,
    MinHashConfig,
    MinHasher,
    NearDuplicates,
    exact_key,
    find_near_duplicates,
    shingle_hashes,
)
from .filters import (
    Blocklist,
    BlocklistConfig,
    LangIdConfig,
    LanguageIdentifier,
    NormalizeConfig,
    Normalizer,
    Outcome,
    PIIConfig,
    PIIScrubber,
    QualityConfig,
    QualityFilter,
)
from .parallel import ordered_map
from .readers import DocumentReader

REPORT_FORMAT = "lmlab-prepare-report"
REPORT_VERSION = 1
STAGES = ("normalize", "langid", "quality", "blocklist", "pii", "exact_dedup", "near_dedup")
DOCUMENTS_FILE = "documents.jsonl"
_CHUNK_DOCS = 256  # documents per task sent to a worker; does not change the output


@dataclass
class PrepareConfig:
    """Which stages run, and how. A stage set to None (or False) is skipped."""

    normalize: NormalizeConfig | None = field(default_factory=NormalizeConfig)
    langid: LangIdConfig | None = field(default_factory=LangIdConfig)
    quality: QualityConfig | None = field(default_factory=QualityConfig)
    blocklist: BlocklistConfig | None = field(default_factory=BlocklistConfig)
    pii: PIIConfig | None = field(default_factory=PIIConfig)
    exact_dedup: bool = True
    near_dedup: MinHashConfig | None = field(default_factory=MinHashConfig)
    workers: int = 1
    examples: int = 3  # per reason, in the report
    example_chars: int = 200

    def validate(self) -> None:
        for part in (self.normalize, self.langid, self.quality, self.blocklist, self.near_dedup):
            if part is not None:
                part.validate()
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.examples < 0 or self.example_chars < 1:
            raise ValueError("examples must be >= 0 and example_chars >= 1")

    def enabled(self) -> list[str]:
        return [name for name in STAGES if getattr(self, name) not in (None, False)]


# --- configuration overrides ("--quality min_words=20") ---------------------------------------

def _coerce(text: str, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(text)
        if typing.get_origin(hint) is tuple:
            return tuple(t.strip() for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"{key}: cannot read {text!r} as {getattr(hint, '__name__', hint)}") from None
    raise ValueError(f"{key} cannot be set from the command line")


def apply_overrides(config: Any, items: Sequence[str]) -> Any:
    """A copy of the dataclass `config` with "key=value" items applied; nested fields take a dotted
    key ("c4.min_sentences=3"). Values are parsed by the field's type; tuples are comma-separated;
    "none" clears an optional field."""
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: write KEY=VALUE, e.g. min_words=20")
        *parents, name = key.strip().split(".")
        config = _set_path(config, parents, name, text.strip(), key.strip())
    return config


def _set_path(obj: Any, parents: list[str], name: str, text: str, key: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    head = parents[0] if parents else name
    if head not in names:
        raise ValueError(f"{type(obj).__name__} has no field {head!r} (in {key!r}); fields: {', '.join(names)}")
    if not parents:
        return dataclasses.replace(obj, **{name: _coerce(text, typing.get_type_hints(type(obj))[name], key)})
    child = getattr(obj, head)
    if child is None or not dataclasses.is_dataclass(child):
        raise ValueError(f"{key!r}: {head} is not set; switch it on first (e.g. --c4)")
    return dataclasses.replace(obj, **{head: _set_path(child, parents[1:], name, text, key)})


# --- one document through the per-document stages (runs in workers) ----------------------------

@dataclass
class StageEvent:
    """What one stage did to one document (see `filters.Outcome`); `snippet` is the start of a
    removed document, or the text around the first change of a changed one."""

    stage: str
    chars_in: int
    chars_out: int
    reason: str = ""
    detail: str = ""
    changes: dict[str, int] = field(default_factory=dict)
    snippet: str = ""
    kept_snippet: str = ""  # dedup: the start of the document that was kept instead


@dataclass
class CleanedDocument:
    text: str | None
    events: list[StageEvent]
    key: bytes | None = None  # exact-dedup key
    signature: np.ndarray | None = None  # MinHash signature


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _first_difference(a: str, b: str) -> int:
    """Length of the common prefix, by bisection (slice comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def around_change(before: str, after: str, limit: int) -> str:
    start = max(0, _first_difference(before, after) - limit // 4)
    return ("…" if start else "") + truncate(after[start:], limit)


class Cleaner:
    """The per-document stages of a PrepareConfig, chained."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        stages: list[tuple[str, Callable[[str], Outcome]]] = []
        if cfg.normalize is not None:
            stages.append(("normalize", Normalizer(cfg.normalize)))
        if cfg.langid is not None:
            stages.append(("langid", LanguageIdentifier(cfg.langid)))
        if cfg.quality is not None:
            stages.append(("quality", QualityFilter(cfg.quality)))
        if cfg.blocklist is not None:
            stages.append(("blocklist", Blocklist(cfg.blocklist)))
        if cfg.pii is not None:
            stages.append(("pii", PIIScrubber(cfg.pii)))
        self.stages = stages
        near = cfg.near_dedup
        self.hasher = MinHasher(near.num_perm, near.seed) if near is not None else None

    def __call__(self, text: str) -> CleanedDocument:
        events, limit = [], self.cfg.example_chars
        for name, stage in self.stages:
            out = stage(text)
            event = StageEvent(name, len(text), 0 if out.removed else len(out.text), out.reason, out.detail,
                               out.changes)
            if out.removed:
                event.snippet = truncate(text, limit)
                events.append(event)
                return CleanedDocument(None, events)
            if out.changes:
                event.snippet = around_change(text, out.text, limit) if out.text != text else truncate(text, limit)
            events.append(event)
            text = out.text
        doc = CleanedDocument(text, events)
        if self.cfg.exact_dedup:
            doc.key = exact_key(text)
        if self.hasher is not None:
            near = self.cfg.near_dedup
            doc.signature = self.hasher.signature(shingle_hashes(text, near.shingle, near.ngram))
        return doc


_worker_cleaner: Cleaner | None = None  # one per worker process, built by its initializer


def _init_worker(cfg: PrepareConfig) -> None:
    global _worker_cleaner
    _worker_cleaner = Cleaner(cfg)


def _clean_chunk(texts: list[str]) -> tuple[list[str], list[CleanedDocument]]:
    return texts, [_worker_cleaner(t) for t in texts]


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clean_documents(texts: Iterable[str], cfg: PrepareConfig,
                    cleaner: Cleaner | None = None) -> Iterator[tuple[str, CleanedDocument]]:
    """(original text, result) for every document, in input order. With cfg.workers > 1 the work
    goes to a process pool, at most 2 * workers chunks ahead of the consumer (Pool.imap would
    read the whole input ahead and hold it in memory)."""
    # Built here even for the pool: a bad setting (unknown language, missing blocklist file) must
    # fail in this process, since a pool whose initializer raises restarts workers forever.
    cleaner = cleaner or Cleaner(cfg)
    if cfg.workers <= 1:
        for text in texts:
            yield text, cleaner(text)
        return
    results = ordered_map(_clean_chunk, _chunks(texts, _CHUNK_DOCS), cfg.workers, _init_worker, (cfg,))
    # the chunk travels back with its results: the input is a stream and cannot be read twice
    for chunk, cleaned in results:
        yield from zip(chunk, cleaned, strict=True)


# --- the report ------------------------------------------------------------------------------

@dataclass
class StageReport:
    """Counts for one stage; examples are capped per reason / kind."""

    name: str
    max_examples: int = 3
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    removed: Counter = field(default_factory=Counter)
    changes: Counter = field(default_factory=Counter)
    changed_docs: int = 0
    examples: dict[str, list[dict]] = field(default_factory=dict)
    change_examples: dict[str, list[dict]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def _example(self, table: dict[str, list[dict]], key: str, doc: int, text: str, why: str,
                 kept: str = "") -> None:
        bucket = table.setdefault(key, [])
        if len(bucket) < self.max_examples:
            example = {"doc": doc, "text": text}
            if why:
                example["why"] = why
            if kept:
                example["kept"] = kept
            bucket.append(example)

    def add(self, event: StageEvent, doc: int) -> None:
        self.docs_in += 1
        self.chars_in += event.chars_in
        if event.reason:
            self.removed[event.reason] += 1
            self._example(self.examples, event.reason, doc, event.snippet, event.detail, event.kept_snippet)
            return
        self.docs_out += 1
        self.chars_out += event.chars_out
        if event.changes:
            self.changed_docs += 1
            self.changes.update(event.changes)
            for kind, count in event.changes.items():
                self._example(self.change_examples, kind, doc, event.snippet, f"{count} {kind}" if count > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out,
               "chars_in": self.chars_in, "chars_out": self.chars_out,
               "removed": dict(self.removed.most_common()), "examples": self.examples}
        if self.changes or self.changed_docs:
            out.update(changed_docs=self.changed_docs, changes=dict(self.changes.most_common()),
                       change_examples=self.change_examples)
        if self.info:
            out["info"] = self.info
        return out


class _Run:
    """One pass of the pipeline: documents in, surviving texts out, stage reports filled in."""

    def __init__(self, cfg: PrepareConfig, progress: bool):
        self.cfg, self.progress = cfg, progress
        self.cleaner = Cleaner(cfg)  # checks every stage's settings before anything is written
        self.stages = {name: StageReport(name, cfg.examples) for name in cfg.enabled()}
        self.read_docs = self.read_chars = self.kept_docs = self.kept_chars = 0

    def _cleaned(self, texts: Iterable[str]) -> Iterator[tuple[int, str, np.ndarray | None]]:
        """(input index, text, signature) of each document that survives the per-document stages
        and exact dedup."""
        exact = ExactDeduplicator() if self.cfg.exact_dedup else None
        survivors = 0
        with tqdm(desc="cleaning", unit="doc", disable=not self.progress) as bar:
            for index, (original, doc) in enumerate(clean_documents(texts, self.cfg, self.cleaner)):
                bar.update()
                self.read_docs += 1
                self.read_chars += len(original)
                for event in doc.events:
                    self.stages[event.stage].add(event, index)
                if doc.text is None:
                    continue
                if exact is not None:
                    first = exact.check(doc.key, index)
                    size = len(doc.text)
                    if first is None:
                        self.stages["exact_dedup"].add(StageEvent("exact_dedup", size, size), index)
                    else:
                        self.stages["exact_dedup"].add(StageEvent(
                            "exact_dedup", size, 0, "exact_duplicate", f"same text as input doc #{first}",
                            snippet=truncate(doc.text, self.cfg.example_chars)), index)
                        continue
                survivors += 1
                bar.set_postfix(kept=survivors, refresh=False)
                yield index, doc.text, doc.signature

    def documents(self, texts: Iterable[str], spool_dir: Path) -> Iterator[str]:
        if self.cfg.near_dedup is None:
            for _, text, _ in self._cleaned(texts):
                yield self._count_out(text)
            return
        spool = spool_dir / "spool.jsonl"
        indices, sizes, signatures = [], [], []
        with open(spool, "w", encoding="utf-8") as f:
            for index, text, signature in self._cleaned(texts):
                f.write(json.dumps(text) + "\n")  # ASCII escapes: safe for any str
                indices.append(index)
                sizes.append(len(text))
                signatures.append(signature)
        near = self.cfg.near_dedup
        sigs = np.stack(signatures) if signatures else np.zeros((0, near.num_perm), dtype=np.uint32)
        result = find_near_duplicates(sigs, near)
        report = self.stages["near_dedup"]
        report.info = {"threshold": near.threshold, "num_perm": near.num_perm, "shingle": f"{near.shingle} "
                       f"{near.ngram}-grams", "bands": result.bands, "rows": result.rows,
                       "candidate_pairs": result.candidate_pairs, "joined_pairs": result.joined_pairs}
        yield from self._replay(spool, indices, sizes, sigs, result)

    def _replay(self, spool: Path, indices: list[int], sizes: list[int], sigs: np.ndarray,
                result: NearDuplicates) -> Iterator[str]:
        """Stream the spool back, dropping the near-duplicates, counting, keeping examples."""
        report, limit = self.stages["near_dedup"], self.cfg.example_chars
        # the kept documents that the examples show beside their removed duplicates
        wanted = {int(result.root[i]) for i in np.flatnonzero(~result.keep)[:self.cfg.examples]}
        kept_text: dict[int, str] = {}
        with open(spool, encoding="utf-8") as f:
            for pos, line in enumerate(f):
                text = json.loads(line)
                root = int(result.root[pos])
                if root == pos:
                    event = StageEvent("near_dedup", sizes[pos], sizes[pos])
                    if pos in wanted:
                        kept_text[pos] = truncate(text, limit)
                else:
                    similarity = float(np.mean(sigs[pos] == sigs[root]))
                    why = f"near-duplicate of input doc #{indices[root]} (estimated Jaccard {similarity:.2f})"
                    event = StageEvent("near_dedup", sizes[pos], 0, "near_duplicate", why,
                                       snippet=truncate(text, limit), kept_snippet=kept_text.get(root, ""))
                report.add(event, indices[pos])
                if root == pos:
                    yield self._count_out(text)

    def _count_out(self, text: str) -> str:
        self.kept_docs += 1
        self.kept_chars += len(text)
        return text

    def report(self, sources: list[str], reader_stats: dict | None, output: dict, seconds: float) -> dict:
        return {
            "format": REPORT_FORMAT, "version": REPORT_VERSION,
            "sources": sources,
            "read": {"documents": self.read_docs, "chars": self.read_chars,
                     **{k: v for k, v in (reader_stats or {}).items() if k not in ("documents", "chars")}},
            "stages": [self.stages[name].to_dict() for name in self.cfg.enabled()],
            "skipped_stages": [name for name in STAGES if name not in self.stages],
            "output": {"documents": self.kept_docs, "chars": self.kept_chars, **output},
            "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),  # tuples as lists, as in the file
            "seconds": round(seconds, 2),
        }


# --- sources ---------------------------------------------------------------------------------

class Sources:
    """Documents from files and directories (`readers.DocumentReader`) and registry dataset names
    (`sources.texts(name, split)`), in the order given. A source that exists on disk is a path;
    anything else that looks like a path (a separator or a file extension) is a missing file; the
    rest are dataset names. Every source is checked here, before any reading starts."""

    def __init__(self, sources: Sequence[str], *, split: str = "train", text_fields: Sequence[str] = ("text",),
                 split_on: str = "file"):
        if not sources:
            raise ValueError("give at least one source: a file, a directory or a dataset name")
        self.split = split
        self.parts: list[DocumentReader | str] = []
        for source in sources:
            if os.path.exists(source) or "/" in source or os.sep in source or Path(source).suffix:
                self.parts.append(DocumentReader([source], text_fields, split_on))
            else:
                self._registry().get_source(source)  # an unknown name fails now, with suggestions
                self.parts.append(source)

    @staticmethod
    def _registry():
        try:
            from . import sources as registry
        except ImportError as e:
            raise ValueError(f"dataset names need lmlab.data.sources, which failed to import ({e}); "
                             "give files or directories instead") from e
        return registry

    def describe(self) -> list[str]:
        out: list[str] = []
        for part in self.parts:
            out += [str(p) for p in part.files] if isinstance(part, DocumentReader) else [f"{part} ({self.split})"]
        return out

    @property
    def stats(self) -> dict:
        """Reading counts of the file sources (files, empty records skipped, ...)."""
        total: Counter[str] = Counter()
        for part in self.parts:
            if isinstance(part, DocumentReader):
                total.update(part.stats)
        return dict(total)

    def __iter__(self) -> Iterator[str]:
        for part in self.parts:
            yield from part if isinstance(part, DocumentReader) else self._registry().texts(part, split=self.split)


# --- the pipeline ----------------------------------------------------------------------------

def prepare(
    texts: Iterable[str],
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    tokenizer: Any = None,
    *,
    val_fraction: float = 0.0005,
    shard_tokens: int | None = None,
    seed: int = 0,
    keep_text: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Clean, filter and deduplicate `texts`, then tokenize the survivors into token shards at
    `out_dir` (`shards.write_shards`, with a train/val split by document hash), and return the
    report (also written there as report.json and report.md).

    tokenizer: anything with encode/eos_id/vocab_size (see `shards.write_shards`); None writes the
      cleaned documents as documents.jsonl instead (e.g. to train a tokenizer on them first).
    keep_text: with a tokenizer, also write documents.jsonl.
    val_fraction, shard_tokens, seed: passed to write_shards.
    `texts` may be a `Sources` (or `DocumentReader`), whose reading counts then join the report.
    An existing non-empty `out_dir` is refused unless overwrite=True; nothing is left half-written.
    """
    config = config or PrepareConfig()
    config.validate()
    start = time.perf_counter()
    run = _Run(config, progress)
    target = Path(out_dir)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        spool_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.spool-", dir=tmp.parent))
        try:
            output = _write_output(run.documents(texts, spool_dir), tmp, spool_dir, tokenizer, keep_text, run,
                                   dict(val_fraction=val_fraction, seed=seed, workers=config.workers,
                                        progress=progress, **({} if shard_tokens is None else
                                                              {"shard_tokens": shard_tokens})))
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)
        describe = getattr(texts, "describe", None)
        report = run.report(describe() if callable(describe) else [], getattr(texts, "stats", None), output,
                            time.perf_counter() - start)
        with atomic_file(tmp / "report.json", "w") as f:
            f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        with atomic_file(tmp / "report.md", "w") as f:
            f.write(format_markdown(report))
    return report


def _write_jsonl(texts: Iterable[str], path: Path) -> Iterator[str]:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")  # ASCII escapes: valid for any str, even lone surrogates
            yield text


def _write_output(texts: Iterator[str], tmp: Path, spool_dir: Path, tokenizer: Any, keep_text: bool, run: _Run,
                  shard_options: dict) -> dict:
    if tokenizer is None:
        for _ in _write_jsonl(texts, tmp / DOCUMENTS_FILE):
            pass
        return {"documents_file": DOCUMENTS_FILE, "shards": None}
    from .shards import write_shards

    text_file = spool_dir / DOCUMENTS_FILE
    stream = _write_jsonl(texts, text_file) if keep_text else texts
    try:
        # tmp is still empty: write_shards fills it (atomically, in its own right)
        summary = write_shards(stream, tokenizer, tmp, **shard_options)
    except ValueError:
        if run.read_docs == 0:
            raise ValueError("the sources yielded no documents; check the paths, --text-field and --split-on") from None
        if run.kept_docs == 0:
            raise ValueError(f"every one of the {run.read_docs} documents was removed by the filters; see the "
                             "counts per stage (run without a tokenizer to get the report), and loosen or "
                             "switch off the stage that removed them") from None
        raise
    if keep_text:
        shutil.move(text_file, tmp / DOCUMENTS_FILE)
    return {"documents_file": DOCUMENTS_FILE if keep_text else None, "shards": summary}


# --- summaries -------------------------------------------------------------------------------

def _rows(report: dict) -> list[list[str]]:
    rows = [["read", "", f"{report['read']['documents']:,}", "", "", f"{report['read']['chars']:,}", ""]]
    for s in report["stages"]:
        removed = s["docs_in"] - s["docs_out"]
        reasons = ", ".join(f"{k} {v:,}" for k, v in list(s["removed"].items())[:3])
        if not reasons and s.get("changes"):
            reasons = "changed: " + ", ".join(f"{k} {v:,}" for k, v in list(s["changes"].items())[:3])
        rows.append([s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{removed:,}",
                     f"{s['chars_in']:,}", f"{s['chars_out']:,}", reasons])
    return rows


HEADER = ["stage", "docs in", "docs out", "removed", "chars in", "chars out", "top reasons"]


def format_summary(report: dict) -> str:
    """The per-stage table printed at the end of `lmlab data prepare`."""
    rows = [HEADER, *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, len(widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    out = report["output"]
    tail = f"kept {out['documents']:,} documents, {out['chars']:,} characters"
    shards = out.get("shards")
    if shards:
        splits = shards.get("splits", {})
        tail += "; tokens " + ", ".join(f"{k} {v.get('tokens', 0):,}" for k, v in splits.items())
    if report.get("skipped_stages"):
        tail += f"\nskipped stages: {', '.join(report['skipped_stages'])}"
    return "\n".join(lines) + "\n" + tail


def _code(text: str) -> str:
    return "`` " + json.dumps(text, ensure_ascii=False).replace("`", "'") + " ``"


def format_markdown(report: dict) -> str:
    """report.md: the summary table, then every stage's reasons and examples."""
    lines = ["# Corpus preparation report", ""]
    if report["sources"]:
        lines += ["Sources: " + ", ".join(f"`{s}`" for s in report["sources"]), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    out = report["output"]
    lines += ["", f"Kept {out['documents']:,} documents ({out['chars']:,} characters).", ""]
    if report.get("skipped_stages"):
        lines += [f"Skipped stages: {', '.join(report['skipped_stages'])}.", ""]
    for s in report["stages"]:
        lines += [f"## {s['name']}", "", f"{s['docs_in']:,} documents in, {s['docs_out']:,} out."]
        if s.get("info"):
            lines += ["", ", ".join(f"{k}: {v}" for k, v in s["info"].items())]
        for title, counts, examples in (("Removed", s["removed"], s["examples"]),
                                        ("Changed or noted", s.get("changes", {}), s.get("change_examples", {}))):
            if not counts:
                continue
            lines += ["", f"{title}:", ""]
            for reason, count in counts.items():
                lines.append(f"- **{reason}**: {count:,}")
                for ex in examples.get(reason, []):
                    why = f" ({ex['why']})" if ex.get("why") else ""
                    lines.append(f"  - doc #{ex['doc']}{why}: {_code(ex['text'])}")
                    if ex.get("kept"):
                        lines.append(f"    - kept: {_code(ex['kept'])}")
        lines.append("")
    return "\n".join(lines)
