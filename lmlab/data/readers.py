"""Reading a raw corpus as a stream of documents (plain strings).

Formats, chosen by file name: `.txt`, `.jsonl` and `.parquet`, each also gzip-compressed (`.gz`).
A directory stands for every such file below it, in sorted order, so a run is reproducible.

- `.txt`: one document per file, or split into several (`split_on`): at blank lines
  ("blank-lines": paragraphs, e.g. the speeches of a play), at every line ("lines"), or at lines
  that match a regular expression as a whole (e.g. `<\\|endoftext\\|>` for TinyStories; the
  separator line itself is dropped). Files are read line by line, so a multi-gigabyte text file
  streams in constant memory.
- `.jsonl`: one JSON object per line; the document is its `text` field, or several fields joined
  by a blank line (GSM8K: `question` and `answer`).
- `.parquet`: the same with columns, read in record batches through pyarrow (the `data` extra).
  A gzipped parquet file (unusual: parquet compresses inside) is decompressed into memory.

Bytes that are not valid UTF-8 become U+FFFD rather than stopping a long run; the normalization
stage counts the documents that contain one.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
SPLIT_MODES = ("file", "blank-lines", "lines")
PARQUET_BATCH = 1024


def file_format(path: str | Path) -> str | None:
    """"txt", "jsonl" or "parquet" for a file name this module reads (".gz" allowed), else None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return FORMATS.get(suffixes[-1]) if suffixes else None


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files to read: each path itself, or for a directory every readable file below it (sorted).
    Raises FileNotFoundError for a missing path and ValueError for a file in an unknown format or
    a directory without any readable file."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
            if not found:
                raise ValueError(f"{path} holds no .txt, .jsonl or .parquet file (or .gz of one)")
            files += found
        elif path.is_file():
            if file_format(path) is None:
                raise ValueError(f"{path}: unknown format; name it .txt, .jsonl or .parquet (optionally + .gz)")
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def separator_test(split_on: str) -> Callable[[str], bool] | None:
    """For "blank-lines" or a regex, a function telling whether a line (without its newline)
    separates documents; None for "file" and "lines". Raises ValueError for a regular expression
    that does not compile."""
    if split_on in ("file", "lines"):
        return None
    if split_on == "blank-lines":
        return lambda line: not line.strip()
    try:
        pattern = re.compile(split_on)
    except re.error as e:
        raise ValueError(f"split_on: {split_on!r} is neither one of {SPLIT_MODES} nor a valid regular "
                         f"expression ({e})") from None
    return lambda line: pattern.fullmatch(line) is not None


def split_lines(lines: Iterable[str], split_on: str) -> Iterator[str]:
    """Documents from a stream of lines (with their newlines), without the newline that ends
    them. Pieces of whitespace alone are not documents."""
    if split_on == "lines":
        yield from (line.rstrip("\r\n") for line in lines if line.strip())
        return
    is_separator = separator_test(split_on)
    if is_separator is None:
        raise ValueError(f"split_lines needs a way to split, got split_on={split_on!r}")
    piece: list[str] = []
    for line in lines:
        if is_separator(line.rstrip("\r\n")):
            if any(p.strip() for p in piece):
                yield "".join(piece).rstrip("\r\n")
            piece = []
        else:
            piece.append(line)
    if any(p.strip() for p in piece):
        yield "".join(piece).rstrip("\r\n")


def open_text(path: Path) -> IO[str]:
    """A text file, gzip-compressed or not, as UTF-8 (undecodable bytes become U+FFFD)."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _join_fields(record: dict, fields: Sequence[str], where: str) -> str:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{where}: no field {missing[0]!r} (fields: {', '.join(map(str, record))}); "
                         "choose the text field(s) with --text-field")
    values = []
    for name in fields:
        value = record[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} is a {type(value).__name__}, not text; "
                             "choose a text field with --text-field")
        values.append(value)
    return "\n\n".join(v for v in values if v)


def read_jsonl(path: Path, fields: Sequence[str]) -> Iterator[str]:
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(record).__name__}, expected an object")
            yield _join_fields(record, fields, f"{path}:{number}")


def read_parquet(path: Path, fields: Sequence[str]) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading parquet needs pyarrow: pip install 'lmlab[data]'") from e
    source = pa.BufferReader(gzip.decompress(path.read_bytes())) if path.suffix.lower() == ".gz" else path
    table = pq.ParquetFile(source)
    columns = table.schema_arrow.names
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (columns: {', '.join(columns)}); "
                         "choose the text column(s) with --text-field")
    for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=list(fields)):
        for row, record in enumerate(batch.to_pylist()):
            yield _join_fields(record, fields, f"{path} (row {row} of a batch)")


def read_txt(path: Path, split_on: str = "file") -> Iterator[str]:
    with open_text(path) as f:
        if split_on == "file":
            text = f.read()
            if text.strip():
                yield text
        else:
            yield from split_lines(f, split_on)


class DocumentReader:
    """Iterate over the documents of `paths` (files or directories), counting as it goes.

    text_fields: for jsonl and parquet, the field(s) that make the document.
    split_on: for txt, "file", "blank-lines", "lines" or a separator-line regex (see module doc).
    After (or during) iteration, `stats` holds files, documents, characters, and records whose
    text fields were empty (skipped: there is nothing to clean).
    """

    def __init__(self, paths: Iterable[str | Path], text_fields: Sequence[str] = ("text",), split_on: str = "file"):
        self.files = expand_paths(paths)
        self.text_fields = tuple(text_fields)
        if not self.text_fields:
            raise ValueError("give at least one text field")
        self.split_on = split_on
        separator_test(split_on)  # a bad regex fails now, not after an hour of reading
        if split_on != "file" and not any(file_format(p) == "txt" for p in self.files):
            raise ValueError(f"split_on={split_on!r} applies to .txt files, and none is among the inputs")
        self.stats: Counter[str] = Counter()

    def _documents(self, path: Path) -> Iterator[str]:
        kind = file_format(path)
        if kind == "txt":
            return read_txt(path, self.split_on)
        if kind == "jsonl":
            return read_jsonl(path, self.text_fields)
        return read_parquet(path, self.text_fields)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            self.stats["files"] += 1
            for text in self._documents(path):
                if not text.strip():
                    self.stats["empty_records_skipped"] += 1
                    continue
                self.stats["documents"] += 1
                self.stats["chars"] += len(text)
                yield text

    def describe(self) -> list[str]:
        return [str(p) for p in self.files]


def read_documents(paths: Iterable[str | Path], text_fields: Sequence[str] = ("text",),
                   split_on: str = "file") -> Iterator[str]:
    """The documents of `paths`, as a stream (see `DocumentReader`)."""
    return iter(DocumentReader(paths, text_fields, split_on))

