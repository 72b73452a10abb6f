"""`lmlab data prepare`: readers for every input format, the pipeline's report (consistent counts,
capped examples), what it writes (documents or token shards that decode back to the kept text),
determinism across worker counts, atomic output, and the command line."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.data.dedup import MinHashConfig
from lmlab.data.filters import (
    Blocklist,
    LanguageIdentifier,
    Normalizer,
    PIIScrubber,
    QualityConfig,
    QualityFilter,
)
from lmlab.data.prepare import PrepareConfig, Sources, apply_overrides, format_summary, prepare
from lmlab.data.readers import DocumentReader, expand_paths, file_format, read_documents


class ByteTokenizer:
    """UTF-8 bytes as ids, eos = 256: exact round trips, no training needed."""

    vocab_size, eos_id, bos_id = 257, 256, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", "replace")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".spool-" in p.name or ".old-" in p.name)


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def shakespeare_part(shared_data, tmp_path_factory) -> Path:
    """The first ~150 KB of tinyshakespeare (about 1,000 speeches), as a file."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("src") / "part.txt"
    path.write_text(text[:text.index("\n\n", 150_000)] + "\n", encoding="utf-8")
    return path


# --- readers -------------------------------------------------------------------------------------

def test_txt_split_modes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo two\n  \n\n\nthree\n<|endoftext|>\nfour\n")
    assert list(read_documents([path])) == [path.read_text()]
    assert list(read_documents([path], split_on="blank-lines")) == ["one", "two two", "three\n<|endoftext|>\nfour"]
    assert list(read_documents([path], split_on="lines")) == ["one", "two two", "three", "<|endoftext|>", "four"]
    assert list(read_documents([path], split_on=r"<\|endoftext\|>")) == ["one\n\ntwo two\n  \n\n\nthree", "four"]
    gz = tmp_path / "a.txt.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list(read_documents([gz], split_on="blank-lines")) == list(read_documents([path], split_on="blank-lines"))
    with pytest.raises(ValueError, match="regular expression"):
        DocumentReader([path], split_on="(unclosed")


def test_jsonl_fields_errors_and_empty_records(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": None}, {"question": "", "answer": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reader = DocumentReader([path], text_fields=["question", "answer"])
    assert list(reader) == ["Q1?\n\nA1.", "Q2?"]
    assert reader.stats == {"files": 1, "documents": 2, "chars": 8 + 3, "empty_records_skipped": 1}
    with pytest.raises(ValueError, match=r"d.jsonl:1: no field 'text' \(fields: question, answer\)"):
        list(read_documents([path]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents([bad]))
    bad.write_text('{"text": ["not", "text"]}\n')
    with pytest.raises(ValueError, match="is a list, not text"):
        list(read_documents([bad]))


def test_parquet_and_gzipped_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"document number {i}" for i in range(2500)]  # more than one record batch
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": texts, "id": list(range(2500))}), path)
    assert list(read_documents([path], text_fields=["body"])) == texts
    gz = tmp_path / "t.parquet.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list(read_documents([gz], text_fields=["body"])) == texts
    with pytest.raises(ValueError, match="no column 'text' .columns: body, id."):
        list(read_documents([path]))


def test_directories_and_path_errors(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("bee")
    (tmp_path / "corpus" / "sub" / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "corpus" / "notes.md").write_text("ignored: not a corpus format")
    assert [p.name for p in expand_paths([tmp_path / "corpus"])] == ["b.txt", "a.jsonl"]  # sorted by path
    assert list(read_documents([tmp_path / "corpus"])) == ["bee", "ay"]
    assert [file_format(n) for n in ("x.TXT", "x.jsonl.gz", "x.parquet", "x.json", "x.gz")] == \
        ["txt", "jsonl", "parquet", None, None]
    with pytest.raises(ValueError, match="unknown format"):
        expand_paths([tmp_path / "corpus" / "notes.md"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        expand_paths([tmp_path / "empty"])
    with pytest.raises(ValueError, match="applies to .txt files"):
        DocumentReader([tmp_path / "corpus" / "sub"], split_on="lines")


def test_invalid_utf8_is_replaced_and_reported(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    (doc,) = read_documents([path])
    assert doc == "caf\ufffd au lait"
    assert Normalizer()(doc).changes == {"replacement_chars": 1}


def test_readers_on_real_data(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    speeches = [s.strip("\n") for s in text.split("\n\n") if s.strip()]
    assert list(read_documents([shared_data / "tinyshakespeare" / "input.txt"], split_on="blank-lines")) == speeches
    stories = list(read_documents([shared_data / "tinystories"], split_on=r"<\|endoftext\|>"))
    # 2,316 complete stories, then the truncated one the 2 MiB byte-range cut leaves at the end
    assert len(stories) == 2316 + 1 and not any("<|endoftext|>" in s for s in stories)
    assert stories[-1].endswith("She said it was")
    gsm = list(read_documents([shared_data / "gsm8k" / "test.jsonl"], text_fields=["question", "answer"]))
    assert len(gsm) == 1319 and gsm[0].split("\n\n")[-1].splitlines()[-1].startswith("####")


# --- configuration overrides --------------------------------------------------------------------

def test_apply_overrides():
    from lmlab.data.filters import C4Config

    cfg = apply_overrides(QualityConfig(c4=C4Config()), ["min_words=20", "max_hash_ratio=0.5", "c4.min_sentences=3",
                                                          "c4.drop_curly_brackets=false", "stop_words=a, b"])
    assert (cfg.min_words, cfg.max_hash_ratio, cfg.c4.min_sentences) == (20, 0.5, 3)
    assert cfg.c4.drop_curly_brackets is False and cfg.stop_words == ("a", "b")
    assert apply_overrides(QualityConfig(c4=C4Config()), ["c4=none"]).c4 is None
    assert QualityConfig().min_words == 50  # the original is not modified
    with pytest.raises(ValueError, match="no field 'min_word'.*min_words"):
        apply_overrides(QualityConfig(), ["min_word=3"])
    with pytest.raises(ValueError, match="cannot read 'many' as int"):
        apply_overrides(QualityConfig(), ["min_words=many"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(QualityConfig(), ["min_words"])
    with pytest.raises(ValueError, match="c4 is not set; switch it on first"):
        apply_overrides(QualityConfig(), ["c4.min_sentences=3"])


# --- the pipeline --------------------------------------------------------------------------------

def check_report_consistency(report: dict) -> None:
    docs, chars = report["read"]["documents"], report["read"]["chars"]
    for stage in report["stages"]:
        assert (stage["docs_in"], stage["chars_in"]) == (docs, chars), stage["name"]  # chained
        assert stage["docs_in"] - stage["docs_out"] == sum(stage["removed"].values())
        for reason, examples in stage["examples"].items():
            assert reason in stage["removed"] and 1 <= len(examples) <= 3
            assert all(len(e["text"]) <= 201 for e in examples)
        docs, chars = stage["docs_out"], stage["chars_out"]
    assert (report["output"]["documents"], report["output"]["chars"]) == (docs, chars)


def test_prepare_tinyshakespeare_report_and_output(shakespeare_part, tmp_path):
    out = tmp_path / "out"
    report = prepare(Sources([str(shakespeare_part)], split_on="blank-lines"), out, progress=False)
    check_report_consistency(report)
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["normalize", "langid", "quality", "blocklist", "pii", "exact_dedup", "near_dedup"]
    assert report["read"]["files"] == 1 and report["sources"] == [str(shakespeare_part)]
    # speeches are short: Gopher's 50-word minimum removes most of them, and says so with the count
    quality = stages["quality"]
    assert quality["removed"]["too_few_words"] > 0.7 * quality["docs_in"]
    assert quality["examples"]["too_few_words"][0]["why"].endswith("words < 50")
    assert stages["langid"]["changes"]["short_unjudged"] > 0
    assert stages["near_dedup"]["info"]["bands"] == 14
    kept = read_jsonl(out / "documents.jsonl")
    assert len(kept) == report["output"]["documents"] > 50
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| quality |" in md and "too_few_words" in md
    assert "too_few_words" in format_summary(report)
    # what comes out passes every stage unchanged
    identify = LanguageIdentifier()
    for text in kept:
        for stage in (Normalizer(), identify, QualityFilter(), Blocklist(), PIIScrubber()):
            outcome = stage(text)
            assert outcome.text == text and set(outcome.changes) <= {"short_unjudged"}
    assert leftovers(tmp_path) == []


def test_any_string_survives_the_round_trip(tmp_path):
    docs = ["naïve café 日本語 😀", "lone surrogate \ud83d kept as is", "quote \" and \\ backslash\nline"]
    prepare(docs, tmp_path / "o", PrepareConfig(normalize=None, langid=None, quality=None), progress=False)
    assert read_jsonl(tmp_path / "o" / "documents.jsonl") == docs


def test_every_stage_can_be_switched_off(shakespeare_part, tmp_path):
    config = PrepareConfig(normalize=None, langid=None, quality=None, blocklist=None, pii=None, exact_dedup=False,
                           near_dedup=None)
    report = prepare(Sources([str(shakespeare_part)], split_on="blank-lines"), tmp_path / "raw", config,
                     progress=False)
    assert report["stages"] == [] and len(report["skipped_stages"]) == 7
    docs = list(read_documents([shakespeare_part], split_on="blank-lines"))
    assert read_jsonl(tmp_path / "raw" / "documents.jsonl") == docs


def test_dedup_stages_remove_planted_duplicates(shared_data, tmp_path):
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:300]
    docs = [f"{r['question']}\n\n{r['answer']}" for r in map(json.loads, lines)]
    rng = random.Random(1)
    exact = [docs[i].upper() for i in rng.sample(range(300), 20)]
    near = []
    for i in rng.sample(range(300), 20):  # one word dropped from documents of 100+ words
        words = docs[i].split(" ")
        if len(words) >= 100:
            near.append(" ".join(words[:50] + words[51:]))
    corpus = docs + exact + near
    config = PrepareConfig(langid=None, quality=None)  # GSM8K's arithmetic fails Gopher's alpha rule
    report = prepare(corpus, tmp_path / "out", config, progress=False)
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["exact_dedup"]["removed"] == {"exact_duplicate": 20}
    assert stages["near_dedup"]["removed"]["near_duplicate"] >= 0.9 * len(near) and len(near) >= 10
    assert stages["near_dedup"]["removed"]["near_duplicate"] <= len(near)
    example = stages["near_dedup"]["examples"]["near_duplicate"][0]
    assert example["why"].startswith("near-duplicate of input doc #") and example["kept"]
    kept = read_jsonl(tmp_path / "out" / "documents.jsonl")
    assert kept[:300] == docs  # originals come first and are the ones kept


def test_workers_give_identical_output(shakespeare_part, tmp_path):
    config = PrepareConfig(quality=QualityConfig(min_words=10))
    one = prepare(Sources([str(shakespeare_part)], split_on="blank-lines"), tmp_path / "w1", config, progress=False)
    config.workers = 2
    two = prepare(Sources([str(shakespeare_part)], split_on="blank-lines"), tmp_path / "w2", config, progress=False)
    assert (tmp_path / "w1" / "documents.jsonl").read_bytes() == (tmp_path / "w2" / "documents.jsonl").read_bytes()
    for report in (one, two):
        report.pop("seconds")
        report["config"].pop("workers")
    assert one == two


def test_prepare_writes_token_shards(shakespeare_part, tmp_path):
    from lmlab.data.shards import TokenShards

    out = tmp_path / "shards"
    report = prepare(Sources([str(shakespeare_part)], split_on="blank-lines"), out,
                     PrepareConfig(quality=QualityConfig(min_words=20)), ByteTokenizer(), val_fraction=0.1,
                     keep_text=True, progress=False)
    kept = read_jsonl(out / "documents.jsonl")
    shards = TokenShards(out)
    decoded = {split: [ByteTokenizer().decode(d) for d in shards.documents(split)] for split in ("train", "val")}
    assert sorted(decoded["train"] + decoded["val"]) == sorted(kept)
    assert decoded["train"] == [k for k in kept if k in set(decoded["train"])]  # input order within a split
    assert 0 < len(decoded["val"]) < 0.25 * len(kept)
    assert report["output"]["shards"]["splits"]["train"]["documents"] == len(decoded["train"])
    assert {"report.json", "report.md", "meta.json"} <= {p.name for p in out.iterdir()}
    assert "tokens train" in format_summary(report)


def test_output_is_atomic(shakespeare_part, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare(["some text"], out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"

    def failing():
        yield from read_documents([shakespeare_part], split_on="blank-lines")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        prepare(failing(), out, overwrite=True, progress=False)
    assert (out / "precious.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    prepare(read_documents([shakespeare_part], split_on="blank-lines"), out, overwrite=True, progress=False)
    assert not (out / "precious.txt").exists() and (out / "report.json").is_file()


def test_everything_removed_with_a_tokenizer_says_why(tmp_path):
    with pytest.raises(ValueError, match="every one of the 2 documents was removed by the filters"):
        prepare(["too short", "also short"], tmp_path / "out", PrepareConfig(), ByteTokenizer(), progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_settings_fail_before_anything_is_written(tmp_path):
    from lmlab.data.filters import BlocklistConfig, LangIdConfig

    for config in (PrepareConfig(langid=LangIdConfig(languages=("xx",)), workers=2),
                   PrepareConfig(blocklist=BlocklistConfig(files=(str(tmp_path / "none.txt"),)), workers=2)):
        with pytest.raises((ValueError, FileNotFoundError)):
            prepare(["some text"], tmp_path / "o", config, progress=False)
        assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="the sources yielded no documents"):
        prepare([], tmp_path / "o", tokenizer=ByteTokenizer(), progress=False)


def test_near_dedup_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="Jaccard"):
        prepare(["x"], tmp_path / "o", PrepareConfig(near_dedup=MinHashConfig(threshold=1.5)), progress=False)
    assert not (tmp_path / "o").exists()


# --- command line --------------------------------------------------------------------------------

def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["data", "prepare", *args, "--no-progress", "--workers", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prepare_files(shakespeare_part, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--source", str(shakespeare_part), "--out", str(out), "--split-on",
                              "blank-lines", "--quality", "min_words=20", "--near-dup-threshold", "0.7")
    assert code == 0
    assert stdout.splitlines()[0].split() == ["stage", "docs", "in", "docs", "out", "removed", "chars", "in",
                                              "chars", "out", "top", "reasons"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["quality"]["min_words"] == 20 and report["config"]["near_dedup"]["threshold"] == 0.7
    assert f"kept {report['output']['documents']:,} documents" in stdout
    code, _, err = run_cli(capsys, "--source", str(shakespeare_part), "--out", str(out))
    assert code == 1 and "not empty" in err and "--overwrite" in err


def test_cli_stage_switches(shakespeare_part, tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "--source", str(shakespeare_part), "--out", str(tmp_path / "o"), "--split-on",
                              "blank-lines", "--no-langid", "--no-quality", "--no-pii", "--no-blocklist", "--no-dedup",
                              "--normalization", "NFKC")
    assert code == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["normalize"] and report["config"]["normalize"]["form"] == "NFKC"
    assert "skipped stages: langid, quality, blocklist, pii, exact_dedup, near_dedup" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--no-quality", "--quality", "min_words=3"], "--no-quality switches off"),
    (["--quality", "min_word=3"], "no field 'min_word'"),
    (["--languages", "xx"], "unknown to langdetect"),
    (["--near-dup-threshold", "0"], "Jaccard similarity in (0, 1]"),
    (["--tokenizer", "/nonexistent/tok"], "is not a directory"),
    (["--text-field", "body"], "no field 'body'"),
])
def test_cli_usage_errors(tmp_path, capsys, args, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "hello"}\n')
    code, _, err = run_cli(capsys, "--source", str(src), "--out", str(tmp_path / "o"), *args)
    assert code == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_cli_missing_source(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in err


def test_cli_registry_source_and_tokenizer(shared_data, tmp_path, capsys, monkeypatch):
    """`--source tinyshakespeare` through the dataset registry, tokenized with an lmlab BPE."""
    from lmlab.data.shards import TokenShards
    from lmlab.tokenizer import Tokenizer, load_tokenizer

    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    sample = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:50_000]
    Tokenizer.train([sample], vocab_size=300, progress=False).save(tmp_path / "tok")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--source", "tinyshakespeare", "--out", str(out), "--tokenizer",
                              str(tmp_path / "tok"), "--keep-text", "--val-fraction", "0.05")
    assert code == 0, stdout
    report = json.loads((out / "report.json").read_text())
    assert report["sources"] == ["tinyshakespeare (train)"]
    assert report["read"]["documents"] > 300  # passages of whole speeches, about 2,000 characters each
    tokenizer = load_tokenizer(tmp_path / "tok")
    shards = TokenShards(out)
    shards.check_tokenizer(tokenizer)
    first = next(shards.documents("train"))
    assert tokenizer.decode([int(t) for t in first[:-1]]) == read_jsonl(out / "documents.jsonl")[0]
