"""Correctness: every candidate's result against the reference before it is timed."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

import cnnfast
from cnnfast.bench.candidates import Candidate, KernelCandidate, family_kernels, kernel_call
from cnnfast.bench.workloads import ModelSpec, OpItem, _model_data, build_model

REFERENCE_SETS = ("r18-28", "tiny")     # where the reference path is timed by default
REFERENCE_MODELS = ("smallcnn",)
REFERENCE_MAX_REPEATS = 3
# Largest reference convolution (FLOPs) checked at the full batch; bigger ones use fewer samples.
CHECK_FLOPS_FULL = 12e9
CHECK_FLOPS_QUICK = 4e9
# Ops: max |got - ref| / max |ref|. Steps: ||got - ref|| / ||ref|| per gradient, looser: in
# float32 a pre-activation within ~1e-7 of zero can flip its ReLU mask between two correct
# implementations, which moves a few gradient elements by O(1) (seen: 2e-3 on 3D ResNet-18).
TOLERANCE = {"op": 1e-3, "step": 1e-2}



def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected|; inf for a shape mismatch or non-finite values."""
    got = np.asarray(got)
    expected = np.asarray(expected)
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
    scale = float(np.max(np.abs(e)))
    return float(np.max(np.abs(g - e))) / (scale if scale > 0 else 1.0)


def compare_outputs(got: Sequence, expected: Sequence, tol: float) -> tuple[bool, float, str]:
    """(ok, worst error, what differed) over matching output tuples."""
    if len(got) != len(expected):
        return False, math.inf, f"{len(got)} outputs, expected {len(expected)}"
    worst, what = 0.0, ""
    for i, (g, e) in enumerate(zip(got, expected)):
        err = relative_error(g, e)
        if err > worst or math.isnan(err):
            worst = err
            what = (f"output {i}: shape {np.shape(g)} vs {np.shape(e)}" if np.shape(g) !=
                    np.shape(e) else f"output {i}: relative error {err:.2e}")
    return worst <= tol, worst, what


def relative_l2_error(got, expected) -> float:
    """||got - expected|| / ||expected||; inf for a shape mismatch or non-finite values."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape or not np.isfinite(got).all():
        return math.inf
    norm = float(np.linalg.norm(expected))
    return float(np.linalg.norm(got - expected)) / (norm if norm > 0 else 1.0)


def compare_grads(got: tuple, expected: tuple, tol: float) -> tuple[bool, float, str]:
    """A step's (loss, {name: gradient}) against the reference's: the loss and each gradient
    within ``tol`` (relative L2)."""
    loss, grads = got
    ref_loss, ref_grads = expected
    worst = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    what = f"loss {loss:.6g} vs {ref_loss:.6g}"
    if not math.isfinite(loss):
        worst = math.inf
    for name, ref in ref_grads.items():
        g = grads.get(name)
        if g is None:
            return False, math.inf, f"no gradient for {name}"
        err = relative_l2_error(g, ref)
        if err > worst:
            worst, what = err, f"gradient of {name}: relative error {err:.2e}"
    return worst <= tol, worst, what



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
    """Check ``cand`` on ``item`` against the reference (raise :class:`CheckFailed` when it
    differs), then return a callable running it at the full batch, synchronised."""
    n = check_batch or check_batch_for(item)
    inputs = item.make_inputs(n)
    expected = kernel_call(family_kernels("reference", item.family), item, inputs)()
    got = cand.op_fn(item, {k: cand.native(v) for k, v in inputs.items()})()
    cand.sync()
    ok, _, what = compare_outputs(tuple(cand.to_numpy(g) for g in got), expected,
                                  TOLERANCE["op"])
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on {item.id} (checked at batch {n}): {what}")
    full = inputs if n == item.batch else item.make_inputs(item.batch)
    fn = cand.op_fn(item, {k: cand.native(v) for k, v in full.items()})

    def run():
        fn()
        cand.sync()
    return run


def checked_step(spec: ModelSpec, cand: Candidate, seed: int = 0) -> Callable[[], None]:
    """Check a training step of ``cand`` against the reference (loss and every gradient at
    ``spec.check_batch``), then return one full training step at ``spec.batch``."""
    cnnfast.manual_seed(seed)
    state = build_model(spec.name).state_dict()
    xc, yc = _model_data(spec, spec.check_batch)
    expected = KernelCandidate("reference").trainer(spec, state).check(xc, yc)
    trainer = cand.trainer(spec, state)
    ok, _, what = compare_grads(trainer.check(xc, yc), expected, TOLERANCE["step"])
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on the {spec.name} step (checked at batch "
                          f"{spec.check_batch}): {what}")
    trainer.prepare(*_model_data(spec, spec.batch))
    return trainer.step

