"""The rollout phase and the math PPO and GRPO share (lmlab/align/rollout.py): KL estimators, masked statistics, the
clipped surrogate, per-token log-probs of padded replies, prompt records, sampling through the engine, and the
batch iterator's exact resume (a state_dict round trip gives the same next batches)."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

from lmlab.align import rollout as ro
from lmlab.align.grpo import GRPORollout, GRPOSettings
from lmlab.align.rewards import RewardSet
from lmlab.model import ModelConfig, Transformer


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=64))


# --- math ---------------------------------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # r = pi_ref / pi = 0.5
    assert ro.kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert ro.kl_k3(logp, ref).item() == pytest.approx((0.5 - 1) - math.log(0.5))  # 0.19315
    assert ro.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.1931472)
    with pytest.raises(ValueError, match="choose one of"):
        ro.kl_estimate(logp, ref, "k2x")


def test_k3_is_nonnegative_and_both_estimators_are_unbiased():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, generator=g) * 3, torch.randn(10_000, generator=g) * 3
    k3 = ro.kl_k3(a, b)
    assert (k3 >= 0).all() and ro.kl_k3(a, a).abs().max() == 0
    assert (ro.kl_k1(a, b) < 0).any()  # k1 is not >= 0 sample by sample
    # E_{x~p}[k] = KL(p || q) for both estimators (Schulman 2020)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[x], q.log()[x]
    assert ro.kl_k1(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)
    assert ro.kl_k3(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)
    assert ro.kl_k3(lp, lq).var() < ro.kl_k1(lp, lq).var()


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert ro.masked_mean(x, mask).item() == 2.5
    assert ro.masked_mean(x, mask, dim=1).tolist() == [2.0, 4.0]
    w = ro.masked_whiten(x, mask)
    std = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 3)  # unbiased
    assert w[0, 0].item() == pytest.approx((1 - 2.5) / std, rel=1e-6)
    assert w[1, 1:].tolist() == [0.0, 0.0]
    assert ro.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_clipped_surrogate_by_hand():
    old = torch.zeros(6)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.25]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 1.0])
    loss, clipped = ro.clipped_surrogate(logp, old, adv, 0.2)
    # -min(rho A, clip(rho, 0.8, 1.2) A): the clipped term wins (and stops the gradient) in cases 1 and 4
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.0, -1.2])
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    loss, clipped = ro.clipped_surrogate(logp, old, adv, 0.2, eps_high=0.28)  # clip-higher
    assert loss[5].item() == pytest.approx(-1.25) and clipped[5] == 0
    # the gradient of a clipped token is zero
    lp = logp.clone().requires_grad_(True)
    ro.clipped_surrogate(lp, old, adv, 0.2)[0].sum().backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0 and lp.grad[2] == pytest.approx(-0.5)


def test_response_logps_of_padded_rows_equal_each_row_alone():
    model = tiny_model().eval()
    prompts, replies = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11], [12, 13, 14, 15], [16]]
    batch = ro.pad_rollout(prompts, replies)
    assert batch["ids"].shape == (3, 6) and batch["mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    with torch.no_grad():
        logps, entropy = ro.response_logps(model(batch["ids"]).logits, batch["ids"], batch["prompt_len"], 4)
        for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
            alone = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
            expected = [alone[len(p) - 1 + j, t].item() for j, t in enumerate(r)]
            assert logps[i, : len(r)].tolist() == pytest.approx(expected, abs=1e-5)
            ent = -(alone.exp() * alone).sum(-1)[len(p) - 1 : len(p) - 1 + len(r)]
            assert entropy[i, : len(r)].tolist() == pytest.approx(ent.tolist(), abs=1e-5)
        hot, _ = ro.response_logps(model(batch["ids"]).logits, batch["ids"], batch["prompt_len"], 4, temperature=2.0)
        alone = torch.log_softmax(model(torch.tensor([prompts[0] + replies[0]])).logits[0].float() / 2.0, -1)
        assert hot[0, 0].item() == pytest.approx(alone[2, 10].item(), abs=1e-5)  # the sampling distribution's
    with pytest.raises(ValueError, match="no token"):
        ro.pad_rollout([[1]], [[]])


def test_trim_cuts_rows_to_their_longest():
    batch = ro.pad_rollout([[1, 2, 3], [4], [5, 6]], [[7], [8, 9, 10, 11], [12, 13]])
    batch["adv"] = torch.arange(3.0)
    small = ro.trim(batch, torch.tensor([2, 0]))
    assert small["ids"].tolist() == [[5, 6, 12, 13], [1, 2, 3, 7]]
    assert small["mask"].tolist() == [[1, 1], [1, 0]] and small["adv"].tolist() == [2.0, 0.0]


# --- prompts ------------------------------------------------------------------------------------------------------
def test_prompt_records_in_every_form(tmp_path):
    chat = ro.to_prompt({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                         "task": "add"})
    assert chat.messages == [{"role": "user", "content": "2+2?"}] and chat.columns == {"task": "add", "answer": "4"}
    plain = ro.to_prompt({"prompt": "What is 1 + 1?", "answer": "2", "task": "add"}, system="Be brief.")
    assert plain.messages[0] == {"role": "system", "content": "Be brief."} and plain.columns["answer"] == "2"
    gsm = ro.to_prompt({"question": "How many?", "answer": "3 + 4 = 7\n#### 7", "final_answer": "7"})
    assert gsm.messages == [{"role": "user", "content": "How many?"}] and gsm.columns["answer"] == "7"
    with pytest.raises(ValueError, match="'messages', 'prompt' or 'question'"):
        ro.to_prompt({"text": "x"})
    with pytest.raises(ValueError, match="end with a user message"):
        ro.to_prompt({"prompt": [{"role": "assistant", "content": "hi"}]})
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": f"p{i}", "task": t})
                                                for i, t in enumerate(["add", "kv", "add"])))
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "q", "task": "mul"}))
    assert [p.messages[0]["content"] for p in ro.load_prompts(str(tmp_path), tasks=["add", "mul"])] == \
        ["p0", "p2", "q"]
    assert len(ro.load_prompts(str(tmp_path / "a.jsonl"), limit=2)) == 2
    with pytest.raises(ValueError, match="no usable record of the tasks"):
        ro.load_prompts(str(tmp_path / "a.jsonl"), tasks=["story"])
    assert [p.messages[0]["content"] for p in ro.load_prompts(str(tmp_path), match=r"^p\d$")] == ["p0", "p1", "p2"]
    with pytest.raises(ValueError, match="matching 'x'"):
        ro.load_prompts(str(tmp_path), match="x")
    with pytest.raises(ValueError, match="not a regular expression"):
        ro.load_prompts(str(tmp_path), match="(")


# --- sampling and the iterator on a real (tiny) checkpoint -------------------------------------------------------
@pytest.fixture(scope="module")
def policy_and_tokenizer(tiny_base):
    from lmlab.model.loading import load
    from lmlab.tokenizer import load_tokenizer

    return load(tiny_base), load_tokenizer(tiny_base)


def test_sample_is_seeded_keeps_the_end_token_and_restores_train_mode(policy_and_tokenizer):
    from lmlab.tokenizer.chat import end_of_turn_ids

    model, tok = policy_and_tokenizer
    model.train()
    ids = [tok.render_chat([{"role": "user", "content": f"Say {w}."}], add_generation_prompt=True)[0]
           for w in ("hi", "yes", "no")]
    a = ro.sample(model, tok, ids, max_new_tokens=6, seeds=[1, 2, 3])
    b = ro.sample(model, tok, ids, max_new_tokens=6, seeds=[1, 2, 3])
    assert model.training and a.response_ids == b.response_ids and a.texts == b.texts
    assert a.response_ids != ro.sample(model, tok, ids, max_new_tokens=6, seeds=[4, 5, 6]).response_ids
    stops = end_of_turn_ids(tok)
    for r, ended in zip(a.response_ids, a.ended, strict=True):
        assert ended == (r[-1] in stops) and (ended or len(r) == 6)
    # a reply that ends keeps its end-of-turn token: force one with a head that always says <|end|>
    forced = copy.deepcopy(model)

    def always_end(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*h.shape[:-1], model.cfg.vocab_size, device=h.device)
        out[..., stops[-1]] = 50.0
        return out

    forced.logits = always_end
    s = ro.sample(forced, tok, ids[:1], max_new_tokens=6, temperature=0.0)
    assert s.ended == [True] and s.response_ids == [[stops[-1]]] and s.texts == [""]


def _grpo_batches(model, tok, tmp_path, seed: int = 0) -> ro.RolloutBatches:
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)})
                                                for i in range(12)))
    prompts = ro.load_prompts(str(tmp_path / "p.jsonl"))
    cfg = ro.RolloutConfig(prompts="x", max_new_tokens=5, prompts_per_rollout=2)
    method = GRPORollout(model, copy.deepcopy(model), tok, RewardSet.from_specs(["format"]), cfg,
                         ro.RewardConfig(functions=["format"]), GRPOSettings(num_generations=4, beta=0.1),
                         forward_batch=4)
    return ro.RolloutBatches(prompts, method, prompts_per_rollout=2, samples_per_prompt=4, batch_size=4, epochs=2,
                             seed=seed)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


@pytest.mark.parametrize("taken", [3, 4, 5])  # mid-rollout, at the end of one, just into the next
def test_state_dict_round_trip_gives_the_same_next_batches(policy_and_tokenizer, tmp_path, taken):
    model, tok = policy_and_tokenizer
    batches = _grpo_batches(model, tok, tmp_path)
    assert batches.steps_per_rollout == 4  # 8 replies, 2 epochs, minibatches of 4
    for _ in range(taken):
        next(batches)
    buffer = io.BytesIO()
    torch.save(batches.state_dict(), buffer)  # through the checkpoint's own serialization
    expected = [next(batches) for _ in range(6)]
    resumed = _grpo_batches(model, tok, tmp_path, seed=123)  # the seed comes back from the state
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    got = [next(resumed) for _ in range(6)]
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True))
    assert resumed.rollouts == batches.rollouts == 3


def test_rollout_batches_serve_every_reply_once_per_epoch(policy_and_tokenizer, tmp_path):
    model, tok = policy_and_tokenizer
    batches = _grpo_batches(model, tok, tmp_path)
    first = [next(batches) for _ in range(4)]
    assert batches.rollouts == 1 and all(b["stats"]["rollouts"] == 1.0 for b in first)
    # two epochs: each a permutation of the 8 replies
    assert sorted(batches.order[:8]) == sorted(batches.order[8:]) == list(range(8))
    assert batches.order[:8] != batches.order[8:]
    assert first[0]["old_logps"].shape == first[0]["mask"].shape
    assert first[0]["advantages"].shape == (4,) and "ref_logps" in first[0]
    with pytest.raises(ValueError, match="multiple of the batch size"):
        ro.RolloutBatches(batches.prompts, batches.method, prompts_per_rollout=3, samples_per_prompt=1, batch_size=2)
    with pytest.raises(ValueError, match="same rollout settings"):
        other = _grpo_batches(model, tok, tmp_path)
        state = other.state_dict()
        state["batch_size"] = 8
        other.load_state_dict(state)
