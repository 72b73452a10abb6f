"""What every benchmark script shares."""

from __future__ import annotations

import argparse
import json
import time

# wall: elapsed seconds; cpu: this process's CPU seconds (all its threads), which other processes' load barely
# changes (with one thread it is the work itself; with more it counts their spinning too)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds, which other processes' load barely "
                        "changes (with --threads 1 it is the step's work; with more it counts spinning too)")


def timed(fn, repeats: int, clock: str = "wall") -> list[float]:
    """Seconds of `repeats` calls of fn() on `clock` (a key of CLOCKS)."""
    now = CLOCKS[clock]
    times = []
    for _ in range(repeats):
        t = now()
        fn()
        times.append(now() - t)
    return times


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's results to `path` atomically: a reader never sees half a file."""
    from lmlab.atomic import atomic_file

    with atomic_file(path, "w") as f:
        json.dump(result, f, indent=2)
