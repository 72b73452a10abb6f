"""Contamination checks: the hashed, streamed n-gram index agrees exactly with a brute-force
set-of-tuples reference; planted GSM8K questions are found and nothing else is; the synthetic
corpus' held-out sets are clean; GSM8K train vs test shows its small known overlap."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.cli import main
from lmlab.data import contamination as C
from lmlab.data.contamination import (
    ContaminationIndex,
    check_contamination,
    contamination_of_texts,
    normalize,
)
from lmlab.data.sources import records, texts
from lmlab.data.synthetic import SynthConfig, generate


def brute_force(train: list[str], evals: dict[str, list[str]], n: int, min_words: int) -> dict[str, list]:
    """Per item: None if too short, else the share of its distinct n-grams (whole item when shorter
    than n) that occur in some training document. Sets of word tuples, nothing clever."""
    train_words = [normalize(t) for t in train]
    out = {}
    for name, items in evals.items():
        fractions = []
        for text in items:
            w = normalize(text)
            if len(w) < min(min_words, n):
                fractions.append(None)
                continue
            size = min(n, len(w))
            grams = {tuple(w[i:i + size]) for i in range(len(w) - size + 1)}
            seen = {tuple(t[i:i + size]) for t in train_words for i in range(len(t) - size + 1)}
            fractions.append(len(grams & seen) / len(grams))
        out[name] = fractions
    return out


def test_normalization():
    assert normalize("Don't STOP!  Ünïcode—dash_under\t3.14") == ["don", "t", "stop", "ünïcode", "dash", "under",
                                                                  "3", "14"]


def test_window_hashes_match_the_definition():
    codes = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint64)
    h = C.window_hashes(codes, 3)
    base = int(C.HASH_BASE)
    assert [int(x) for x in h] == [(int(codes[i]) * base**2 + int(codes[i + 1]) * base + int(codes[i + 2])) % 2**64
                                   for i in range(6)]
    assert len(C.window_hashes(codes, 9)) == 0


WORDS = st.lists(st.sampled_from("a b c d e".split()), max_size=30).map(" ".join)


@given(train=st.lists(WORDS, max_size=6), evals=st.lists(WORDS, min_size=1, max_size=8),
       n=st.integers(1, 6), min_words=st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_agrees_with_brute_force(train, evals, n, min_words):
    reports = contamination_of_texts(train, {"x": evals}, n=n, min_words=min_words)
    assert reports[0].overlap == pytest.approx(brute_force(train, {"x": evals}, n, min_words)["x"])


def test_hash_collisions_never_flag_an_item(monkeypatch):
    """Every word gets the same code, so every window hashes alike: only the word-by-word check
    keeps the result exact."""
    monkeypatch.setattr(C._Codes, "__call__", lambda self, words: np.ones(len(words), dtype=np.uint64))
    train = ["the cat sat on the mat today", "a dog ran far"]
    evals = {"x": ["the cat sat on the rug", "one two three four", "a dog ran far away"]}
    got = contamination_of_texts(train, evals, n=3, min_words=1)[0].overlap
    assert got == pytest.approx(brute_force(train, evals, 3, 1)["x"]) and got[1] == 0


def test_ngrams_spanning_flushes_and_text_blocks_are_found(tmp_path, monkeypatch):
    """A txt file is read in blocks and hashed in batches: n-grams across both seams still count."""
    monkeypatch.setattr(C, "FLUSH_WORDS", 7)
    monkeypatch.setattr(C, "TXT_BLOCK_CHARS", 20)
    words = [f"w{i}" for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(" ".join(words[i:i + 3]) for i in range(0, 400, 3)) + "\n")
    items = [" ".join(words[i:i + 13]) for i in range(0, 387, 7)] + [" ".join(words[:12] + ["zz"])]
    index = ContaminationIndex({"x": items})
    C.scan_training(index, [tmp_path / "train.txt"], progress=False)
    (report,) = index.reports()
    assert report.overlap == [1.0] * (len(items) - 1) + [0.0]


@pytest.fixture
def mirror(shared_data, monkeypatch) -> Path:
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    return shared_data


def test_planted_gsm8k_questions_are_found_and_nothing_else(mirror, tmp_path):
    questions = [r["question"] for r in records("gsm8k", "test", download=False)]
    planted = sorted(random.Random(0).sample(range(len(questions)), 7))
    speeches = (mirror / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    for k, i in enumerate(planted):  # spread through the play, between speeches
        speeches.insert(len(speeches) * (k + 1) // (len(planted) + 1), questions[i])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "shakespeare.txt").write_text("\n\n".join(speeches))
    (report,) = check_contamination([corpus], ["gsm8k:test"], progress=False)
    assert report.name == "gsm8k:test" and report.items == report.checked == 1319
    assert report.contaminated_items == planted
    # the flagged share is the question's share of the item's 13-grams: compare with the reference
    items = list(texts("gsm8k", "test", download=False))
    reference = brute_force(["\n\n".join(speeches)], {"g": [items[i] for i in planted]}, 13, 8)["g"]
    assert [report.overlap[i] for i in planted] == pytest.approx(reference)
    assert all(0.2 < f < 1 for f in reference)
    assert {ex["index"] for ex in report.examples} <= set(planted)


def test_gsm8k_train_against_test(mirror, capsys):
    (report,) = check_contamination(["gsm8k:train"], ["gsm8k:test"], progress=False)
    with capsys.disabled():
        print(f"\nGSM8K train vs test, 13-grams: {report.contaminated} of {report.checked} test items "
              f"({report.percent:.2f}%) share a 13-gram with train; histogram {report.histogram}")
    assert 0 < report.contaminated < 0.02 * report.checked  # a few shared phrases, no copied problems
    assert max(f for f in report.overlap if f is not None) < 0.5


def test_synthetic_held_out_sets_are_clean(tmp_path):
    corpus = tmp_path / "synth"
    generate(corpus, SynthConfig(n_pretrain=2000, n_sft=500, n_preference=250, n_eval=100), progress=False)
    train = [corpus / "pretrain", corpus / "sft", corpus / "preference"]
    tasks = ("add", "sub", "mul", "kv", "copy")
    evals = [str(corpus / "eval" / f"{t}.jsonl") for t in tasks]
    reports = check_contamination(train, evals, progress=False)
    for task, r in zip(tasks, reports, strict=True):
        assert r.contaminated == 0, (task, r.examples)
        assert r.checked >= 10, task  # not vacuous: these items were long enough to check
    # the control: one held-out kv item copied into training is caught, and only that one
    item = json.loads((corpus / "eval" / "kv.jsonl").read_text().splitlines()[5])
    with open(corpus / "pretrain" / "train.jsonl", "a") as f:
        f.write(json.dumps({"text": f"{item['prompt']}\n{item['answer']}", "task": "kv"}) + "\n")
    (kv,) = check_contamination(train, [evals[3]], progress=False)
    assert kv.contaminated_items == [5] and kv.overlap[5] == 1.0


def test_cli_json_report(mirror, tmp_path, capsys):
    question = next(records("humaneval", "test", download=False))["prompt"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": question}]}) + "\n")
    assert main(["data", "contamination", "--train", str(tmp_path / "train.jsonl"), "--eval", "humaneval",
                 "arc:challenge", "--json", "--no-progress"]) == 0
    he, arc = json.loads(capsys.readouterr().out)
    assert he["name"] == "humaneval:test" and he["contaminated_items"] == [0] and he["n"] == 13
    assert arc["name"] == "arc:challenge" and arc["contaminated"] == 0 and arc["items"] == 1172
    assert sum(he["histogram"].values()) == he["checked"]
    assert main(["data", "contamination", "--train", str(tmp_path / "train.jsonl"), "--eval", "humaneval",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "humaneval:test" in table and "shares" in table


def test_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(tmp_path / "cache"))
    assert main(["data", "contamination", "--train", str(tmp_path / "nope"), "--eval", "gsm8k"]) == 1
    assert "neither a file or directory nor a registered dataset" in capsys.readouterr().err
    (tmp_path / "train.txt").write_text("some text")
    assert main(["data", "contamination", "--train", str(tmp_path / "train.txt"), "--eval", "gsm8"]) == 1
    assert "unknown dataset 'gsm8'" in capsys.readouterr().err
    assert main(["data", "contamination", "--train", str(tmp_path / "train.txt"), "--eval", "gsm8k", "--n",
                 "0"]) == 1
    assert "--n and --min-words must be at least 1" in capsys.readouterr().err
