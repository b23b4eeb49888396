"""The public ops through autograd, on every path: against PyTorch (forward and every gradient)
and against float64 finite differences. Shapes are tiny so the CUDA simulator stays quick.

These check the wiring (argument handling, defaults, which gradients flow, devices); the kernels'
case grids (shapes, strides, padding, dilation, groups, dtypes, layouts) are in
tests/test_contract.py, on every path too."""

from __future__ import annotations

import numpy as np
import pytest

import cnnfast
from cnnfast import functional as F
from cnnfast.testing import assert_close, compare_with_torch, gradient_check


def _torch():
    return pytest.importorskip("torch")


def _distinct(rng, shape, dtype=np.float32):
    """Values without ties (so max pooling has one winner per window)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) / n - 0.5).astype(dtype)


CONV2D_CASES = [  # every argument away from its default at least once (kernel grids: contract)
    # (N, C, H, W, K, KH, KW, stride, padding, dilation, groups)
    (2, 2, 5, 6, 4, 3, 2, 2, 1, 1, 2),
    (1, 3, 6, 5, 3, 3, 3, 1, 2, 2, 3),
]


@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_matches_torch(path, case, bias, rng):
    t = _torch()
    N, C, H, W, K, KH, KW, s, p, d, g = case
    arrays = [rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C // g, KH, KW))]
    if bias:
        arrays.append(rng.standard_normal(K))

    def ours(x, w, b=None):
        return F.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)

    def theirs(x, w, b=None):
        return t.nn.functional.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g)

    compare_with_torch(ours, theirs, arrays, path, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 2)])
def test_conv3d_matches_torch(path, stride, padding, groups, rng):
    t = _torch()
    arrays = [rng.standard_normal((1, 2, 4, 5, 4)), rng.standard_normal((2, 2 // groups, 3, 2, 3)),
              rng.standard_normal(2)]
    compare_with_torch(
        lambda x, w, b: F.conv3d(x, w, b, stride, padding, 1, groups),
        lambda x, w, b: t.nn.functional.conv3d(x, w, b, stride, padding, 1, groups),
        arrays, path, rtol=1e-4, atol=1e-5)


def test_conv2d_float64_and_noncontiguous_input(path, rng):
    t = _torch()
    x = rng.standard_normal((2, 5, 4, 3)).transpose(0, 3, 1, 2)  # (2, 3, 5, 4), not contiguous
    w = rng.standard_normal((2, 3, 2, 2))
    compare_with_torch(lambda a, b: F.conv2d(a, b, padding=1),
                       lambda a, b: t.nn.functional.conv2d(a, b, padding=1),
                       [x, w], path, dtype=np.float64)


POOL_CASES = [  # (nd, kernel, stride, padding): default stride, tuples (kernel grids: contract)
    (2, 2, None, 0), (2, (2, 3), (1, 2), (1, 0)), (3, 2, None, 0), (3, 3, 2, 1),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_matches_torch(path, case, kind, rng):
    t = _torch()
    nd, kernel, stride, padding = case
    shape = (2, 2, 5, 6) if nd == 2 else (1, 2, 4, 5, 4)
    ours = getattr(F, f"{kind}_pool{nd}d")
    theirs = getattr(t.nn.functional, f"{kind}_pool{nd}d")
    compare_with_torch(lambda x: ours(x, kernel, stride, padding),
                       lambda x: theirs(x, kernel, stride, padding),
                       [_distinct(rng, shape)], path)


@pytest.mark.parametrize("nd,out", [(2, 1), (2, (2, 3)), (3, 1)])
def test_adaptive_avg_pool_matches_torch(path, nd, out, rng):
    t = _torch()
    shape = (2, 3, 5, 7) if nd == 2 else (1, 2, 3, 4, 5)
    compare_with_torch(lambda x: getattr(F, f"adaptive_avg_pool{nd}d")(x, out),
                       lambda x: getattr(t.nn.functional, f"adaptive_avg_pool{nd}d")(x, out),
                       [rng.standard_normal(shape)], path)


def test_relu_linear_sigmoid_match_torch(path, rng):
    t = _torch()
    arrays = [rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)]
    compare_with_torch(lambda x, w, b: F.sigmoid(F.relu(F.linear(x, w, b))),
                       lambda x, w, b: t.sigmoid(t.relu(t.nn.functional.linear(x, w, b))),
                       arrays, path)


@pytest.mark.parametrize("nd", [2, 3])
def test_batch_norm_training_matches_torch(path, nd, rng):
    t = _torch()
    shape = (3, 2, 4, 3) if nd == 2 else (2, 2, 3, 2, 3)
    x = rng.standard_normal(shape) * 2 + 1
    gamma, beta = rng.standard_normal(2), rng.standard_normal(2)
    rm, rv = cnnfast.tensor(np.zeros(2, np.float32), device=path), cnnfast.tensor(
        np.ones(2, np.float32), device=path)
    trm, trv = t.zeros(2), t.ones(2)
    compare_with_torch(
        lambda a, g, b: F.batch_norm(a, rm, rv, g, b, training=True, momentum=0.2),
        lambda a, g, b: t.nn.functional.batch_norm(a, trm, trv, g, b, training=True,
                                                   momentum=0.2),
        [x, gamma, beta], path, rtol=1e-4, atol=1e-5)
    assert_close(rm, trm.numpy(), name="running_mean")
    assert_close(rv, trv.numpy(), rtol=1e-4, atol=1e-5, name="running_var")


def test_batch_norm_eval_matches_torch(path, rng):
    t = _torch()
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    compare_with_torch(
        lambda a, g, b: F.batch_norm(a, cnnfast.tensor(rm, device=path),
                                     cnnfast.tensor(rv, device=path), g, b, training=False),
        lambda a, g, b: t.nn.functional.batch_norm(a, t.tensor(rm), t.tensor(rv), g, b,
                                                   training=False),
        [rng.standard_normal((2, 3, 3, 2)), rng.standard_normal(3), rng.standard_normal(3)], path)


@pytest.mark.parametrize("pos_weight", [None, [0.5, 3.0, 1.0]])
def test_bce_with_logits_matches_torch(path, pos_weight, rng):
    t = _torch()
    target = (rng.random((4, 3)) > 0.5).astype(np.float32)
    pw = None if pos_weight is None else np.array(pos_weight, np.float32)
    compare_with_torch(
        lambda z: F.binary_cross_entropy_with_logits(z, cnnfast.tensor(target, device=path),
                                                    pos_weight=pw),
        lambda z: t.nn.functional.binary_cross_entropy_with_logits(
            z, t.tensor(target), pos_weight=None if pw is None else t.tensor(pw)),
        [rng.standard_normal((4, 3)) * 3], path)


def test_bce_with_logits_is_stable_for_huge_logits(path):
    t = _torch()
    z = np.array([[1e4, -1e4], [-1e4, 1e4]], np.float32)
    y = np.array([[1, 0], [1, 0]], np.float32)
    ours = F.binary_cross_entropy_with_logits(cnnfast.tensor(z, requires_grad=True, device=path),
                                              cnnfast.tensor(y, device=path))
    theirs = t.nn.functional.binary_cross_entropy_with_logits(t.tensor(z), t.tensor(y))
    assert np.isfinite(ours.item())
    assert_close(ours, theirs.numpy(), rtol=1e-6, atol=0)
    ours.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(path, reduction, rng):
    t = _torch()
    target = np.array([0, 2, 1, 2])
    compare_with_torch(
        lambda z: F.cross_entropy(z, cnnfast.tensor(target, device=path), reduction=reduction),
        lambda z: t.nn.functional.cross_entropy(z, t.tensor(target), reduction=reduction),
        [rng.standard_normal((4, 3)) * 50], path)


# --- finite differences (float64), independent of PyTorch ----------------------------------------

def test_conv_bias_relu_pool_chain_gradient(cpu_path, rng):
    x = rng.standard_normal((1, 2, 5, 5))
    w = rng.standard_normal((2, 2, 3, 3))
    b = rng.standard_normal(2)
    gradient_check(lambda x, w, b: F.avg_pool2d(F.conv2d(x, w, b, padding=1, stride=1), 2),
                   [x, w, b])


def test_batch_norm_and_losses_gradient(cpu_path, rng):
    x = rng.standard_normal((3, 2, 2, 2))
    g, b = rng.standard_normal(2), rng.standard_normal(2)
    target = (rng.random((3, 8)) > 0.5).astype(np.float64)
    pw = np.linspace(0.5, 2, 8)
    gradient_check(
        lambda x, g, b: F.binary_cross_entropy_with_logits(
            F.batch_norm(x, None, None, g, b, training=True).reshape(3, 8), target, pw),
        [x, g, b])
    gradient_check(lambda z: F.cross_entropy(z, np.array([1, 0, 3])), [rng.standard_normal((3, 4))])


def test_max_pool_and_dropout_gradient(cpu_path, rng):
    x = _distinct(rng, (1, 1, 4, 4), np.float64)
    gradient_check(lambda x: F.max_pool2d(x, 3, 1, 1), [x])
    gradient_check(lambda x: F.dropout(x, 0.5, rng_=3), [x])


def test_dropout_is_seeded_and_scaled():
    x = cnnfast.tensor(np.ones((100, 100), np.float32))
    a, b = F.dropout(x, 0.25, rng_=5).numpy(), F.dropout(x, 0.25, rng_=5).numpy()
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0.0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(F.dropout(x, 0.25, training=False).numpy(), x.numpy())


# --- bad input: a clear error before any kernel runs ---------------------------------------------

def _x(*shape, dtype=np.float32):
    return cnnfast.tensor(np.zeros(shape, dtype))


@pytest.mark.parametrize("call,error,words", [
    (lambda: F.conv2d(_x(2, 5), _x(3, 2, 3, 3)), ValueError, ["4-D", "3-D unbatched", "(2, 5)"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 3, 3, 3)), ValueError, ["2 channels", "expects 3"]),
    (lambda: F.conv2d(_x(1, 4, 5, 5), _x(3, 2, 3, 3), groups=2), ValueError, ["groups=2"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5, dtype=np.int32), _x(3, 2, 3, 3)), TypeError, ["int32"]),
    (lambda: F.conv2d(_x(1, 2, 2, 2), _x(3, 2, 3, 3)), ValueError, ["larger than the padded"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3), stride=0), ValueError, ["stride", ">= 1"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3), dilation=-1), ValueError, ["dilation"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3), padding=(1, 1, 1)), ValueError,
     ["padding", "tuple of 2"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3), _x(4)), ValueError, ["bias", "(3,)"]),
    (lambda: F.conv2d(_x(1, 2, 5, 5), _x(3, 2, 3, 3, dtype=np.float64)), TypeError, ["float64"]),
    (lambda: F.conv3d(_x(2, 5, 5), _x(3, 2, 3, 3, 3)), ValueError, ["5-D"]),
    (lambda: F.max_pool2d(_x(1, 1, 4, 4), 5), ValueError, ["larger than the padded"]),
    (lambda: F.max_pool2d(_x(1, 1, 4, 4), 2, padding=2), ValueError, ["at most half"]),
    (lambda: F.avg_pool3d(_x(1, 1, 4, 4, 4), 2, stride=0), ValueError, ["stride"]),
    (lambda: F.linear(_x(2, 3), _x(4, 5)), ValueError, ["weight", "(OUT, 3)"]),
    (lambda: F.batch_norm(_x(1, 2, 1, 1), None, None, training=True), ValueError,
     ["more than one value"]),
    (lambda: F.batch_norm(_x(2, 2, 2, 2), _x(3), _x(3)), ValueError, ["running_mean", "(2,)"]),
    (lambda: F.binary_cross_entropy_with_logits(_x(4, 2), _x(4, 3)), ValueError,
     ["target shape (4, 3)", "(4, 2)"]),
    (lambda: F.cross_entropy(_x(4, 3), np.array([0, 1, 2])), ValueError, ["(4,)"]),
    (lambda: F.cross_entropy(_x(2, 3), np.array([0, 3])), ValueError, ["[0, 2]"]),
    (lambda: F.cross_entropy(_x(2, 3), np.array([0.0, 1.0])), TypeError, ["integer"]),
    (lambda: F.dropout(_x(2), 1.5), ValueError, ["p must be"]),
    (lambda: F.relu("abc"), TypeError, ["str"]),
])
def test_bad_input_is_refused_with_a_clear_message(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!s}"


# --- regressions found by PyTorch's OpInfo samples (issue #21) ---------------------------------

def test_relu_of_a_scalar_keeps_its_shape(path):
    """Bug 3: the fast CPU path returned shape (1,) for a 0-d input (and its gradient too)."""
    for value, slope in ((-1.5, 0.0), (2.0, 1.0)):
        x = cnnfast.tensor(np.array(value), requires_grad=True, device=path)
        y = F.relu(x)
        assert y.shape == ()
        y.backward()
        assert x.grad.shape == () and x.grad.item() == slope


@pytest.mark.parametrize("op", [F.softmax, F.log_softmax])
@pytest.mark.parametrize("shape,dim", [((5, 0, 0), -1), ((5, 3, 0), -1), ((0, 4), 1)])
def test_softmax_over_an_empty_tensor_is_empty(op, shape, dim):
    """Bug 4: NumPy's 'zero-size array to reduction operation maximum' escaped."""
    x = cnnfast.tensor(np.zeros(shape), requires_grad=True)
    y = op(x, dim)
    assert y.shape == shape
    y.backward(cnnfast.tensor(np.zeros(shape)))
    assert x.grad.shape == shape
