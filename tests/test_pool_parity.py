"""PyTorch argument parity for pooling and padding, on every path (reference, cpu, cuda in the
simulator): ``ceil_mode``, ``dilation``, ``return_indices``, ``count_include_pad``,
``divisor_override`` and ``F.pad`` — forward and gradients against PyTorch, gradients against
float64 finite differences, and PyTorch's argument rules."""

from __future__ import annotations

import numpy as np
import pytest

import cnnfast
from cnnfast import functional as F
from cnnfast import nn
from cnnfast.testing import assert_close, compare_with_torch, gradient_check


def _torch():
    return pytest.importorskip("torch")


def _distinct(rng, shape, dtype=np.float32):
    """Values without ties (so max pooling has one winner per window)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) / n - 0.5).astype(dtype)


def _compare(ours, theirs, x, device):
    """Forward and input gradient (random upstream gradient) of ``ours`` vs ``theirs``."""
    _torch()
    compare_with_torch(ours, theirs, [x], device)


MAX_CASES = [  # (input spatial shape, kernel, stride, padding, dilation, ceil_mode)
    ((5, 6), 3, 2, 1, 1, True),
    ((5, 7), 2, 2, 0, 1, True),
    ((6, 7), 3, 1, 1, 2, False),
    ((7, 6), (2, 3), (2, 1), (1, 1), (2, 1), True),
    ((4, 5, 5), 2, 2, 1, 2, True),
    ((4, 5, 4), 3, 2, 1, 1, True),
]
AVG_CASES = [  # (input spatial shape, kernel, stride, padding, ceil, count_include_pad, divisor)
    ((5, 6), 3, 2, 1, True, True, None),
    ((5, 6), 3, 2, 1, True, False, None),
    ((5, 7), 2, 2, 0, True, True, None),
    ((6, 5), (3, 2), (2, 1), (1, 0), False, False, None),
    ((5, 5), 2, 1, 1, False, True, 3),
    ((6, 5), 3, 2, 1, True, False, -2),
    ((4, 5, 3), 3, 2, 1, True, False, None),
    ((3, 4, 5), 2, 2, 1, True, True, 5),
]


@pytest.mark.parametrize("case", MAX_CASES, ids=str)
def test_max_pool_arguments_match_torch(path, case, rng):
    t = _torch()
    size, k, s, p, d, ceil = case
    nd = len(size)
    ours, theirs = getattr(F, f"max_pool{nd}d"), getattr(t.nn.functional, f"max_pool{nd}d")
    x = _distinct(rng, (2, 2) + size)
    _compare(lambda a: ours(a, k, s, p, d, ceil), lambda a: theirs(a, k, s, p, d, ceil), x, path)
    y, idx = ours(cnnfast.tensor(x, device=path), k, s, p, d, ceil, return_indices=True)
    ty, tidx = theirs(t.tensor(x), k, s, p, d, ceil, return_indices=True)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx.numpy(), tidx.numpy())
    np.testing.assert_array_equal(y.numpy(), ty.numpy())


@pytest.mark.parametrize("case", AVG_CASES, ids=str)
def test_avg_pool_arguments_match_torch(path, case, rng):
    t = _torch()
    size, k, s, p, ceil, include, divisor = case
    nd = len(size)
    ours, theirs = getattr(F, f"avg_pool{nd}d"), getattr(t.nn.functional, f"avg_pool{nd}d")
    _compare(lambda a: ours(a, k, s, p, ceil, include, divisor),
             lambda a: theirs(a, k, s, p, ceil, include, divisor),
             rng.standard_normal((2, 2) + size), path)


@pytest.mark.parametrize("kind", ["max", "avg", "pad"])
def test_gradients_match_finite_differences(path, kind, rng):
    """float64 central differences, on each path (moved to the path's device and back)."""
    if kind == "max":
        x = _distinct(rng, (1, 2, 5, 6), np.float64)

        def f(a):
            return F.max_pool2d(a.to(path), 3, 2, 1, dilation=(1, 2), ceil_mode=True).to("cpu")
    elif kind == "avg":
        x = rng.standard_normal((1, 2, 4, 5, 3))

        def f(a):
            return F.avg_pool3d(a.to(path), 2, (2, 1, 2), 1, ceil_mode=True,
                                count_include_pad=False).to("cpu")
    else:
        x = rng.standard_normal((2, 3, 4))

        def f(a):
            return F.pad(a.to(path), (1, 2, -1, 3), value=0.5).to("cpu")
    gradient_check(f, [x])


def test_avg_pool_divisor_override_gradient(path, rng):
    x = rng.standard_normal((1, 1, 5, 4))
    gradient_check(lambda a: F.avg_pool2d(a.to(path), 3, 2, 1, True, True, 4).to("cpu"), [x])


PAD_CASES = [  # (input shape, pad, value)
    ((2, 3, 4), (1, 2), 0.0),
    ((2, 3, 4, 5), (0, 1, 2, 0), -1.5),
    ((1, 2, 3, 4, 5), (1, 0, 0, 2, 3, 1), 2.0),
    ((2, 3, 6, 5), (-1, 2, 1, -2), 0.0),
    ((3, 4), (2, 1, 1, 0), 7.0),
]


@pytest.mark.parametrize("case", PAD_CASES, ids=str)
def test_pad_matches_torch(path, case, rng):
    t = _torch()
    shape, pads, value = case
    _compare(lambda a: F.pad(a, pads, value=value),
             lambda a: t.nn.functional.pad(a, pads, mode="constant", value=value),
             rng.standard_normal(shape), path)


def test_modules_take_torch_arguments(rng):
    t = _torch()
    x = _distinct(rng, (2, 3, 7, 6))
    pairs = [
        (nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
         t.nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)),
        (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=None),
         t.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)),
        (nn.AvgPool2d(2, divisor_override=3), t.nn.AvgPool2d(2, divisor_override=3)),
        (nn.ConstantPad((1, 2, 0, 3), 0.25), t.nn.ConstantPad2d((1, 2, 0, 3), 0.25)),
    ]
    for ours, theirs in pairs:
        assert_close(ours(cnnfast.tensor(x)), theirs(t.tensor(x)).numpy(), name=repr(ours))
    y, idx = nn.MaxPool2d(2, ceil_mode=True, return_indices=True)(cnnfast.tensor(x))
    ty, tidx = t.nn.MaxPool2d(2, ceil_mode=True, return_indices=True)(t.tensor(x))
    np.testing.assert_array_equal(idx.numpy(), tidx.numpy())
    x3 = _distinct(rng, (1, 2, 5, 4, 5))
    assert_close(nn.MaxPool3d(2, 2, 1, dilation=(1, 2, 1), ceil_mode=True)(cnnfast.tensor(x3)),
                 t.nn.MaxPool3d(2, 2, 1, dilation=(1, 2, 1), ceil_mode=True)(t.tensor(x3)).numpy())
    assert_close(nn.AvgPool3d(3, 2, 1, True, False)(cnnfast.tensor(x3)),
                 t.nn.AvgPool3d(3, 2, 1, True, False)(t.tensor(x3)).numpy())


@pytest.mark.parametrize("call,message", [
    (lambda x: F.max_pool2d(x, 3, padding=2), "at most half"),
    (lambda x: F.max_pool2d(x, 3, dilation=0), "dilation must be >= 1"),
    (lambda x: F.max_pool2d(x, 3, dilation=(1, 2, 3)), "dilation must be an int or a tuple"),
    (lambda x: F.max_pool2d(x, 3, dilation=4), "too small"),
    (lambda x: F.max_pool2d(x, 2, ceil_mode="yes"), "ceil_mode must be a bool"),
    (lambda x: F.avg_pool2d(x, 2, divisor_override=0), "must not be zero"),
    (lambda x: F.avg_pool2d(x, 2, divisor_override=1.5), "divisor_override must be an int"),
    (lambda x: F.avg_pool2d(x, 2, count_include_pad=None), "count_include_pad must be a bool"),
    (lambda x: F.avg_pool2d(x, 7), "too small"),
    (lambda x: F.pad(x, (1, 2, 3)), "even number"),
    (lambda x: F.pad(x, (1, 1), mode="wrap"), "mode must be one of"),
    (lambda x: F.pad(x, (1, 1), mode="reflect"), "pads the last 1-3 axes of a 2-D or 3-D"),
    (lambda x: F.pad(x, (6, 0, 0, 0), mode="reflect"), "amount <= 5"),
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="replicate", value=2.0), "to mode 'constant' only"),
    (lambda x: F.pad(x, (1, 1) * 5), "pads 5 axes"),
    (lambda x: F.pad(x, (-4, -4)), "with size -2"),
    (lambda x: F.pad(x, (1, 1), value="a"), "value must be a number"),
])
def test_bad_arguments_are_refused(call, message):
    x = cnnfast.tensor(np.zeros((1, 1, 6, 6), np.float32))
    with pytest.raises((ValueError, TypeError), match=message):
        call(x)


# The pooling and padding cases of tinygrad's test_ops.py that need these arguments, as a user
# porting them would write them (tinygrad's shapes, batch and channels shrunk where large).
TINYGRAD_CASES = [
    *[(op, (1, 1, 6, 6), {"kernel_size": k, "padding": 1, "stride": 3, "ceil_mode": True})
      for op in ("avg_pool2d", "max_pool2d") for k in [(3, 3), 3, (3, 2), 4]],
    *[("max_pool2d", (2, 2, 23, 17), {"kernel_size": (5, 5), "dilation": d})
      for d in [2, (2, 3), (3, 2)]],
]


@pytest.mark.parametrize("case", TINYGRAD_CASES, ids=str)
def test_tinygrad_op_cases(path, case, rng):
    t = _torch()
    name, shape, kwargs = case
    _compare(lambda a: getattr(F, name)(a, **kwargs),
             lambda a: getattr(t.nn.functional, name)(a, **kwargs), _distinct(rng, shape), path)


def test_tinygrad_avg_pool3d_exclude_pad_forward(path, rng):
    t = _torch()
    x = rng.standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    kwargs = {"kernel_size": (8, 8, 8), "stride": 5, "padding": 1, "count_include_pad": False}
    assert_close(F.avg_pool3d(cnnfast.tensor(x, device=path), **kwargs),
                 t.nn.functional.avg_pool3d(t.tensor(x), **kwargs).numpy())
