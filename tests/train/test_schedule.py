"""Learning-rate schedules: every boundary step against a value worked out by hand from the
conventions in the module docstring, shape invariants over random configs, and the errors."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.train.schedule import SCHEDULES, ScheduleConfig, describe, lr_multiplier


def values(cfg: ScheduleConfig, total: int, steps: list[int]) -> list[float]:
    return [lr_multiplier(s, total, cfg) for s in steps]


def test_cosine_boundaries():
    # W = 10, T = 110, r = 0.1: warmup (s + 1) / 10, then 0.1 + 0.9 (1 + cos(pi (s - 10) / 100)) / 2
    cfg = ScheduleConfig("cosine", warmup_steps=10, min_lr_ratio=0.1)
    steps = [0, 9, 10, 60, 109, 110, 111, 10_000]
    # step 109: p = 0.99 and (1 + cos(0.99 pi)) / 2 = sin^2(0.005 pi) = 2.4672e-4
    expected = [0.1, 1.0, 1.0, 0.55, 0.1 + 0.9 * 2.467198e-4, 0.1, 0.1, 0.1]
    assert values(cfg, 110, steps) == pytest.approx(expected, abs=1e-9)
    assert lr_multiplier(9, 110, cfg) == 1.0  # the last warmup step is exactly the peak
    assert lr_multiplier(35, 110, cfg) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)  # p = 1/4


def test_linear_boundaries_without_warmup():
    cfg = ScheduleConfig("linear", warmup_steps=0, min_lr_ratio=0.0)
    # p = s / 100; the last step taken (99) still trains with 1/100 of the peak
    assert values(cfg, 100, [0, 1, 50, 99, 100, 150]) == pytest.approx([1.0, 0.99, 0.5, 0.01, 0.0, 0.0])


def test_linear_with_warmup_and_floor():
    cfg = ScheduleConfig("linear", warmup_steps=4, min_lr_ratio=0.2)
    # warmup 1/4 .. 4/4, then 0.2 + 0.8 (1 - (s - 4) / 16) over steps 4..19
    assert values(cfg, 20, [0, 1, 3, 4, 12, 19, 20, 21]) == pytest.approx(
        [0.25, 0.5, 1.0, 1.0, 0.6, 0.25, 0.2, 0.2])


def test_constant():
    cfg = ScheduleConfig("constant", warmup_steps=4, min_lr_ratio=0.1)  # the ratio does not apply
    assert values(cfg, 10, [0, 3, 4, 9, 10, 100]) == [0.25, 1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "shape, at_85, at_90, at_99",
    [
        # p = (s - 80) / 20; m = 0.1 + 0.9 f(p)
        ("linear", 0.1 + 0.9 * 0.75, 0.55, 0.1 + 0.9 * 0.05),
        ("cosine", 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 0.55, 0.1 + 0.9 * (1 + math.cos(0.95 * math.pi)) / 2),
        ("sqrt", 0.55, 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1 + 0.9 * (1 - math.sqrt(0.95))),
    ],
)
def test_wsd_boundaries(shape, at_85, at_90, at_99):
    # W = 5, T = 100, decay_fraction 0.2: D = 20 decay steps starting at step 80
    cfg = ScheduleConfig("wsd", warmup_steps=5, min_lr_ratio=0.1, decay_fraction=0.2, decay_shape=shape)
    assert values(cfg, 100, [0, 4, 5, 50, 79, 80]) == pytest.approx([0.2, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert values(cfg, 100, [85, 90, 99, 100, 500]) == pytest.approx([at_85, at_90, at_99, 0.1, 0.1])


def test_wsd_decay_steps_are_rounded_not_truncated():
    # 0.1 * 30 is 3.0000000000000004 in floating point: 3 decay steps, starting at 27
    cfg = ScheduleConfig("wsd", min_lr_ratio=0.0, decay_fraction=0.1)
    assert cfg.decay_steps(30) == 3
    assert values(cfg, 30, [26, 27, 28, 29, 30]) == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 0.0])


def test_degenerate_lengths():
    # warmup as long as the run: the peak on the last step, the final value after it
    cosine = ScheduleConfig("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert values(cosine, 10, [0, 9, 10]) == pytest.approx([0.1, 1.0, 0.1])
    # wsd with no decay steps holds the peak through the run
    wsd = ScheduleConfig("wsd", warmup_steps=0, min_lr_ratio=0.5, decay_fraction=0.0)
    assert values(wsd, 10, [0, 9, 10]) == [1.0, 1.0, 0.5]
    # a one-step run: step 0 uses the peak
    assert lr_multiplier(0, 1, ScheduleConfig("linear", min_lr_ratio=0.0)) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(SCHEDULES),
    total=st.integers(1, 400),
    warmup_frac=st.floats(0, 0.5),
    ratio=st.floats(0, 1),
    fraction=st.floats(0, 0.5),
    shape=st.sampled_from(["linear", "cosine", "sqrt"]),
)
def test_shape_invariants(name, total, warmup_frac, ratio, fraction, shape):
    warmup = int(warmup_frac * total)
    cfg = ScheduleConfig(name, warmup_steps=warmup, min_lr_ratio=ratio, decay_fraction=fraction, decay_shape=shape)
    m = [lr_multiplier(s, total, cfg) for s in range(total + 3)]
    final = 1.0 if name == "constant" else ratio
    # warmup rises strictly from 1/W and ends exactly at the peak
    assert all(0 < m[s] < m[s + 1] for s in range(warmup - 1))
    if warmup:
        assert m[0] == 1 / warmup and m[warmup - 1] == 1.0
    # afterwards: starts at the peak, never rises, stays within [final, 1], clamps after the run
    after = m[warmup:]
    assert after[0] == 1.0 or warmup == total
    assert all(b <= a + 1e-12 for a, b in pairwise(after))
    assert all(final - 1e-12 <= x <= 1.0 for x in after)
    assert m[total:] == [final] * 3
    assert all(x > 0 for x in m[:total])  # even with ratio 0, no step of the run is wasted at lr 0


@pytest.mark.parametrize(
    "kwargs, total, message",
    [
        (dict(name="cosin"), 10, "name='cosin'; choose one of"),
        (dict(warmup_steps=-1), 10, "warmup_steps must be >= 0"),
        (dict(min_lr_ratio=-0.1), 10, r"min_lr_ratio must be in \[0, 1\]"),
        (dict(min_lr_ratio=1.5), 10, r"min_lr_ratio must be in \[0, 1\]"),
        (dict(decay_fraction=1.2), 10, r"decay_fraction must be in \[0, 1\]"),
        (dict(decay_shape="exp"), 10, "decay_shape='exp'"),
    ],
)
def test_config_errors(kwargs, total, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_errors_that_depend_on_the_run_length():
    with pytest.raises(ValueError, match="warmup_steps=11 exceeds the run's 10 steps"):
        lr_multiplier(0, 10, ScheduleConfig(warmup_steps=11))
    with pytest.raises(ValueError, match="plus the wsd decay of 3 steps"):
        lr_multiplier(0, 10, ScheduleConfig("wsd", warmup_steps=8, decay_fraction=0.3))
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        lr_multiplier(0, 0, ScheduleConfig())
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_multiplier(-1, 10, ScheduleConfig())


def test_describe():
    assert describe(ScheduleConfig("cosine", warmup_steps=100), 1000) == (
        "cosine: warmup 100 steps, then cosine decay to 0.1x by step 1000")
    assert describe(ScheduleConfig("wsd", decay_shape="sqrt", min_lr_ratio=0.0), 1000) == (
        "wsd: peak lr until step 800, then sqrt decay to 0x by step 1000")
    assert describe(ScheduleConfig("constant"), 50) == "constant: peak lr for 50 steps"
