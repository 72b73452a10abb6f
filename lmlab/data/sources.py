"""The dataset registry: a name instead of a path, for every corpus and benchmark lmlab uses.

Each `Source` records where its files come from (public URLs pinned to a commit where the host
allows it), their sha256 and size, the license, and a parser that turns the files of one split
into records with a documented schema (`records`) and into plain-text documents (`texts`).

Files live under the cache `LMLAB_DATA` (default `~/.cache/lmlab`) as `<LMLAB_DATA>/<name>/<path>`.
A folder laid out that way (a local mirror, a shared data directory) works offline exactly like a
cache the files were downloaded into. A missing file is downloaded with a progress bar; an
interrupted download leaves `<path>.part` behind and resumes from it with an HTTP Range request;
the file is renamed into place only after its sha256 (or, where no checksum is published, its
size and format) checks out, and a file that fails the check is deleted.

Why by hand, when Hugging Face `datasets` exists: the point is a registry a reader can audit in
one file (URL, checksum, license, parser side by side), that runs with the standard library
alone, and whose parsers read the exact upstream file formats (HellaSwag's six-line text layout,
MMLU's header-less CSVs, MosaicML's ARC conversion) rather than a re-hosted copy.

Record schemas (the parsed fields; every record is a plain dict):

    tinyshakespeare  {text}                       passages of whole speeches, about 2,000 chars
    tinystories      {text}                       one story per record
    fineweb-edu      {text, id, url, score}
    gsm8k            {question, answer, final_answer}
    humaneval        {task_id, prompt, canonical_solution, test, entry_point}
    mbpp             {task_id, text, code, test_list, test_setup_code, challenge_test_list}
    mmlu             {subject, question, choices, answer}          answer: index into choices
    hellaswag        {activity_label, context, endings, label}     label: index into endings
    arc              {subset, question, choices, answer}           answer: index into choices
    truthfulqa       {type, category, question, best_answer, best_incorrect_answer,
                      correct_answers, incorrect_answers, source, mc1_targets, mc2_targets}
    hh-rlhf          {subset, prompt, chosen, rejected}
    alpaca, dolly    {instruction, input, output} (+ category for dolly, id/name for seed tasks)
    synthetic        train/validation {text, task}; sft* {messages, task};
                     preference* {prompt, messages, chosen, rejected, reason, task};
                     eval {prompt, answer, task}
"""

from __future__ import annotations

import bz2
import codecs
import csv
import difflib
import gzip
import hashlib
import http.client
import json
import lzma
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

ENV_VAR = "LMLAB_DATA"
DEFAULT_HOME = "~/.cache/lmlab"
CHUNK = 1 << 20


# --- errors ------------------------------------------------------------------------------------

class DatasetError(Exception):
    """Base class of the registry's errors."""


class UnknownDatasetError(DatasetError, ValueError):
    """A name or split that the registry does not know."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file is absent and could not (or may not) be downloaded."""


class ChecksumError(DatasetError, ValueError):
    """A file's bytes are not the registered ones (sha256, size or format)."""


class DatasetFormatError(DatasetError, ValueError):
    """A file verified by size or format only does not parse as its dataset's format."""


# --- the registry's types ----------------------------------------------------------------------

@dataclass(frozen=True)
class File:
    """One file of a dataset.

    url: the URL, or a tuple of mirrors tried in order.
    path: where the file lives, relative to `<LMLAB_DATA>/<dataset name>/`.
    sha256, size: of the file as stored at `path`; None where no checksum is published, in which
      case the file is verified by size (when known) and by its format only.
    download_sha256, content_sha256: for a file whose URL serves another compression of the same
      content (HellaSwag: bzip2 upstream, gzip in the mirror layout): the downloaded bytes are
      checked against download_sha256, decompressed and checked against content_sha256, then
      recompressed to `path`. Such a recompressed file is accepted by its content_sha256, since
      compressors do not all produce the same bytes.
    """

    url: str | tuple[str, ...]
    path: str
    sha256: str | None
    size: int | None = None
    download_sha256: str | None = None
    content_sha256: str | None = None

    @property
    def urls(self) -> tuple[str, ...]:
        return (self.url,) if isinstance(self.url, str) else tuple(self.url)

    @property
    def verified_by(self) -> str:
        if self.sha256:
            return "sha256"
        return "size+format" if self.size else "format"


Parser = Callable[[Sequence[Path], str], Iterator[dict]]


@dataclass(frozen=True)
class Source:
    """A registered dataset. `splits` maps a split name to the paths (File.path) it reads;
    `parser(paths, split)` yields its records; `text(record)` renders one record as a document.
    `generate(directory, progress)`, for generated sources (the synthetic corpus): makes sure the
    files exist under the dataset directory, generating them when absent, damaged or made by
    another generator version."""

    name: str
    description: str
    license: str
    homepage: str
    files: tuple[File, ...]
    splits: Mapping[str, tuple[str, ...]]
    parser: Parser
    text: Callable[[dict], str]
    schema: str = ""
    generate: Callable[[Path, bool], None] | None = field(default=None, compare=False)

    def file(self, path: str) -> File:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def files_for(self, split: str | None) -> tuple[File, ...]:
        """The files one split reads, or every file when split is None."""
        if split is None:
            return self.files
        if split not in self.splits:
            raise UnknownDatasetError(
                f"dataset {self.name!r} has no split {split!r}; its splits are: {', '.join(self.splits)}"
            )
        return tuple(self.file(p) for p in self.splits[split])

    @property
    def checksums(self) -> str:
        """How this dataset's files are verified, for `lmlab data list`."""
        if self.generate is not None:
            return "generated"
        kinds = {f.verified_by for f in self.files}
        if kinds == {"sha256"}:
            return "sha256"
        return "sha256 (some files: size/format only)" if "sha256" in kinds else "none (size/format only)"


# --- where files live --------------------------------------------------------------------------

def data_home() -> Path:
    """The cache directory: $LMLAB_DATA, or ~/.cache/lmlab."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_HOME).expanduser()


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        close = difflib.get_close_matches(name, SOURCES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownDatasetError(
            f"unknown dataset {name!r}.{hint} Registered: {', '.join(sorted(SOURCES))} (`lmlab data list`)"
        ) from None


def default_split(source: Source) -> str:
    """The split an evaluation reads by default: test, else eval, else validation, else the first."""
    for split in ("test", "eval", "validation"):
        if split in source.splits:
            return split
    return next(iter(source.splits))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _codec(path: str | Path) -> Callable[..., IO[bytes]]:
    suffix = Path(str(path).split("?")[0]).suffix
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)


def _sha256_decompressed(path: Path) -> str:
    h = hashlib.sha256()
    with _codec(path)(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_format(path: Path) -> str | None:
    """A cheap sanity check for files without a checksum: None if `path` looks like its format,
    else what is wrong (the usual failure is an HTML error page saved under the data file's name)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head:
        return "the file is empty"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "the file is an HTML page, not data (a login or error page?)"
    name = path.name
    magic = {".gz": b"\x1f\x8b", ".bz2": b"BZh", ".xz": b"\xfd7zXZ", ".parquet": b"PAR1"}
    for suffix, expected in magic.items():
        if name.endswith(suffix):
            if not head.startswith(expected):
                return f"the file does not start with the {suffix} magic bytes {expected!r}"
            if suffix == ".parquet":
                with open(path, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    if f.read(4) != b"PAR1":
                        return "the parquet footer is missing (truncated file?)"
            return None
    if name.endswith((".json", ".jsonl")) and head.lstrip()[:1] not in (b"{", b"["):
        return "the file does not start with a JSON object or array"
    try:  # text formats: the head must be UTF-8 (allowing a character cut at the 64 KiB boundary)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as e:
        return f"the file is not UTF-8 text ({e})"
    return None


def check_file(file: File, path: Path) -> None:
    """Raise ChecksumError unless `path` holds `file`'s registered bytes (or content)."""
    actual_size = path.stat().st_size
    if file.sha256 is not None:
        if actual_size == file.size or file.size is None:
            if sha256_file(path) == file.sha256:
                return
        if file.content_sha256 and _safe_content_sha(path) == file.content_sha256:
            return
        raise ChecksumError(
            f"{path} does not match the registered file (expected sha256 {file.sha256}"
            f"{f', {file.size:,} bytes' if file.size else ''}; it has {actual_size:,} bytes). It is corrupt, "
            f"truncated or another version: delete it and download it again ({_urls_text(file)})"
        )
    if file.size is not None and actual_size != file.size:
        raise ChecksumError(
            f"{path} has {actual_size:,} bytes, the registered file has {file.size:,}: delete it and "
            f"download it again ({_urls_text(file)})"
        )
    problem = _check_format(path)
    if problem:
        raise ChecksumError(f"{path}: {problem}. Delete it and download it again ({_urls_text(file)})")


def _safe_content_sha(path: Path) -> str | None:
    try:
        return _sha256_decompressed(path)
    except (OSError, EOFError, lzma.LZMAError):
        return None


def _urls_text(file: File) -> str:
    return " or ".join(file.urls) if file.urls else "no URL: it is generated"


# --- download ------------------------------------------------------------------------------

def _open_url(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "lmlab"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, label: str) -> None:
    """Append the bytes of `url` to `part`, resuming from its current length where the server
    honours HTTP Range requests, and starting over where it does not."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open_url(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the part file is already whole
            return
        raise
    with response:
        status = getattr(response, "status", None)
        if offset and status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:  # a range we did not ask for
                response.close()
                part.unlink()
                return _fetch(url, part, progress=progress, timeout=timeout, label=label)
        elif offset:
            offset = 0  # the server ignored the Range header (or file://): it sends the whole file
        length = response.headers.get("Content-Length")
        total = int(length) + offset if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())


def _recompress(src: Path, dest_tmp: Path, file: File, url: str) -> None:
    """Decompress `src` (the URL's compression), check the content, recompress to `dest_tmp`."""
    h = hashlib.sha256()
    with _codec(url)(src, "rb") as fin, _open_for_write(dest_tmp, file.path) as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
    if file.content_sha256 and h.hexdigest() != file.content_sha256:
        dest_tmp.unlink()
        raise ChecksumError(
            f"{url}: the decompressed content has sha256 {h.hexdigest()}, expected {file.content_sha256}"
        )


def _open_for_write(path: Path, name: str) -> IO[bytes]:
    if name.endswith(".gz"):  # mtime=0: the same content always gives the same bytes
        return gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), compresslevel=9, mtime=0)
    return _codec(name)(path, "wb")


def download_file(file: File, dest: Path, *, progress: bool = True, timeout: float = 30.0,
                  label: str | None = None) -> None:
    """Download `file` to `dest`: mirrors in order, resuming `<dest>.part`, verified, renamed
    into place. Raises ChecksumError (part file deleted) or DatasetNotFoundError (unreachable)."""
    if not file.urls:
        raise DatasetNotFoundError(f"{dest} is missing and {file.path} has no download URL")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        probe = dest.parent / f".{dest.name}.write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise DatasetNotFoundError(
            f"{dest} is missing and cannot be downloaded there ({e.strerror or e}): {dest.parent} is not "
            f"writable. Point {ENV_VAR} at a writable folder, or put the file there by hand "
            f"(from {_urls_text(file)})"
        ) from None
    part = dest.with_name(dest.name + ".part")
    expected_sha = file.download_sha256 or file.sha256
    network_errors: list[str] = []
    checksum_errors: list[str] = []
    for url in file.urls:
        resumed = part.exists()
        try:
            _fetch(url, part, progress=progress, timeout=timeout, label=label or file.path)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            network_errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        problem = _verify_download(part, file, expected_sha)
        if problem:
            part.unlink(missing_ok=True)
            stale = " (resumed from an earlier .part file, which may have been the bad part)" if resumed else ""
            checksum_errors.append(f"{url}: {problem}{stale}")
            continue
        if file.download_sha256:
            tmp = dest.with_name(f".{dest.name}.tmp")
            try:
                _recompress(part, tmp, file, url)
            except ChecksumError as e:
                part.unlink(missing_ok=True)
                checksum_errors.append(str(e))
                continue
            part.unlink()
            part = tmp
        os.replace(part, dest)
        return
    if checksum_errors:
        raise ChecksumError(
            f"downloaded {file.path} but its bytes are not the registered ones, so it was deleted:\n  "
            + "\n  ".join(checksum_errors)
            + "\nRun the command again to start afresh. If it fails again the upstream file has changed: "
            + f"report it, or fetch a matching copy by hand and put it at {dest}"
        )
    raise DatasetNotFoundError(_unreachable_message(file, dest, network_errors))


def _verify_download(part: Path, file: File, expected_sha: str | None) -> str | None:
    if not part.exists():
        return "nothing was received"
    size = part.stat().st_size
    if expected_sha is not None:
        actual = sha256_file(part)
        return None if actual == expected_sha else f"sha256 {actual} ({size:,} bytes), expected {expected_sha}"
    if file.size is not None and size != file.size:
        return f"{size:,} bytes, expected {file.size:,}"
    return _check_format(part)


def _unreachable_message(file: File, dest: Path, errors: list[str]) -> str:
    check = f"sha256 {file.sha256}" if file.sha256 else "no published sha256; checked by size/format only"
    how = ""
    if file.download_sha256:
        how = (f"\nThe URL serves a {Path(file.urls[0]).suffix} file: recompress it, e.g. "
               f"`bunzip2 -c {Path(file.urls[0]).name} | gzip -9n > {dest}`")
    return (
        f"could not download {file.path}:\n  " + "\n  ".join(errors)
        + "\nIf this machine is offline, fetch the file on a connected one from "
        + " or ".join(file.urls)
        + f"\nand put it at exactly\n  {dest}\n({check}).{how} Or point {ENV_VAR} at a folder that already "
        f"holds {dest.parent.name}/{file.path}."
    )


# --- resolve, records, texts ---------------------------------------------------------------

def resolve(name: str, split: str | None = None, *, download: bool = True, progress: bool = True) -> Path:
    """Make sure the files of `name` (of one split, or all of them) are present and verified;
    return the dataset's directory `<LMLAB_DATA>/<name>`.

    A present file that fails its check raises ChecksumError (it is never deleted: it may be the
    user's). An absent one is downloaded when `download`, else DatasetNotFoundError says where to
    put it."""
    source = get_source(name)
    root = data_home() / source.name
    if source.generate is not None:
        return _resolve_generated(source, root, progress)
    files = source.files_for(split)
    for f in tqdm(files, desc=f"checking {name}", unit="file", disable=not progress or len(files) < 20,
                  leave=False):
        dest = root / f.path
        if dest.is_file():
            check_file(f, dest)
            continue
        if not download:
            raise DatasetNotFoundError(
                f"dataset {name!r}: {dest} is missing. Run `lmlab data download {name}` or fetch it by hand "
                f"from {_urls_text(f)} and put it at exactly that path"
            )
        download_file(f, dest, progress=progress, label=f"{name}/{f.path}")
    return root


def _resolve_generated(source: Source, root: Path, progress: bool) -> Path:
    try:
        source.generate(root, progress)
    except OSError as e:
        raise DatasetNotFoundError(
            f"dataset {source.name!r} is generated on first use, but could not be written to {root} ({e}). "
            f"Point {ENV_VAR} at a writable folder, or generate it with `lmlab data synth --out DIR`"
        ) from None
    return root


def records(name: str, split: str | None = None, *, download: bool = True, progress: bool = True) -> Iterator[dict]:
    """The parsed records of one split (default: test, else eval, else validation, else the
    first split), in the dataset's documented schema (see the module docstring)."""
    source = get_source(name)  # names, splits and files are checked now, records read lazily
    split = split or default_split(source)
    files = source.files_for(split)
    root = resolve(name, split, download=download, progress=progress)
    return source.parser([root / f.path for f in files], split)


def texts(name: str, split: str | None = None, *, download: bool = True, progress: bool = True) -> Iterator[str]:
    """One plain-text document per record: the documents of a corpus, or an evaluation item
    (question and answer) of a benchmark."""
    render = get_source(name).text
    return map(render, records(name, split, download=download, progress=progress))


# --- parsers ---------------------------------------------------------------------------------

def _open_text(path: Path) -> IO[str]:
    if path.name.endswith((".gz", ".bz2", ".xz")):
        return _codec(path)(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8-sig" if path.suffix == ".csv" else "utf-8", newline="" if
                path.suffix == ".csv" else None)


def _jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({e}); delete the file and "
                                         "download it again") from None


def _json(path: Path):
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}: not valid JSON ({e}); delete it and download it again") from None


def _fields(path: Path, record: dict, names: Iterable[str]) -> dict:
    missing = [n for n in names if n not in record]
    if missing:
        raise DatasetFormatError(f"{path}: a record lacks the field(s) {missing}; has {sorted(record)}")
    return {n: record[n] for n in names}


PASSAGE_CHARS = 2000  # tinyshakespeare passages: whole speeches, at least this many characters
VALIDATION_FRACTION = 0.1  # tinyshakespeare: the last 10% of characters, as nanoGPT does


def parse_shakespeare(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """Split at the speech boundary nearest 90% of the text (train before, validation after),
    then group whole consecutive speeches into passages of about PASSAGE_CHARS characters:
    a speech alone (often one line) is too short to be a document, the whole play too long.
    Passages never cross the two blank lines that separate the plays."""
    (path,) = paths
    text = path.read_text(encoding="utf-8")
    speeches: list[tuple[int, str]] = []  # (play, speech)
    for play, part in enumerate(re.split(r"\n{3,}", text)):
        speeches += [(play, s.strip("\n")) for s in part.split("\n\n") if s.strip()]
    cut_char, seen, cut = (1 - VALIDATION_FRACTION) * len(text), 0, len(speeches)
    for i, (_, speech) in enumerate(speeches):
        if seen + len(speech) / 2 >= cut_char:  # the boundary whose offset is closest to 90%
            cut = i
            break
        seen += len(speech) + 2
    chosen = speeches[:cut] if split == "train" else speeches[cut:]
    passage: list[str] = []
    size = 0
    for i, (play, speech) in enumerate(chosen):
        passage.append(speech)
        size += len(speech) + (2 if len(passage) > 1 else 0)  # the length of the joined passage
        if size >= PASSAGE_CHARS or i + 1 == len(chosen) or chosen[i + 1][0] != play:
            yield {"text": "\n\n".join(passage)}
            passage, size = [], 0


EOT = "<|endoftext|>"


def parse_tinystories(paths: Sequence[Path], split: str, *, drop_unterminated: bool = False) -> Iterator[dict]:
    """Stories are separated by the literal `<|endoftext|>` (on its own line in the upstream
    files). `drop_unterminated`: drop the text after the last separator (the sample is a byte
    range cut through its last story)."""
    for path in paths:
        pending: list[str] = []
        with _open_text(path) as f:
            for line in f:
                while EOT in line:
                    before, line = line.split(EOT, 1)
                    pending.append(before)
                    story = "".join(pending).strip()
                    pending = []
                    if story:
                        yield {"text": story}
                pending.append(line)
        rest = "".join(pending).strip()
        if rest and not drop_unterminated:
            yield {"text": rest}


def parse_parquet_texts(paths: Sequence[Path], split: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet files needs pyarrow: pip install 'lmlab[data]'") from None
    wanted = ("text", "id", "url", "score")
    for path in paths:
        pf = pq.ParquetFile(path)
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        if "text" not in columns:
            raise DatasetFormatError(f"{path}: no 'text' column (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            yield from batch.to_pylist()


def parse_gsm8k(paths: Sequence[Path], split: str) -> Iterator[dict]:
    for path in paths:
        for r in _jsonl(path):
            rec = _fields(path, r, ("question", "answer"))
            final = rec["answer"].rsplit("####", 1)
            rec["final_answer"] = final[1].strip().replace(",", "") if len(final) == 2 else None
            yield rec


HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MBPP_FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
# The split of the MBPP paper's README by task id (the same ranges as the Hugging Face "full" set).
MBPP_SPLITS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
               "train": range(601, 1001)}


def parse_humaneval(paths: Sequence[Path], split: str) -> Iterator[dict]:
    for path in paths:
        for r in _jsonl(path):
            yield _fields(path, r, HUMANEVAL_FIELDS)


def parse_mbpp(paths: Sequence[Path], split: str) -> Iterator[dict]:
    ids = MBPP_SPLITS[split]
    for path in paths:
        for r in _jsonl(path):
            if r.get("task_id") in ids:
                yield _fields(path, r, MBPP_FIELDS)


LETTERS = "ABCD"


def parse_mmlu(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """Header-less CSVs `question,A,B,C,D,answer`; the subject is the file name."""
    for path in sorted(paths, key=lambda p: p.name):
        subject = path.stem.rsplit("_", 1)[0]
        with _open_text(path) as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise DatasetFormatError(f"{path}: row {lineno} is not question,A,B,C,D,answer: {row[:1]}")
                yield {"subject": subject, "question": row[0], "choices": row[1:5],
                       "answer": LETTERS.index(row[5].strip())}


def parse_hellaswag(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """Six lines per item: `<activity label>: <context>`, the gold label 0-3, four endings."""
    for path in paths:
        with _open_text(path) as f:
            lines = f.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise DatasetFormatError(f"{path}: {len(lines)} lines, not a multiple of 6 (truncated?)")
        for i in range(0, len(lines), 6):
            context, label, *endings = lines[i:i + 6]
            if label not in ("0", "1", "2", "3"):
                raise DatasetFormatError(f"{path}: line {i + 2} should be a label 0-3, got {label[:40]!r}")
            yield {"activity_label": context.split(": ", 1)[0], "context": context, "endings": endings,
                   "label": int(label)}


def parse_arc(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """MosaicML's conversion: {query: "Question: ...", choices, gold}."""
    for path in paths:
        subset = path.stem.removeprefix("arc_")
        for r in _jsonl(path):
            r = _fields(path, r, ("query", "choices", "gold"))
            yield {"subset": subset, "question": r["query"].removeprefix("Question: ").strip(),
                   "choices": r["choices"], "answer": int(r["gold"])}


def _targets(d: dict) -> dict:
    return {"choices": list(d), "labels": [int(v) for v in d.values()]}


def parse_truthfulqa(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """The CSV (generation task) joined with mc_task.json (multiple choice) on the question."""
    csv_path, mc_path = paths
    mc = {m["question"].strip(): m for m in _json(mc_path)}
    with _open_text(csv_path) as f:
        for row in csv.DictReader(f):
            question = row["Question"].strip()
            m = mc.get(question)
            if m is None:
                raise DatasetFormatError(f"{mc_path}: no multiple-choice entry for {question!r}")
            yield {
                "type": row["Type"], "category": row["Category"], "question": question,
                "best_answer": row["Best Answer"], "best_incorrect_answer": row.get("Best Incorrect Answer"),
                "correct_answers": [a.strip() for a in row["Correct Answers"].split(";") if a.strip()],
                "incorrect_answers": [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()],
                "source": row["Source"], "mc1_targets": _targets(m["mc1_targets"]),
                "mc2_targets": _targets(m["mc2_targets"]),
            }


HH_ASSISTANT = "\n\nAssistant:"


def parse_hh(paths: Sequence[Path], split: str) -> Iterator[dict]:
    """{chosen, rejected} transcripts; the prompt is their common prefix up to the last
    `\\n\\nAssistant:` they share."""
    for path in paths:
        subset = path.parent.name
        for r in _jsonl(path):
            r = _fields(path, r, ("chosen", "rejected"))
            common = os.path.commonprefix([r["chosen"], r["rejected"]])
            end = common.rfind(HH_ASSISTANT)
            prompt = common[: end + len(HH_ASSISTANT)] if end >= 0 else ""
            yield {"subset": subset, "prompt": prompt, **r}


def parse_alpaca(paths: Sequence[Path], split: str) -> Iterator[dict]:
    for path in paths:
        if path.suffix == ".jsonl":  # the self-instruct seed tasks: one record per instance
            for task in _jsonl(path):
                for inst in task["instances"]:
                    yield {"id": task["id"], "name": task["name"], "instruction": task["instruction"],
                           "input": inst["input"], "output": inst["output"]}
            continue
        for r in _json(path):
            yield _fields(path, r, ("instruction", "input", "output"))


def parse_dolly(paths: Sequence[Path], split: str) -> Iterator[dict]:
    for path in paths:
        for r in _jsonl(path):
            r = _fields(path, r, ("instruction", "context", "response", "category"))
            yield {"instruction": r["instruction"], "input": r["context"], "output": r["response"],
                   "category": r["category"]}


def parse_synthetic(paths: Sequence[Path], split: str) -> Iterator[dict]:
    for path in paths:
        yield from _jsonl(path)


# --- texts: one document per record ----------------------------------------------------------

def _choices_text(question: str, choices: Sequence[str], answer: int) -> str:
    lines = [question, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))]
    return "\n".join(lines) + f"\nAnswer: {choices[answer]}"


def _instruction_text(r: dict) -> str:
    return "\n".join(s for s in (r["instruction"], r["input"], r["output"]) if s)


def _synthetic_text(r: dict) -> str:
    if "text" in r:
        return r["text"]
    if "answer" in r:
        return f"{r['prompt']}\n{r['answer']}"
    if "chosen" in r:
        return f"{r['prompt']}\n{r['chosen']}"
    return "\n".join(m["content"] for m in r["messages"])


TEXTS: dict[str, Callable[[dict], str]] = {
    "corpus": lambda r: r["text"],
    "gsm8k": lambda r: f"{r['question']}\n{r['answer']}",
    "humaneval": lambda r: r["prompt"] + r["canonical_solution"],
    "mbpp": lambda r: f"{r['text']}\n{r['code']}",
    "mmlu": lambda r: _choices_text(r["question"], r["choices"], r["answer"]),
    "hellaswag": lambda r: f"{r['context']} {r['endings'][r['label']]}",
    "arc": lambda r: _choices_text(r["question"], r["choices"], r["answer"]),
    "truthfulqa": lambda r: f"{r['question']}\n{r['best_answer']}",
    "hh-rlhf": lambda r: r["chosen"],
}


# --- the registry ----------------------------------------------------------------------------

def _github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def _github_lfs(repo: str, commit: str, path: str) -> str:
    return f"https://media.githubusercontent.com/media/{repo}/{commit}/{path}"


def _hf(repo: str, path: str, revision: str = "main") -> str:
    return f"https://huggingface.co/datasets/{repo}/resolve/{revision}/{path}"


_MMLU_REPO, _MMLU_COMMIT = "hendrycks/test", "785eba57b455b9f9be12a0d3c1106d67274fea0e"
_MMLU_SPLITS = {"dev": "dev", "validation": "val", "test": "test"}


def _mmlu() -> Source:
    files = []
    for line in _MMLU_TABLE.split("\n"):
        if not line.strip():
            continue
        sha, size, folder, subject = line.split()
        path = f"{folder}/{subject}_{folder}.csv"
        files.append(File(_github(_MMLU_REPO, _MMLU_COMMIT, f"data/{path}"), path, sha, int(size)))
    splits = {name: tuple(f.path for f in files if f.path.startswith(folder + "/"))
              for name, folder in _MMLU_SPLITS.items()}
    return Source(
        "mmlu", "MMLU: 57-subject four-way multiple choice (Hendrycks et al., 2021); the authors' 2020 git "
        "revision (14,079 test / 1,542 validation / 285 dev, vs 14,042 / 1,531 / 285 in the final release)",
        "MIT", "https://github.com/hendrycks/test", tuple(files), splits, parse_mmlu, TEXTS["mmlu"],
        "subject, question, choices, answer",
    )


def _sources() -> dict[str, Source]:
    gh = _github
    gsm = ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
    hh = ("anthropics/hh-rlhf", "354e5c3cb8960630860dd5774a6ac2a58313bf4d")
    tqa = "d71c110897f5d31c5d7f309e7bc316c152f6f031"
    arc = ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d",
           "scripts/eval/local_data/world_knowledge")
    alpaca = ("tatsu-lab/stanford_alpaca", "761dc5bfbdeeffa89b8bff5d038781a4055f796a")

    def tqa_urls(path: str) -> tuple[str, ...]:
        return (gh("sylinrl/TruthfulQA", tqa, path), gh("koppula/TruthfulQA", tqa, path))

    sources = [
        Source(
            "tinyshakespeare", "Tiny Shakespeare: 1.1 MB of Shakespeare's plays (char-rnn); split 90/10 by "
            "characters as nanoGPT does, in passages of whole speeches", "MIT (repository); text public domain",
            "https://github.com/karpathy/char-rnn",
            (File(gh("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e", "data/tinyshakespeare/input.txt"),
                  "input.txt", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394),),
            {"train": ("input.txt",), "validation": ("input.txt",)}, parse_shakespeare, TEXTS["corpus"], "text",
        ),
        Source(
            "tinystories", "TinyStories (Eldan & Li, 2023): short children's stories. 'sample': a 2 MiB sample of "
            "the training split (2,316 stories); 'train'/'validation': the full GPT-4 (V2) files (about 2 GB / "
            "20 MB, no published checksum)", "CDLA-Sharing-1.0",
            "https://huggingface.co/datasets/roneneldan/TinyStories",
            (File(gh("gusjengis/toy-RNN", "e4c7ff8bba4ff7989e69a3a816ebe4b14813b41e", "data/tinystories_sample.txt"),
                  "tinystories_sample.txt", "5352b299dcb1a32898b2d779b145b5a05f3e1265953fd21c264c9f9f9c9ae33d",
                  2097152),
             File(_hf("roneneldan/TinyStories", "TinyStoriesV2-GPT4-train.txt"), "TinyStoriesV2-GPT4-train.txt", None),
             File(_hf("roneneldan/TinyStories", "TinyStoriesV2-GPT4-valid.txt"), "TinyStoriesV2-GPT4-valid.txt", None)),
            {"sample": ("tinystories_sample.txt",), "train": ("TinyStoriesV2-GPT4-train.txt",),
             "validation": ("TinyStoriesV2-GPT4-valid.txt",)},
            _split_parser({"sample": partial(parse_tinystories, drop_unterminated=True)}, parse_tinystories),
            TEXTS["corpus"], "text",
        ),
        Source(
            "fineweb-edu", "FineWeb-Edu (Lozhkov et al., 2024): educational web pages; the first 2 GB parquet "
            "file of the 10B-token sample (no published checksum; needs pyarrow)", "ODC-By 1.0",
            "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu",
            (File(_hf("HuggingFaceFW/fineweb-edu", "sample/10BT/000_00000.parquet"), "sample/10BT/000_00000.parquet",
                  None),),
            {"train": ("sample/10BT/000_00000.parquet",)}, parse_parquet_texts, TEXTS["corpus"], "text, id, url, score",
        ),
        Source(
            "gsm8k", "GSM8K (Cobbe et al., 2021): grade-school math word problems with worked solutions",
            "MIT", "https://github.com/openai/grade-school-math",
            (File(gh(*gsm, "grade_school_math/data/train.jsonl"), "train.jsonl",
                  "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4166206),
             File(gh(*gsm, "grade_school_math/data/test.jsonl"), "test.jsonl",
                  "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738)),
            {"train": ("train.jsonl",), "test": ("test.jsonl",)}, parse_gsm8k, TEXTS["gsm8k"],
            "question, answer, final_answer",
        ),
        Source(
            "humaneval", "HumanEval (Chen et al., 2021): 164 Python problems with unit tests (run them only "
            "in a sandbox)", "MIT", "https://github.com/openai/human-eval",
            (File(gh("openai/human-eval", "6d43fb980f9fee3c892a914eda09951f772ad10d", "data/HumanEval.jsonl.gz"),
                  "HumanEval.jsonl.gz", "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 44877),),
            {"test": ("HumanEval.jsonl.gz",)}, parse_humaneval, TEXTS["humaneval"], ", ".join(HUMANEVAL_FIELDS),
        ),
        Source(
            "mbpp", "MBPP (Austin et al., 2021): 974 basic Python problems; splits by task id as in the paper's "
            "README (prompt 1-10, test 11-510, validation 511-600, train 601-974)",
            "CC BY 4.0 (per the Hugging Face card; the source repository states none)",
            "https://github.com/google-research/google-research/tree/master/mbpp",
            (File(gh("deepseek-ai/DeepSeek-Coder", "2f9fd85927c669dae3c0fbb2d607274023af243e",
                     "Evaluation/MBPP/data/mbpp.jsonl"),
                  "mbpp.jsonl", "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f", 563743),),
            {split: ("mbpp.jsonl",) for split in MBPP_SPLITS}, parse_mbpp, TEXTS["mbpp"], ", ".join(MBPP_FIELDS),
        ),
        _mmlu(),
        Source(
            "hellaswag", "HellaSwag (Zellers et al., 2019) validation set, 10,042 items, in llama.cpp's six-line "
            "text layout (fields already cleaned of [header]/[title] tags)", "MIT (upstream rowanz/hellaswag)",
            "https://github.com/rowanz/hellaswag",
            (File(gh("klosax/hellaswag_text_data", "1105d370f8340eac3c63a91fd1fa58e8999f9505",
                     "hellaswag_val_full.txt.bz2"),
                  "hellaswag_val_full.txt.gz", "8a5e3d39844938323f7a3d2b1e0c6162faf3f3f35396ccd67324aa2f4cae5a7b",
                  2709513, download_sha256="50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
                  content_sha256="d572539320eb2050e858ca34b495bbe2103e3b3f1391a9c3bcdf215b0bb93bd1"),),
            {"validation": ("hellaswag_val_full.txt.gz",)}, parse_hellaswag, TEXTS["hellaswag"],
            "activity_label, context, endings, label",
        ),
        Source(
            "arc", "ARC (Clark et al., 2018) Challenge (1,172) and Easy (2,376) test sets, MosaicML Eval Gauntlet "
            "format; split 'test' is both", "CC BY-SA 4.0 (ARC); Apache-2.0 (repository)",
            "https://allenai.org/data/arc",
            (File(gh(arc[0], arc[1], f"{arc[2]}/arc_challenge.jsonl"), "arc_challenge.jsonl",
                  "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636", 365606),
             File(gh(arc[0], arc[1], f"{arc[2]}/arc_easy.jsonl"), "arc_easy.jsonl",
                  "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5", 636665)),
            {"test": ("arc_challenge.jsonl", "arc_easy.jsonl"), "challenge": ("arc_challenge.jsonl",),
             "easy": ("arc_easy.jsonl",)}, parse_arc, TEXTS["arc"], "subset, question, choices, answer",
        ),
        Source(
            "truthfulqa", "TruthfulQA (Lin et al., 2021): 'validation' is the January 2025 version (790 "
            "questions), 'v1' the 2021 one (817) behind most published numbers. Evaluation only: keep it out "
            "of training data", "Apache-2.0", "https://github.com/sylinrl/TruthfulQA",
            (File(tqa_urls("TruthfulQA.csv"), "TruthfulQA.csv",
                  "b8d8ef1e12f98b4f2a9f47abc9765da0640b182b6c5d9b92f0c1a1f2f1e02e5c", 503550),
             File(tqa_urls("data/mc_task.json"), "mc_task.json",
                  "c90d853454fd48c676accb33e16923ac438dbb6fb37ecc7c6a70e33c9e556e87", 744411),
             File(tqa_urls("data/v1/TruthfulQA.csv"), "v1/TruthfulQA.csv",
                  "f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d", 476230),
             File(tqa_urls("data/v1/mc_task.json"), "v1/mc_task.json",
                  "b3799639bc76c939836d587de7d30b48d91012cb34be04806d33106ce06c162a", 755456)),
            {"validation": ("TruthfulQA.csv", "mc_task.json"), "v1": ("v1/TruthfulQA.csv", "v1/mc_task.json")},
            parse_truthfulqa, TEXTS["truthfulqa"],
            "type, category, question, best_answer, best_incorrect_answer, correct_answers, incorrect_answers, "
            "source, mc1_targets, mc2_targets",
        ),
        Source(
            "hh-rlhf", "Anthropic HH-RLHF (Bai et al., 2022) preference pairs, helpful-base and harmless-base; "
            "the train files have no published checksum (contains offensive content by design)", "MIT",
            "https://github.com/anthropics/hh-rlhf",
            (File((_github_lfs(*hh, "helpful-base/test.jsonl.gz"),
                   gh("DaehanKim/EasyRLHF", "45eccb72ddb8c18aa52dc2a184516380e06582fe",
                      "data/helpful-base/test.jsonl.gz"),
                   _hf("Anthropic/hh-rlhf", "helpful-base/test.jsonl.gz")),
                  "helpful-base/test.jsonl.gz", "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b",
                  875191),
             File((gh(*hh, "harmless-base/test.jsonl.gz"), _hf("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz")),
                  "harmless-base/test.jsonl.gz", "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
                  742801),
             File((_github_lfs(*hh, "helpful-base/train.jsonl.gz"),
                   _hf("Anthropic/hh-rlhf", "helpful-base/train.jsonl.gz")),
                  "helpful-base/train.jsonl.gz", None, 16200131),
             File((_github_lfs(*hh, "harmless-base/train.jsonl.gz"),
                   _hf("Anthropic/hh-rlhf", "harmless-base/train.jsonl.gz")),
                  "harmless-base/train.jsonl.gz", None)),
            {"test": ("helpful-base/test.jsonl.gz", "harmless-base/test.jsonl.gz"),
             "train": ("helpful-base/train.jsonl.gz", "harmless-base/train.jsonl.gz")},
            parse_hh, TEXTS["hh-rlhf"], "subset, prompt, chosen, rejected",
        ),
        Source(
            "alpaca", "Stanford Alpaca instruction data: 'train' is the 52K file (no published checksum), "
            "'sample' its first 100 records, 'seed' the 175 human-written self-instruct seed tasks",
            "CC BY-NC 4.0 (non-commercial)", "https://github.com/tatsu-lab/stanford_alpaca",
            (File(gh("pytorch/torchtune", "bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1", "tests/assets/alpaca_tiny.json"),
                  "alpaca_tiny.json", "b1e3ff228aa9c61b524f85f859640fd07c0b94895047222dba6deec978afdfc0", 101501),
             File(gh(*alpaca, "seed_tasks.jsonl"), "seed_tasks.jsonl",
                  "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48", 110934),
             File(gh("tatsu-lab/stanford_alpaca", "main", "alpaca_data.json"), "alpaca_data.json", None)),
            {"train": ("alpaca_data.json",), "sample": ("alpaca_tiny.json",), "seed": ("seed_tasks.jsonl",)},
            parse_alpaca, _instruction_text, "instruction, input, output",
        ),
        Source(
            "dolly", "databricks-dolly-15k: 15K human-written instruction/response pairs in 8 categories (no "
            "published checksum)", "CC BY-SA 3.0", "https://huggingface.co/datasets/databricks/databricks-dolly-15k",
            (File(_hf("databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl"), "databricks-dolly-15k.jsonl",
                  None),),
            {"train": ("databricks-dolly-15k.jsonl",)}, parse_dolly, _instruction_text,
            "instruction, input, output, category",
        ),
        _synthetic_source(),
    ]
    return {s.name: s for s in sources}


def _split_parser(by_split: dict[str, Parser], default: Parser) -> Parser:
    def parse(paths: Sequence[Path], split: str) -> Iterator[dict]:
        return by_split.get(split, default)(paths, split)

    return parse


SYNTHETIC_SEED = 0  # `texts("synthetic", ...)` reads the corpus of this seed, at the default size


def _synthetic_source() -> Source:
    from . import synthetic

    seed = str(SYNTHETIC_SEED)
    layout = synthetic.layout()  # split -> relative paths inside a generated directory
    paths = dict.fromkeys(p for split_paths in layout.values() for p in split_paths)  # unique, in order
    files = tuple(File((), f"{seed}/{p}", None) for p in paths)
    splits = {split: tuple(f"{seed}/{p}" for p in paths) for split, paths in layout.items()}

    def generate(root: Path, progress: bool) -> None:
        config = synthetic.SynthConfig.from_size(synthetic.DEFAULT_SIZE, seed=SYNTHETIC_SEED)
        synthetic.ensure(root / seed, config, progress=progress)

    return Source(
        "synthetic", "lmlab's built-in synthetic corpus (stories, arithmetic with worked steps, key-value "
        "lookup, copying, instructions, preference pairs, held-out verifiable evals); generated offline on "
        f"first use under <{ENV_VAR}>/synthetic/{seed}", "generated by lmlab (no third-party data)",
        "docs/data.md", files, splits, parse_synthetic, _synthetic_text,
        "see module docstring", generate=generate,
    )




def verify_dataset(name: str, split: str | None = None) -> list[tuple[str, str]]:
    """Check every present file of a dataset without downloading: [(path, status)] where status
    is 'ok (sha256)', 'ok (size+format)', 'missing' or the error message."""
    source = get_source(name)
    root = data_home() / source.name
    report = []
    for f in source.files_for(split):
        path = root / f.path
        if not path.is_file():
            report.append((f.path, "missing"))
            continue
        try:
            check_file(f, path)
            report.append((f.path, f"ok ({f.verified_by})"))
        except ChecksumError as e:
            report.append((f.path, str(e)))
    return report


__all__ = [
    "ChecksumError", "DatasetError", "DatasetFormatError", "DatasetNotFoundError", "File", "SOURCES", "Source",
    "UnknownDatasetError", "check_file", "data_home", "default_split", "download_file",
    "get_source", "records", "resolve", "sha256_file", "texts", "verify_dataset",
]


# MMLU (hendrycks/test at 785eba5, the authors' 2020 git revision): sha256, bytes, split, subject.
_MMLU_TABLE = """
bd8c73f3c75bea9db82d281d9da6949cea687b987dba24a142c638e758046624 719 dev abstract_algebra
0985685cf5ab13ccc1629f03a1308a9add8767582ffeb195b68b18c3415c9993 830 dev anatomy
bb03eca519a3fbc04017dc4783635763ac928f0811ce6243dbcbf0d526dbe1e3 1943 dev astronomy
7cd487e4ba7d9fe423bcc259ad852e963dc370629b8d61881b61ed0ae84c0b46 2095 dev business_ethics
a82e8b10da8168f8fe9f7315165e6e87a4b3bebe91f6445b9aafbefb162cc531 1029 dev clinical_knowledge
31f4ae0707ba3f742e0d5546ff970949be8a05e217921fe87b1814d6a0ab8184 1403 dev college_biology
9ba27ba571b8ad40d35a2a88a60acf434ca5f37962c2eba8f9d0aa89edb4c1c7 1200 dev college_chemistry
fc1a43187cd68390d663e0a1849688b13a4cd75ab17616558f4e584a4a8ae2bd 2638 dev college_computer_science
27731ee1402e720ee01ad6fa6a969a0d0978a0e9b4c385d328a61869a43f321f 1366 dev college_mathematics
63928a944fda769d7e52a3a4549d4f37f094896e65e7db35029261e1ae79909b 1545 dev college_medicine
6e043d6c566091c5ad1d8bc1d002900e1aa0bff114f98d5e3f2e4f645efce100 1279 dev college_physics
09e276300dbd2d07906dbe4ff82aabf45b9765f933eb7d0f35ea3ea97dee8020 974 dev computer_security
5e65be1f6fdd82f4887e3747af790a747191b1b732dd2bea76306388d5ee3719 799 dev conceptual_physics
7a01a925199c246decd0f1fc7a1b8dc28136b19d793e5b1e0d97142c118a2940 1521 dev econometrics
5aad11b1d1c8dc1a431c3e79a047cba56d691a60403ddffaf5fbd45e9c82bc0d 851 dev electrical_engineering
9aca9cd215b7c170020fd5f7db1c9c3d5cbf6df9ee7b970a4810649a87245011 1315 dev elementary_mathematics
e4b579358ed4878f6c91bfea0ccc51efdd15a28401f86da9ee8f6c0af37cf36d 1628 dev formal_logic
8090f53567366b64ee6d23b6f73753421ea6d38780e0e3ca3f856bfa76031c86 1095 dev global_facts
6a200085c150794846d4bab43bb0e22ceec9f99576dfc25f5c5d8faa9595ae13 1538 dev high_school_biology
1ba44aeea98ca22342b6525a3a9ebb62003b2a8289fa42d7c844e2139557ec5b 1091 dev high_school_chemistry
5de3800dfbbfaa89050413a765deaf774fdb0611e370951383fb50fac774663e 2809 dev high_school_computer_science
a3677065cf51abc32901cdcf88ed64121f5595e3a5a67f86ae2570f866fe87c5 11445 dev high_school_european_history
e43fc27b9fa8b808773a2871007b39e012a1cc1ec902f85d85cc9c27cc12883d 1268 dev high_school_geography
daf013a3eae04b5904e6a706cf0574df2c881e00d46a979cb34c6e2968ad1c90 1648 dev high_school_government_and_politics
23ed995071c47e627c4e6adbce63a9144920441abb7e69f8b4dfac5fdc4e402d 1191 dev high_school_macroeconomics
d7401d5cbad5ae697bfa480e35d85de8ebf1232589a3c59b010782ee49cbe18c 1168 dev high_school_mathematics
a409b422561f1fb02e6d1bc044657cfff7779b13146edfd937d2573423c2c49b 1167 dev high_school_microeconomics
d54598276e1761c8c849eda3e8ba6cb3eb0785b7944c5921af12a3af32bcf78d 1307 dev high_school_physics
cb1ae2b20c2a43f68e0c6cd6ec208c8cbbbefaee931f5f0dba1b7f4dda5e6482 1781 dev high_school_psychology
5103d34343f7749a578a0f1a6b20bceb999ed07de27432f1a89d79161eadde22 2381 dev high_school_statistics
028b3c81c7be1138ad50b4afa1835773788e4557426a40abfaf132b11edab541 8758 dev high_school_us_history
b6e87a14718b0415241dfe10dd86605de5b6e5995fa57580e9e2d7c56fe147a1 4771 dev high_school_world_history
c2667f1f98c7e63a0693d9a1bf09065d21b9e499087d396aeca0fafebbf752d2 863 dev human_aging
0da7f8f7aeb6d5a08f0413489aa5d5b84ff8ac971952ea66242762f779cb6794 942 dev human_sexuality
6f7f1c0191c0bcfe195d0ed39942a605012967a04d855c6482dc7e7a9f95e4d8 2293 dev international_law
27533d974102031088bc5c47fc008538ab3d08ca75e127fb64ff04cdd1562da2 1172 dev jurisprudence
4de026c2d116c381dcc1b65e91a28ba3d124398f920b0f3904ec5b641deb28f4 1444 dev logical_fallacies
7870177516ff1958ca6f8eaec855c74b14078eafde8c0c5480c7f9eb7f3b8551 2074 dev machine_learning
f75224958ab245d86c335d6886f8689247a9f83691ad63bb7ef3196641be9e52 761 dev management
15b3cf450ebc11e122886a5bad41e78260228259fa184eaa4ba566bdf37f0315 1354 dev marketing
70cd9ff940bef360693eeb4e05b5b8e53ad75a81d6b74a784222d4cae6dcb896 952 dev medical_genetics
72f74676c37fe477720d8b55e84517bd21daf1fe24f99dd33f1b0a636d31782e 562 dev miscellaneous
b3eddc16d4328c766b5d8aea52b8bae2fdcd64ed2f307a5c758790f84fcf3453 1637 dev moral_disputes
1c04ba888a302e9526147d85415979f818683d7551dbef609f6e7fc8aadb43ca 1667 dev moral_scenarios
6c51e76e5adbbdf1c42e9af9c1af025e82d5682957a7c726976e695b79234110 1866 dev nutrition
587be220837bbe089702aa27cda03fbf72a7b959a9a4425e70d598026614cf11 859 dev philosophy
b20f0b1823fe00e7e2ee9f7378be8cb612a61a0d7bf0c97dad0f4201e495bf3b 1742 dev prehistory
efc070ed71676829c67497542e3571f50a868036a17f93d00a56a4f85767ae0d 2041 dev professional_accounting
15d8589900ccf4725e1bad17837d48cc18c8bf033cd9b5d6bacf28a2a8f1064f 6503 dev professional_law
486456d578890d4700dd8044ac236c8ac2ee3389e35fc81ac37529f4f4487785 3678 dev professional_medicine
222e690db42dfb217a7c56a6ac693b73cf0168e344d75f28618c62ad9d2c0261 2148 dev professional_psychology
8895f665f4c696ae76d34210546d0ab4b21b79d2fd8534cd2e8002e8ed0969dc 1363 dev public_relations
007576f989b0badbf87423a444433099ee98438380e8a41c141d51c85d5abccf 5215 dev security_studies
2e2bb34b4cabdc50e2c43097d1cfe91560224f9e1224adc19a01e922d1c49414 1484 dev sociology
3a9677a89fd67c3a891671a2a6a14ff69ab37bdd54fb687c2f8334c8a3fa1543 1480 dev us_foreign_policy
2a95551a16fc9538d98e1c79ab0ba53c40562158e6d05e9c42f7fdbeae8379bd 960 dev virology
985f2091ed0cf0340b4a191ce941bc7b1bef6f0614b852eb4cbc0dd236ae95f3 538 dev world_religions
ab0c6d19c4523969ec7b553ed49adecdb9cc00decc76c26c56c42ba198d8047c 1791 val abstract_algebra
09e9959486ebf3643e4ecbf173a77b029c6f08665ab8f89daf99399956f26b8e 2784 val anatomy
3dbe51f827890dd079e04c8ab024c5a2a7829033cd16913744af99f7b3a46328 4615 val astronomy
929daf023cce06fa7558595ff8c329a3c9211693f8a46977997435da52876cc3 2815 val business_ethics
aa4a98fac4cb6c0ed219d44ef46a6aa9e8d56b0a62046bb220b836dbee4ff6a7 5922 val clinical_knowledge
f624eaf75ee2add75a9f2b189bb703e0a2591981d45c60bb5f9dcd9bfe168456 4417 val college_biology
351cf8c4d1ea2c6cd5d521593b2cd592477a13a284871b681f0785cd2dddf6bb 3021 val college_chemistry
4f7a08808c39218f0a8a8b945cadcc40dbf3d254962e620f7dccdea8a0596259 4410 val college_computer_science
12621b0f192fe8773cac843c5bdc4777cc81d66b31c41188a3096e20dde143f8 2405 val college_mathematics
9a490f6aaeb2e7c15cc8ce4c5745ff449568971ac447c4aa616858f7f4dcef35 7375 val college_medicine
55c80f8fdd225c5ff57ab952d583fa5f20ac719e2432e9062fd5fb00e4abe42e 3231 val college_physics
52faa1f86a4fa029d1953443ac636c359c9487efa1259d6212ea052018bc1582 4310 val computer_security
dba647511d25b8defe1325268913d5b5853f3692af104176b88948bf89f06b95 3826 val conceptual_physics
062b8b3ae560c7bf1bde9fb64958949ce74093eec3761dc3227e6e777168aaf1 4693 val econometrics
31462254765b0525942d28da430d168dc012c64fd63140ee7c4d1cb42ebea6f5 2511 val electrical_engineering
a3bfebe71e8dddf47d8eb36800ce97adfdca34c3a419941b36acf8bea8afe637 7976 val elementary_mathematics
306d64079d5a16516470cc059e8e313abc06ceeec8c1131af582e30fb6f21667 5930 val formal_logic
8bab486afff4f69b25fe96065f6a04e34375ae4bb1333cdd8a7d321e37d1f398 1618 val global_facts
3458797fd751675cca19618b834ec17ed1eac464bdd1303a56602b764a01a765 10667 val high_school_biology
ed0c2c9846a709332f679a14dc0f99b68d61b6161e7f86aaf9012a11f9617e3b 6580 val high_school_chemistry
30a37702271777a18c2d09138ea41388bacccd317d8a8ff7c3f9b2ad5da24e63 3325 val high_school_computer_science
82f2bbbf8148f3c7bfe8936278f8b3713686b5aa0bba43cadf4f59b7f8d192f2 29242 val high_school_european_history
94444fda55747826967db7d9eb4a977edc34a64c0cdf2a8e865c382a8610d96b 3778 val high_school_geography
0fd2fd6ec975ed75c36eb6b826e4906ccdfa0275b915fa5b97499e6906a87777 6554 val high_school_government_and_politics
3533d53f9f803657e25acd63fd98f2e24626008ff2fb793e2077feccd3d97f3c 11941 val high_school_macroeconomics
233f0811fb852a080f52c9e9cb3ce7cfb76f54661dd6f8fddfdac6b8e2a989b2 5084 val high_school_mathematics
51a6993ff0e2de9dcfc1c292efa4f4d983fd2397d5a28453c075272b7ba698f8 6929 val high_school_microeconomics
3861ace8d359bac8b8560481599212193d38120fc350082680d99ad2090eeb0e 6370 val high_school_physics
785e5c3e90eafb1cbeca4fd6c8d4d061d0358f5c4cdc5a916c77aa038cec0f9a 15845 val high_school_psychology
ee65f842e44b0f9ada3919f64459c9b6a7aec190a26be00e037289279574d63c 9482 val high_school_statistics
b28f9c1a3382cb1ccba85b70ed1a3f555a37b01788cc0b96f8be08a72b29d8b7 31271 val high_school_us_history
7ba62c498d5bbe64423f6dca9db97b8240b87aee8a8559cafe5bca0e8b82fd4b 44987 val high_school_world_history
5f4e2e4eebf704c4f19a6b54e58570b5f7d3928bedc807a24ff95dc296431de0 4132 val human_aging
4f4c7b8766ade90e46218fda72146b10bc80dbf94d4b741804267a93a664af4c 2982 val human_sexuality
627a60c75899197670999963d6a2814b2bc7b4f7afc176a6bd665a0a2289a18a 6160 val international_law
a54d080420bbdb866fb18ff9eb6e8eb524df0dc1d25724997f73ac860fd3c8ec 3450 val jurisprudence
35820dc5ddf469d073691f4634edb87955902dd4d90b45f62f848ccd88dc4817 4667 val logical_fallacies
23ea00a670424f7f7f54c3d32a04f470983234ffa7c6356eab8f4f7c6150fce4 2983 val machine_learning
73f1407eedac9d6b02494b8e5292daa905993ed086883b56f4f0e52aea0e61bc 1543 val management
521b52fd9be14088e8b3194088edd4de306e960d4a15558a0b0ea5f074ab158c 6795 val marketing
03d44b759f35da638d7432bb7f050cc0bc5886497285980e91d387fe23478d6a 2722 val medical_genetics
bb746ae23c45b8c80b5f996fd6ee71dbf9795f3f2bfa3a41f797289ef0e3d1d0 12463 val miscellaneous
941826c9761dade3ebfb3a6a9c18e36994c3fcff2b10ffbe8830cf41b9e6cad0 11552 val moral_disputes
082412ba7550eb905b1640d272f49311062e1a29d2e8b05209be6316aee25a9e 34710 val moral_scenarios
50a18a7a16ce33c9574b035a7f3229bfb03645562142b5d99fe932ba6599ff8c 7653 val nutrition
e190e2653bf42254783e4ed04d8016e5aedcb050a4496d3de0d737f84c79755a 8388 val philosophy
08d0748aa24b77a3ca1e95897d6c77585c728b098a5a91501015552f1f331086 9474 val prehistory
865b30e9a3c8dedbcedf9f50ac290571a729e1c7968485b203d328e55bbf6dca 13685 val professional_accounting
175350a6b9a39a1f3118b3d700068f06ea1b59fa361d40f719fc3769c3e01601 200624 val professional_law
8ccce8d3ca49f2a8ff645a12151ec36f4d567b53bf146bcefcb44c993efd7392 23126 val professional_medicine
ef9cac4327293305ab3becdd4e8bc7ddeb56c3e43766ef4c9b8f506a3a69107c 27484 val professional_psychology
7acad9ec286d30324ecec4888789abf73903d8e3222cef8650e7f294310a7957 4270 val public_relations
5287f8757b00302ebcfddfe6c510e06a21c3b697e17cdefe40dfe180a619c6ca 22080 val security_studies
593bf2643ee40f288dc1104fe2994ec343e7db0f11970a9d449220daf4b38846 6664 val sociology
c427b2d9da8929924583eb4d6a32956d112cb9c43448225833c0d581a25ca1df 2997 val us_foreign_policy
bfd8a9560123c397d4697333b59e1230b4154c466c9361530381434e2c6fd401 5019 val virology
4352332375435709451e5782ede6700752db0b289602e572927d30ee0289125f 2308 val world_religions
4be89c0fb1d2419722e88880f6da3da95750367185ecd36f6492a6f74785cf64 17358 test abstract_algebra
966dfd5c4579885ebdb8c05d6754ae5834f672632586d8595be3c0f9360e6f4e 29844 test anatomy
87c9c3cb5a55395c70dd9ed521dd7d2629fd4ff236c5ab647102e007f52a9341 42999 test astronomy
cd3fc3a85a34cb17e6c5b2fb68ea61e7800b31120d92934019f1e17f4832fbd4 31394 test business_ethics
d7c23fd4e75d0a99f042a5d55221ba8465ffc9c9042bc4c30bb07f45d2199dac 56224 test clinical_knowledge
e1204cb9d19887ea266145f038b5d4cc1fbc33d7efce186259c4ecca1cbe3119 45351 test college_biology
4d61d7887f845b887c52ac928b6dffdcf2468d79f3d0fbb4d1731092a51d2552 22314 test college_chemistry
d53a1d0d1c4362dacf92a4ff1d6a755beb5a87f24a7301c3c4391fcacc6530b4 40401 test college_computer_science
8b5bef14d4209c7918eaf947e4f12a5ae9470567722d8ba9761302d733e8ac71 22429 test college_mathematics
9c533cfff89edaa317b2e79bbabcdd5e2e522e019679cb4a6475e5f2a1861b1e 78334 test college_medicine
079c3696eda22c13b0472de245c7bb4918315b59481964109a4f65d2a35b4243 27811 test college_physics
8e40f809858db9dd8585036b53984e570b6101f72be2214b85e979c7fafa307f 24840 test computer_security
7b39a241bb20424fd2a4e0e37ce05d94865ffc44191d8be4063be0e973312256 34992 test conceptual_physics
10eb6b2d3a519a463872ef75902991b51ebf45865b29888e86d40228ace24029 44039 test econometrics
8b0d747a97cb2cbbd8926c8deb2cda6073da6d5d3cc099693aa7761be938f5e4 21595 test electrical_engineering
50aca74e92c6ffa50ada650f9b14af333490ea7c6649c73ccde48b78051dc27c 61126 test elementary_mathematics
bc2dc7373a664ae72e166dcbe3f7aaf1bb65b99f106f1831f335c53467f35248 46929 test formal_logic
84d6bcd165fba01327a8c5503239da9a00b7bd8a1b48db61d5774de29ee823aa 15970 test global_facts
cfaba2b58b9714d2a6983a90bce17f14cc44cfc8195b20f8f65fef70d21331b9 102424 test high_school_biology
15171de0d3bb730b348736625e34d564c34ff7d790a77e93f9bcd8d332ab63d5 53944 test high_school_chemistry
c203732c6ea575e14ef54d6fbc91a5fe87b958c6a6e0b035038e6c65baff6e88 42396 test high_school_computer_science
09983655452c3c40ba466050ec82252f02a235e5946734f4d73b73688fc9509b 266888 test high_school_european_history
b59382702daeb29a5ff8e255d5a22a33775c79859defd089a1cd835e0949b3af 38280 test high_school_geography
fbd7a89eb2c7806097e18b40950e44e0580e6f97cd151f01a216bb575c2d7903 61553 test high_school_government_and_politics
e60b488a00f908bed94e5ed46638506a203bab0763fc22d20a3bbf0d939f5d02 108097 test high_school_macroeconomics
fe8f7a154834bba30947401ba37ea6c7afdcfba82ddc341c79b5d3016991d290 48584 test high_school_mathematics
a250cc4976654e479cecdb7b66046ce2412df3e5e1b9c3d145ed344eae9a2256 70131 test high_school_microeconomics
a217233b6c1f1aa703d3d1535de8eec218a55e5c1aee21d89ee9046a81fb9ff0 56855 test high_school_physics
88c33b6b0ade567d07b8b5b074effdb52f31d773541fd71e86cb0d85a8daf7bf 146542 test high_school_psychology
d62843d2fd084d6af1c8a0a6491d0aa642c34a7a68476605b9b3db5841e63d3f 105978 test high_school_statistics
0338dea3b11881be53c2208ae8dbb571c792c0dca6f0b36a352147c0be81625e 292834 test high_school_us_history
7787343ae18e4e1ef833c8630c0c914c62f42c2f35d8b90f4bec2eecccfc161e 373770 test high_school_world_history
01299d7e0ae4a8d082daeecc140445ce7393b464040bd810b0a60a370ae5502e 40617 test human_aging
befe44cd6db2b4c759acce66dfcbbc5e959bbbcfc8aca0096bb09549653c06c8 29792 test human_sexuality
51b3a6d74cc84651b2355d2823c30d993015ddfe8ef39725da4e0442f29489fc 50691 test international_law
bf7a770aebfbdb181abc2c26ffd7a01ab31f93c7e2dfe6924c57c7bca4a0dff6 31375 test jurisprudence
3fe8b48c74832525556455d49960cc0c3cff37496783348043ff69a1863c2244 46290 test logical_fallacies
b579bd7dfc9319cd8810a723c8e662afbab810fe64d775fc57ec24cfb55b3af1 27990 test machine_learning
4a535a11bb480a09a302e86d157ae2d33e054cfa00e4265fe300a9408b87ec6b 17457 test management
ecf0ae0ae906194d033ca7d7746eaf201232eccb78ee24147e737473f751233d 57435 test marketing
4cf70b253e326ee5bcff6e14091765c64003c0d853a58dbc6a5737281356766d 18414 test medical_genetics
f850dd48e37a545cef57741206598de71e2b2f6b008c8c7a51a4530987ae3ee7 129093 test miscellaneous
673f5e9054f55fc5e165a3ed01e1b13eb1ee5a3405055818b50532e05de9bfdd 99902 test moral_disputes
39599417ee0e5eabaca8c4686afc9ba7d0e34f858bce580caa59ee34b264af0a 305813 test moral_scenarios
b5ef9739b7846733797f73f2cc67715d41160719e8846e0d529a61f2d6d659d0 85612 test nutrition
a0f0c6fc9e4f08c04ff3a339996c4ed688a9fbe75d205fff4b9d3549fb49fa1e 72820 test philosophy
8d44938332ea3d199cfa51a18ef69af972aa33ca4af7b5f5bc62e768a31f949a 82193 test prehistory
a0960b00b979aec320d8e74e1492683df5709000decc4752a67792fe66f8478a 118249 test professional_accounting
1bb6dd95b4b6480ca815ee31102e9636fc5634062d27cefb48ca2b1d382abce8 1868779 test professional_law
d6cb72e2238d5a3885ee28c6194bf62fff9c2799f9aabeac8aec3b89f122d438 217493 test professional_medicine
322b8268bf89d9bac278120a0a11e5992b329797b4afe3d76bdd4fb847a94b31 217475 test professional_psychology
836cceb16b257c344e11f7ebee4e889284273eda5e0c6bdcb124cffa9dbb0673 26585 test public_relations
ab7634702670ee0d5e98b852f5bcfad2821ff9a2e909d223de05422c948f6638 199745 test security_studies
f6c464600032aa2bb53294ad53217fbb650601eee206af947b3ce4c587ff5bed 61540 test sociology
2821ee009a2b1b7d4adc5a212a0bad7fe05d377455de0fe0841beab8f00142e1 26047 test us_foreign_policy
4355b9d79142da0e44a767a495a277733fd89ad67236cbbe3f42ff3a6d46b483 34689 test virology
3be96b2465419289c4fe0c8a0d003003facd243c8982c6daafc6ac90a40bd507 21156 test world_religions
"""

SOURCES: dict[str, Source] = _sources()
