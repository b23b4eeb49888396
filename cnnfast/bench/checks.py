"""Correctness: every candidate's result against the reference before it is timed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from cnnfast import dispatch
from cnnfast.bench.executor import LocalExecutor
from cnnfast.bench.paths import Candidate, KernelCandidate
from cnnfast.bench.workloads import ModelSpec, OpItem

REFERENCE_SETS = ("r18-28", "tiny")     # where the reference path is timed by default
REFERENCE_MODELS = ("smallcnn",)
REFERENCE_MAX_REPEATS = 3
# Largest reference convolution (FLOPs) checked at the full batch; bigger ones use fewer samples.
CHECK_FLOPS_FULL = 6e9    # the check runs twice (float32 and float64)
CHECK_FLOPS_QUICK = 2e9
# Every candidate runs twice on the check's inputs, in float64 and in float32, and both results
# are compared with the reference computed in float64. Errors: ops max |got - ref| / max |ref|,
# steps the loss's relative error and ||got - ref|| / ||ref|| per gradient.
# float64 decides whether a path computes the right thing: correct paths agree to ~1e-14.
F64_TOLERANCE = {"op": 1e-9, "loss": 1e-9, "grad": 1e-8}
# float32 may differ from float64 by float32's own error: F32_SCALE times what the reference's
# float32 result differs by, and never less than the floor. Gradients get a wide floor: a
# pre-activation within float32 rounding of zero can flip its ReLU mask, which moves a gradient
# by about 1/sqrt(positions reaching it): 1.5e-2 seen for PyTorch's float32 SmallCNN step (batch
# 64), more at the small check batches of the ResNets. The loss, computed before any mask
# matters, keeps a tight floor; so do ops, which have no masks to flip.
F32_SCALE = 16.0
F32_FLOOR = {"op": 1e-4, "loss": 1e-5, "grad": 0.1}


def relative_error(got, expected, norm: str = "max") -> float:
    """The error measure of every check: ``norm="max"``: max |got - expected| / max |expected|
    (ops); ``norm="l2"``: ||got - expected|| / ||expected|| (gradients; the GPU check). In
    float64; a zero ``expected`` scales by 1. inf for a shape mismatch or a non-finite ``got``;
    integer arrays (indices) must be equal (0 or inf). NumPy or CuPy arrays."""
    if norm not in ("max", "l2"):
        raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
    got = dispatch.to_device(got, "cpu")
    expected = dispatch.to_device(expected, "cpu")
    if got.shape != expected.shape:
        return math.inf
    if expected.size == 0:
        return 0.0
    if expected.dtype.kind in "iub":
        return 0.0 if np.array_equal(got, expected) else math.inf
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.isfinite(g).all():
        return math.inf
    if norm == "l2":
        scale, diff = float(np.linalg.norm(e)), float(np.linalg.norm(g - e))
    else:
        scale, diff = float(np.max(np.abs(e))), float(np.max(np.abs(g - e)))
    return diff / (scale if scale > 0 else 1.0)


def _verdict(checks: list[tuple[str, float, float]]) -> tuple[bool, float, str]:
    """(ok, worst error relative to its tolerance, what failed) over (what, error, tol)."""
    worst, what = 0.0, ""
    for name, err, tol in checks:
        rel = math.inf if not math.isfinite(err) else err / tol
        if rel > worst or not what:
            worst, what = rel, f"{name}: relative error {err:.2e} (tolerance {tol:.1e})"
    return worst <= 1.0, worst, what


def check_op(got32: Sequence, got64: Sequence, ref32: Sequence,
             ref64: Sequence) -> tuple[bool, float, float, float, str]:
    """An op's float32 and float64 outputs against the float64 reference.

    Returns (ok, float32 error, float64 error, float32 tolerance, what failed): float64 within
    ``F64_TOLERANCE``; float32 within ``F32_SCALE`` times the reference's own float32 error (at
    least ``F32_FLOOR``)."""
    if len(got32) != len(ref64) or len(got64) != len(ref64):
        return False, math.inf, math.inf, 0.0, (f"{len(got32)} outputs, expected {len(ref64)}")
    checks = []
    err32 = err64 = 0.0
    tol32 = F32_FLOOR["op"]
    for i, (g32, g64, r32, r64) in enumerate(zip(got32, got64, ref32, ref64)):
        if np.shape(g32) != np.shape(r64) or np.shape(g64) != np.shape(r64):
            shape = np.shape(g32) if np.shape(g32) != np.shape(r64) else np.shape(g64)
            return False, math.inf, math.inf, 0.0, f"output {i}: shape {shape} vs {np.shape(r64)}"
        e64 = relative_error(g64, r64)
        e32 = relative_error(g32, r64)
        t32 = max(F32_FLOOR["op"], F32_SCALE * relative_error(r32, r64))
        checks += [(f"output {i} in float64", e64, F64_TOLERANCE["op"]),
                   (f"output {i} in float32", e32, t32)]
        err32, err64, tol32 = max(err32, e32), max(err64, e64), max(tol32, t32)
    ok, _, what = _verdict(checks)
    return ok, err32, err64, tol32, what


def check_step(got32: tuple, got64: tuple, ref32: tuple,
               ref64: tuple) -> tuple[bool, float, float, float, str]:
    """A step's float32 and float64 (loss, {name: gradient}) against the float64 reference's:
    as :func:`check_op`, with the loss and every gradient checked (relative L2 for gradients);
    the float32 tolerance reported is the widest gradient one."""
    (l32, g32), (l64, g64) = got32, got64
    (rl32, rg32), (rl64, rg64) = ref32, ref64

    def loss_err(loss):
        return abs(loss - rl64) / max(abs(rl64), 1e-12) if math.isfinite(loss) else math.inf

    tol_loss = max(F32_FLOOR["loss"], F32_SCALE * loss_err(rl32))
    err32, err64 = loss_err(l32), loss_err(l64)
    checks = [("loss in float64", err64, F64_TOLERANCE["loss"]),
              ("loss in float32", err32, tol_loss)]
    tol32 = F32_FLOOR["grad"]
    for name, ref in rg64.items():
        if g32.get(name) is None or g64.get(name) is None:
            return False, math.inf, math.inf, 0.0, f"no gradient for {name}"
        e64 = relative_error(g64[name], ref, "l2")
        e32 = relative_error(g32[name], ref, "l2")
        t32 = max(F32_FLOOR["grad"], F32_SCALE * relative_error(rg32[name], ref, "l2"))
        checks += [(f"gradient of {name} in float64", e64, F64_TOLERANCE["grad"]),
                   (f"gradient of {name} in float32", e32, t32)]
        err32, err64, tol32 = max(err32, e32), max(err64, e64), max(tol32, t32)
    ok, _, what = _verdict(checks)
    return ok, err32, err64, tol32, what


class CheckFailed(AssertionError):
    """A candidate's result differs from the reference: it must not be timed."""


def reference_timed(item: OpItem | ModelSpec, everywhere: bool = False) -> bool:
    """Whether the (slow) reference path is timed on ``item`` by default."""
    if everywhere:
        return True
    if isinstance(item, ModelSpec):
        return item.name in REFERENCE_MODELS
    return item.set_name in REFERENCE_SETS


def check_batch_for(item: OpItem, quick: bool = False, override: int | None = None) -> int:
    """The batch the correctness check runs at: the full batch unless the reference would take
    long (``override``: a batch, or 0 for always the full batch)."""
    if override == 0:
        return item.batch
    if override:
        return min(override, item.batch)
    flops = item.flops()
    budget = CHECK_FLOPS_QUICK if quick else CHECK_FLOPS_FULL
    if flops is None or flops <= budget:
        return item.batch
    return max(1, min(item.batch, int(item.batch * budget / flops)))


def checked_op(item: OpItem, cand: Candidate, check_batch: int | None = None) -> Callable[[], None]:
    """Check ``cand`` on ``item`` against the float64 reference (:func:`check_op`; raise
    :class:`CheckFailed` when it differs), then return a callable running it at the full batch
    in float32, synchronised."""
    n = check_batch or check_batch_for(item)
    oracle, ex = LocalExecutor(KernelCandidate("reference")), LocalExecutor(cand)
    ok, _, _, _, what = check_op(ex.op_result(item, n, np.float32)[0],
                                 ex.op_result(item, n, np.float64)[0],
                                 oracle.op_result(item, n, np.float32)[0],
                                 oracle.op_result(item, n, np.float64)[0])
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on {item.id} (checked at batch {n}): {what}")
    key = ex.prepare_op(item)
    return lambda: ex.call(key)


def checked_step(spec: ModelSpec, cand: Candidate, seed: int = 0) -> Callable[[], None]:
    """Check a training step of ``cand`` against the float64 reference (:func:`check_step`, at
    ``spec.check_batch``), then return one full float32 training step at ``spec.batch``."""
    oracle, ex = LocalExecutor(KernelCandidate("reference")), LocalExecutor(cand)
    ref64 = oracle.step_result(spec, seed, np.float64)[0]
    ref32 = oracle.step_result(spec, seed, np.float32)[0]
    got64 = ex.step_result(spec, seed, np.float64)[0]
    ok, _, _, _, what = check_step(ex.step_result(spec, seed, np.float32)[0], got64, ref32, ref64)
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on the {spec.name} step (checked at batch "
                          f"{spec.check_batch}): {what}")
    key = ex.prepare_step(spec)
    return lambda: ex.call(key)
