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
import math
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

from cnnfast.bench.candidates import KernelCandidate, TorchCandidate
from cnnfast.bench.executor import LocalExecutor, WorkerExecutor
from cnnfast.bench.machine import OthersBusy, machine_info, machine_threads, versions
from cnnfast.bench.shapes import IN_CHANNELS
from cnnfast.bench.workloads import ModelSpec

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


def _stats(times: list[float]) -> dict:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "min_s": ts[0],
            "times_s": times}


def run_scaling(models=("smallcnn", "resnet18", "resnet18_3d"), paths=("cpu", "torch"),
                full: bool = False, repeats: int = 3, threads: int = 0, seed: int = 0,
                isolation: str = "process", progress=None) -> dict:
    """Time every point of the grid on every path; returns the report (JSON-ready)."""
    threads = threads or machine_threads()
    points = scaling_points(models, full, threads)
    started = _dt.datetime.now().astimezone()
    machine = machine_info(SimpleNamespace(threads=threads))
    execs: dict[tuple[str, int], LocalExecutor | WorkerExecutor] = {}
    unavailable: dict[str, str] = {}
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        for path in paths:
            for n in sorted({p.threads for p in points}):
                cand = TorchCandidate(path) if path in ("torch", "cudnn") else KernelCandidate(path)
                ex = (LocalExecutor(cand) if isolation == "in-process" else WorkerExecutor(cand))
                execs[(path, n)] = ex
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
    _ratios(rows)
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
            active.append((ex, key, row, []))
        except Exception as e:  # noqa: BLE001 - one failing point must not stop the sweep
            row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
    pids = {getattr(ex, "pid", 0) for ex, _, _, _ in active}
    with OthersBusy(pids) as others:
        for r in range(repeats):
            shift = r % max(len(active), 1)
            for ex, key, row, times in active[shift:] + active[:shift]:
                try:
                    times.append(ex.sample(key, 1))
                except Exception as e:  # noqa: BLE001
                    row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
    for ex, key, row, times in active:
        if times and row["status"] != "ERROR":
            row.update(_stats(times), status="ok", others_busy=others.cores)
        try:
            ex.release(key)
        except Exception:  # noqa: BLE001 - a dead worker: its row already says so
            pass
    return rows


def _ratios(rows: list[dict]) -> None:
    """time_vs_torch = t_path / t_torch at the same point (< 1: faster than PyTorch)."""
    def key(r):
        return (r["sweep"], r["model"], r["size"], r["batch"], r["threads"])

    torch = {key(r): r["median_s"] for r in rows if r["path"] == "torch" and r["median_s"]}
    for r in rows:
        t = torch.get(key(r))
        if r["median_s"] and t:
            r["time_vs_torch"] = r["median_s"] / t


def format_scaling(report: dict) -> str:
    repeats = report["options"]["repeats"]
    lines = [f"cnnfast bench --scaling  {report['created']}  (median of {repeats} alternating "
             "steps; time/torch < 1: faster than PyTorch)",
             f"{'model':<12} {'sweep':<8} {'shape':<14} {'batch':>5} {'thr':>3}  "
             f"{'path':<6} {'step':>10} {'per sample':>11} {'time/torch':>10}"]
    for r in report["points"]:
        shape = "x".join(map(str, r["input_shape"][1:]))
        if r["status"] != "ok":
            lines.append(f"{r['model']:<12} {r['sweep']:<8} {shape:<14} {r['batch']:>5} "
                         f"{r['threads']:>3}  {r['path']:<6} {r['status']} {r['reason']}")
            continue
        ratio = "-" if r["time_vs_torch"] is None else f"{r['time_vs_torch']:.2f}"
        lines.append(f"{r['model']:<12} {r['sweep']:<8} {shape:<14} {r['batch']:>5} "
                     f"{r['threads']:>3}  {r['path']:<6} {r['median_s'] * 1e3:>8.1f}ms "
                     f"{r['median_s'] * 1e3 / r['batch']:>9.2f}ms {ratio:>10}")
    lines.append(f"wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


def plot_scaling(report: dict, path: str) -> None:
    """A PNG: one panel per (model, sweep), step time (batch sweep: per sample) per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnfast._io import atomic_write

    panels = sorted({(r["model"], r["sweep"]) for r in report["points"]})
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (model, sweep) in zip(axes.flat, panels):
        pts = [r for r in report["points"] if r["model"] == model and r["sweep"] == sweep
               and r["status"] == "ok"]
        xname = {"batch": "batch", "size": "size", "threads": "threads"}[sweep]
        for p in sorted({r["path"] for r in pts}):
            mine = sorted((r for r in pts if r["path"] == p), key=lambda r: r[xname])
            ys = [r["median_s"] * 1e3 / (r["batch"] if sweep == "batch" else 1) for r in mine]
            ax.plot([r[xname] for r in mine], ys, marker="o", label=p)
        ax.set_title(f"{model}: {sweep}")
        ax.set_xlabel(xname)
        ax.set_ylabel("ms per sample" if sweep == "batch" else "ms per step")
        if sweep in ("batch", "size"):
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"training-step scaling, {report['machine'].get('cpu')}")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
