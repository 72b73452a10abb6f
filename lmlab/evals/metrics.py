"""Evaluation metrics as pure functions: pass@k, calibration, standard errors, voting, agreement.

- pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
  Code", HumanEval), from n samples per problem of which c pass.
- expected_calibration_error: ECE with equal-width bins (Guo et al. 2017, "On Calibration of Modern
  Neural Networks").
- mean_stderr: a mean and its standard error, as lm-evaluation-harness reports `acc` and `acc_stderr`.
- majority_vote: self-consistency (Wang et al. 2023): the most common final answer of several samples.
- cohen_kappa and agreement_rate: how far two raters (a model judge and a human, two judges) agree,
  with and without correction for chance (Cohen 1960).

Written here rather than imported because each is a few lines whose formula is the point; the tests
check them against hand-computed values, brute force, lm-evaluation-harness and scikit-learn.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples, drawn without replacement from n samples of
    which c are correct, is correct (Chen et al. 2021, eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomial
    coefficients (C(200, 100) ~ 9e58) and so stays exact to float precision for any n."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"pass_at_k needs non-negative integers, got {name}={value!r}")
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}: draw more samples per problem or lower k")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct samples out of n={n} is impossible (c <= n)")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k of a benchmark: the mean over problems of pass_at_k(n, c, k), one (n, c) per problem."""
    if len(counts) == 0:
        raise ValueError("mean_pass_at_k needs at least one (n, c) pair, got none")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017, eq. 3) with n_bins equal-width bins:

        ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|

    where acc(B_b) is the fraction correct and conf(B_b) the mean confidence of the predictions in
    bin b; empty bins contribute nothing. Bins are closed on the right, (0, 1/M], (1/M, 2/M], ...,
    ((M-1)/M, 1], and a confidence of exactly 0 goes in the first bin. The edges are b/M, so a
    confidence written as 0.3 lands in (0.2, 0.3] with M = 10, as on paper."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct)
    if conf.ndim != 1 or hits.shape != conf.shape:
        raise ValueError(f"confidences and correct must be 1-D and of equal length, got shapes {conf.shape} "
                         f"and {hits.shape}")
    if conf.size == 0:
        raise ValueError("expected_calibration_error needs at least one prediction, got none")
    if not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError(f"confidences must lie in [0, 1], got values from {conf.min()} to {conf.max()}")
    if not np.isin(hits, (0, 1)).all():
        raise ValueError("correct must hold booleans or 0/1 values")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    inner_edges = np.arange(1, n_bins) / n_bins
    bins = np.searchsorted(inner_edges, conf, side="left")  # number of edges strictly below: right-closed bins
    hits = hits.astype(np.float64)
    ece = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            ece += members.sum() / conf.size * abs(hits[members].mean() - conf[members].mean())
    return float(ece)


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error, s / sqrt(n) with the sample standard deviation s (ddof=1),
    as lm-evaluation-harness reports it (`mean_stderr` there); the error is 0 for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mean_stderr needs a non-empty 1-D sequence of numbers, got shape {x.shape}")
    if x.size < 2:
        return float(x[0]), 0.0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common answer, None (no answer extracted) not counted; a tie goes to the answer that
    appeared first, so the vote is deterministic. None when no sample gave an answer."""
    counts = Counter(a for a in answers if a is not None)  # insertion-ordered: first occurrence first
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts


def agreement_rate(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """The fraction of items on which two raters give the same label."""
    _check_pair(a, b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Agreement corrected for chance (Cohen 1960):

        kappa = (p_o - p_e) / (1 - p_e),   p_e = sum_l p_a(l) * p_b(l)

    with p_o the observed agreement and p_e the agreement expected if each rater drew labels
    independently at its own rates p_a, p_b. 1 is perfect agreement, 0 chance level, negative worse
    than chance. When both raters use one and the same label throughout (p_e = 1) kappa is 0/0:
    NaN is returned, as scikit-learn does."""
    _check_pair(a, b)
    n = len(a)
    count_a, count_b = Counter(a), Counter(b)
    p_o = agreement_rate(a, b)
    p_e = sum(count_a[label] * count_b[label] for label in count_a) / (n * n)
    if p_e == 1.0:
        return math.nan
    return (p_o - p_e) / (1.0 - p_e)


def _check_pair(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"the two raters must label the same items: got {len(a)} and {len(b)} labels")
    if len(a) == 0:
        raise ValueError("need at least one labelled item, got none")
