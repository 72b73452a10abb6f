"""Preference data: reading every accepted form, tokenizing with the chat template, batches, and log-probabilities."""

import gzip
import json
import math

import pytest
import torch

from lmlab.align import preference as prefs
from lmlab.model import ModelConfig, Transformer
from lmlab.tune.chat_data import IGNORE


def test_hh_transcripts_become_chats():
    prompt = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
    pair = prefs.to_pair({"prompt": prompt, "chosen": prompt + " Why did the chicken...",
                          "rejected": prompt + " No."})
    assert pair.prompt == [{"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello! How can I help?"},
                           {"role": "user", "content": "Tell me a joke"}]
    assert (pair.chosen, pair.rejected) == ("Why did the chicken...", "No.")


def test_record_forms():
    chat = [{"role": "user", "content": "2+2?"}]
    a = prefs.to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    b = prefs.to_pair({"messages": chat, "chosen": "4", "rejected": "5", "task": "add"})
    c = prefs.to_pair({"prompt": chat, "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}], "margin": 2})
    assert a.prompt == b.prompt == c.prompt == chat
    assert (a.chosen, a.rejected) == (b.chosen, b.rejected) == (c.chosen, c.rejected) == ("4", "5")
    assert c.margin == 2.0 and a.margin is None
    for bad, msg in (({"prompt": "x", "chosen": "a"}, "'chosen' and 'rejected'"),
                     ({"chosen": "a", "rejected": "b"}, "needs its prompt"),
                     ({"prompt": "x", "chosen": "", "rejected": "b"}, "empty response"),
                     ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
                      "end with a user turn")):
        with pytest.raises(ValueError, match=msg):
            prefs.to_pair(bad)


def test_unpaired_forms():
    u = prefs.to_unpaired({"prompt": "q", "completion": "a", "label": False})
    assert [(x.completion, x.desirable) for x in u] == [("a", False)]
    u = prefs.to_unpaired({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert [(x.completion, x.desirable) for x in u] == [("good", True), ("bad", False)]
    with pytest.raises(ValueError, match="label"):
        prefs.to_unpaired({"prompt": "q", "completion": "a", "label": "yes"})


def test_files_are_strict_and_datasets_skip_unusable(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                 + json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="record 1: a preference pair has an empty response"):
        prefs.load_pairs(str(f))
    assert len(prefs.load_pairs(str(f), limit=1)) == 1
    # HH-RLHF as published: every record whose pair is usable, the rest skipped with a warning
    raw = 0
    for part in ("helpful-base", "harmless-base"):
        with gzip.open(shared_data / "hh-rlhf" / part / "test.jsonl.gz", "rt") as fh:
            raw += sum(1 for _ in fh)
    with pytest.warns(UserWarning, match="skipped"):
        pairs = prefs.load_pairs("hh-rlhf:test")
    assert 0.99 * raw < len(pairs) < raw
    assert all(p.prompt[-1]["role"] == "user" and p.chosen and p.rejected for p in pairs)
    assert prefs.validation_spec("hh-rlhf:train") == "hh-rlhf:test"
    assert prefs.validation_spec("synthetic") == "synthetic:preference-validation"
    assert prefs.validation_spec(str(f)) is None


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from lmlab.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base)


def test_tokenize_splits_prompt_and_reply(tokenizer):
    chat = [{"role": "user", "content": "What is 2+2?"}]
    prompt, reply = prefs.prompt_and_response(tokenizer, chat, "4")
    full, mask = tokenizer.render_chat([*chat, {"role": "assistant", "content": "4"}])
    assert prompt + reply == full
    assert prompt == tokenizer.render_chat(chat, add_generation_prompt=True)[0]
    assert all(mask[len(prompt):])  # the reply, end-of-turn included, is what the template marks as assistant's


def test_fit_keeps_prompt_end_and_reply_start():
    prompt, replies = list(range(100)), [list(range(1000, 1030)), list(range(2000, 2080))]
    p, (a, b), cut = prefs.fit(prompt, replies, 64)
    assert cut and len(p) + max(len(a), len(b)) == 64
    assert a == replies[0] and b == replies[1][:32]  # replies keep at least half of seq_len
    assert p == prompt[-32:]
    assert prefs.fit(prompt[:10], [[1], [2]], 64) == (prompt[:10], [[1], [2]], False)


def test_collate_rows_and_targets():
    e1 = prefs.PairExample([1, 2], [3, 4], [5], margin=1.0, ref_chosen=-1.0, ref_rejected=-2.0)
    e2 = prefs.PairExample([6], [7], [8, 9, 10], ref_chosen=-3.0, ref_rejected=-4.0)
    b = prefs.collate([e1, e2])
    assert b["ids"].tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    I = IGNORE
    assert b["targets"].tolist() == [[I, 3, 4, I], [7, I, I, I], [I, 5, I, I], [8, 9, 10, I]]
    assert b["lengths"].tolist() == [4, 2, 3, 4]
    assert b["margin"].tolist() == [1.0, 0.0]
    assert b["ref_chosen"].tolist() == [-1.0, -3.0] and b["ref_rejected"].tolist() == [-2.0, -4.0]


def test_sequence_logps_by_hand_and_padding_invariance():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)).eval()
    e = prefs.PairExample([1, 2, 3], [4, 5], [6, 7, 8, 9, 10])
    with torch.no_grad():
        logps, n = prefs.sequence_logps(model, prefs.collate([e]))
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits[0].log_softmax(-1)
        by_hand = logits[2, 4] + logits[3, 5]
        assert n.tolist() == [2, 5]
        assert torch.allclose(logps[0], by_hand, atol=1e-5)
        alone = prefs.sequence_logps(model, prefs.rows([[1, 2, 3]], [[6, 7, 8, 9, 10]]))[0]
        assert torch.allclose(logps[1], alone[0], atol=1e-5)
        padded = prefs.sequence_logps(model, prefs.rows([[1, 2, 3]], [[4, 5]], pad_to=12))[0]
        assert torch.allclose(padded[0], by_hand, atol=1e-5)


def test_reference_logps_fill_and_batches_resume(tiny_base, tokenizer):
    from lmlab.model.loading import load

    model = load(tiny_base)
    pairs = [prefs.Pair([{"role": "user", "content": f"q{i}"}], f"good {i}", f"bad {i} x") for i in range(10)]
    tok = prefs.tokenize_pairs(tokenizer, pairs, 64)
    assert len(tok.examples) == 10 and tok.dropped == 0
    prefs.reference_logps(model, tok.examples, batch_size=3, progress=False)
    with torch.no_grad():
        direct, _ = prefs.sequence_logps(model.eval(), prefs.collate(tok.examples[:1]))
    assert math.isclose(tok.examples[0].ref_chosen, float(direct[0]), abs_tol=1e-4)
    assert math.isclose(tok.examples[0].ref_rejected, float(direct[1]), abs_tol=1e-4)

    it = prefs.PairBatches(tok.examples, 3, seed=1)
    seen = [next(it)["ids"] for _ in range(4)]  # 3 batches per epoch: the 4th starts epoch 1
    state = it.state_dict()
    expect = [next(it)["ids"] for _ in range(3)]
    again = prefs.PairBatches(tok.examples, 3, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expect, [next(again)["ids"] for _ in range(3)], strict=True))
    assert state["epoch"] == 1 and len(seen) == 4
    with pytest.raises(ValueError, match="same data"):
        prefs.PairBatches(tok.examples[:5], 3).load_state_dict(state)


def test_unpaired_mismatched_rows_are_fixed(tokenizer):
    items = [prefs.Unpaired([{"role": "user", "content": f"q{i}"}], f"a{i}", i % 2 == 0) for i in range(4)]
    tok = prefs.tokenize_unpaired(tokenizer, items, 64)
    b = prefs.collate(tok.examples[:2])
    assert b["desirable"].tolist() == [True, False]
    # row 2 = prompt 0 with the reply of example 1 (fixed at tokenizing, whatever the batch)
    want = tok.examples[0].prompt + tok.examples[1].chosen
    assert b["ids"][2, :len(want)].tolist() == want
