"""The dataset registry: every dataset in the shared folder resolves with the published sha256 and
parses to the record counts its README states; downloads from a local HTTP server resume, fall
back to mirrors, reject wrong bytes leaving nothing behind, and offline errors say what to do."""

from __future__ import annotations

import bz2
import collections
import gzip
import hashlib
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.data import sources
from lmlab.data.sources import (
    SOURCES,
    ChecksumError,
    DatasetNotFoundError,
    File,
    Source,
    UnknownDatasetError,
    check_file,
    download_file,
    records,
    resolve,
    texts,
    verify_dataset,
)

REQUIRED = {"tinyshakespeare", "tinystories", "fineweb-edu", "gsm8k", "humaneval", "mmlu", "hellaswag", "arc",
            "truthfulqa", "hh-rlhf", "alpaca", "dolly", "mbpp", "synthetic"}


@pytest.fixture
def mirror(shared_data, monkeypatch) -> Path:
    """LMLAB_DATA pointed at the shared folder. Only ever read: every call passes download=False."""
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    return shared_data


def _count(name: str, split: str) -> int:
    return sum(1 for _ in records(name, split, download=False, progress=False))


# --- the registry itself -------------------------------------------------------------------------

def test_registry_lists_the_required_datasets_with_sane_entries():
    assert REQUIRED <= set(SOURCES)
    for source in SOURCES.values():
        assert source.license and source.description and source.splits
        paths = [f.path for f in source.files]
        assert len(paths) == len(set(paths)), source.name
        for split, split_paths in source.splits.items():
            assert split_paths and set(split_paths) <= set(paths), (source.name, split)
        for f in source.files:
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), (source.name, f.path)
            if source.generate is None:
                assert f.urls and all(u.startswith("https://") for u in f.urls), (source.name, f.path)


def test_every_file_of_the_shared_folder_is_registered_under_its_own_path(mirror):
    on_disk = {
        str(p.relative_to(mirror)) for p in mirror.rglob("*")
        if p.is_file() and p.name not in ("README.md", "SHA256SUMS")
    }
    registered = {f"{s.name}/{f.path}" for s in SOURCES.values() for f in s.files}
    assert on_disk <= registered, sorted(on_disk - registered)[:5]
    assert len(on_disk) == 188  # the shared README: "188 files"


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n != "synthetic"))
def test_present_files_match_the_registered_sha256(mirror, name):
    report = verify_dataset(name)
    present = [(path, status) for path, status in report if status != "missing"]
    if not present:
        pytest.skip(f"no file of {name} in the shared folder")
    for path, status in present:
        assert status == f"ok ({SOURCES[name].file(path).verified_by})", (path, status)
    # and independently of check_file: the bytes hash to the registered value
    for path, _ in present:
        f = SOURCES[name].file(path)
        if f.sha256:
            assert hashlib.sha256((mirror / name / path).read_bytes()).hexdigest() == f.sha256


def test_fully_mirrored_datasets_resolve_offline(mirror):
    for name in ("tinyshakespeare", "gsm8k", "humaneval", "mbpp", "mmlu", "hellaswag", "arc", "truthfulqa"):
        assert resolve(name, download=False, progress=False) == mirror / name


def test_mmlu_table_agrees_with_the_mirrors_sha256sums(mirror):
    sums = dict(line.split()[::-1] for line in (mirror / "mmlu" / "SHA256SUMS").read_text().splitlines())
    assert {f.path: f.sha256 for f in SOURCES["mmlu"].files} == sums


def test_hellaswag_content_checksum_is_the_decompressed_mirror_file(mirror):
    f = SOURCES["hellaswag"].file("hellaswag_val_full.txt.gz")
    data = gzip.decompress((mirror / "hellaswag" / f.path).read_bytes())
    assert hashlib.sha256(data).hexdigest() == f.content_sha256
    assert len(data) == 7_770_677


# --- record counts and schemas (numbers from each dataset's README) ---------------------------------

COUNTS = [
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("humaneval", "test", 164),
    ("mbpp", "prompt", 10), ("mbpp", "test", 500), ("mbpp", "validation", 90), ("mbpp", "train", 374),
    ("mmlu", "test", 14079), ("mmlu", "validation", 1542), ("mmlu", "dev", 285),
    ("hellaswag", "validation", 10042), ("arc", "challenge", 1172), ("arc", "easy", 2376), ("arc", "test", 3548),
    ("truthfulqa", "validation", 790), ("truthfulqa", "v1", 817), ("hh-rlhf", "test", 2354 + 2312),
    ("alpaca", "sample", 100), ("alpaca", "seed", 175), ("tinystories", "sample", 2316),
]


@pytest.mark.parametrize(("name", "split", "count"), COUNTS)
def test_record_counts(mirror, name, split, count):
    assert _count(name, split) == count
    assert sum(1 for t in texts(name, split, download=False, progress=False) if t.strip()) == count


def test_gsm8k_records(mirror):
    first = next(records("gsm8k", "train", download=False))
    assert first["question"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first["final_answer"] == "72" and first["answer"].endswith("#### 72")
    assert all(r["final_answer"] for r in records("gsm8k", "test", download=False))


def test_hellaswag_six_line_layout(mirror):
    items = list(records("hellaswag", "validation", download=False))
    assert items[0] == {
        "activity_label": "Roof shingle removal", "context": "Roof shingle removal: A man is sitting on a roof. he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "label": 3,
    }
    assert collections.Counter(r["label"] for r in items) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}
    assert all(len(r["endings"]) == 4 for r in items)
    assert next(texts("hellaswag", download=False)) == items[0]["context"] + " " + items[0]["endings"][3]


def test_mmlu_csvs(mirror):
    test = list(records("mmlu", "test", download=False, progress=False))
    assert test[0] == {"subject": "abstract_algebra", "question": "Find the degree for the given field extension "
                       "Q(sqrt(2), sqrt(3), sqrt(18)) over Q.", "choices": ["0", "4", "2", "6"], "answer": 1}
    per_subject = collections.Counter(r["subject"] for r in test)
    assert len(per_subject) == 57
    assert per_subject["high_school_chemistry"] == 204 and per_subject["professional_law"] == 1534
    dev = list(records("mmlu", "dev", download=False, progress=False))
    assert dev[0]["question"] == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field." and dev[0]["answer"] == 1


def test_arc_mosaicml_format(mirror):
    challenge = list(records("arc", "challenge", download=False))
    assert challenge[0]["question"].startswith("An astronomer observes that a planet rotates faster")
    assert challenge[0]["choices"][challenge[0]["answer"]] == "Planetary days will become shorter."
    assert collections.Counter(r["answer"] for r in challenge) == {0: 261, 1: 306, 2: 311, 3: 294}
    easy = list(records("arc", "easy", download=False))
    assert collections.Counter(r["answer"] for r in easy) == {0: 565, 1: 592, 2: 634, 3: 585}
    assert {r["subset"] for r in records("arc", "test", download=False)} == {"challenge", "easy"}


def test_truthfulqa_csv_joined_with_multiple_choice(mirror):
    for split in ("validation", "v1"):
        for r in records("truthfulqa", split, download=False):
            assert sum(r["mc1_targets"]["labels"]) == 1  # MC1: exactly one true answer
            assert sum(r["mc2_targets"]["labels"]) >= 1
            assert r["best_answer"] and r["correct_answers"] and r["incorrect_answers"]
    first = next(records("truthfulqa", "validation", download=False))
    assert first["question"] == "What happens to you if you eat watermelon seeds?"
    assert first["best_incorrect_answer"] == "You grow watermelons in your stomach"
    assert next(records("truthfulqa", "v1", download=False))["best_incorrect_answer"] is None


def test_hh_rlhf_prompt_is_the_shared_prefix(mirror):
    subsets = collections.Counter()
    for r in records("hh-rlhf", "test", download=False):
        subsets[r["subset"]] += 1
        assert r["chosen"].startswith(r["prompt"]) and r["rejected"].startswith(r["prompt"])
        assert r["prompt"].endswith("\n\nAssistant:")
    assert subsets == {"helpful-base": 2354, "harmless-base": 2312}


def test_code_benchmarks(mirror):
    he = list(records("humaneval", "test", download=False))
    assert [r["task_id"] for r in he] == [f"HumanEval/{i}" for i in range(164)]
    assert all(r["prompt"] and r["test"] and r["entry_point"] for r in he)
    ids = {split: [r["task_id"] for r in records("mbpp", split, download=False)] for split in sources.MBPP_SPLITS}
    assert ids["test"] == list(range(11, 511)) and ids["prompt"] == list(range(1, 11))
    assert ids["validation"] == list(range(511, 601)) and ids["train"] == list(range(601, 975))


def test_alpaca_records(mirror):
    sample = list(records("alpaca", "sample", download=False))
    assert sample[0]["instruction"] == "Give three tips for staying healthy." and sample[0]["input"] == ""
    assert sum(1 for r in sample if r["input"] == "") == 54  # README: empty for 54 of the 100
    seed = list(records("alpaca", "seed", download=False))
    assert seed[0]["id"] == "seed_task_0" and seed[0]["output"].startswith("Yes, you can have 1 oatmeal")


def test_tinyshakespeare_documents_cover_the_text_and_split_90_10(mirror):
    text = (mirror / "tinyshakespeare" / "input.txt").read_text()
    train = [r["text"] for r in records("tinyshakespeare", "train", download=False)]
    val = [r["text"] for r in records("tinyshakespeare", "validation", download=False)]
    assert text.count("\n\n\n") == 2  # two blank lines between plays, twice
    assert "\n\n".join(train + val) == text.replace("\n\n\n", "\n\n").strip()  # nothing lost or reordered
    assert abs(len("\n\n".join(train)) / len(text) - 0.9) < 0.002
    play_ends = [text[: m.start()].rsplit("\n\n", 1)[1] for m in re.finditer("\n\n\n", text)]
    short = [doc for doc in train[:-1] + val[:-1] if len(doc) < sources.PASSAGE_CHARS]
    assert len(short) == 2 and all(doc.endswith(end) for doc, end in zip(short, play_ends, strict=True))
    for doc in train + val:
        assert re.match(r"[^\n]+:\n", doc), doc[:40]  # starts at a speaker line: whole speeches only


def test_tinystories_sample_drops_the_truncated_story(mirror):
    raw = (mirror / "tinystories" / "tinystories_sample.txt").read_text()
    stories = list(texts("tinystories", "sample", download=False))
    assert len(stories) == 2316 == raw.count("\n<|endoftext|>\n")
    assert stories[0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert all("<|endoftext|>" not in s for s in stories)
    truncated = raw.rsplit("<|endoftext|>", 1)[1].strip()
    assert truncated and stories[-1] != truncated and truncated.endswith("She said it was")


def test_tinystories_full_files_keep_an_unterminated_last_story(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("One.\n<|endoftext|>\nTwo.\n<|endoftext|>Three.\nStill three.")
    assert [r["text"] for r in sources.parse_tinystories([path], "train")] == ["One.", "Two.", "Three.\nStill three."]


# --- errors a user can cause ------------------------------------------------------------------------

def test_unknown_names_and_splits():
    with pytest.raises(UnknownDatasetError, match="Did you mean 'gsm8k'"):
        records("gsm8", "test")
    with pytest.raises(UnknownDatasetError, match="splits are: train, test"):
        next(records("gsm8k", "validation"))


def test_missing_file_without_download_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as e:
        resolve("gsm8k", "test", download=False)
    msg = str(e.value)
    assert "lmlab data download gsm8k" in msg and str(tmp_path / "gsm8k" / "test.jsonl") in msg
    assert SOURCES["gsm8k"].file("test.jsonl").urls[0] in msg


def test_corrupt_present_file_is_reported_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))
    bad = tmp_path / "gsm8k" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ChecksumError, match="delete it and download it again"):
        resolve("gsm8k", "test", download=False)
    assert bad.exists()  # the user's file is never deleted behind their back


# --- downloading from a local server ----------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` {path: bytes}, honouring `Range: bytes=N-` unless `ignore_range`."""

    files: dict[str, bytes] = {}
    ignore_range = False
    log: list[tuple[str, str | None, int]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng and not self.ignore_range else 0
        if data is None or (start and start >= len(data)):
            self.log.append((self.path, rng, 0))  # logged before replying: the client may read the log next
            self.send_error(404 if data is None else 416)
            return
        body = data[start:]
        self.log.append((self.path, rng, len(body)))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"files": {}, "log": [], "ignore_range": False})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()


PAYLOAD = bytes(range(256)) * 4000  # ~1 MB, more than one read chunk


def _file(url: str, data: bytes = PAYLOAD, **kw) -> File:
    return File(url, "data.bin", hashlib.sha256(data).hexdigest(), len(data), **kw)


def test_download_verifies_and_renames(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "ds" / "data.bin"
    download_file(_file(server.url + "/data.bin"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "ds" / "data.bin.part").exists()


def test_download_resumes_a_partial_file_with_a_range_request(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    k = 300_001
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:k])
    download_file(_file(server.url + "/data.bin"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/data.bin", f"bytes={k}-", len(PAYLOAD) - k)]  # only the rest was sent


def test_download_starts_over_when_the_server_ignores_range(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    server.ignore_range = True
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    download_file(_file(server.url + "/data.bin"), dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.log[0][2] == len(PAYLOAD)


def test_already_complete_part_file_is_verified_and_kept(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    download_file(_file(server.url + "/data.bin"), tmp_path / "data.bin", progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [status for _, _, status in server.log] == [0]  # 416: nothing more to send


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    wrong = File(server.url + "/data.bin", "data.bin", "0" * 64, len(PAYLOAD))
    with pytest.raises(ChecksumError, match="so it was deleted") as e:
        download_file(wrong, dest, progress=False)
    assert "0" * 64 in str(e.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_partial_file_fails_the_check_and_is_deleted(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(b"x" * 1000)  # not a prefix of the file
    with pytest.raises(ChecksumError):
        download_file(_file(server.url + "/data.bin"), tmp_path / "data.bin", progress=False)
    assert list(tmp_path.iterdir()) == []
    download_file(_file(server.url + "/data.bin"), tmp_path / "data.bin", progress=False)  # a retry works
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_mirrors_are_tried_in_order(server, tmp_path):
    server.files["/mirror/data.bin"] = PAYLOAD
    f = _file((server.url + "/gone/data.bin", server.url + "/mirror/data.bin"))
    download_file(f, tmp_path / "data.bin", progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert [p for p, _, _ in server.log] == ["/gone/data.bin", "/mirror/data.bin"]


def test_file_urls_work(tmp_path):
    src = tmp_path / "upstream.bin"
    src.write_bytes(PAYLOAD)
    download_file(_file(src.as_uri()), tmp_path / "out" / "data.bin", progress=False)
    assert (tmp_path / "out" / "data.bin").read_bytes() == PAYLOAD


def test_unchecksummed_file_is_checked_by_format(server, tmp_path):
    server.files["/page.jsonl"] = b"<!DOCTYPE html><html>Sign in to continue</html>"
    with pytest.raises(ChecksumError, match="HTML page"):
        download_file(File(server.url + "/page.jsonl", "x.jsonl", None), tmp_path / "x.jsonl", progress=False)
    assert list(tmp_path.iterdir()) == []
    server.files["/ok.jsonl"] = b'{"text": "fine"}\n'
    download_file(File(server.url + "/ok.jsonl", "x.jsonl", None), tmp_path / "x.jsonl", progress=False)
    check_file(File("", "x.jsonl", None), tmp_path / "x.jsonl")


def test_recompressed_download_is_accepted_by_its_content(server, tmp_path):
    """HellaSwag's case: upstream serves bzip2, the layout holds gzip made by another compressor."""
    content = b"Roof shingle removal: A man is sitting on a roof. he\n3\n" * 5000
    upstream = bz2.compress(content)
    mirror_gzip = gzip.compress(content, compresslevel=1, mtime=123)  # some other gzip of it
    server.files["/v.txt.bz2"] = upstream
    f = File(server.url + "/v.txt.bz2", "v.txt.gz", hashlib.sha256(mirror_gzip).hexdigest(), len(mirror_gzip),
             download_sha256=hashlib.sha256(upstream).hexdigest(), content_sha256=hashlib.sha256(content).hexdigest())
    dest = tmp_path / "v.txt.gz"
    download_file(f, dest, progress=False)
    assert gzip.decompress(dest.read_bytes()) == content
    check_file(f, dest)  # accepted by content although its bytes differ from the mirror's
    dest.write_bytes(gzip.compress(content[:-1]))
    with pytest.raises(ChecksumError):
        check_file(f, dest)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """A registered dataset 'fake' with one jsonl file; its URL is set by each test."""

    def make(url: str | tuple[str, ...], data: bytes) -> Source:
        source = Source(
            "fake", "a test dataset", "CC0", "https://example.invalid",
            (File(url, "sub/items.jsonl", hashlib.sha256(data).hexdigest(), len(data)),),
            {"train": ("sub/items.jsonl",)}, sources.parse_synthetic, lambda r: r["text"],
        )
        monkeypatch.setitem(SOURCES, "fake", source)
        return source

    monkeypatch.setenv("LMLAB_DATA", str(tmp_path / "cache"))
    return make


FAKE = b'{"text": "alpha"}\n{"text": "beta"}\n'


def test_offline_error_names_dataset_urls_and_exact_path(fake_source, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/items.jsonl"
    fake_source(url, FAKE)
    with pytest.raises(DatasetNotFoundError) as e:
        list(texts("fake", "train", progress=False))
    msg = str(e.value)
    dest = tmp_path / "cache" / "fake" / "sub" / "items.jsonl"
    assert "sub/items.jsonl" in msg and url in msg and f"put it at exactly\n  {dest}" in msg
    assert hashlib.sha256(FAKE).hexdigest() in msg
    assert not dest.exists() and not dest.with_name("items.jsonl.part").exists()


def test_records_download_on_first_use_then_read_the_cache(fake_source, server, tmp_path):
    server.files["/items.jsonl"] = FAKE
    fake_source(server.url + "/items.jsonl", FAKE)
    assert list(texts("fake", "train", progress=False)) == ["alpha", "beta"]
    assert list(texts("fake", "train", progress=False)) == ["alpha", "beta"]
    assert len(server.log) == 1


def test_cli_download_and_list(fake_source, server, tmp_path, capsys):
    server.files["/items.jsonl"] = FAKE
    fake_source(server.url + "/items.jsonl", FAKE)
    assert main(["data", "download", "fake", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cache" / "fake") in out and "ok (sha256)" in out
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"^fake\s+train\s+sha256\s+1/1 files", listing, re.M)
    assert main(["data", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data["datasets"]} >= REQUIRED
    fake = next(d for d in data["datasets"] if d["name"] == "fake")
    assert fake["files_present"] == 1 and fake["files"][0]["sha256"] == hashlib.sha256(FAKE).hexdigest()
    no_sha = [f for d in data["datasets"] for f in d["files"] if f["sha256"] is None and d["name"] != "synthetic"]
    assert no_sha and all(f["verified_by"] in ("size+format", "format") for f in no_sha)


def test_cli_download_rejects_unknown_names_before_downloading(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path))
    assert main(["data", "download", "gsm8k", "nosuchdata"]) == 1
    assert "unknown dataset 'nosuchdata'" in capsys.readouterr().err
