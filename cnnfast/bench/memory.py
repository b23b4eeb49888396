"""Memory: the RSS peak of one training step and the RSS growth over many steps."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc

from cnnfast.bench.trainers import Trainer


def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssSampler:
    """Samples the RSS every millisecond in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


MB = 1024 * 1024


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that the RSS
    before a step is what is live, not what earlier steps left cached; a no-op elsewhere."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_step_memory(trainer: Trainer, numpy_path: bool) -> dict:
    """Peak memory of one step: RSS above the level before the step (sampled every ms, after
    :func:`release_free_memory`), and for NumPy paths also tracemalloc's peak of traced (NumPy)
    allocations above the level before."""
    release_free_memory()
    out = {}
    if numpy_path:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    try:
        with RssSampler() as sampler:
            trainer.step()
        out["peak_rss_mb"] = (sampler.peak - sampler.start) / MB
        if numpy_path:
            out["peak_traced_mb"] = (tracemalloc.get_traced_memory()[1] - base) / MB
    finally:
        if numpy_path:
            tracemalloc.stop()
    return out


def measure_growth(trainer: Trainer, steps: int, settle: int = 3) -> dict:
    """RSS growth over ``steps`` steps after ``settle`` steps (allocator pools filled)."""
    for _ in range(settle):
        trainer.step()
    release_free_memory()
    before = rss_bytes()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    release_free_memory()
    return {"steps": steps, "growth_mb": (rss_bytes() - before) / MB,
            "rss_mb": rss_bytes() / MB, "seconds": time.perf_counter() - start}

