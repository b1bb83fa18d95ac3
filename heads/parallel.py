"""Run the heads' independent fits (outer folds, compare's candidates) side by side without
oversubscribing the cores, and tell the user how far a long run is.

On a busy machine the slow part of ``fit`` was not the maths but BLAS: OpenBLAS starts one
thread per core in every process and its threads spin while they wait for each other, so a
fit next to any other job ran 8-15x slower (117-216 s instead of 14 s on 2,059 x 1,280).
Here every fit runs with its BLAS/OpenMP pools capped (threadpoolctl): one thread per worker
when the cores are shared among workers, and the parallelism comes from whole fits running
in joblib worker processes, one per core at most. Small data stays in-process (starting
workers costs about a second, more than the fits themselves).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

#: Below this many rows the fits run in this process: worker start-up would cost more than they do.
PARALLEL_MIN_SAMPLES = 2000
#: Progress lines start once a run has taken this long (short runs stay silent).
PROGRESS_AFTER_S = 2.0


def cpu_cores() -> int:
    """Cores this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def plan_jobs(n_jobs: int | None, n_tasks: int, n_samples: int) -> int:
    """Worker processes for ``n_tasks`` independent fits on ``n_samples`` rows.

    ``n_jobs`` as the user gave it (-1 = every core), else one per core for large data and 1
    (in-process) below ``PARALLEL_MIN_SAMPLES``; never more than there are tasks.
    """
    if n_jobs is None:
        n_jobs = cpu_cores() if n_samples >= PARALLEL_MIN_SAMPLES else 1
    elif n_jobs < 0:
        n_jobs = max(1, cpu_cores() + 1 + n_jobs)  # joblib's convention: -1 all, -2 all but one
    return max(1, min(n_jobs, n_tasks))


@contextmanager
def capped_threads(n: int):
    """Cap BLAS and OpenMP thread pools of this process to ``n`` threads inside the block."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(n))):
        yield


def _call_capped(fn, threads, i, args):
    with capped_threads(threads):
        return i, fn(*args)


def run_tasks(fn, tasks: list[tuple], jobs: int, on_done=None) -> list:
    """``[fn(*args) for args in tasks]``, on ``jobs`` worker processes when ``jobs`` > 1.

    Each fit runs with its thread pools capped to ``cores // jobs`` (one thread on two cores),
    so workers never compete with each other's BLAS threads. ``on_done(i, result)`` is called
    in this process as each task finishes (in completion order); the returned list is in task
    order whatever the order of completion.
    """
    out = [None] * len(tasks)
    if jobs <= 1:
        with capped_threads(1):
            for i, args in enumerate(tasks):
                out[i] = fn(*args)
                if on_done:
                    on_done(i, out[i])
        return out
    from joblib import Parallel, delayed

    threads = max(1, cpu_cores() // jobs)
    results = Parallel(n_jobs=jobs, return_as="generator_unordered")(
        delayed(_call_capped)(fn, threads, i, args) for i, args in enumerate(tasks))
    for i, res in results:
        out[i] = res
        if on_done:
            on_done(i, res)
    return out


class Progress:
    """One line per finished step on stderr (``label: what (k/n, 12.3 s)``) once a run is long.

    Lines start after ``PROGRESS_AFTER_S``; stdout (and so ``--json``) is never touched.
    """

    def __init__(self, label: str, total: int, stream=None, after: float | None = None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.after = PROGRESS_AFTER_S if after is None else after
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        if elapsed >= self.after:
            print(f"{self.label}: {what} ({self.done}/{self.total}, {elapsed:.1f} s)", file=self.stream, flush=True)
