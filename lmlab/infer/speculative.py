"""Speculative decoding: verify k drafted tokens with one target forward pass, and propose them
without a draft model by prompt lookup.

A cheap proposer drafts k tokens x_1..x_k; the target scores all of them in one forward pass over
the k new positions, giving its next-token distributions p_1..p_{k+1} (p_i conditioned on the
context and x_1..x_{i-1}). The functions here turn those distributions into the tokens to emit:

- `verify_greedy`: keep the longest draft prefix that equals the target's argmax, then append the
  target's own argmax (at the first mismatch, or the "bonus" token after all k). The output is
  exactly what greedy decoding with the target alone produces, 1..k+1 tokens per target pass.
- `verify_sampled`: the rejection-sampling rule of Leviathan, Kalman & Matias 2023 ("Fast
  Inference from Transformers via Speculative Decoding", Algorithm 1) and Chen et al. 2023
  ("Accelerating Large Language Model Decoding with Speculative Sampling"), which leaves the
  target's distribution exactly unchanged whatever the draft is (see its docstring for the proof).
- `ngram_propose`: prompt lookup decoding (Saxena 2023): the draft is the continuation of the
  latest earlier occurrence of the text's last n tokens. It costs no model and is accurate
  wherever the output copies its input (summaries, code edits, retrieval, quoting).

Written by hand because the verification rule is the whole point of the technique: a reader can
hold each line against the paper's algorithm. The functions are pure (tensors and ids in, ids out)
and take one request's draft, so an engine calls them per row after its batched forward pass.
All randomness comes from the given torch.Generator, so a seeded request is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sampling import sample_from_logits


def _check_draft(draft: Sequence[int], rows: int, vocab: int, what: str) -> list[int]:
    """The draft as a list of ints, checked against the (k+1, V) target tensor's shape."""
    draft = [int(t) for t in draft]
    if rows != len(draft) + 1:
        raise ValueError(
            f"{what} has {rows} rows for a draft of {len(draft)} tokens; it needs k + 1 = {len(draft) + 1} "
            "(one distribution per drafted position plus one for the token after them)"
        )
    bad = [t for t in draft if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"draft token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return draft


def verify_greedy(draft: Sequence[int], target_logits: torch.Tensor) -> list[int]:
    """Greedy verification: the tokens greedy decoding with the target emits from here.

    target_logits (k+1, V): the target's logits at the k drafted positions and the one after them
    (after any penalty, which greedy applies before the argmax). With y_i = argmax target_logits[i],
    the output is x_1..x_n, y_{n+1} where n is the length of the longest prefix with x_i = y_i:
    the accepted draft plus the target's correction, or plus the bonus token y_{k+1} when all k
    are accepted. Always 1..k+1 tokens; with k = 0 it is plain greedy decoding.
    """
    if target_logits.dim() != 2:
        raise ValueError(f"target_logits must be (k+1, V), got shape {tuple(target_logits.shape)}")
    draft = _check_draft(draft, target_logits.shape[0], target_logits.shape[1], "target_logits")
    best = target_logits.argmax(dim=-1).tolist()  # one host read for the whole draft
    out = []
    for x, y in zip(draft, best, strict=False):
        if x != y:
            break
        out.append(x)
    out.append(best[len(out)])
    return out


def verify_sampled(draft: Sequence[int], draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

    draft x_1..x_k was sampled from the draft's distributions q_i = draft_probs[i-1]; the target's
    distributions are p_i = target_probs[i-1], i = 1..k+1 (both AFTER temperature, top-k, top-p,
    i.e. the distributions each side actually samples from). For i = 1..k, with r_i ~ U[0, 1):

        accept x_i            if r_i < min(1, p_i(x_i) / q_i(x_i))
        otherwise emit y ~ norm(max(0, p_i - q_i)) and stop
        after k acceptances, emit the bonus token y ~ p_{k+1}

    Why the output follows p exactly: the token emitted at a position is x with probability
    q(x) min(1, p(x)/q(x)) = min(p(x), q(x)) by acceptance, plus P(reject) * residual(x); since
    P(reject) = 1 - sum_x min(p, q) = sum_x max(0, p - q), the second term is max(0, p(x) - q(x)),
    and min(p, q) + max(0, p - q) = p. The expected acceptance rate is sum_x min(p(x), q(x)).

    Edge cases: p(x_i) = 0 where q(x_i) > 0 always rejects; if the residual is all zero (p = q up to
    rounding, so a rejection can only come from rounding) the token is drawn from p itself;
    draft_probs None means a deterministic draft (prompt lookup), q_i one-hot on x_i, so x_i is
    accepted with probability p_i(x_i) and the residual is p_i without x_i; k = 0 samples from p_1.

    Randomness: k uniforms from `generator` (torch.rand), then one exponential-race draw
    (`sample_from_logits`) for the last token, so a seeded generator makes the result reproducible.
    Returns 1..k+1 token ids.
    """
    if target_probs.dim() != 2:
        raise ValueError(f"target_probs must be (k+1, V), got shape {tuple(target_probs.shape)}")
    k1, V = target_probs.shape
    draft = _check_draft(draft, k1, V, "target_probs")
    k = len(draft)
    if draft_probs is not None and tuple(draft_probs.shape) != (k, V):
        raise ValueError(f"draft_probs must be (k, V) = {(k, V)} to match the draft and target_probs, "
                         f"got {tuple(draft_probs.shape)}")
    p = target_probs.float()
    n, residual = k, None  # accepted tokens; the distribution of the token emitted after them
    if k:
        rows = torch.arange(k, device=p.device)
        ids = torch.tensor(draft, device=p.device)
        p_x = p[rows, ids]
        q_x = draft_probs.float()[rows, ids] if draft_probs is not None else torch.ones_like(p_x)
        r = torch.rand(k, generator=generator, device=p.device, dtype=torch.float64)
        # r < p/q written as r * q < p: no division, and q(x) = 0 (a token the draft could not have
        # proposed) accepts iff p(x) > 0, the limit of min(1, p/q)
        accept = (r * q_x.double() < p_x.double()).tolist()
        n = accept.index(False) if False in accept else k
        if n < k:
            if draft_probs is not None:
                q = draft_probs[n].float()
            else:
                q = torch.zeros(V, device=p.device)
                q[draft[n]] = 1.0
            residual = (p[n] - q).clamp_(min=0.0)
            if not residual.sum() > 0:  # p == q: rejection came from rounding; p is the right law
                residual = p[n]
    if residual is None:
        residual = p[n]  # the bonus token, or p_1 when k = 0
    # log(0) = -inf: tokens without mass are never drawn; softmax renormalizes the residual
    token = sample_from_logits(residual.log()[None], generator)
    return draft[:n] + [int(token)]


def ngram_propose(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup decoding (Saxena 2023): draft the tokens that followed the last time the
    current suffix occurred.

    For n = max_ngram down to min_ngram, take the suffix s = tokens[-n:] and look for its latest
    occurrence that starts before it (overlapping the suffix is fine); the first n that has one wins
    (a longer match predicts better), and the draft is the (up to k) tokens right after that
    occurrence, fewer when the occurrence ends close to the end. [] when no suffix recurs or k = 0.
    The latest occurrence is the one most likely to continue the same way (the same variable, the
    same passage being copied).
    """
    if k < 0:
        raise ValueError(f"k={k}: the number of tokens to propose must be >= 0")
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
    tokens = list(tokens)
    L = len(tokens)
    if k == 0:
        return []
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        suffix = tokens[L - n:]
        last = suffix[-1]
        # an occurrence ending at e (exclusive) with e <= L - 1, so at least one token follows it
        for end in range(L - 1, n - 1, -1):
            if tokens[end - 1] == last and tokens[end - n:end] == suffix:
                return tokens[end:end + k]
    return []
