"""Benchmark runner: every kernel path side by side with PyTorch, checked before it is timed.

    python -m cnnfast.bench --quick                 # a few representative shapes, < 2 minutes
    python -m cnnfast.bench --out results.json      # the full suite
    python -m cnnfast.bench --compare old.json new.json --threshold 0.10

What it measures
================
- ``conv``: forward, backward-data and backward-weight on the unique convolution shapes of
  ResNet-18 with a 3x3 stride-1 stem (no max pool): 2D at 28 and 64 pixels (batch 32) and 3D at
  28^3 (batch 8). Shape sets ``r18-28``, ``r18-64``, ``r18-3d``; ``tiny`` holds toy shapes for
  the CUDA simulator and for tests.
- ``pool`` (max 3x3/2 pad 1, average 2x2/2), ``relu`` and ``bn`` (training-mode batch norm),
  forward and backward, on the first-stage activation of each shape set (``<set>.act``).
- ``step``: one training step (forward, cross-entropy loss, backward, SGD momentum step) of
  SmallCNN (batch 64, 1x28x28), ResNet-18 (batch 32, 1x28x28) and 3D ResNet-18 (batch 8,
  1x28^3), with the peak memory of one step and the memory growth over ``--memory-steps``
  SmallCNN steps.

Candidates ("paths"): ``reference`` (NumPy oracle), ``cpu`` (Numba/BLAS), ``cuda`` (a GPU through
CuPy, or Numba's simulator with ``--cuda-sim`` on the ``tiny`` shapes only), and PyTorch as the
peer users would otherwise pick: ``torch`` (CPU, with ``torch.set_num_threads`` set to the
threads this machine gives) and ``cudnn`` (PyTorch on the GPU).

How it measures
===============
0. Each candidate runs in a worker process of its own (:mod:`cnnfast.bench.executor`), as users
   run one library per process; ``--in-process`` runs them all here instead.
1. Correctness first: each candidate runs the op (or a step's forward and backward) in float64
   and in float32, and both results (every output, or the loss and every parameter gradient) are
   compared with the reference computed in float64 (:mod:`cnnfast.bench.checks`): float64 within
   1e-9 (gradients 1e-8), float32 within 16 times the reference's own float32 error, at least
   1e-4 for ops, 1e-5 for the loss and 0.1 for gradients (ReLU masks flip near zero in float32).
   A candidate that differs is reported as WRONG and not timed; one that raises as ERROR. Where
   the reference would take long (big 3D shapes, the ResNet steps) the check runs on a smaller
   batch of the same shape; the table says so (``ok@2`` = checked at batch 2).
2. The check's first float32 call is the candidate's first call of the op: its wall time
   ("1st") includes any JIT compilation and is reported apart from the timings.
3. One more untimed warm-up call at the timed shape, then ``repeats`` timed calls per candidate,
   alternating (the candidate order rotates every repeat), so drift from other load on the
   machine hits all candidates alike. GPU work is synchronised before the clock stops. Calls
   shorter than 20 ms are repeated in an inner loop and averaged. Without ``--repeats``, items
   slower than the per-item budget get fewer repeats (at least 3; 2 in quick mode).
4. Reported: median, IQR and min of the repeats, GFLOP/s (convolutions and steps), the time
   ratio to PyTorch on the same kind of device, ``time_vs_torch = t_path / t_torch`` (< 1:
   faster than PyTorch), and the CPU other processes used while each item was timed.

The reference path is slow: it is timed only on the ``r18-28`` and ``tiny`` shapes and the
SmallCNN step, with at most 3 repeats (2 in quick mode; ``--reference-all`` times it
everywhere); it is always run as the oracle.

Memory: the peak of one training step is the RSS high-water above the level before the step
(sampled every millisecond after returning free heap pages to the OS), plus, for the NumPy paths,
tracemalloc's peak of traced allocations; the growth is the RSS after ``--memory-steps`` SmallCNN
steps minus before them, in MB.

FLOPs: convolution (each of the three passes) ``2 * N * K * prod(O) * (C / groups) * prod(KS)``;
a training step counts its convolutions and linear layers: 3x the forward (2x for a layer whose
input needs no gradient).

Modules, one idea each (each imports only those above it):
:mod:`~cnnfast.bench.workloads` (shapes, op items, model specs), :mod:`~cnnfast.bench.paths` (the
candidates under test, their trainers, the PyTorch mirror), :mod:`~cnnfast.bench.measuring` (the
one timer, memory, the machine), :mod:`~cnnfast.bench.executor` (a candidate in this process or
a worker of its own), :mod:`~cnnfast.bench.checks` (the one error measure, the correctness gate),
:mod:`~cnnfast.bench.report` (tables, ``--compare``, plots), :mod:`~cnnfast.bench.runner` (the
run), :mod:`~cnnfast.bench.scaling` (the scaling sweep), :mod:`~cnnfast.bench.cli`. This module
holds the public API alone.
"""

from __future__ import annotations

from cnnfast.bench.checks import (
    CheckFailed,
    check_batch_for,
    check_op,
    check_step,
    checked_op,
    checked_step,
    reference_timed,
    relative_error,
)
from cnnfast.bench.cli import QUICK_MODELS, QUICK_SHAPES, main, options_from_args
from cnnfast.bench.executor import LocalExecutor, WorkerError, WorkerExecutor
from cnnfast.bench.measuring import (
    Timing,
    benchmark,
    cpu_busy,
    cpu_model,
    machine_info,
    machine_threads,
    summarize,
    time_call,
)
from cnnfast.bench.paths import (
    PATHS,
    Candidate,
    CnnfastTrainer,
    KernelCandidate,
    TorchCandidate,
    TorchTrainer,
    Trainer,
    torch_mirror,
)
from cnnfast.bench.report import (
    SCHEMA,
    UsageError,
    busy_note,
    compare_reports,
    format_table,
    load_report,
)
from cnnfast.bench.runner import (
    Options,
    Runner,
    make_candidate,
    make_candidates,
    make_executor,
    run_benchmarks,
)
from cnnfast.bench.scaling import run_scaling
from cnnfast.bench.workloads import (
    IN_CHANNELS,
    MODEL_SPECS,
    MODELS,
    OPS,
    SETS,
    ConvShape,
    ModelSpec,
    OpItem,
    all_shape_ids,
    build_model,
    conv_shapes,
    op_items,
    resnet18_conv_shapes,
)

__all__ = [
    "IN_CHANNELS", "MODELS", "MODEL_SPECS", "OPS", "PATHS", "QUICK_MODELS", "QUICK_SHAPES",
    "SCHEMA", "SETS", "Candidate", "CheckFailed", "CnnfastTrainer", "ConvShape", "KernelCandidate",
    "LocalExecutor", "ModelSpec", "OpItem", "Options", "Runner", "Timing", "TorchCandidate",
    "TorchTrainer", "Trainer", "UsageError", "WorkerError", "WorkerExecutor", "all_shape_ids",
    "benchmark", "build_model", "busy_note", "check_batch_for", "check_op", "check_step",
    "checked_op", "checked_step", "compare_reports", "conv_shapes", "cpu_busy", "cpu_model",
    "format_table", "load_report", "machine_info", "machine_threads", "main", "make_candidate",
    "make_candidates", "make_executor", "op_items", "options_from_args", "reference_timed",
    "relative_error", "resnet18_conv_shapes", "run_benchmarks", "run_scaling", "summarize",
    "time_call", "torch_mirror",
]
