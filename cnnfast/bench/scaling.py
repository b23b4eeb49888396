"""Scaling: training-step time against batch size, image size and threads, for cnnfast's fast
path and PyTorch, each in worker processes of its own; a JSON report and a PNG.

``cnnfast bench --scaling`` runs a reduced grid in bounded time; ``--scaling-full`` the whole
one (batch 1-256, 2D images 28-128, 3D volumes 28-64, 1 and 2 threads). Three sweeps per model,
each varying one thing from the model's base point:

- ``batch``: the batch at the base image size (28; 3D 28^3),
- ``size``: the image size at a small batch (ResNet-18 switches to the ImageNet stem, 7x7
  stride 2 and a max pool, above 28 pixels, as MedMNIST+ does),
- ``threads``: 1 and 2 threads at the base point.

The steps are not checked here: the main run checks the same models (``--ops step``). Each
(path, threads) pair has its own worker; the paths alternate sample by sample at every point.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass

from cnnfast.bench.executor import LocalExecutor, WorkerExecutor
from cnnfast.bench.measuring import (
    Entry,
    add_ratios,
    machine_info,
    machine_threads,
    round_robin,
    versions,
)
from cnnfast.bench.runner import make_candidate, make_executor
from cnnfast.bench.workloads import IN_CHANNELS, ModelSpec

SCALING_SCHEMA = "cnnfast-bench-scaling/1"
# model -> (base batch, base size, batches, sizes, thread sweep?)
REDUCED_GRID = {
    "smallcnn": (64, 28, (1, 16, 64, 256), (28, 64, 128), True),
    "resnet18": (32, 28, (1, 8, 32), (28, 64, 128), True),
    "resnet18_3d": (8, 28, (1, 2, 8), (28,), False),
}
FULL_GRID = {
    "smallcnn": (64, 28, (1, 4, 16, 64, 256), (28, 64, 128), True),
    "resnet18": (32, 28, (1, 4, 16, 64, 128, 256), (28, 64, 128), True),
    "resnet18_3d": (8, 28, (1, 2, 4, 8, 16), (28, 48, 64), True),
}
SIZE_SWEEP_BATCH = {"smallcnn": 16, "resnet18": 8, "resnet18_3d": 1}


@dataclass(frozen=True)
class Point:
    sweep: str          # batch, size or threads
    spec: ModelSpec
    threads: int


def _spec(model: str, size: int, batch: int) -> ModelSpec:
    nd = 3 if model == "resnet18_3d" else 2
    stem = "imagenet" if model != "smallcnn" and size > 28 else "small"
    return ModelSpec(model, (IN_CHANNELS,) + (size,) * nd, batch, min(batch, 2), stem)


def scaling_points(models, full: bool = False, threads: int = 2) -> list[Point]:
    """The grid's points, base points once per sweep they belong to."""
    grid = FULL_GRID if full else REDUCED_GRID
    points = []
    for model in models:
        base_batch, base_size, batches, sizes, sweep_threads = grid[model]
        points += [Point("batch", _spec(model, base_size, b), threads) for b in batches]
        points += [Point("size", _spec(model, s, SIZE_SWEEP_BATCH[model]), threads)
                   for s in sizes]
        if sweep_threads:
            points += [Point("threads", _spec(model, base_size, base_batch), t)
                       for t in sorted({1, threads})]
    return points


def run_scaling(models=("smallcnn", "resnet18", "resnet18_3d"), paths=("cpu", "torch"),
                full: bool = False, repeats: int = 3, threads: int = 0, seed: int = 0,
                isolation: str = "process", progress=None) -> dict:
    """Time every point of the grid on every path; returns the report (JSON-ready)."""
    threads = threads or machine_threads()
    points = scaling_points(models, full, threads)
    started = _dt.datetime.now().astimezone()
    machine = machine_info(threads)
    execs: dict[tuple[str, int], LocalExecutor | WorkerExecutor] = {}
    unavailable: dict[str, str] = {}
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        for path in paths:
            for n in sorted({p.threads for p in points}):
                ex = execs[(path, n)] = make_executor(make_candidate(path), isolation)
                reason, _, _ = ex.start(n)
                if reason:
                    unavailable[path] = reason
        for i, point in enumerate(points):
            if progress:
                progress(i, len(points), point)
            rows += _time_point(point, paths, execs, unavailable, repeats, seed)
    finally:
        for ex in execs.values():
            ex.close()
    add_ratios(rows, lambda r: (r["sweep"], r["model"], r["size"], r["batch"], r["threads"]),
               lambda path: "torch", {"median_s": "time_vs_torch"})
    return {"schema": SCALING_SCHEMA, "created": started.isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - t0, "machine": machine, "versions": versions(),
            "options": {"models": list(models), "paths": list(paths), "full": full,
                        "repeats": repeats, "threads": threads, "isolation": isolation},
            "unavailable": unavailable, "points": rows}


def _time_point(point: Point, paths, execs, unavailable, repeats: int, seed: int) -> list[dict]:
    spec = point.spec
    rows, active = [], []
    for path in paths:
        row = {"sweep": point.sweep, "model": spec.name, "input_shape": list(spec.input_shape),
               "size": spec.input_shape[1], "batch": spec.batch, "stem": spec.stem,
               "threads": point.threads, "path": path, "status": "skipped", "reason": None,
               "median_s": None, "time_vs_torch": None}
        rows.append(row)
        if path in unavailable:
            row["reason"] = unavailable[path]
            continue
        ex = execs[(path, point.threads)]
        try:
            key = ex.prepare_unchecked(spec, seed)
            row["warmup_s"] = ex.sample(key, 1)
            active.append(Entry(ex, key, row, repeats=repeats))
        except Exception as e:  # noqa: BLE001 - one failing point must not stop the sweep
            row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
    round_robin(active)
    for e in active:
        if e.row["status"] != "ERROR":
            e.row["status"] = "ok"
        try:
            e.executor.release(e.key)
        except Exception:  # noqa: BLE001 - a dead worker: its row already says so
            pass
    return rows
