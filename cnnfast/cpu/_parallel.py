"""How the fast CPU kernels use the cores: one small thread pool, and single-threaded BLAS.

Every kernel of :mod:`cnnfast.cpu` is a serial ``@njit(nogil=True)`` loop over a range of
independent tasks (output planes, channels, column-matrix chunks); :func:`parallel_for` splits
the tasks into one contiguous range per thread and runs the ranges on this pool, the calling
thread taking the first. A convolution chunk runs its gather and its matrix product (BLAS, one
thread) on the same thread, so each core works through its own chunks out of its own cache.

Why not ``@njit(parallel=True)`` plus multi-threaded BLAS: both keep their idle workers spinning
for milliseconds after each call (Numba's OpenMP layer, OpenBLAS's server threads), and a
training step alternates between them hundreds of times, so each ran with a spinning thread
stealing a core from it (measured on 2 cores: a BLAS product right after a 0.1 ms Numba
parallel loop took 1.8x as long). Threads of this pool block when idle, and BLAS is held to one
thread while a kernel runs (restored afterwards), so nothing spins.

Determinism: a task range depends only on the task count and the thread count, each task is
computed by one thread in a fixed order, and partial sums are combined in range order, so the
same inputs give the same bits on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numba

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def num_threads() -> int:
    """Threads the kernels use: NUMBA_NUM_THREADS (default: the CPUs this process may use)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(int(numba.config.NUMBA_NUM_THREADS), available))


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnfast-cpu")
            _pool_size = workers
        return _pool


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` tasks as at most ``parts`` contiguous, non-empty, nearly equal [start, stop)."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    ranges = []
    start = 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def run_all(jobs: Sequence[Callable[[], object]]) -> list:
    """Run the jobs concurrently (the calling thread runs the first); results in job order."""
    if len(jobs) == 1:
        return [jobs[0]()]
    pool = _executor(len(jobs) - 1)
    futures = [pool.submit(job) for job in jobs[1:]]
    try:
        first = jobs[0]()
    finally:
        rest = [f.result() for f in futures]
    return [first] + rest


def parallel_for(body: Callable[[int, int], object], count: int, min_per_thread: int = 1,
                 threads: int | None = None) -> list:
    """Call ``body(start, stop)`` on contiguous ranges covering ``range(count)``, one per thread.

    Uses at most ``count // min_per_thread`` threads, so small jobs stay on the calling thread.
    Returns the bodies' results in range order (for partial sums combined in a fixed order).
    """
    if count <= 0:
        return []
    threads = num_threads() if threads is None else threads
    parts = max(1, min(threads, count // max(1, min_per_thread)))
    ranges = split(count, parts)
    return run_all([lambda r=r: body(*r) for r in ranges])


# --- BLAS threads ---------------------------------------------------------------------------------

_blas_controllers: list | None = None
_blas_depth = 0
_blas_saved: list[int] = []


def _controllers() -> list:
    global _blas_controllers
    if _blas_controllers is None:
        try:
            from threadpoolctl import ThreadpoolController

            found = ThreadpoolController().select(user_api="blas").lib_controllers
            _blas_controllers = [c for c in found if hasattr(c, "set_num_threads")]
        except (ImportError, OSError, AttributeError, ValueError, RuntimeError):
            # threadpoolctl missing, or unable to inspect this BLAS: leave its threads alone
            _blas_controllers = []
    return _blas_controllers


@contextlib.contextmanager
def single_threaded_blas():
    """Hold every BLAS that NumPy may call to one thread inside the block (nestable,
    thread-safe); the previous thread counts come back when the outermost block exits."""
    global _blas_depth, _blas_saved
    with _lock:
        if _blas_depth == 0:
            _blas_saved = []
            for c in _controllers():
                _blas_saved.append(c.get_num_threads())
                if _blas_saved[-1] != 1:
                    c.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for c, n in zip(_controllers(), _blas_saved):
                    if n != 1:
                        c.set_num_threads(n)
