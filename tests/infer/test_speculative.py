"""Speculative decoding math: the rejection-sampling rule leaves the target's distribution unchanged
(chi-square goodness of fit over many samples on a tiny vocabulary, and the same test rejecting
wrong rules), greedy verification by hand and against plain greedy generation, prompt lookup by hand."""

from collections.abc import Callable

import pytest
import torch

from lmlab.infer import SamplingParams, generate
from lmlab.infer.speculative import ngram_propose, verify_greedy, verify_sampled
from lmlab.model import ModelConfig, build_model

V = 6
N = 20_000  # samples per goodness-of-fit test


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value of observed counts against probabilities (same
    shape, any), over the cells with probability > 0: sf(x; df) = Q(df / 2, x / 2), the regularized
    upper incomplete gamma function. A count in a cell of probability 0 is impossible under the
    hypothesis: p-value 0."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = counts.sum() * probs[support]
    assert expected.min() >= 5, "too few samples per cell for the chi-square approximation"
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    df = torch.tensor(support.sum().item() - 1.0, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, stat / 2).item()


def test_chi_square_pvalue_by_hand():
    # counts exactly as expected: statistic 0, p-value 1; df = 1, x = 3.841 is the 5% critical value
    assert chi_square_pvalue(torch.tensor([50, 50]), torch.tensor([0.5, 0.5])) == pytest.approx(1.0)
    stat_3841 = torch.tensor([50 + 9.8, 50 - 9.8])  # (9.8^2 / 50) * 2 = 3.8416
    assert chi_square_pvalue(stat_3841, torch.tensor([0.5, 0.5])) == pytest.approx(0.05, abs=1e-4)
    assert chi_square_pvalue(torch.tensor([50, 49, 1]), torch.tensor([0.5, 0.5, 0.0])) == 0.0


# --- a two-position "model": the target p1(x1), p2(x2 | x1); the draft q1, q2(. | x1) ---------


def distribution(g: torch.Generator, *shape: int, zeros: int = 0) -> torch.Tensor:
    """Random distributions over the last axis, each entry >= ~4% of the mass (enough samples in
    every pair cell), with `zeros` tokens of no mass per row."""
    w = torch.rand(*shape, V, generator=g, dtype=torch.float64) + 0.3
    if zeros:
        w.scatter_(-1, torch.rand(*shape, V, generator=g).argsort(dim=-1)[..., :zeros], 0.0)
    return (w / w.sum(dim=-1, keepdim=True)).float()


def make_case(name: str) -> dict:
    """A target/draft pair named by what it tests; k: the draft length of the first round."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    p1, p2 = distribution(g), distribution(g, V)
    k = 2
    if name in ("random", "one_draft_token"):
        q1, q2 = distribution(g), distribution(g, V)
        k = 2 if name == "random" else 1
    elif name == "q_mass_where_p_has_none":
        p1, p2 = distribution(g, zeros=2), distribution(g, V, zeros=2)
        q1, q2 = distribution(g, zeros=1), distribution(g, V, zeros=1)
        assert ((q1 > 0) & (p1 == 0)).any() and ((q2 > 0) & (p2 == 0)).any()
        assert ((p1 > 0) & (q1 == 0)).any()
    elif name == "p_equals_q":
        q1, q2 = p1.clone(), p2.clone()
    elif name in ("deterministic_draft", "zero_draft_tokens"):
        q1 = q2 = None
        k = 0 if name == "zero_draft_tokens" else 2
    else:
        raise KeyError(name)
    return dict(name=name, p1=p1, p2=p2, q1=q1, q2=q2, k=k)


def simulate(case: dict, n: int, verify: Callable = verify_sampled, seed: int = 0):
    """Emit two tokens per sample with speculative decoding, as an engine would: one round with
    case["k"] drafted tokens; if it emits only one token (a rejection at the first position, or
    k = 0), a second round with min(k, 1) drafted tokens from the new context. With k = 1 the
    second token of an accepted round is the bonus token. Returns the (n, 2) emitted pairs and
    how many first draft tokens were accepted."""
    p1, p2, q1, q2, k = case["p1"], case["p2"], case["q1"], case["q2"], case["k"]
    g = torch.Generator().manual_seed(seed)
    uniform = torch.full((V,), 1.0 / V)  # p3(. | x1, x2): the bonus after two tokens, unseen by the pair
    if q1 is not None:  # draft tokens drawn ahead, vectorized: d1 ~ q1; e[x] ~ q2(. | x) for every x
        d1 = torch.multinomial(q1, n, replacement=True, generator=g).tolist()
        e = torch.multinomial(q2, n, replacement=True, generator=g).T.tolist()  # (n, V)
    else:  # a deterministic proposer (q one-hot): a fixed first token (one p1 gives little mass), then a map
        d1 = [int(p1.argmin())] * n
        follow = [(x * 5 + 1) % V for x in range(V)]
        e = [follow] * n
    rounds1 = [torch.stack([p1, p2[x], uniform])[:k + 1] for x in range(V)]  # target_probs given d1 = x
    rounds2 = [torch.stack([p2[x], uniform])[:min(k, 1) + 1] for x in range(V)]  # given x1 = x
    pairs, accepted_first = [], 0
    for i in range(n):
        x = d1[i]
        draft = [x, e[i][x]][:k]
        q = None if q1 is None else torch.stack([q1, q2[x]])[:k]
        out = verify(draft, q, rounds1[x], g)
        accepted_first += len(out) >= 2
        if len(out) < 2:
            x1 = out[0]
            draft = [e[i][x1]][:k]
            q = None if q1 is None else q2[x1][None][:k]
            out = [x1] + verify(draft, q, rounds2[x1], g)
        pairs.append(out[:2])
    return torch.tensor(pairs), accepted_first


def pvalues(case: dict, pairs: torch.Tensor) -> tuple[float, float]:
    """p-values of the first token against p1 and of the pair against p1(x1) p2(x2 | x1)."""
    first = torch.bincount(pairs[:, 0], minlength=V)
    joint = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V)
    return (chi_square_pvalue(first, case["p1"]),
            chi_square_pvalue(joint, case["p1"][:, None] * case["p2"]))


CASES = ["random", "one_draft_token", "q_mass_where_p_has_none", "p_equals_q", "deterministic_draft",
         "zero_draft_tokens"]


@pytest.mark.parametrize("name", CASES)
def test_sampled_output_follows_the_target_distribution(name):
    case = make_case(name)
    pairs, accepted = simulate(case, N)
    p_first, p_pair = pvalues(case, pairs)
    assert p_first > 1e-3 and p_pair > 1e-3, (p_first, p_pair)
    if case["q1"] is not None:
        # the first draft token is accepted with probability sum_x min(p1(x), q1(x)) (1 - total variation)
        alpha = torch.minimum(case["p1"], case["q1"]).sum().item()
        sigma = (alpha * (1 - alpha) / N) ** 0.5
        assert abs(accepted / N - alpha) < 5 * sigma + 1e-9, (accepted / N, alpha)
        if name == "p_equals_q":
            assert accepted == N  # r < p/q = 1 always holds


def accept_all(draft, draft_probs, target_probs, generator):
    """A wrong rule: keep every drafted token (the output then follows q, not p)."""
    bonus = torch.multinomial(target_probs[-1], 1, generator=generator).item()
    return list(draft) + [bonus]


def resample_from_p(draft, draft_probs, target_probs, generator):
    """A subtly wrong rule: the right acceptance test, but a rejected token is redrawn from p
    instead of norm(max(0, p - q)), which over-weights the tokens where q > p."""
    q = draft_probs if draft_probs is not None else torch.eye(target_probs.shape[1])[list(draft)]
    for i, x in enumerate(draft):
        if torch.rand((), generator=generator) * q[i, x] >= target_probs[i, x]:
            return list(draft[:i]) + [torch.multinomial(target_probs[i], 1, generator=generator).item()]
    return list(draft) + [torch.multinomial(target_probs[-1], 1, generator=generator).item()]


@pytest.mark.parametrize("rule", [accept_all, resample_from_p])
def test_the_goodness_of_fit_test_rejects_wrong_rules(rule):
    case = make_case("random")
    pairs, _ = simulate(case, N, verify=rule)
    p_first, p_pair = pvalues(case, pairs)
    assert p_first < 1e-6 and p_pair < 1e-6, (p_first, p_pair)


# --- verify_sampled: edge cases by hand --------------------------------------------------------


def test_a_token_the_target_never_emits_is_always_rejected():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25] * 4])
    q = torch.tensor([[0.9, 0.1, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    outs = [verify_sampled([0], q, p, g) for _ in range(500)]
    assert all(len(o) == 1 for o in outs)
    # the residual max(0, p - q) = (0, 0.4, 0.5, 0) / 0.9
    assert {o[0] for o in outs} == {1, 2}


def test_equal_distributions_accept_every_draft():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(4, 5, generator=g), dim=-1)
    for _ in range(200):
        draft = torch.multinomial(p[:3], 1, generator=g)[:, 0].tolist()
        out = verify_sampled(draft, p[:3].clone(), p, g)
        assert out[:3] == draft and len(out) == 4


def test_certain_tokens_are_accepted_and_certain_rejections_redrawn():
    # a deterministic draft (q one-hot) of a token with p = 1 is always accepted; bonus from p_{k+1}
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert verify_sampled([1], None, p) == [1, 2]
    # a residual that is one-hot: a rejected token must become that token
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3] * 3])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(2)
    outs = {tuple(verify_sampled([1], q, p, g)) for _ in range(200)}
    assert {o for o in outs if len(o) == 1} == {(0,)}  # max(0, p - q) = (0.5, 0, 0)
    assert {o[0] for o in outs if len(o) == 2} == {1}


def test_zero_draft_tokens_sample_from_the_first_distribution():
    p = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert verify_sampled([], None, p) == [2]
    assert verify_sampled([], torch.empty(0, 4), p) == [2]


def test_seeded_verification_is_reproducible():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(5, 50, generator=g), dim=-1)
    q = torch.softmax(torch.randn(4, 50, generator=g), dim=-1)
    draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(4)]

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [verify_sampled(draft, q, p, gen) for _ in range(30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bad_shapes_and_ids_raise():
    p = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="needs k \\+ 1 = 2"):
        verify_sampled([1], None, p)
    with pytest.raises(ValueError, match="draft_probs must be"):
        verify_sampled([1, 2], torch.full((2, 5), 0.2), p)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        verify_sampled([1, 4], None, p)
    with pytest.raises(ValueError, match="needs k \\+ 1"):
        verify_greedy([1, 2, 3], p)
    with pytest.raises(ValueError, match="must be \\(k\\+1, V\\)"):
        verify_greedy([], p[0])


# --- verify_greedy ------------------------------------------------------------------------------


def one_hot_logits(best: list[int], vocab: int = 6) -> torch.Tensor:
    logits = torch.randn(len(best), vocab, generator=torch.Generator().manual_seed(0)) * 0.1
    logits[range(len(best)), best] = 5.0
    return logits


@pytest.mark.parametrize("draft, expected", [
    ([3, 1, 4], [3, 1, 4, 0]),  # all accepted, plus the bonus token
    ([3, 1, 5], [3, 1, 4]),  # the last one corrected
    ([3, 2, 4], [3, 1]),  # a mismatch at the second: what follows is not looked at
    ([2, 1, 4], [3]),  # the first rejected: the target's own token
])
def test_verify_greedy_by_hand(draft, expected):
    assert verify_greedy(draft, one_hot_logits([3, 1, 4, 0])) == expected


def test_verify_greedy_without_a_draft_is_the_argmax():
    assert verify_greedy([], one_hot_logits([5])) == [5]


@torch.no_grad()
def test_speculative_greedy_loop_equals_plain_greedy():
    """A whole speculative decode loop (full forward passes of a tiny target, drafts from a different
    tiny model and from prompt lookup) gives exactly the target's greedy tokens."""
    cfg = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.15)
    torch.manual_seed(0)
    target = build_model(ModelConfig(**cfg)).eval()
    draft_model = build_model(ModelConfig(**{**cfg, "n_layers": 1})).eval()
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    M = 30
    (expected,) = generate(target, [prompt], SamplingParams(max_new_tokens=M, temperature=0))

    def draft_greedy(ids, k):
        ids = list(ids)
        for _ in range(k):
            ids.append(int(draft_model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-k:]

    for propose in (draft_greedy, lambda ids, k: ngram_propose(ids, k, max_ngram=2)):
        ids, passes = list(prompt), 0
        while len(ids) < len(prompt) + M:
            draft = propose(ids, 4)
            logits = target(torch.tensor([ids + draft])).logits[0, len(ids) - 1:]
            ids += verify_greedy(draft, logits)
            passes += 1
        assert ids[len(prompt):len(prompt) + M] == expected.token_ids
        assert passes <= M


# --- ngram_propose -----------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, k, expected", [
    ([1, 2, 3, 9, 2, 3, 8, 7, 2, 3], 2, [8, 7]),  # suffix (2, 3): its latest earlier occurrence wins
    ([5, 2, 3, 4, 4, 1, 3, 6, 2, 3], 2, [4, 4]),  # the 2-gram (2, 3) beats the later 1-gram (3,)
    ([7, 8, 9, 1, 7, 8, 9, 2, 8, 9, 3, 7, 8, 9], 3, [2, 8, 9]),  # the 3-gram beats the later 2-gram (8, 9)
    ([1, 2, 3, 4, 5, 1, 2], 10, [3, 4, 5, 1, 2]),  # fewer than k tokens left after the match
    ([1, 2, 1, 2, 1, 2], 4, [1, 2]),  # the occurrence may overlap the suffix
    ([4, 4, 4], 5, [4]),
    ([1, 2, 3, 4], 3, []),  # nothing recurs
    ([3], 3, []),
    ([], 3, []),
    ([1, 2, 1, 2], 0, []),
])
def test_ngram_propose_by_hand(tokens, k, expected):
    assert ngram_propose(tokens, k) == expected


def test_ngram_propose_respects_the_ngram_range():
    tokens = [1, 2, 3, 9, 5, 3]  # only the 1-gram (3,) recurs
    assert ngram_propose(tokens, 2, max_ngram=3, min_ngram=1) == [9, 5]
    assert ngram_propose(tokens, 2, max_ngram=3, min_ngram=2) == []
    tokens = [1, 2, 3, 7, 0, 2, 3, 8, 1, 2, 3]  # 3-gram (1, 2, 3) at 0; the 2-gram (2, 3) last at 5
    assert ngram_propose(tokens, 1, max_ngram=3) == [7]
    assert ngram_propose(tokens, 1, max_ngram=2) == [8]


def test_ngram_propose_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=-1"):
        ngram_propose([1, 2], -1)
    with pytest.raises(ValueError, match="min_ngram"):
        ngram_propose([1, 2], 2, max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="min_ngram"):
        ngram_propose([1, 2], 2, min_ngram=0)
