"""Learning-rate schedules as pure functions of the step: warmup, then cosine, linear or WSD decay.

The loop calls `lr_multiplier(step, total_steps, cfg)` before every optimizer step and sets each
param group's lr to `group["base_lr"] * multiplier`. Because the multiplier depends on nothing
but the step, a resumed run needs no scheduler state, and any step's lr can be read off directly
(torch's `LRScheduler` objects instead carry a mutable counter that has to be checkpointed).

Conventions (W = warmup_steps, T = total_steps, r = min_lr_ratio, step s counted from 0):

    warmup   s < W:   m(s) = (s + 1) / W
             step 0 already moves the weights (m = 1/W) and step W - 1, the last warmup step,
             uses the peak exactly, as in nanoGPT/nanochat.
    decay    s >= W:  m(s) = r + (1 - r) * f(p),   p = progress in [0, 1], f(0) = 1, f(1) = 0
    after    s >= T:  m(s) = r (the final value; "constant" stays at 1)

The decay ends at step T, one past the last step taken, as in Hugging Face's schedules: with
r = 0 the last step still trains (its lr is small, not zero).

    cosine    p = (s - W) / (T - W),  f(p) = (1 + cos(pi p)) / 2      (Loshchilov & Hutter 2017, SGDR)
    linear    p = (s - W) / (T - W),  f(p) = 1 - p
    constant  m(s) = 1 after warmup
    wsd       warmup-stable-decay (Hu et al. 2024, MiniCPM): the peak holds until step T - D,
              D = round(decay_fraction * T), then p = (s - (T - D)) / D and f is
                linear  1 - p
                cosine  (1 + cos(pi p)) / 2
                sqrt    1 - sqrt(p)    the "1-sqrt" cooldown that Hägele et al. 2024 ("Scaling
                                       Laws and Compute-Optimal Training Beyond Fixed Training
                                       Durations") found to match a tuned cosine
              A WSD run can be continued from any checkpoint of its stable phase with a longer T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


@dataclass
class ScheduleConfig:
    """The shape of the learning rate over a run, as a multiple of the peak lr."""

    name: str = "cosine"
    """"cosine" | "wsd" (warmup-stable-decay) | "linear" | "constant" (after warmup)."""
    warmup_steps: int = 0
    """Steps of linear warmup: step s < warmup_steps uses (s + 1) / warmup_steps of the peak."""
    min_lr_ratio: float = 0.1
    """Final lr / peak lr, reached at the last step's end (cosine, wsd, linear; not constant)."""
    decay_fraction: float = 0.2
    """wsd only: the fraction of total steps spent in the final decay (rounded to whole steps)."""
    decay_shape: str = "linear"
    """wsd only: the decay's shape, "linear" | "cosine" | "sqrt" (1 - sqrt, Hägele et al. 2024)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, total_steps: int | None = None) -> None:
        """Raise ValueError naming the field and the fix; with `total_steps`, also check that the
        warmup and the WSD decay fit in the run."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid schedule: {msg}")

        check(self.name in SCHEDULES, f"name={self.name!r}; choose one of {SCHEDULES}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(0.0 <= self.decay_fraction <= 1.0, f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        check(self.decay_shape in DECAY_SHAPES, f"decay_shape={self.decay_shape!r}; choose one of {DECAY_SHAPES}")
        if total_steps is None:
            return
        check(total_steps >= 1, f"total_steps must be at least 1, got {total_steps}")
        check(
            self.warmup_steps <= total_steps,
            f"warmup_steps={self.warmup_steps} exceeds the run's {total_steps} steps; shorten the warmup",
        )
        if self.name == "wsd":
            decay = self.decay_steps(total_steps)
            check(
                self.warmup_steps + decay <= total_steps,
                f"warmup_steps={self.warmup_steps} plus the wsd decay of {decay} steps "
                f"(decay_fraction={self.decay_fraction} of {total_steps}) exceed the run; "
                "shorten the warmup or lower decay_fraction",
            )

    def decay_steps(self, total_steps: int) -> int:
        """wsd: the number of steps in the final decay, D = round(decay_fraction * total_steps)."""
        return round(self.decay_fraction * total_steps)

    @property
    def final_ratio(self) -> float:
        """The multiplier after the last step: 1 for "constant", min_lr_ratio otherwise."""
        return 1.0 if self.name == "constant" else self.min_lr_ratio


def _decay_shape(shape: str, p: float) -> float:
    """f(p) for p in [0, 1]: 1 at the start of the decay, 0 at its end."""
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - math.sqrt(p)  # "sqrt"


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """The factor on the peak lr for optimizer step `step` (0-based) of a `total_steps` run."""
    cfg.validate(total_steps)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup, final = cfg.warmup_steps, cfg.final_ratio
    if step < warmup:
        return (step + 1) / warmup
    if step >= total_steps:
        return final
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        decay = cfg.decay_steps(total_steps)
        start = total_steps - decay
        if step < start:
            return 1.0
        shape, p = cfg.decay_shape, (step - start) / decay
    else:  # cosine, linear: decay over every step after warmup (total_steps > warmup here)
        shape, p = cfg.name, (step - warmup) / (total_steps - warmup)
    return final + (1.0 - final) * _decay_shape(shape, p)


def describe(cfg: ScheduleConfig, total_steps: int) -> str:
    """One line for logs, e.g. "cosine: warmup 100 steps, then cosine decay to 0.1x by step 1000"."""
    cfg.validate(total_steps)
    warmup = f"warmup {cfg.warmup_steps} steps, then " if cfg.warmup_steps else ""
    if cfg.name == "constant":
        return f"constant: {warmup}peak lr for {total_steps} steps"
    if cfg.name == "wsd":
        start = total_steps - cfg.decay_steps(total_steps)
        return (f"wsd: {warmup}peak lr until step {start}, then {cfg.decay_shape} decay "
                f"to {cfg.min_lr_ratio:g}x by step {total_steps}")
    return f"{cfg.name}: {warmup}{cfg.name} decay to {cfg.min_lr_ratio:g}x by step {total_steps}"
