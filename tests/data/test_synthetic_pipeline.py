"""The whole data stage on the built-in synthetic corpus: generate, train a tokenizer (both
trainers agree), clean and deduplicate, write shards, load packed batches, render the SFT
conversations with their loss masks. The same path the main job takes, offline."""

from __future__ import annotations

import json

import torch

from lmlab.data.loader import PackedLoader
from lmlab.data.prepare import PrepareConfig, prepare
from lmlab.data.shards import TokenShards
from lmlab.data.synthetic import SynthConfig, generate
from lmlab.tokenizer import Tokenizer, load_tokenizer
from lmlab.tokenizer.bpe import train_bpe, train_bpe_reference


def test_synthetic_corpus_through_every_stage(tmp_path):
    generate(tmp_path / "synth", SynthConfig.from_size("tiny", seed=3), progress=False)
    records = [json.loads(line) for line in (tmp_path / "synth/pretrain/train.jsonl").read_text().splitlines()]
    docs = [r["text"] for r in records]
    assert len({r["task"] for r in records}) >= 4  # stories, arithmetic, lookup, copy, ...

    sample = docs[:150]
    assert train_bpe(sample, 600, progress=False) == train_bpe_reference(sample, 600)
    tok = Tokenizer.train(docs, 1024, progress=False)
    tok.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert all(tok.decode(tok.encode(d)) == d for d in docs)

    corpus = docs + docs[:25]  # planted exact duplicates
    cfg = PrepareConfig(langid=None, quality=None)  # clean by construction: the web-text filters do not apply
    summary = prepare(corpus, tmp_path / "shards", cfg, tok, val_fraction=0.05, progress=False)
    report = json.loads((tmp_path / "shards/report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["exact_dedup"]["docs_in"] - stages["exact_dedup"]["docs_out"] >= 25
    assert summary is not None

    shards = TokenShards(tmp_path / "shards")
    stored = list(shards.documents("train")) + list(shards.documents("val"))
    kept = {tok.decode(d[:-1]) for d in stored}  # each document ends with eos
    assert all(d[-1] == tok.eos_id for d in stored) and kept <= set(docs) and len(kept) == len(stored)

    loader = PackedLoader(tmp_path / "shards", "train", 64, 4, seed=1)
    batch = next(loader)
    assert batch.x.shape == batch.y.shape == (4, 64) and torch.equal(batch.x[:, 1:], batch.y[:, :-1])

    sft = [json.loads(line) for line in (tmp_path / "synth/sft/train.jsonl").read_text().splitlines()]
    for record in sft[:50]:
        ids, mask = tok.render_chat(record["messages"])
        trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
        answers = "".join(m["content"] + "<|end|>" for m in record["messages"] if m["role"] == "assistant")
        assert trained == answers
