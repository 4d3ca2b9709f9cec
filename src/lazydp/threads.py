"""The one thread pool lazydp's CPU noise draws share (lazydp.noise).

Contract: ``run_chunks(work, chunks, threads)`` runs ``work(i)`` for i in range(chunks) with the
caller as one of the workers and re-raises a worker's exception; ``work`` must release the GIL
for most of its time (numpy ufuncs, fancy indexing and torch kernels do) to gain anything. The
pool is separate from torch's OpenMP team, so using it never wakes (or waits on) that team.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: OpenMP settings for jobs whose steps draw much catch-up noise (the benchmark children that
#: do: ``lazydp.bench.harness.openmp_env``). torch's CPU build uses libgomp, whose idle workers
#: spin for ~300k iterations (milliseconds) after every parallel region before they sleep. Work
#: on this pool that follows a torch op (the catch-up's noise refills) then shares a core with a
#: spinning worker: on DLRM basic a 4M-value refill took 11.3 ms inside a step against 5.6 ms
#: alone, and 6.0 ms with GOMP_SPINCOUNT=1000. But a short spin costs every torch op that
#: follows Python work a wake-up: where refills are rare (rmc1 at pooling 1, one every ~6
#: steps) lazydp's steps were ~13% slower with it (benchmarks/RESULTS.md, twenty-second
#: session). libgomp reads the variable once, when torch loads it, so it cannot be set from
#: inside a process that imported torch: set it in the environment of the training job.
OPENMP_ENV = {"GOMP_SPINCOUNT": "1000"}

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
if hasattr(os, "register_at_fork"):
    # A forked child inherits the pools but not their threads: it would wait on them forever.
    os.register_at_fork(after_in_child=_pools.clear)


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's core count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool of ``threads`` workers (torch's and numpy's kernels release the GIL)."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lazydp")
        return _pools[threads]


def run_chunks(work: Callable[[int], None], chunks: int, threads: int) -> None:
    """Run ``work(i)`` for every chunk i on ``threads`` threads, the caller being one of them.

    Workers pull the next chunk index from a shared counter: one task per worker rather than
    per chunk keeps the pool's hand-offs (and the GIL traffic they cost) off the hot path,
    while still balancing load when another process takes a core.
    """
    helpers = min(threads, chunks) - 1
    next_index = iter(range(chunks))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            work(index)

    futures = [_pool(helpers).submit(drain) for _ in range(helpers)] if helpers > 0 else []
    try:
        drain()
    finally:
        for future in futures:
            future.result()  # re-raises a worker's exception in the caller
