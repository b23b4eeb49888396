"""PyTorch's own OpInfo samples run through cnnfast: the shared machinery of
tests/test_opinfo.py (and of its report, ``python tests/opinfo_harness.py``).

Each OpInfo of ``torch.testing._internal.common_methods_invocations.op_db`` that has a cnnfast
counterpart is listed in :data:`COUNTERPARTS` with the call a PyTorch user would write in
cnnfast (the same arguments: only the module is renamed, or an operator or method spelled as
cnnfast spells it). A sample is converted to cnnfast tensors (same values, dtypes, and which
inputs require grad), run forward, and backward with one seeded upstream gradient; outputs and
every input gradient are compared with PyTorch's.

A sample's outcome is ``passed``, ``failed`` (a wrong value or gradient, or an unexpected
exception) or ``unsupported`` (cnnfast refuses it with ValueError/TypeError, or gives no gradient
for an input PyTorch differentiates); ``unsupported`` carries cnnfast's message.
"""

from __future__ import annotations

import functools
import sys
import zlib
from dataclasses import dataclass

import numpy as np

import cnnfast
from cnnfast import dispatch
from cnnfast import functional as F

# The sample generators draw from torch's global generator: seeded once per (op, dtype), the
# samples are the same on every run of the pinned torch version.
SEED = 0

# Largest grids, sub-sampled deterministically (every k-th sample) unless CNNFAST_OPINFO_FULL=1.
MAX_SAMPLES = 96


def _div(x, y, rounding_mode=None):
    return x / y if rounding_mode is None else x.div(y, rounding_mode=rounding_mode)


def _add(x, y, alpha=1):
    return x + y if alpha == 1 else x.add(y, alpha=alpha)


def _sub(x, y, alpha=1):
    return x - y if alpha == 1 else x.sub(y, alpha=alpha)


# OpInfo (name, variant) -> the cnnfast call a PyTorch user would write.
COUNTERPARTS = {
    ("add", ""): _add,
    ("sub", ""): _sub,
    ("mul", ""): lambda x, y: x * y,
    ("div", "no_rounding_mode"): _div,
    ("div", "trunc_rounding"): _div,
    ("div", "floor_rounding"): _div,
    ("pow", ""): lambda x, y: x ** y,
    ("matmul", ""): lambda x, y: x @ y,
    ("exp", ""): lambda x: x.exp(),
    ("log", ""): lambda x: x.log(),
    ("neg", ""): lambda x: -x,
    ("sigmoid", ""): lambda x: x.sigmoid(),
    ("sum", ""): lambda x, *a, **k: x.sum(*a, **k),
    ("mean", ""): lambda x, *a, **k: x.mean(*a, **k),
    ("reshape", ""): lambda x, shape: x.reshape(shape),
    ("flatten", ""): lambda x, **k: x.flatten(**k),
    ("transpose", ""): lambda x, a, b: x.transpose(a, b),
    ("softmax", ""): F.softmax,
    ("softmax", "with_dtype"): F.softmax,
    ("log_softmax", ""): F.log_softmax,
    ("log_softmax", "with_dtype"): F.log_softmax,
    ("nn.functional.relu", ""): F.relu,
    ("nn.functional.linear", ""): F.linear,
    ("nn.functional.batch_norm", ""): F.batch_norm,
    ("nn.functional.batch_norm", "without_cudnn"): F.batch_norm,
    ("nn.functional.pad", "constant"): F.pad,
    ("nn.functional.pad", "reflect"): F.pad,
    ("nn.functional.pad", "replicate"): F.pad,
    ("nn.functional.pad", "replicate_negative"): F.pad,
    ("nn.functional.pad", "circular"): F.pad,
    ("nn.functional.binary_cross_entropy_with_logits", ""): F.binary_cross_entropy_with_logits,
    ("nn.functional.cross_entropy", ""): F.cross_entropy,
    ("nn.functional.dropout", ""): F.dropout,
    ("nn.functional.conv2d", ""): F.conv2d,
    ("nn.functional.conv3d", ""): F.conv3d,
    ("nn.functional.max_pool2d", ""): F.max_pool2d,
    ("nn.functional.max_pool3d", ""): F.max_pool3d,
    ("nn.functional.avg_pool2d", ""): F.avg_pool2d,
    ("nn.functional.avg_pool3d", ""): F.avg_pool3d,
    ("nn.functional.adaptive_avg_pool2d", ""): F.adaptive_avg_pool2d,
    ("nn.functional.adaptive_avg_pool3d", ""): F.adaptive_avg_pool3d,
}

TOLERANCES = {np.float64: {"rtol": 1e-7, "atol": 1e-9}, np.float32: {"rtol": 2e-4, "atol": 2e-5}}



def op_key(op) -> tuple[str, str]:
    return (op.name, op.variant_test_name)


def key_id(key: tuple[str, str]) -> str:
    name = key[0].replace("nn.functional.", "")
    return f"{name}.{key[1]}" if key[1] else name


@functools.cache
def opinfos() -> dict:
    """The OpInfos with a cnnfast counterpart (importing op_db takes seconds: done once)."""
    from torch.testing._internal.common_methods_invocations import op_db

    found = {op_key(op): op for op in op_db if op_key(op) in COUNTERPARTS}
    missing = set(COUNTERPARTS) - set(found)
    assert not missing, f"OpInfos gone from this torch version: {sorted(missing)}"
    return found


@functools.cache
def samples(key: tuple[str, str], dtype: type) -> tuple:
    """The op's sample inputs for ``dtype``: seeded, sub-sampled to at most MAX_SAMPLES (every
    k-th, the first kept) unless CNNFAST_OPINFO_FULL=1."""
    import torch

    torch.manual_seed(SEED)
    tdtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    found = list(opinfos()[key].sample_inputs("cpu", tdtype, requires_grad=True))
    if not cnnfast.config.get("opinfo_full") and len(found) > MAX_SAMPLES:
        step = -(-len(found) // MAX_SAMPLES)
        found = found[::step]
    return tuple(found)


def describe(v) -> str:
    """A short stable text for a value of a sample: tensors by shape, containers recursively."""
    import torch

    if isinstance(v, torch.Tensor):
        return f"T{tuple(v.shape)}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(describe(x) for x in v) + ")"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={describe(x)}" for k, x in v.items()) + "}"
    return repr(v)


def sample_id(sample) -> str:
    """A short stable description of a sample (shapes and arguments)."""
    return f"{describe(sample.input)} {describe(sample.args)} {describe(sample.kwargs)}"


def derandomised_subset(key, dtype, count: int) -> list:
    """``count`` samples chosen by a hash of their description (the same ones every run)."""
    found = samples(key, dtype)
    ranked = sorted(range(len(found)), key=lambda i: zlib.crc32(sample_id(found[i]).encode()))
    return [found[i] for i in sorted(ranked[:count])]


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "unsupported"
    message: str = ""


class _Converter:
    """torch values -> cnnfast values (tensors keep values, dtype and requires_grad)."""

    def __init__(self, device: str):
        self.device = device
        self.leaves: list[tuple[object, object]] = []  # (torch leaf, cnnfast leaf)

    def __call__(self, v):
        import torch

        if isinstance(v, torch.Tensor):
            t = cnnfast.tensor(v.detach().numpy().copy(), requires_grad=v.requires_grad,
                               device=self.device)
            if v.requires_grad:
                self.leaves.append((v, t))
            return t
        if isinstance(v, torch.dtype):
            return {torch.float32: np.float32, torch.float64: np.float64}[v]
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, tuple):
            return tuple(self(x) for x in v)
        if isinstance(v, dict):
            return {k: self(x) for k, x in v.items()}
        return v


def _as_outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _check_dropout(sample, ours, x, tol):
    """Dropout's mask is random: each output is 0 or x / (1 - p), and the gradient uses the
    same mask."""
    p = sample.kwargs.get("p", 0.5)
    training = sample.kwargs.get("training", True)
    xv = x.numpy()
    y = ours.numpy()
    if not training or p == 0:
        np.testing.assert_allclose(y, xv, **tol)
        return None
    if p == 1:
        np.testing.assert_array_equal(y, np.zeros_like(xv))
        return np.zeros_like(xv)
    kept = y != 0
    np.testing.assert_allclose(y[kept], xv[kept] / (1 - p), **tol)
    return kept / (1 - p)


def run_sample(key, sample, dtype, path: str) -> Outcome:
    """Run one OpInfo sample through cnnfast on ``path`` and compare with PyTorch."""
    import torch

    op = opinfos()[key]
    device = dispatch.device_of(path)
    tol = TOLERANCES[dtype]
    convert = _Converter(device)
    x, args, kwargs = convert(sample.input), convert(sample.args), convert(sample.kwargs)
    ours_fn = COUNTERPARTS[key]
    with dispatch.using_path(path):
        try:
            ours = ours_fn(x, *args, **kwargs)
        except (ValueError, TypeError, NotImplementedError, AttributeError) as e:
            return Outcome("unsupported", f"{type(e).__name__}: {e}".splitlines()[0])
        except Exception as e:  # noqa: BLE001 - any other escape is a bug to report
            return Outcome("failed", f"forward raised {type(e).__name__}: {e}")
        theirs = op.op(sample.input, *sample.args, **sample.kwargs)
        ours_out, theirs_out = _as_outputs(ours), _as_outputs(theirs)
        if len(ours_out) != len(theirs_out):
            return Outcome("failed", f"{len(ours_out)} outputs, PyTorch gives {len(theirs_out)}")
        dropout_grad = None
        try:
            for a, b in zip(ours_out, theirs_out):
                if tuple(a.shape) != tuple(b.shape):
                    raise AssertionError(f"shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}")
                if key[0] == "nn.functional.dropout":
                    dropout_grad = _check_dropout(sample, a, x, tol)
                else:
                    np.testing.assert_allclose(a.numpy(), b.detach().numpy(), **tol)
            for name in ("running_mean", "running_var"):  # batch norm's buffers, updated in place
                pos = {"running_mean": 0, "running_var": 1}[name]
                if key[0].endswith("batch_norm") and len(args) > pos and args[pos] is not None:
                    np.testing.assert_allclose(args[pos].numpy(), sample.args[pos].numpy(), **tol)
        except AssertionError as e:
            return Outcome("failed", f"forward: {str(e).strip().splitlines()[0]}")
        if not convert.leaves or not theirs_out[0].requires_grad:
            return Outcome("passed")
        rng = np.random.default_rng(zlib.crc32(sample_id(sample).encode()))
        gy = rng.standard_normal(tuple(theirs_out[0].shape)).astype(dtype)
        leaves_t = [t for t, _ in convert.leaves]
        grads_t = torch.autograd.grad(theirs_out[0], leaves_t, torch.from_numpy(gy),
                                      allow_unused=True)
        y = ours_out[0]
        if not y.requires_grad:  # fine where PyTorch's gradient is zero too (a step function)
            if all(g is None or not g.any() for g in grads_t):
                return Outcome("passed")
            return Outcome("unsupported", "no gradient: the output has no graph")
        try:
            y.backward(cnnfast.tensor(gy, device=device))
        except (ValueError, TypeError, NotImplementedError) as e:
            return Outcome("unsupported", f"backward {type(e).__name__}: {e}".splitlines()[0])
        except Exception as e:  # noqa: BLE001
            return Outcome("failed", f"backward raised {type(e).__name__}: {e}")
        for i, ((t, c), g) in enumerate(zip(convert.leaves, grads_t)):
            expected = np.zeros(tuple(t.shape), dtype) if g is None else g.numpy()
            if key[0] == "nn.functional.dropout" and dropout_grad is not None:
                expected = gy * dropout_grad
            if c.grad is None:
                if np.any(expected != 0):
                    return Outcome("unsupported", f"no gradient for input {i} "
                                                  f"(shape {tuple(t.shape)})")
                continue
            try:
                np.testing.assert_allclose(c.grad.numpy(), expected, **tol)
            except AssertionError as e:
                return Outcome("failed", f"gradient of input {i}: "
                                         f"{str(e).strip().splitlines()[0]}")
    return Outcome("passed")


def report(paths=("reference", "cpu"), dtypes=(np.float64, np.float32), out=sys.stdout) -> dict:
    """Count passed/failed/unsupported per op over ``paths`` and ``dtypes``; print a table."""
    totals: dict = {}
    for key in COUNTERPARTS:
        counts = {"passed": 0, "failed": 0, "unsupported": 0}
        reasons: dict = {}
        for dtype in dtypes:
            for path in paths:
                for s in samples(key, dtype):
                    o = run_sample(key, s, dtype, path)
                    counts[o.status] += 1
                    if o.status != "passed":
                        reasons.setdefault(f"{o.status}: {o.message[:110]}", 0)
                        reasons[f"{o.status}: {o.message[:110]}"] += 1
        totals[key_id(key)] = counts
        print(f"{key_id(key):34s} {counts['passed']:5d} passed {counts['failed']:4d} failed "
              f"{counts['unsupported']:4d} unsupported", file=out)
        for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print(f"      {n:4d}  {r}", file=out)
    total = {s: sum(c[s] for c in totals.values()) for s in ("passed", "failed", "unsupported")}
    print(f"{'TOTAL':34s} {total['passed']:5d} passed {total['failed']:4d} failed "
          f"{total['unsupported']:4d} unsupported", file=out)
    return totals


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore")
    report()
