"""Speculative decoding inside the engine: greedy output identical to the target alone, and sampled output
distributed exactly as the target's (chi-square over thousands of requests on a tiny vocabulary)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from lmlab.infer import speculative
from lmlab.infer.engine import Engine, EngineConfig
from lmlab.infer.generate import generate
from lmlab.infer.sampling import SamplingParams, process_logits
from lmlab.model import ModelConfig, build_model


def model(vocab: int, seed: int, layers: int = 2, d: int = 48, init_std: float = 0.02):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      init_std=init_std)
    return build_model(cfg).eval()


@pytest.mark.parametrize("kind", ["draft", "self-draft", "ngram"])
def test_greedy_speculative_output_equals_target_alone(kind):
    """A weak draft (other weights), a perfect draft (the target itself: every proposal accepted) and prompt
    lookup; mixed requests, some with a repetition penalty (which decode without speculation)."""
    target = model(61, 0)
    draft = {"draft": model(61, 1, layers=1), "self-draft": target, "ngram": None}[kind]
    rng = random.Random(kind)
    motif = [rng.randrange(61) for _ in range(6)]
    prompts = [motif * rng.randrange(1, 5) + [rng.randrange(61) for _ in range(rng.randrange(0, 10))]
               for _ in range(12)]
    params = [SamplingParams(max_new_tokens=rng.randrange(1, 30), temperature=0,
                             repetition_penalty=1.2 if i % 5 == 0 else 1.0,
                             stop_token_ids=[rng.randrange(61)] if i % 3 == 0 else []) for i in range(12)]
    config = EngineConfig(block_size=4, speculative="ngram" if kind == "ngram" else "draft", num_speculative_tokens=3,
                          max_batch_tokens=64)
    engine = Engine(target, config=config, draft=draft)
    outs = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        (ref,) = generate(target, [prompt], p)
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (ref.token_ids, ref.finish_reason,
                                                                       ref.stop_reason)
    stats = engine.stats()
    assert stats.spec_drafted > 0 and stats.blocks_used == 0
    if kind == "self-draft":
        assert stats.spec_accepted == stats.spec_drafted
    else:
        assert stats.spec_accepted < stats.spec_drafted


def chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled. Returns the p-value,
    sf(x; dof) = Q(dof / 2, x / 2) (the regularized upper incomplete gamma function)."""
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        if n * p < 5:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + n * p
        else:
            observed.append(counts.get(cell, 0))
            expected.append(n * p)
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    x = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2, dtype=torch.float64), x / 2))


def exact_pair_distribution(target, prompt, params, vocab):
    """p(t2, t3) of the target's sampled continuation (t1, t2, t3, ...), t1 summed out."""
    def probs(ids):
        logits = target(torch.tensor([ids])).logits[0, -1]
        return process_logits(logits[None], params)[0].softmax(-1).double()

    out = {}
    with torch.no_grad():
        p1 = probs(prompt)
        for t1 in range(vocab):
            p2 = probs(prompt + [t1])
            for t2 in range(vocab):
                p3 = probs(prompt + [t1, t2])
                for t3 in range(vocab):
                    out[(t2, t3)] = out.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return out


def sample_pairs(target, draft, prompt, params, n, kind):
    engine = Engine(target, draft=draft, config=EngineConfig(
        speculative=kind, num_speculative_tokens=2, max_num_seqs=128, max_batch_tokens=512, block_size=4))
    seeds = itertools.count(1)
    counts: dict = {}
    for start in range(0, n, 500):
        reqs = [engine.add_request(prompt, SamplingParams(**{**params.__dict__, "seed": next(seeds)}))
                for _ in range(min(500, n - start))]
        engine.run()
        for r in reqs:
            assert len(r.output) == 4
            cell = tuple(r.output[1:3])
            counts[cell] = counts.get(cell, 0) + 1
    stats = engine.stats()
    assert stats.spec_drafted > 0
    return counts, stats


@pytest.mark.parametrize("kind", ["draft", "self-draft", "ngram"])
def test_sampled_speculative_output_follows_the_target_distribution(kind, monkeypatch):
    """Tokens 2 and 3 of each 4-token completion come from verifying k = 2 drafted tokens (the first comes from
    the prefill; the fourth can be the bonus token). Their joint frequency over 6,000 seeded requests must fit
    the target's exact distribution, and the same test rejects a broken acceptance rule (always accept the
    draft)."""
    V = 5
    target = model(V, 0, init_std=0.5)  # peaked, unlike a near-uniform random init
    draft = {"draft": model(V, 1, layers=1, init_std=0.5), "self-draft": target, "ngram": None}[kind]
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # repeats, so that prompt lookup proposes
    params = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=4, stop_token_ids=[])
    exact = exact_pair_distribution(target, prompt, params, V)
    n = 6000
    counts, stats = sample_pairs(target, draft, prompt, params, n, "ngram" if kind == "ngram" else "draft")
    assert 0 < stats.spec_accepted <= stats.spec_drafted
    assert chi_square_p(counts, exact, n) > 1e-3
    if kind == "self-draft":  # q = p: every proposal is accepted, and accepting everything is right
        assert stats.spec_accepted == stats.spec_drafted
        return

    def accept_everything(drafts, draft_probs, target_probs, generator=None):
        return list(drafts) + [int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator))]

    monkeypatch.setattr(speculative, "verify_sampled", accept_everything)
    counts, _ = sample_pairs(target, draft, prompt, params, n, kind)
    assert chi_square_p(counts, exact, n) < 1e-6
