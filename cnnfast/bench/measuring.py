"""Measuring: the one timer, the memory of a training step, and the machine the figures come from.

:func:`benchmark` is the timer everything uses (the runner, the pytest-benchmark suites,
``benchmarks/gpu_check.py``), modelled on CuPy's ``cupyx.profiler.benchmark``: untimed warm-up
calls, then for each repeat the host (wall) time and, on a GPU, the CUDA-event time between two
events recorded around the call. The runner takes one sample at a time (:func:`time_call`) so
that it can alternate candidates sample by sample (:func:`round_robin`): load that comes and
goes on the machine then hits them all alike.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import cnnfast
from cnnfast import dispatch

MIN_SAMPLE_S = 0.02                       # shorter calls are looped to this length per sample


# --- the timer ------------------------------------------------------------------------------------

def _nothing() -> None:
    pass


def time_call(fn: Callable, sync: Callable = _nothing, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (run ``inner`` times, then ``sync()``: the wait for a GPU),
    with the garbage collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        return (time.perf_counter() - start) / inner
    finally:
        if enabled:
            gc.enable()


def _cuda_events(kind: str):
    """(start event, stop event, seconds between them) for ``kind`` "cupy" or "torch"."""
    if kind == "cupy":
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        return start, stop, lambda: cupy.cuda.get_elapsed_time(start, stop) / 1e3
    if kind == "torch":
        import torch

        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        return start, stop, lambda: start.elapsed_time(stop) / 1e3
    raise ValueError(f"events must be None, 'cupy' or 'torch', got {kind!r}")


@dataclass
class Timing:
    """What :func:`benchmark` measured: per repeat, seconds per call on the host clock (the call
    and ``sync``) and, with CUDA events, on the GPU's clock (``None`` without)."""

    cpu_times: list[float]
    gpu_times: list[float] | None = None

    @property
    def times(self) -> list[float]:
        """The GPU times where there are any, else the host times."""
        return self.gpu_times if self.gpu_times is not None else self.cpu_times

    def stats(self) -> dict:
        return summarize(self.times)


def benchmark(fn: Callable, *, repeats: int = 5, warmup: int = 1, inner: int = 1,
              sync: Callable = _nothing, events: str | None = None,
              max_duration: float = math.inf, min_repeats: int = 1) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` samples of ``inner`` calls each,
    the garbage collector paused during each sample. ``sync`` waits for queued GPU work (it is
    part of the host time); ``events`` ("cupy" or "torch") also records a CUDA event before and
    after each sample, whose difference is the GPU time (``cupyx.profiler.benchmark``'s
    ``gpu_times``). As there, ``max_duration`` (seconds) stops early once the samples taken (at
    least ``min_repeats``) add up to more."""
    if repeats < 1 or warmup < 0 or inner < 1 or not 1 <= min_repeats:
        raise ValueError(f"benchmark needs repeats >= 1, warmup >= 0, inner >= 1 and "
                         f"min_repeats >= 1, got {repeats}, {warmup}, {inner}, {min_repeats}")
    for _ in range(warmup):
        fn()
    sync()
    timing = Timing([], [] if events else None)
    while len(timing.cpu_times) < repeats:
        if events:
            start, stop, elapsed = _cuda_events(events)
            start.record()
            timing.cpu_times.append(time_call(fn, sync, inner))
            stop.record()
            stop.synchronize()
            timing.gpu_times.append(elapsed() / inner)
        else:
            timing.cpu_times.append(time_call(fn, sync, inner))
        taken = timing.times
        if len(taken) >= min_repeats and sum(taken) * inner > max_duration:
            break
    return timing


def summarize(times: list[float]) -> dict:
    """Median, interquartile range, min and max of ``times`` (seconds); {} for none."""
    if not times:
        return {}
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "min_s": ts[0],
            "max_s": ts[-1]}


def add_ratios(rows: list[dict], same_point: Callable[[dict], object],
               peer_of: Callable[[str], str], ratios: dict[str, str]) -> None:
    """For each row, ``row[ratio] = row[field] / peer[field]`` for every ``field: ratio`` of
    ``ratios``, the peer being the row of path ``peer_of(row["path"])`` at the same point
    (rows with equal ``same_point(row)``); left as it is where either figure is missing."""
    points: dict[object, dict[str, dict]] = {}
    for row in rows:
        points.setdefault(same_point(row), {})[row["path"]] = row
    for by_path in points.values():
        for path, row in by_path.items():
            peer = by_path.get(peer_of(path))
            for name, ratio in ratios.items():
                if peer and row.get(name) and peer.get(name):
                    row[ratio] = row[name] / peer[name]


# --- alternating samples --------------------------------------------------------------------------

@dataclass
class Entry:
    """One candidate being timed on one item: ``executor.sample(key, inner)`` gives one
    sample (seconds per call) of the work ``key`` prepared in that executor."""

    executor: object
    key: str
    row: dict
    repeats: int = 0
    inner: int = 1
    times: list = field(default_factory=list)


def inner_loops(call_s: float) -> int:
    """Calls per sample so that a sample lasts about MIN_SAMPLE_S."""
    if call_s >= MIN_SAMPLE_S:
        return 1
    return max(1, min(1000, int(MIN_SAMPLE_S / max(call_s, 1e-7))))


def round_robin(entries: list[Entry]) -> None:
    """Time the (warmed-up) entries in turn, ``e.repeats`` samples each, rotating the order
    every repeat so that drift in the machine's load hits every entry alike; then write each
    entry's figures (:func:`summarize`, the load, the others' CPU use) into its row. An entry
    whose sample raises (a worker that died) stops there, its row an ERROR; the others go on."""
    rounds = max((e.repeats for e in entries), default=0)
    pids = {getattr(e.executor, "pid", os.getpid()) for e in entries}
    failed: dict[int, str] = {}
    with OthersBusy(pids) as others:
        for r in range(rounds):
            shift = r % max(len(entries), 1)
            for e in entries[shift:] + entries[:shift]:
                if id(e) in failed or len(e.times) >= e.repeats:
                    continue
                try:
                    e.times.append(e.executor.sample(e.key, e.inner))
                except Exception as ex:  # noqa: BLE001 - reported in the row
                    failed[id(e)] = f"{type(ex).__name__}: {ex}"
    load = load_average()
    for e in entries:
        if id(e) in failed:
            e.row["status"], e.row["reason"] = "ERROR", failed[id(e)]
            continue
        e.row.update(summarize(e.times))
        e.row["load_1m"] = load
        e.row["others_busy"] = others.cores
        e.row["times_s"] = e.times
        e.row["repeats"] = len(e.times)
        e.row["inner_loops"] = e.inner


# --- memory ---------------------------------------------------------------------------------------

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


def measure_step_memory(trainer, numpy_path: bool) -> dict:
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


def measure_growth(trainer, steps: int, settle: int = 3) -> dict:
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


# --- the machine ----------------------------------------------------------------------------------

def cpu_busy(seconds: float = 1.0) -> float | None:
    """Cores' worth of CPU time that ran (anything but idle and I/O wait) during ``seconds``,
    from /proc/stat; called while this process sleeps, it is what other processes used. None
    where /proc/stat is missing. Unlike the load average, it is not raised by kernel threads that
    wait uninterruptibly without using a CPU (a VM can show a load of 1 while idle)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = total1 - total0
    if ticks <= 0:
        return None
    return (os.cpu_count() or 1) * (ticks - (idle1 - idle0)) / ticks


def _stat_ticks() -> tuple[int, int]:
    """(all ticks, busy ticks) of every CPU so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), sum(fields[:8]) - idle


def _process_ticks(pid: int) -> int:
    """User + system clock ticks a process has used (its own threads; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


class OthersBusy:
    """Cores' worth of CPU that other processes used while the block ran: all busy time in
    /proc/stat minus what the processes ``pids`` (this one and the workers being timed) used.
    ``cores`` stays None where /proc is missing."""

    def __init__(self, pids):
        self.pids = set(pids) | {os.getpid()}
        self.cores: float | None = None

    def _snapshot(self):
        total, busy = _stat_ticks()
        return total, busy, sum(_process_ticks(p) for p in self.pids)

    def __enter__(self):
        try:
            self._start = self._snapshot()
        except (OSError, ValueError, IndexError):
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return
        try:
            total, busy, own = (b - a for a, b in zip(self._start, self._snapshot()))
        except (OSError, ValueError, IndexError):
            return
        if total > 0:
            self.cores = max(0.0, (os.cpu_count() or 1) * (busy - own) / total)


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if dispatch.cuda_simulated():
        return None
    if dispatch.gpu_present():
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - report what can be found
            return "CUDA GPU"
    torch = sys.modules.get("torch")   # only when a torch candidate loaded it
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def versions() -> dict:
    """Versions of Python and the libraries, from package metadata (nothing heavy is imported)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "cnnfast": cnnfast.__version__}
    for name, dists in (("numba", ("numba",)), ("torch", ("torch",)),
                        ("cupy", ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x"))):
        out[name] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def machine_info(threads: int) -> dict:
    """The machine a report was measured on (``threads``: what the run uses) and its load now."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads_available": machine_threads(),
        "threads_used": threads,
        "platform": platform.platform(),
        "gpu": gpu_name(),
        "cuda_simulator": dispatch.cuda_simulated(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_start"] = os.getloadavg()
    info["cpu_busy_start"] = cpu_busy()
    return info


def blas_info() -> list[dict]:
    """The BLAS libraries loaded here and the kernels they chose (threadpoolctl, where
    installed): {library, version, architecture, threads}."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"library": i.get("internal_api"), "version": i.get("version"),
             "architecture": i.get("architecture"), "threads": i.get("num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
