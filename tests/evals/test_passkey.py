"""Passkey retrieval: prompt construction, scoring, the sweep's bookkeeping, context variants, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

import lmlab.evals.passkey as P
from lmlab.cli import main
from lmlab.infer.generate import Completion
from lmlab.model import ModelConfig, RopeScaling, build_model, save_checkpoint
from lmlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [P.HEADER + "".join(P.FILLER) + P.NEEDLE.format(key=P.random_key(rng)) + P.QUESTION for _ in range(20)]
    return Tokenizer.train(texts, vocab_size=400, progress=False)


def tiny(tokenizer, **changes):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=96, **changes)
    return build_model(cfg).eval()


# --- prompts and scoring ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [None, 100, 257, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_hides_the_key_at_the_depth(tokenizer, length, depth):
    shortest = P.min_length(tokenizer)
    length = length or shortest
    p = P.passkey_prompt(tokenizer, length, depth, "40719")
    assert len(p.ids) == length and p.key == "40719"
    header = tokenizer.encode(P.HEADER, add_special_tokens=True)
    needle = tokenizer.encode(P.NEEDLE.format(key="40719"))
    question = tokenizer.encode(P.QUESTION)
    assert p.ids[:len(header)] == header
    assert p.ids[p.needle_start:p.needle_start + len(needle)] == needle  # whole, at a sentence boundary
    assert p.ids[-len(question):] == question
    text = tokenizer.decode(p.ids)
    assert text.count("40719") == 2 and text.endswith("The pass key is")
    n_fill = length - shortest
    longest_sentence = max(len(tokenizer.encode(s)) for s in P.FILLER)
    assert abs((p.needle_start - len(header)) - depth * n_fill) <= longest_sentence / 2 + 1
    if depth == 0.0:
        assert p.needle_start == len(header)


def test_needle_moves_back_with_depth(tokenizer):
    starts = [P.passkey_prompt(tokenizer, 600, d, "12345").needle_start for d in (0, 0.25, 0.5, 0.75, 1)]
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_prompt_errors(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        P.passkey_prompt(tokenizer, P.min_length(tokenizer) - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        P.passkey_prompt(tokenizer, 200, 1.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        P.passkey_prompt(tokenizer, 200, 0.5, "12a45")


def test_score_is_exact_match_of_the_first_number():
    assert P.score(" 12345.", "12345") and P.score("12345 is it", "12345")
    assert not P.score(" 1234.", "12345") and not P.score(" 123456", "12345")
    assert not P.score(" no idea", "12345") and not P.score(" 54321 12345", "12345")


def test_random_keys_have_no_leading_zero():
    rng = random.Random(3)
    keys = [P.random_key(rng) for _ in range(500)]
    assert all(len(k) == 5 and k[0] != "0" for k in keys) and len(set(keys)) > 450


def test_parse_rope_scaling():
    assert P.parse_rope_scaling("ntk:4") == ("ntk", 4.0)
    assert P.parse_rope_scaling("yarn:auto") == ("yarn", None)
    for bad in ("ntk", "cubic:2", "ntk:x", "linear:0.5"):
        with pytest.raises(ValueError, match="rope scaling"):
            P.parse_rope_scaling(bad)


# --- context variants ---------------------------------------------------------------------------------------

def test_with_context_shares_weights_and_leaves_the_model_alone(tokenizer):
    model = tiny(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (1, 40))
    before = model(ids).logits
    scaled = P.with_context(model, rope_scaling=RopeScaling("ntk", 4.0, 96))
    windowed = P.with_context(model, sliding_window=8)
    assert model.cfg.rope_scaling is None and model.cfg.sliding_window is None
    assert scaled.cfg.rope_scaling.kind == "ntk" and windowed.cfg.sliding_window == 8
    for variant in (scaled, windowed):
        for (name, a), (_, b) in zip(model.state_dict().items(), variant.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        assert not torch.allclose(variant(ids).logits, before)
    assert torch.equal(model(ids).logits, before)
    assert P.with_context(model) is model


# --- the sweep ----------------------------------------------------------------------------------------------

def oracle(answer):
    """A stand-in for generate() that answers answer(prompt ids) and records its calls."""
    calls = []

    def fake(model, prompts, params, decode=None, streaming=None, **_):
        calls.append({"model": model, "n": len(prompts), "streaming": streaming, "lengths": {len(p) for p in prompts}})
        return [Completion(token_ids=[], text=answer(decode(p)), finish_reason="length") for p in prompts]

    return fake, calls


def test_sweep_counts_every_cell_and_reuses_keys_across_lengths(tokenizer, monkeypatch):
    def read_key(text):  # the digits after the first "pass key is"
        return " " + text.split("The pass key is ")[1][:5] + "."

    fake, calls = oracle(read_key)
    monkeypatch.setattr(P, "generate", fake)
    model = tiny(tokenizer)
    r = P.passkey_sweep(model, tokenizer, [80, 300], [0.0, 1.0], n_keys=3, batch_size=4, progress=False)
    assert len(r.samples) == 2 * 2 * 3 and all(s["correct"] for s in r.samples)
    assert r.accuracy(80) == r.accuracy(300, 1.0) == 1.0
    assert [c["n"] for c in calls] == [4, 2, 4, 2] and [c["lengths"] for c in calls] == [{80}] * 2 + [{300}] * 2
    keys = {n: [s["key"] for s in r.samples if s["length"] == n] for n in (80, 300)}
    assert keys[80] == keys[300] and len(set(keys[80])) == 6
    d = json.loads(json.dumps(r.to_dict()))
    assert d["accuracy"] == {"80": {"0.0": 1.0, "1.0": 1.0}, "300": {"0.0": 1.0, "1.0": 1.0}}
    assert "depth 0" in r.table() and "100" in r.table()

    fake, _ = oracle(lambda text: " 99999.")
    monkeypatch.setattr(P, "generate", fake)
    assert P.passkey_sweep(model, tokenizer, [80], [0.5], n_keys=2, progress=False).accuracy(80) == 0.0


def test_sweep_auto_scaling_factor_per_length(tokenizer, monkeypatch):
    fake, calls = oracle(lambda text: "")
    monkeypatch.setattr(P, "generate", fake)
    model = tiny(tokenizer)  # max_seq_len 96
    r = P.passkey_sweep(model, tokenizer, [80, 185, 377], [0.5], n_keys=1, rope_scaling="yarn:auto",
                        max_new_tokens=12, progress=False)
    factors = [c["model"].cfg.rope_scaling.factor for c in calls]
    assert factors == [1.0, 2.0, 4.0]  # (length + 7) / 96, at least 1
    assert {c["model"].cfg.rope_scaling.original_max_seq_len for c in calls} == {96}
    assert r.settings["rope_scaling"]["377"]["factor"] == 4.0
    P.passkey_sweep(model, tokenizer, [84], [0.5], n_keys=1, streaming=(4, 32), progress=False)
    assert calls[-1]["streaming"] == (4, 32)


def test_sweep_runs_a_real_model_past_max_seq_len(tokenizer):
    for changes in ({}, {"position": "alibi"}, {"position": "none"}):
        model = tiny(tokenizer, **changes)
        r = P.passkey_sweep(model, tokenizer, [150], [0.5], n_keys=2, max_new_tokens=3, progress=False)
        assert len(r.samples) == 2
    r = P.passkey_sweep(tiny(tokenizer), tokenizer, [150], [0.5], n_keys=1, max_new_tokens=3, streaming=(2, 40),
                        progress=False)
    assert r.settings["streaming"] == [2, 40]


def test_sweep_refuses_learned_positions_past_their_table(tokenizer):
    model = tiny(tokenizer, position="learned")
    with pytest.raises(ValueError, match="learned position embeddings"):
        P.passkey_sweep(model, tokenizer, [80, 150], [0.5], n_keys=1, progress=False)
    # within the table, and with a sink cache too small to pass it, it runs
    P.passkey_sweep(model, tokenizer, [80], [0.5], n_keys=1, max_new_tokens=3, progress=False)
    with pytest.raises(ValueError, match="absolute position embeddings"):  # the sink cache refuses them
        P.passkey_sweep(model, tokenizer, [150], [0.5], n_keys=1, streaming=(2, 40, 8), progress=False)


def test_sweep_argument_errors(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        P.passkey_sweep(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="shortest passkey prompt"):
        P.passkey_sweep(model, tokenizer, [20], progress=False)
    with pytest.raises(ValueError, match="needs a RoPE model"):
        P.passkey_sweep(tiny(tokenizer, position="alibi"), tokenizer, [80], rope_scaling="ntk:auto", progress=False)


# --- CLI ------------------------------------------------------------------------------------------------------

def test_cli_prints_the_table_and_writes_json(tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    save_checkpoint(tiny(tokenizer), tmp_path / "ckpt", tokenizer_files=list((tmp_path / "tok").iterdir()))
    out = tmp_path / "res" / "passkey.json"
    assert main(["passkey", "--model", str(tmp_path / "ckpt"), "--lengths", "80,160", "--depths", "0,1",
                 "--keys", "1", "--rope-scaling", "ntk:auto", "--max-new-tokens", "3", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "depth 0" in printed and "depth 1" in printed and "160" in printed
    record = json.loads(out.read_text())
    assert record["lengths"] == [80, 160] and set(record["accuracy"]["160"]) == {"0.0", "1.0"}
    assert record["settings"]["rope_scaling"]["160"]["kind"] == "ntk" and len(record["samples"]) == 4
    assert main(["passkey", "--model", str(tmp_path / "ckpt"), "--lengths", "120", "--depths", "0.5", "--keys", "1",
                 "--sinks", "2", "--sliding-window", "40", "--max-new-tokens", "3", "--no-progress"]) == 0
    for bad, message in ((["--sinks", "4"], "needs --sliding-window"), (["--depths", "2"], "fractions"),
                         (["--rope-scaling", "ntk"], "KIND:FACTOR"), (["--lengths", "a,b"], "whole numbers")):
        assert main(["passkey", "--model", str(tmp_path / "ckpt"), "--no-progress", *bad]) == 1
        assert message in capsys.readouterr().err
