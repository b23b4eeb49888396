"""Timing: samples with the garbage collector paused, inner loops for short calls, and the
round-robin that alternates candidates so that load that comes and goes hits all alike."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cnnfast.bench.machine import OthersBusy, load_average

MIN_SAMPLE_S = 0.02                       # shorter calls are looped to this length per sample


def _timed(fn: Callable, sync: Callable, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (run ``inner`` times), with the garbage collector paused."""
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


def _stats(times: list[float]) -> dict:
    if not times:
        return {}
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "min_s": ts[0],
            "max_s": ts[-1]}


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
    every repeat so that drift in the machine's load hits every entry alike."""
    rounds = max((e.repeats for e in entries), default=0)
    pids = {getattr(e.executor, "pid", os.getpid()) for e in entries}
    with OthersBusy(pids) as others:
        for r in range(rounds):
            shift = r % max(len(entries), 1)
            for e in entries[shift:] + entries[:shift]:
                if len(e.times) < e.repeats:
                    e.times.append(e.executor.sample(e.key, e.inner))
    load = load_average()
    for e in entries:
        e.row.update(_stats(e.times))
        e.row["load_1m"] = load
        e.row["others_busy"] = others.cores
        e.row["times_s"] = e.times
        e.row["repeats"] = len(e.times)
        e.row["inner_loops"] = e.inner

