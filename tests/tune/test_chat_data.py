"""Fine-tuning data: record formats, the assistant-only loss mask, packing that keeps conversations apart, and a
loader that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import build_model
from lmlab.tokenizer import Tokenizer
from lmlab.tune import chat_data
from lmlab.tune.chat_data import IGNORE, ChatBatches, Example, collate, model_inputs, pack, render, to_messages

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "red, or green"}],
    [{"role": "user", "content": "What is the value of qiv?"}, {"role": "assistant", "content": "helmet"}],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [m["content"] for c in CHATS for m in c] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    return Tokenizer.train(texts, vocab_size=300, progress=False)


# --- formats -------------------------------------------------------------------------------------
def test_record_formats():
    alpaca = to_messages({"instruction": "Sum these.", "input": "2 3", "output": "5"})
    assert alpaca == [{"role": "user", "content": "Sum these.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert to_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"
    dolly = to_messages({"instruction": "Q", "context": "C", "response": "R", "category": "qa"})
    assert dolly == [{"role": "user", "content": "Q\n\nC"}, {"role": "assistant", "content": "R"}]
    pc = to_messages({"prompt": "P", "completion": "C"}, system="S")
    assert [m["role"] for m in pc] == ["system", "user", "assistant"] and pc[0]["content"] == "S"
    chat = to_messages({"messages": CHATS[0]}, system="other")  # has its own system prompt: kept
    assert chat == CHATS[0]
    with pytest.raises(ValueError, match="needs 'messages'"):
        to_messages({"text": "plain"})
    with pytest.raises(ValueError, match="without an assistant"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})


def test_load_conversations_files(tmp_path):
    jsonl = tmp_path / "chats.jsonl"
    jsonl.write_text("\n".join(json.dumps({"messages": c}) for c in CHATS) + "\n\n")
    assert chat_data.load_conversations(str(jsonl)) == CHATS
    assert len(chat_data.load_conversations(str(jsonl), limit=2)) == 2
    js = tmp_path / "alpaca.json"
    js.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 3))
    assert len(chat_data.load_conversations(str(js))) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0]}) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        chat_data.load_conversations(str(bad))
    with pytest.raises(FileNotFoundError):
        chat_data.load_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="neither a .jsonl/.json file nor a dataset name"):
        chat_data.load_conversations("no-such-dataset")


def test_alpaca_from_the_registry(shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    chats = chat_data.load_conversations("alpaca:sample", limit=50)
    assert len(chats) == 50
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in chats)
    assert chat_data.validation_spec("alpaca:sample") is None
    assert chat_data.validation_spec("synthetic") == "synthetic:sft-validation"


def test_split_validation_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = chat_data.split_validation(items, 0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert chat_data.split_validation(items, 0.1, seed=3) == (train, val)
    assert chat_data.split_validation(items, 0.1, seed=4)[1] != val
    assert chat_data.split_validation(items, 0.0) == (items, [])


# --- the loss mask -------------------------------------------------------------------------------
def test_targets_are_the_assistant_tokens_only(tok):
    for messages in CHATS:
        ids, mask = tok.render_chat(messages)
        (example,) = render(tok, [messages], 512).examples
        assert example.ids == ids
        # target t is token t+1 exactly where token t+1 is the assistant's
        expected = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        assert example.targets == expected
        learned = tok.decode([t for t in example.targets if t != IGNORE])
        answers = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
        assert learned == answers  # every assistant turn and its end token; no system or user text
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] not in learned


def test_truncation_and_dropping(tok):
    long = [{"role": "user", "content": "the quick brown fox " * 30}, {"role": "assistant", "content": "ok"}]
    fits = len(tok.render_chat(CHATS[0])[0])
    out = render(tok, [long, CHATS[0]], fits)
    assert out.truncated == 1 and out.dropped == 1  # cut inside the user turn: nothing left to learn
    assert len(out.examples) == 1 and len(out.examples[0].ids) == fits
    ids, mask = tok.render_chat(CHATS[1])
    keep = mask.index(1) + 2  # the first assistant turn's first two tokens
    cut = render(tok, [CHATS[1]], keep)  # cut inside the answer: kept, shorter
    assert cut.truncated == 1 and cut.examples[0].ids == ids[:keep]
    # the inputs are the first `keep` tokens; their targets run one further, into the third assistant token
    assert cut.examples[0].n_targets == 3 and cut.examples[0].targets[-1] == ids[keep]


# --- packing -------------------------------------------------------------------------------------
def test_pack_uses_every_example_once_and_never_overflows():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.9  # first fit fills rows well
    with pytest.raises(ValueError, match="more than seq_len"):
        pack([5, 200], 128)


def test_packed_rows_compute_what_each_conversation_computes_alone(tok):
    """The document mask and restarting positions: every packed conversation's logits equal its logits alone."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=128)).eval()
    examples = render(tok, CHATS, 128).examples
    batch = collate([examples], length=128)
    assert batch["doc_ids"][0].unique().tolist() == [0, 1, 2, 3]  # three conversations and padding
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        at = 0
        for e in examples:
            alone = model(torch.tensor([e.ids])).logits[0]
            torch.testing.assert_close(packed[at:at + len(e.ids)], alone, atol=1e-5, rtol=1e-5)
            assert batch["targets"][0, at + len(e.ids) - 1] == IGNORE  # never predicts the next conversation
            at += len(e.ids)
    # without the mask the second conversation would see the first: the test above can fail
    with torch.no_grad():
        leaky = model(batch["ids"]).logits[0]
    n0 = len(examples[0].ids)
    assert not torch.allclose(leaky[n0:n0 + len(examples[1].ids)], model(torch.tensor([examples[1].ids])).logits[0],
                              atol=1e-3)


def test_single_unpadded_rows_take_the_fast_path():
    e = Example([1, 2, 3], [2, 3, IGNORE])
    inputs = model_inputs(collate([[e], [e]]))
    assert inputs["attention_mask"] is None and inputs["positions"] is None
    padded = model_inputs(collate([[e], [Example([1, 2], [2, IGNORE])]]))
    assert padded["attention_mask"].shape == (2, 1, 3, 3)


def test_loss_over_a_packed_batch_weights_every_assistant_token_equally(tok):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64,
                                    max_seq_len=128)).eval()
    examples = render(tok, CHATS, 128).examples
    with torch.no_grad():
        packed = model(**model_inputs(batch := collate([examples], 128)), targets=batch["targets"]).loss
        sums, n = 0.0, 0
        for e in examples:
            logits = model(torch.tensor([e.ids])).logits[0]
            t = torch.tensor(e.targets)
            sums += torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum").item()
            n += e.n_targets
    assert packed.item() == pytest.approx(sums / n, rel=1e-5)


# --- the loader ----------------------------------------------------------------------------------
def _examples(n: int, seed: int = 0) -> list[Example]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 30)
        ids = [rng.randrange(1, 300) for _ in range(k)]
        out.append(Example(ids, ids[1:] + [IGNORE]))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resumes_exactly(packing):
    examples = _examples(200)
    a = ChatBatches(examples, 64, 4, packing=packing, seed=1)
    first = [next(a) for _ in range(7)]
    state = a.state_dict()
    rest = [next(a) for _ in range(30)]  # crosses into the next epochs
    b = ChatBatches(examples, 64, 4, packing=packing, seed=1)
    b.load_state_dict(state)
    for x, y in zip(rest, [next(b) for _ in range(30)], strict=True):
        for k in x:
            assert torch.equal(x[k], y[k])
    assert not torch.equal(first[0]["ids"], ChatBatches(examples, 64, 4, packing=packing, seed=2).__next__()["ids"])
    with pytest.raises(ValueError, match="cannot resume"):
        ChatBatches(examples[:-1], 64, 4, packing=packing, seed=1).load_state_dict(state)


def test_loader_epochs_cover_the_data_and_ranks_split_it():
    examples = _examples(120)
    loaders = [ChatBatches(examples, 64, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    rows = loaders[0].rows(0)
    served = [[], []]
    for _ in range(loaders[0].batches_per_epoch):
        for r, loader in enumerate(loaders):
            batch = next(loader)
            served[r] += batch["ids"].tolist()
    assert loaders[0].batches_per_epoch == len(rows) // 4
    assert not set(map(tuple, served[0])) & set(map(tuple, served[1]))  # the two processes never share a row
    assert len(served[0]) + len(served[1]) == 4 * (len(rows) // 4)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ChatBatches(examples[:3], 64, 8)
