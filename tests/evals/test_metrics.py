"""Evaluation metrics against hand-computed values, brute force, lm-evaluation-harness and scikit-learn."""

from __future__ import annotations

import itertools
import math
from math import comb

import numpy as np
import pytest

from lmlab.evals.metrics import (
    agreement_rate,
    cohen_kappa,
    expected_calibration_error,
    majority_vote,
    mean_pass_at_k,
    mean_stderr,
    pass_at_k,
)

# --- pass@k ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                   # c / n
    (5, 2, 2, 0.7),                   # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 3, 0.9),                   # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 2, 4, 1.0),                   # n - c < k: every draw holds a correct sample
    (10, 0, 1, 0.0),
    (10, 0, 10, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 5, 1 - 21 / 252),         # 1 - C(7,5)/C(10,5)
    (1, 1, 1, 1.0),
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_over_subsets(n):
    """The fraction of k-subsets of n samples (the first c correct) that contain a correct sample."""
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(hit, rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(200, 100) ~ 9e58: the ratio form in floats would overflow for larger n; the product does not.
    exact = 1 - comb(150, 100) / comb(200, 100)  # Python integers: exact, then one rounding
    assert pass_at_k(200, 50, 100) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200, rel=1e-12)
    assert pass_at_k(2000, 1, 10) == pytest.approx(10 / 2000, rel=1e-9)
    assert pass_at_k(5000, 3, 2500) == pytest.approx(1 - comb(4997, 2500) / comb(5000, 2500), rel=1e-9)


def test_pass_at_k_matches_lm_evaluation_harness():
    # lm-evaluation-harness's estimator (the HumanEval paper's code), in its cruxeval task
    cruxeval = pytest.importorskip("lm_eval.tasks.cruxeval.utils")
    if not hasattr(cruxeval, "_pass_at_k"):
        pytest.skip("this lm-evaluation-harness version has no cruxeval _pass_at_k")
    for n, c, k in [(20, 7, 5), (100, 1, 10), (13, 12, 2), (200, 0, 50), (5, 2, 1)]:
        assert pass_at_k(n, c, k) == pytest.approx(cruxeval._pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("n, c, k, message", [
    (5, 2, 6, "k <= n"),
    (5, 2, 0, "k <= n"),
    (5, 6, 1, "c <= n"),
    (-1, 0, 1, "n=-1"),
    (5, -1, 1, "c=-1"),
    (5, 1, 1.0, "k=1.0"),
    (True, 1, 1, "n=True"),
])
def test_pass_at_k_rejects_bad_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_mean_pass_at_k():
    # pass@1 = c/n per problem: mean(2/5, 0/5, 5/5) = 0.4666...
    assert mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1) == pytest.approx(7 / 15, rel=1e-12)
    assert mean_pass_at_k([(5, 2), (10, 3)], 2) == pytest.approx((0.7 + (1 - 21 / 45)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        mean_pass_at_k([], 1)


# --- calibration -----------------------------------------------------------------------------------


def test_ece_by_hand():
    # bins of width 0.1, right-closed:
    #   (0.2, 0.3]: 0.25 (wrong), 0.3 (right)    acc 1/2, conf 0.275 -> 2/6 * 0.225 = 0.075
    #   (0.8, 0.9]: 0.9 (right), 0.85 (wrong)     acc 1/2, conf 0.875 -> 2/6 * 0.375 = 0.125
    #   (0.9, 1.0]: 1.0 (right), 0.95 (right)     acc 1,   conf 0.975 -> 2/6 * 0.025 = 0.008333...
    conf = [0.25, 0.3, 0.9, 0.85, 1.0, 0.95]
    correct = [False, True, True, False, True, True]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.075 + 0.125 + 0.025 / 3, rel=1e-12)


def test_ece_bin_edges_are_right_closed_and_zero_goes_first():
    # 0.3 belongs to (0.2, 0.3] with 0.25; were it put in (0.3, 0.4] alone the ECE would differ.
    assert expected_calibration_error([0.25, 0.3], [1, 1]) == pytest.approx(0.725, rel=1e-12)  # one bin: 1 - 0.275
    # 0 and 0.1 share the first bin (0, 0.1]: acc 1/2, conf 0.05 -> 0.45
    assert expected_calibration_error([0.0, 0.1], [1, 0]) == pytest.approx(0.45, rel=1e-12)
    # with 2 bins, 0.5 is in (0, 0.5]: {0.2 wrong, 0.5 right} -> acc 0.5, conf 0.35; {0.9 right} -> 0.1
    assert expected_calibration_error([0.2, 0.5, 0.9], [0, 1, 1], n_bins=2) == pytest.approx(
        2 / 3 * 0.15 + 1 / 3 * 0.1, rel=1e-12)


def test_ece_perfect_and_worst():
    assert expected_calibration_error([1.0, 1.0, 0.0], [1, 1, 0]) == 0.0
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == 1.0
    # one bin: |mean accuracy - mean confidence|
    assert expected_calibration_error([0.9, 0.6, 0.3], [1, 0, 0], n_bins=1) == pytest.approx(0.6 - 1 / 3)


@pytest.mark.parametrize("conf, correct, bins, message", [
    ([0.5, 1.2], [1, 0], 10, r"\[0, 1\]"),
    ([0.5], [1, 0], 10, "equal length"),
    ([], [], 10, "at least one"),
    ([0.5], [2], 10, "booleans or 0/1"),
    ([0.5], [1], 0, "n_bins"),
])
def test_ece_rejects_bad_input(conf, correct, bins, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(conf, correct, n_bins=bins)


# --- standard error --------------------------------------------------------------------------------


def test_mean_stderr_by_hand():
    # [1, 0, 1, 1]: mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, stderr sqrt(0.25 / 4) = 0.25
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx((0.75, 0.25), rel=1e-12)
    assert mean_stderr([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_stderr([])


def test_mean_stderr_matches_lm_evaluation_harness():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1, 0, 0, 1, 1, 1, 0, 1, 0.5, 0.25]
    mean, stderr = mean_stderr(values)
    assert mean == pytest.approx(lm_metrics.mean(values), rel=1e-12)
    assert stderr == pytest.approx(lm_metrics.mean_stderr(values), rel=1e-12)


# --- voting and agreement --------------------------------------------------------------------------


def test_majority_vote():
    assert majority_vote(["4", "5", "4", None, None, None]) == "4"  # None is not an answer
    assert majority_vote(["7", "3", "3", "7"]) == "7"                # tie: the first to appear
    assert majority_vote(["3", "7", "7", "3"]) == "3"
    assert majority_vote([None, "2"]) == "2"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_agreement_and_kappa_by_hand():
    # 10 items; rater a says yes 6 times, rater b 5 times; they agree on 7 (4 yes-yes, 3 no-no).
    a = ["y"] * 4 + ["y"] * 2 + ["n"] * 1 + ["n"] * 3
    b = ["y"] * 4 + ["n"] * 2 + ["y"] * 1 + ["n"] * 3
    assert agreement_rate(a, b) == pytest.approx(0.7)
    # p_o = 0.7, p_e = 0.6 * 0.5 + 0.4 * 0.5 = 0.5, kappa = 0.2 / 0.5 = 0.4
    assert cohen_kappa(a, b) == pytest.approx(0.4, rel=1e-12)


def test_kappa_extremes():
    assert cohen_kappa([1, 2, 3], [1, 2, 3]) == 1.0
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)  # p_o = 0, p_e = 0.5
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))                # one label only: 0/0
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        agreement_rate([], [])


def test_kappa_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, size=50).tolist()
    b = [x if rng.random() < 0.6 else int(rng.integers(0, 3)) for x in a]
    assert cohen_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b), rel=1e-12)
