"""What every benchmark script shares."""

from __future__ import annotations

import time


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times
