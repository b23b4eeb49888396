"""``cnnfast bench`` / ``python -m cnnfast.bench``: the command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from cnnfast import dispatch
from cnnfast._io import atomic_write
from cnnfast.bench.measuring import machine_threads
from cnnfast.bench.paths import PATHS
from cnnfast.bench.report import (
    UsageError,
    compare_reports,
    format_scaling,
    format_table,
    load_report,
    plot_scaling,
)
from cnnfast.bench.runner import Options, run_benchmarks
from cnnfast.bench.scaling import run_scaling
from cnnfast.bench.workloads import MODELS, OPS, SETS, ConvShape, all_shape_ids

QUICK_SHAPES = ("r18-28.stem", "r18-28.layer1", "r18-28.layer3.down", "r18-28.layer4.ds",
                "r18-64.layer3.ds", "r18-3d.layer4.down", "r18-28.act")
QUICK_MODELS = ("smallcnn", "resnet18")
_DESCRIPTION = ("Benchmark runner: every kernel path side by side with PyTorch, checked "
                "before it is timed.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnfast bench", description=_DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few representative shapes, SmallCNN and ResNet-18 steps, 3 repeats "
                        "(under two minutes on 2 cores)")
    p.add_argument("--paths", help=f"comma list of {', '.join(PATHS)} (default: all available)")
    p.add_argument("--ops", help=f"comma list of {', '.join(OPS)} (default: all)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: all; quick: "
                                    f"{', '.join(QUICK_MODELS)})")
    p.add_argument("--shapes", help=f"comma list of shape sets ({', '.join(SETS)}) or shape ids "
                                    "such as r18-28.layer1 or r18-3d.act (see --list)")
    p.add_argument("--list", action="store_true", help="list the shape ids and exit")
    p.add_argument("--repeats", type=int, help="timed repeats per candidate (default 5, quick 3; "
                                               "slow items get fewer unless this is given)")
    p.add_argument("--memory-steps", type=int,
                   help="SmallCNN steps for the memory-growth figure (default 200, quick 20; "
                        "0 skips it)")
    p.add_argument("--check-batch", help="batch of the correctness check: a number, or 'full' "
                                         "(default: full where the reference is cheap)")
    p.add_argument("--step-batch", type=int, help="override the batch of every training step")
    p.add_argument("--reference-all", action="store_true",
                   help="time the reference path on every shape and model")
    p.add_argument("--cuda-sim", action="store_true",
                   help="run the cuda path in Numba's simulator (no GPU), tiny shapes only")
    p.add_argument("--threads", type=int, help="threads for PyTorch and Numba "
                                               "(default: what the machine gives)")
    p.add_argument("--out", help="write the JSON report here (default: "
                                 "cnnfast-bench-<date>.json; '-' writes none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                   help="compare two JSON reports; exit 1 when a regression is flagged")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="--compare: slower by more than this fraction is a regression "
                        "(default 0.10)")
    p.add_argument("--scaling", action="store_true",
                   help="step time against batch, image size and threads for cpu and torch "
                        "(a reduced grid, bounded time; JSON and a PNG beside it)")
    p.add_argument("--scaling-full", action="store_true",
                   help="the whole scaling grid (batch 1-256, 2D 28-128, 3D 28-64; long)")
    p.add_argument("--in-process", action="store_true",
                   help="time every path in this one process instead of a worker process each "
                        "(their thread pools then compete: see benchmarks/README.md)")
    p.add_argument("--metric", choices=("median", "time_vs_torch", "vs_torch"), default="median",
                   help="--compare: median times, or each path's time relative to PyTorch in "
                        "the same run (time_vs_torch; vs_torch is an alias), robust to a machine "
                        "that got slower or busier")
    return p


def _choices(text: str | None, allowed: Sequence[str], what: str,
             aliases: dict | None = None) -> tuple[str, ...] | None:
    if text is None:
        return None
    chosen = []
    for name in (t.strip() for t in text.split(",")):
        name = (aliases or {}).get(name, name)
        if name not in allowed:
            raise UsageError(f"unknown {what} {name!r} (choose from {', '.join(allowed)})")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise UsageError(f"--{what}s is empty")
    return tuple(chosen)


def options_from_args(args: argparse.Namespace) -> Options:
    paths = _choices(args.paths, PATHS, "path") or PATHS
    ops = _choices(args.ops, OPS, "op", {"relu": "relu", "batchnorm": "bn", "train": "step",
                                          "pooling": "pool"}) or OPS
    models = _choices(args.models, MODELS, "model", {"resnet18-3d": "resnet18_3d"})
    known = all_shape_ids()
    if args.shapes:
        shape_ids: list[str] = []
        for name in (s.strip() for s in args.shapes.split(",")):
            if name in SETS:
                shape_ids += [i for i, s in known.items() if s == name]
            elif name in known:
                shape_ids.append(name)
            else:
                raise UsageError(f"unknown shape {name!r} (a set: {', '.join(SETS)}, or an id "
                                 "from --list)")
    elif args.quick:
        shape_ids = list(QUICK_SHAPES)
    else:
        shape_ids = [i for i, s in known.items() if s != "tiny"]
    if args.cuda_sim and not args.shapes:
        shape_ids += [i for i, s in known.items() if s == "tiny"]
    for name, value in (("--repeats", args.repeats), ("--memory-steps", args.memory_steps),
                        ("--step-batch", args.step_batch), ("--threads", args.threads)):
        if value is not None and value < (0 if name == "--memory-steps" else 1):
            raise UsageError(f"{name} must be a positive number, got {value}")
    check_batch = None
    if args.check_batch is not None:
        if args.check_batch == "full":
            check_batch = 0
        elif args.check_batch.isdigit() and int(args.check_batch) >= 1:
            check_batch = int(args.check_batch)
        else:
            raise UsageError(f"--check-batch must be a positive number or 'full', "
                             f"got {args.check_batch!r}")
    if args.step_batch is not None and args.step_batch < 2:
        raise UsageError("--step-batch must be at least 2 (batch norm needs two samples)")
    quick = args.quick
    return Options(
        quick=quick, paths=paths, ops=ops,
        models=models or (QUICK_MODELS if quick else MODELS),
        shapes=tuple(dict.fromkeys(shape_ids)),
        repeats=args.repeats,
        memory_steps=(args.memory_steps if args.memory_steps is not None
                      else (20 if quick else 200)),
        cuda_sim=args.cuda_sim,
        threads=args.threads or machine_threads(),
        check_batch=check_batch, step_batch=args.step_batch,
        reference_all=args.reference_all, progress=not args.no_progress,
        out=args.out, item_budget_s=6.0 if quick else 20.0,
        isolation="in-process" if args.in_process else "process",
    )


def _enable_simulator() -> None:
    """Set NUMBA_ENABLE_CUDASIM before Numba loads; refuse when it already loaded without it."""
    if dispatch.cuda_simulated():
        return
    if "numba" in sys.modules:
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise UsageError("--cuda-sim must be given before Numba is imported in this process "
                             "(set NUMBA_ENABLE_CUDASIM=1 instead)")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def _default_out() -> str:
    return f"cnnfast-bench-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"


def main(argv: list[str] | None = None) -> int:
    """``cnnfast bench``: run the benchmarks (or ``--compare`` two reports). Returns the exit code:
    0 ok, 1 a regression flagged by ``--compare``, 2 bad input."""
    try:
        args = parser().parse_args(argv)
        if args.compare:
            old, new = (load_report(p) for p in args.compare)
            if args.threshold < 0:
                raise UsageError(f"--threshold must be >= 0, got {args.threshold}")
            regressions, text = compare_reports(old, new, args.threshold, args.metric)
            print(text)
            return 1 if regressions else 0
        if args.list:
            for shape_id, set_name in all_shape_ids().items():
                print(f"{set_name:<8} {shape_id}")
            return 0
        if args.scaling or args.scaling_full:
            return _scaling(args)
        options = options_from_args(args)
        if options.cuda_sim:
            _enable_simulator()
        out = options.out or _default_out()
        if out != "-":
            parent = os.path.dirname(os.path.abspath(out))
            if not os.path.isdir(parent):
                raise UsageError(f"--out: directory {parent} does not exist")
    except UsageError as e:
        print(f"cnnfast bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help
        return int(e.code or 0)
    report = run_benchmarks(options)
    print(format_table(report))
    if out != "-":
        with atomic_write(out, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        print(f"report written to {out}")
    return 0


def _scaling(args) -> int:
    """``--scaling``: run the sweep, print it, write the JSON and the PNG."""
    paths = _choices(args.paths, ("reference", "cpu", "torch"), "path") or ("cpu", "torch")
    models = _choices(args.models, MODELS, "model", {"resnet18-3d": "resnet18_3d"}) or MODELS
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be a positive number, got {args.repeats}")
    out = args.out or f"cnnfast-scaling-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    if out != "-" and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UsageError(f"--out: directory {os.path.dirname(os.path.abspath(out))} does not "
                         "exist")

    def progress(i, total, point):
        if not args.no_progress:
            shape = "x".join(map(str, point.spec.input_shape[1:]))
            print(f"[{i + 1}/{total}] {point.spec.name} {point.sweep} {shape} batch "
                  f"{point.spec.batch} threads {point.threads}", file=sys.stderr, flush=True)

    report = run_scaling(models, paths, full=args.scaling_full, repeats=args.repeats or 3,
                         threads=args.threads or 0,
                         isolation="in-process" if args.in_process else "process",
                         progress=progress)
    print(format_scaling(report))
    if out != "-":
        with atomic_write(out, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        png = os.path.splitext(out)[0] + ".png"
        plot_scaling(report, png)
        print(f"report written to {out}, plot to {png}")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, ConvShape):
        return asdict(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")

