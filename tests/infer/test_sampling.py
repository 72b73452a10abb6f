"""Sampling: each filter against hand-made distributions, hypothesis properties and transformers'
logits processors; the sampler's distribution, seeding and batch invariance; validate()."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    exponential_noise,
    min_p_filter,
    process_logits,
    sample_from_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[int]:
    """Indices of a 1-D logits vector that a filter left finite."""
    return torch.isfinite(logits).nonzero().flatten().tolist()


def random_logits(batch=4, vocab=50, seed=0, scale=3.0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --- top-p ---------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [
    (0.3, [0]), (0.5, [0]), (0.51, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]),
    (0.95, [0, 1, 2]), (0.96, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3]),
])
def test_top_p_keeps_the_minimal_set(p, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # also in shuffled vocabulary order, so the scatter back to vocabulary order is exercised
    for perm in (torch.arange(4), torch.tensor([2, 0, 3, 1])):
        logits = probs[perm].log()[None]
        out = top_p_filter(logits, p)[0]
        assert sorted(perm[kept(out)].tolist()) == expected
        assert torch.equal(out[torch.isfinite(out)], logits[0][torch.isfinite(out)])  # untouched


@pytest.mark.parametrize("probs", [
    [0.5, 0.3, 0.15, 0.05], [0.6, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1] * 10, [0.25] * 4,
    [0.35, 0.35, 0.2, 0.1], [0.45, 0.25, 0.2, 0.1],
])
def test_top_p_exact_boundaries(probs):
    # p equal to the mass of the top k tokens keeps exactly k, although the float32 sums round
    # either way (without TOP_P_TOLERANCE, [0.1] * 10 at p = 0.6 keeps 7)
    logits = torch.tensor(probs).log()[None]
    for k in range(1, len(probs)):
        p = round(sum(probs[:k]), 10)
        assert len(kept(top_p_filter(logits, p)[0])) == k, (p, k)


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[0.0, 0.0, 5.0, 1.0]])
    assert kept(top_p_filter(logits, 1e-9)[0]) == [2]


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40),
    p=st.floats(0.01, 0.999),
)
def test_top_p_property(values, p):
    logits = torch.tensor([values])
    keep = torch.isfinite(top_p_filter(logits, p)[0])
    probs = torch.tensor(values, dtype=torch.float64).softmax(0)
    mass = probs[keep].sum().item()
    assert mass >= p - 1e-5  # the kept set reaches p...
    if keep.sum() > 1:  # ...and is minimal: without its least likely member it falls short
        assert mass - probs[keep].min().item() < p + 1e-5
    if (~keep).any():  # and it is a top set
        assert probs[keep].min() >= probs[~keep].max() - 1e-12


def test_top_p_per_row():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(3, 1)
    out = top_p_filter(logits, torch.tensor([0.5, 0.8, 0.9]))
    assert [len(kept(row)) for row in out] == [1, 2, 3]


# --- top-k, min-p, temperature, repetition penalty -------------------------------------------


def test_top_k_keeps_exactly_k_largest():
    logits = random_logits(batch=3, vocab=30)
    for k in (1, 2, 7, 29, 30, 100):
        out = top_k_filter(logits, k)
        for row, orig in zip(out, logits, strict=True):
            assert sorted(kept(row)) == sorted(orig.topk(min(k, 30)).indices.tolist())
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, None), logits)


def test_top_k_per_row_and_ties():
    logits = random_logits(batch=3, vocab=30)
    out = top_k_filter(logits, torch.tensor([1, 5, 0]))  # 0: off for that row
    assert [len(kept(row)) for row in out] == [1, 5, 30]
    tied = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0]])
    assert kept(top_k_filter(tied, 3)[0]) == [0, 2, 3, 4]  # ties at the k-th value stay, as in HF


def test_min_p_threshold():
    # probabilities relative to the top token: 1, e^-1 = 0.368, e^-2 = 0.135, e^-3 = 0.050
    logits = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
    ratio = math.exp(-2)
    assert kept(min_p_filter(logits, ratio - 1e-4)[0]) == [0, 1, 2]
    assert kept(min_p_filter(logits, ratio + 1e-4)[0]) == [0, 1]
    assert kept(min_p_filter(logits, 1.0)[0]) == [0]
    assert torch.equal(min_p_filter(logits, 0.0), logits)
    # on random logits: exactly the tokens with p >= min_p * p_max
    logits = random_logits()
    probs = logits.double().softmax(-1)
    out = min_p_filter(logits, 0.1)
    assert torch.equal(torch.isfinite(out), probs >= 0.1 * probs.amax(-1, keepdim=True))


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 3.0, 0.0]])
    prev = torch.tensor([[0, 1, 1, 5, -1]])  # token 1 twice (penalized once); -1 is padding
    out = apply_repetition_penalty(logits, prev, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 0.5, -0.5, 3.0, 0.0]]))
    out = apply_repetition_penalty(logits, prev, 0.5)  # < 1 rewards repeats
    assert torch.equal(out, torch.tensor([[4.0, -1.0, 0.5, -0.5, 3.0, 0.0]]))
    mask = torch.tensor([[True, True, False, False, False, True]])
    assert torch.equal(apply_repetition_penalty(logits, mask, 2.0),
                       apply_repetition_penalty(logits, prev, 2.0))
    assert torch.equal(apply_repetition_penalty(logits, prev, 1.0), logits)


def test_temperature():
    logits = random_logits()
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    per_row = apply_temperature(logits, torch.tensor([1.0, 2.0, 0.5, 4.0]))
    assert torch.allclose(per_row, logits / torch.tensor([[1.0], [2.0], [0.5], [4.0]]))


def test_filters_do_not_modify_their_input():
    logits = random_logits()
    before = logits.clone()
    prev = torch.randint(0, 50, (4, 6))
    for out in (top_k_filter(logits, 5), top_p_filter(logits, 0.5), min_p_filter(logits, 0.2),
                apply_repetition_penalty(logits, prev, 1.5), apply_temperature(logits, 0.7)):
        assert out.data_ptr() != logits.data_ptr() or out is logits
    assert torch.equal(logits, before)


# --- parity with transformers ----------------------------------------------------------------


def assert_same_filtering(ours, theirs):
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    finite = torch.isfinite(ours)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_parity_with_transformers_processors(seed):
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(batch=6, vocab=80, seed=seed)
    ids = torch.randint(0, 80, (6, 12), generator=torch.Generator().manual_seed(seed))
    for top_p in (0.1, 0.5, 0.9, 0.99):
        assert_same_filtering(top_p_filter(logits, top_p), lp.TopPLogitsWarper(top_p)(ids, logits))
    for top_k in (1, 3, 40, 80):
        assert_same_filtering(top_k_filter(logits, top_k), lp.TopKLogitsWarper(top_k)(ids, logits))
    for min_p in (0.01, 0.1, 0.5, 1.0):
        assert_same_filtering(min_p_filter(logits, min_p), lp.MinPLogitsWarper(min_p)(ids, logits))
    for temperature in (0.3, 1.7):
        assert_same_filtering(apply_temperature(logits, temperature),
                              lp.TemperatureLogitsWarper(temperature)(ids, logits))
    for penalty in (0.7, 1.3, 2.0):
        assert_same_filtering(apply_repetition_penalty(logits, ids, penalty),
                              lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.3, top_p=0.6, min_p=0.2),
    dict(temperature=0.5, top_k=5, repetition_penalty=0.8),
])
def test_pipeline_order_matches_transformers(params):
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(batch=6, vocab=80, seed=4)
    ids = torch.randint(0, 80, (6, 12), generator=torch.Generator().manual_seed(4))
    sp = SamplingParams(**params)
    # the order of transformers' GenerationMixin._get_logits_processor
    chain = [lp.RepetitionPenaltyLogitsProcessor(sp.repetition_penalty),
             lp.TemperatureLogitsWarper(sp.temperature)]
    if sp.top_k:
        chain.append(lp.TopKLogitsWarper(sp.top_k))
    chain += [lp.TopPLogitsWarper(sp.top_p), lp.MinPLogitsWarper(sp.min_p)]
    theirs = lp.LogitsProcessorList(chain)(ids, logits.clone())
    assert_same_filtering(process_logits(logits, sp, ids), theirs)


# --- the sampler -----------------------------------------------------------------------------


def test_greedy_is_argmax_of_penalized_logits():
    logits = random_logits()
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    ids = logits.argmax(-1, keepdim=True)  # penalizing the argmax can change it
    penalized = apply_repetition_penalty(logits, ids, 3.0)
    params = SamplingParams(temperature=0, repetition_penalty=3.0)
    assert torch.equal(sample_next(logits, params, prev=ids), penalized.argmax(-1))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(40000, -1)
    torch.manual_seed(0)
    counts = torch.bincount(sample_from_logits(logits), minlength=5).double() / 40000
    torch.testing.assert_close(counts, probs.double(), rtol=0, atol=0.01)
    assert counts[4] == 0  # -inf is never drawn


def test_filtered_tokens_are_never_sampled():
    logits = random_logits(batch=2000, vocab=20, seed=1)
    params = SamplingParams(temperature=1.0, top_k=8, top_p=0.7, min_p=0.05)
    allowed = torch.isfinite(process_logits(logits, params))
    tokens = sample_next(logits, params, torch.Generator().manual_seed(0))
    assert allowed.gather(1, tokens[:, None]).all()


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    logits = random_logits(batch=5, vocab=50, seed=2, scale=0.5)
    params = SamplingParams(temperature=1.0)

    def draw(rows, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample_next(rows, params, g) for _ in range(30)], dim=1)

    assert torch.equal(draw(logits, 0), draw(logits, 0))
    assert not torch.equal(draw(logits, 0), draw(logits, 1))
    # a row sampled alone draws what it draws in the batch
    assert torch.equal(draw(logits[3:4], 0)[0], draw(logits, 0)[3])


def test_per_row_generators():
    logits = random_logits(batch=3, vocab=50, seed=2, scale=0.5)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    together = torch.stack([sample_from_logits(logits, gens) for _ in range(20)], dim=1)
    for i, s in enumerate((7, 8, 9)):
        g = torch.Generator().manual_seed(s)  # a row draws as a batch of one does
        alone = torch.stack([sample_from_logits(logits[i : i + 1], g) for _ in range(20)], dim=1)
        assert torch.equal(alone[0], together[i])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        exponential_noise((3, 50), gens[:2], torch.device("cpu"))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1),
    ("temperature", float("nan")), ("temperature", float("inf")), ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("stop", [""]), ("stop", [1]), ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]), ("seed", 1.5), ("seed", 2**64),
])
def test_validate_names_field_value_and_range(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.*allowed: ") as info:
        SamplingParams(**{field: value})
    assert repr(value) in str(info.value)
    params = SamplingParams()  # and when a valid object is changed afterwards
    setattr(params, field, value)
    with pytest.raises(ValueError, match=field):
        params.validate()


def test_valid_params():
    SamplingParams(max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, min_p=1.0,
                   repetition_penalty=0.5, stop=["\n"], stop_token_ids=[0], seed=-3)
    assert SamplingParams(stop="###").stop == ["###"]  # one string, as OpenAI's API accepts
