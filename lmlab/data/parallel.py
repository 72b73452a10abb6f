"""Ordered, back-pressured process pools for the CPU-heavy corpus stages (cleaning, tokenizing).

`Pool.imap` would serve, except that it reads its whole input ahead of the workers, which would
load a corpus into memory; here at most `2 * workers` chunks are in flight. Results come back in
input order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def ordered_map(fn: Callable[[Any], Any], items: Iterable, workers: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator:
    """fn(item) for every item, computed by `workers` processes, yielded in input order.

    Workers are started with "spawn": they begin clean rather than as copies of a parent that
    may hold threads (torch's, tiktoken's) or a GPU context. `fn`, `initializer` and the items
    must therefore be picklable, and `initializer` should validate nothing a user can get wrong:
    a pool whose initializer raises restarts workers forever, so check settings before calling.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
