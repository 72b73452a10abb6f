"""Token shards: exact round trips (stand-in byte tokenizer, a trained HF BPE, lmlab's own BPE),
dtype choice, shard rollover, output independent of workers and chunking, the hash split, the
tokenizer fingerprint, atomic writes and the errors a user can cause."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lmlab.data import shards
from lmlab.data.shards import (
    ShardFormatError,
    TokenizerMismatchError,
    TokenShards,
    split_of,
    token_dtype,
    tokenizer_fingerprint,
    write_shards,
)


class ByteTokenizer:
    """Stand-in tokenizer: one id per UTF-8 byte, shifted by `offset`, then bos and eos."""

    def __init__(self, offset: int = 0, specials: bool = True):
        self.offset = offset
        self.vocab_size = offset + 256 + 2
        self.bos_id = offset + 256 if specials else None
        self.eos_id = offset + 257 if specials else None

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256).decode("utf-8", "replace")


class BrokenTokenizer(ByteTokenizer):
    def encode(self, text: str) -> list[int]:
        return [self.vocab_size + 5]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "naïve", "café", "日本語", "🙂", "a", "mat", "\n", "  "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def write(texts, out, tok=None, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return write_shards(texts, tok or ByteTokenizer(), out, **kw)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def expected_split(docs, seed, val_fraction):
    out = {"train": [], "val": []}
    for d in docs:
        if d:
            out[split_of(d, seed, val_fraction)].append(d)
    return out


# --- round trips ------------------------------------------------------------------------------

def test_round_trip_stand_in(tmp_path):
    docs = synthetic_docs(300) + ["", "last one"]
    tok = ByteTokenizer()
    summary = write(docs, tmp_path / "s", tok, val_fraction=0.2, seed=3)
    got = TokenShards(tmp_path / "s")
    want = expected_split(docs, 3, 0.2)
    assert summary["empty_documents_skipped"] == 1
    for split in ("train", "val"):
        stored = list(got.documents(split))
        assert len(stored) == len(want[split]) == got.num_documents(split) == summary["splits"][split]["documents"]
        for ids, text in zip(stored, want[split], strict=True):
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1].tolist()  # one eos, at the end
            assert ids[:-1].tolist() == tok.encode(text)
            assert tok.decode(ids.tolist()) == text
        assert got.num_tokens(split) == sum(len(tok.encode(t)) + 1 for t in want[split])


def test_round_trip_tinyshakespeare_with_rollover(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    docs = re.split(r"\n\s*\n", text)  # paragraphs (speeches)
    assert len(docs) > 5000
    tok = ByteTokenizer()
    summary = write(docs, tmp_path / "s", tok, shard_tokens=50_000, val_fraction=0.01)
    got = TokenShards(tmp_path / "s")
    assert len(got.shards("train")) >= len(text.encode()) // 50_000  # rolled over many times
    assert all(s.tokens <= 50_000 for s in got.shards("train") + got.shards("val"))
    want = expected_split(docs, 0, 0.01)
    for split in ("train", "val"):
        assert [tok.decode(d.tolist()) for d in got.documents(split)] == want[split]
    n_bytes = sum(len(d.encode()) + 1 for d in docs)
    assert summary["splits"]["train"]["tokens"] + summary["splits"]["val"]["tokens"] == n_bytes


def test_bos_and_eos_separators(tmp_path):
    tok = ByteTokenizer()
    docs = ["ab", "c", "déf"]
    for add_bos, add_eos in [(True, False), (True, True)]:
        out = tmp_path / f"{add_bos}{add_eos}"
        meta = write(docs, out, tok, val_fraction=0.0, add_bos=add_bos, add_eos=add_eos)
        stored = [d.tolist() for d in TokenShards(out).documents("train")]
        want = [[tok.bos_id] * add_bos + tok.encode(d) + [tok.eos_id] * add_eos for d in docs]
        assert stored == want
        assert meta["separator"] == {"bos_id": tok.bos_id if add_bos else None,
                                     "eos_id": tok.eos_id if add_eos else None}


def _hf_bpe(texts):
    tokenizers = pytest.importorskip("tokenizers")

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


class HFBPE:
    """A real byte-level BPE (Hugging Face tokenizers), trained in the test, behind the interface."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id("<|endoftext|>")
        self.bos_id = None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self):
        import hashlib

        return "sha256:" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()


def test_round_trip_real_bpe_with_workers(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    docs = text.split("\n\n")[:2000]
    tok = HFBPE(_hf_bpe(docs))
    write(docs, tmp_path / "s", tok, workers=2, val_fraction=0.05, shard_tokens=5000)
    got = TokenShards(tmp_path / "s")
    want = expected_split(docs, 0, 0.05)
    for split in ("train", "val"):
        stored = list(got.documents(split))
        assert [d[-1] for d in stored] == [tok.eos_id] * len(want[split])
        assert [tok.decode(d[:-1].tolist()) for d in stored] == want[split]
    # fewer tokens than bytes: the merges were used, not a byte fallback
    assert got.num_tokens("train") < 0.6 * sum(len(d.encode()) for d in want["train"])
    got.check_tokenizer(tok)
    other = HFBPE(_hf_bpe(docs[:100]))
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        got.check_tokenizer(other)


def _lmlab_bpe(docs, vocab_size=600):
    tokenizer = pytest.importorskip("lmlab.tokenizer.tokenizer")
    return tokenizer.Tokenizer.train(docs, vocab_size, progress=False)


def test_round_trip_lmlab_tokenizer(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    docs = re.split(r"\n\s*\n", text)[:3000]
    tok = _lmlab_bpe(docs[:1500])
    docs.append("odd text: <|eos|> and <|bos|> are written here as plain text")
    summary = write(docs, tmp_path / "s", tok, workers=2, val_fraction=0.05, shard_tokens=20_000, add_bos=True)
    got = TokenShards(tmp_path / "s")
    assert summary["dtype"] == "uint16" and len(got.shards("train")) > 3
    want = expected_split(docs, 0, 0.05)
    for split in ("train", "val"):
        stored = [d.tolist() for d in got.documents(split)]
        assert [(d[0], d[-1]) for d in stored] == [(tok.bos_id, tok.eos_id)] * len(want[split])
        assert [d[1:-1] for d in stored] == [tok.encode(t) for t in want[split]]
        assert [tok.decode(d[1:-1]) for d in stored] == want[split]
    # special-token text inside a document stays text: one bos and one eos per document
    assert sum(d.tolist().count(tok.eos_id) for d in got.documents("train")) == len(want["train"])
    # the fingerprint survives saving and loading the tokenizer, and tells another one apart
    tok.save(tmp_path / "tok")
    got.check_tokenizer(type(tok).from_hf_json(tmp_path / "tok"))
    with pytest.raises(TokenizerMismatchError):
        got.check_tokenizer(_lmlab_bpe(docs[:300]))


# --- format -----------------------------------------------------------------------------------

def test_token_dtype_boundary():
    assert token_dtype(258) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")  # ids up to 65535 fit
    assert token_dtype(65537) == np.dtype("<u4")
    with pytest.raises(ValueError):
        token_dtype(0)


@pytest.mark.parametrize("offset, dtype, size", [(0, "uint16", 2), (65_278, "uint16", 2), (65_279, "uint32", 4)])
def test_dtype_on_disk(tmp_path, offset, dtype, size):
    tok = ByteTokenizer(offset)  # vocab_size = offset + 258: 65536 is the last uint16 vocabulary
    docs = ["héllo", "wörld"]
    meta = write(docs, tmp_path / "s", tok, val_fraction=0.0)
    assert meta["dtype"] == dtype
    shard = tmp_path / "s" / "train_000000.bin"
    raw = np.fromfile(shard, dtype=np.dtype(dtype).newbyteorder("<"))
    assert shard.stat().st_size == size * meta["splits"]["train"]["tokens"]
    assert raw.tolist() == tok.encode("héllo") + [tok.eos_id] + tok.encode("wörld") + [tok.eos_id]
    assert raw.max() == tok.eos_id  # the largest id survives the round trip


def test_meta_and_index_files(tmp_path):
    docs = ["aaaa", "bb", "cccccc", "d"]  # 5, 3, 7, 2 tokens with eos
    meta = write(docs, tmp_path / "s", val_fraction=0.0, shard_tokens=9)
    # greedy rollover by hand: [5, 3] = 8 | [7, 2] = 9
    on_disk = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert on_disk == {k: v for k, v in meta.items() if k != "path"}
    assert [(s["tokens"], s["documents"]) for s in meta["splits"]["train"]["shards"]] == [(8, 2), (9, 2)]
    assert np.load(tmp_path / "s" / "train_000000.idx.npy").tolist() == [0, 5]
    assert np.load(tmp_path / "s" / "train_000001.idx.npy").tolist() == [0, 7]
    assert meta["format_version"] == shards.FORMAT_VERSION and meta["vocab_size"] == 258
    assert meta["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "meta.json", "train_000000.bin", "train_000000.idx.npy", "train_000001.bin", "train_000001.idx.npy"]


def test_long_document_gets_its_own_shard(tmp_path):
    docs = ["ab", "x" * 30, "cd", "ef"]  # 3, 31, 3, 3 tokens with eos
    meta = write(docs, tmp_path / "s", val_fraction=0.0, shard_tokens=8)
    assert [s["tokens"] for s in meta["splits"]["train"]["shards"]] == [3, 31, 6]
    assert [ByteTokenizer().decode(d.tolist()) for d in TokenShards(tmp_path / "s").documents("train")] == docs


# --- determinism ------------------------------------------------------------------------------

def test_workers_and_chunking_do_not_change_the_output(tmp_path, monkeypatch):
    docs = synthetic_docs(2000, seed=1)
    kw = dict(val_fraction=0.1, shard_tokens=4096, seed=7)
    write(docs, tmp_path / "w1", workers=1, **kw)
    monkeypatch.setattr(shards, "CHUNK_DOCS", 37)  # many chunks, so three workers really interleave
    write(iter(docs), tmp_path / "w3", workers=3, **kw)
    monkeypatch.setattr(shards, "CHUNK_DOCS", 5)
    write(iter(docs), tmp_path / "w1b", workers=1, **kw)
    reference = tree_bytes(tmp_path / "w1")
    assert len(reference) > 6  # several shards in both splits
    assert tree_bytes(tmp_path / "w3") == reference
    assert tree_bytes(tmp_path / "w1b") == reference


def test_input_is_streamed_with_back_pressure():
    """Only a bounded number of items is read ahead of the results (Pool.imap would read all)."""
    from lmlab.data.parallel import ordered_map

    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield -i
            i += 1

    results = ordered_map(abs, endless(), workers=2)
    assert [next(results) for _ in range(10)] == list(range(10))  # in input order
    assert len(pulled) <= 10 + 2 * 2
    results.close()  # ends the pool


def test_val_split_is_deterministic_and_near_the_fraction(tmp_path):
    docs = [f"document number {i}" for i in range(20_000)]
    f = 0.1
    meta = write(docs, tmp_path / "a", val_fraction=f, seed=0)
    n_val = meta["splits"]["val"]["documents"]
    sd = math.sqrt(len(docs) * f * (1 - f))
    assert abs(n_val - f * len(docs)) < 5 * sd
    again = write(docs, tmp_path / "b", val_fraction=f, seed=0)
    assert again["splits"] == meta["splits"]
    other = write(docs, tmp_path / "c", val_fraction=f, seed=1)
    val_a = {ByteTokenizer().decode(d.tolist()) for d in TokenShards(tmp_path / "a").documents("val")}
    val_c = {ByteTokenizer().decode(d.tolist()) for d in TokenShards(tmp_path / "c").documents("val")}
    assert abs(other["splits"]["val"]["documents"] - f * len(docs)) < 5 * sd
    assert len(val_a & val_c) < 0.2 * len(val_a)  # another seed draws another split (overlap ~ f)


def test_split_of_is_per_document():
    text = "some document"
    assert split_of(text, 0, 0.0) == "train" and split_of(text, 0, 0.999999) == "val"
    # monotone in the fraction: a document in val stays in val when the fraction grows
    sides = [split_of(text, 5, f / 100) for f in range(100)]
    assert sides == sorted(sides, key=lambda s: s == "val")


# --- fingerprint --------------------------------------------------------------------------------

def test_fingerprint_mismatch(tmp_path):
    write(["hello world"], tmp_path / "s", val_fraction=0.0)
    got = TokenShards(tmp_path / "s")
    got.check_tokenizer(ByteTokenizer())  # same mapping: fine
    with pytest.raises(TokenizerMismatchError, match="tokenize the corpus again"):
        got.check_tokenizer(ByteTokenizer(offset=1))
    with pytest.raises(TokenizerMismatchError):
        got.check_tokenizer(ByteTokenizer(specials=False))  # same bytes, no special ids


def test_fingerprint_sees_the_mapping_not_only_the_size():
    class Swapped(ByteTokenizer):
        def decode(self, ids):
            return super().decode([{97: 98, 98: 97}.get(i, i) for i in ids])

    assert tokenizer_fingerprint(ByteTokenizer()) == tokenizer_fingerprint(ByteTokenizer())
    assert tokenizer_fingerprint(Swapped()) != tokenizer_fingerprint(ByteTokenizer())


# --- errors and atomicity -----------------------------------------------------------------------

def test_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="no non-empty documents"):
        write([], tmp_path / "s")
    with pytest.raises(ValueError, match=r"3 empty documents were skipped"):
        write(["", "", ""], tmp_path / "s")
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_all_documents_in_val(tmp_path):
    with pytest.raises(ValueError, match="lower val_fraction"):
        write(["only one"], tmp_path / "s", val_fraction=0.99999, seed=next(
            s for s in range(100) if split_of("only one", s, 0.99999) == "val"))


def test_warns_when_val_is_empty(tmp_path):
    seed = next(s for s in range(100) if split_of("x", s, 0.5) == "train")
    with pytest.warns(UserWarning, match="no document .* fell into the val split"):
        write(["x"], tmp_path / "s", val_fraction=0.5, seed=seed)


def test_refuses_non_empty_out_dir(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        write(["a"], out)
    assert tree_bytes(out) == {"keep.txt": b"precious"}
    write(["a"], out, overwrite=True, val_fraction=0.0)
    assert "keep.txt" not in tree_bytes(out) and (out / "meta.json").is_file()


def test_failure_mid_stream_leaves_nothing(tmp_path):
    def texts():
        yield from synthetic_docs(100)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write(texts(), tmp_path / "s", shard_tokens=100)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_token_ids_are_caught(tmp_path, workers):
    with pytest.raises(ValueError, match="outside its vocabulary"):
        write(["a", "b"], tmp_path / "s", BrokenTokenizer(), workers=workers)
    assert list(tmp_path.iterdir()) == []


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        write(["a"], tmp_path / "s", val_fraction=1.0)
    with pytest.raises(ValueError, match="separator"):
        write(["a"], tmp_path / "s", add_eos=False)
    with pytest.raises(ValueError, match="eos_id"):
        write(["a"], tmp_path / "s", ByteTokenizer(specials=False))
    with pytest.raises(ValueError, match="shard_tokens"):
        write(["a"], tmp_path / "s", shard_tokens=0)
    with pytest.raises(ValueError, match="workers"):
        write(["a"], tmp_path / "s", workers=0)
    with pytest.raises(TypeError, match="documents must be str"):
        write(["a", b"bytes"], tmp_path / "s")


def test_reading_broken_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenShards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        TokenShards(tmp_path / "empty")
    write(["hello", "world"], tmp_path / "s", val_fraction=0.0)
    shard = tmp_path / "s" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardFormatError, match="corrupted"):
        TokenShards(tmp_path / "s")
    write(["hello"], tmp_path / "v", val_fraction=0.0)
    meta = json.loads((tmp_path / "v" / "meta.json").read_text())
    (tmp_path / "v" / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ShardFormatError, match="upgrade lmlab"):
        TokenShards(tmp_path / "v")
    (tmp_path / "v" / "meta.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        TokenShards(tmp_path / "v")
    write(["a"], tmp_path / "ok", val_fraction=0.0)
    with pytest.raises(ValueError, match="unknown split"):
        TokenShards(tmp_path / "ok").shards("test")


def test_progress_bar(tmp_path, capsys):
    write(["hello"] * 10, tmp_path / "s", val_fraction=0.0, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "docs=10" in err


# --- command line -----------------------------------------------------------------------------

def test_cli_tokenize_and_inspect(shared_data, tmp_path, capsys):
    from lmlab.cli import main

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    docs = re.split(r"\n\s*\n", text)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:500]))
    (tmp_path / "b.txt").write_text("\n\n".join(docs[500:]))
    _lmlab_bpe(docs, 400).save(tmp_path / "tok")
    out = tmp_path / "shards"
    argv = ["data", "tokenize", "--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"),
            "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--workers", "2",
            "--val-fraction", "0.1", "--no-progress"]
    assert main([*argv, "--split-on", "file"]) == 0
    printed = capsys.readouterr().out
    got = TokenShards(out)
    assert f"{got.num_tokens('train'):,} tokens" in printed and f"wrote {out}" in printed
    assert got.num_documents("train") + got.num_documents("val") == 501  # 500 jsonl lines + one text file

    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "tok")
    first = next(got.documents("train")).tolist()
    assert tok.decode(first[:-1]) == next(d for d in docs if split_of(d, 0, 0.1) == "train")

    assert main(["data", "inspect", str(out), "--tokenizer", str(tmp_path / "tok"), "--sample-tokens", "20"]) == 0
    shown = capsys.readouterr().out
    assert "uint16" in shown and f"{got.num_documents('train'):,} documents" in shown
    assert tok.decode(first[:20]) in shown and f"eos={tok.eos_id} after each document" in shown
    assert main(["data", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == got.meta

    assert main(argv) == 1  # the output exists
    assert "overwrite" in capsys.readouterr().err
    assert main([*argv[:3], str(tmp_path / "missing.txt"), *argv[5:]]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 1
    assert "no token shards" in capsys.readouterr().err
    other = tmp_path / "other_tok"
    _lmlab_bpe(docs[:50], 300).save(other)
    assert main(["data", "inspect", str(out), "--tokenizer", str(other)]) == 1
    assert "another tokenizer" in capsys.readouterr().err
