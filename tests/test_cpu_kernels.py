"""The fast CPU kernels (cnnfast.cpu) against the reference kernels and finite differences.

Every case runs in float32 and float64 and compares with the NumPy reference; the case grids
are chosen so that every algorithm branch of cnnfast.cpu runs (GEMM with the stride-1 shifted
copy and with the gather, per-sample and batched column layouts, row bands, pointwise, direct,
backward-data as a flipped convolution and through col2im). Backward passes are also checked
against float64 central differences on tiny shapes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
from cases import ConvCase, PoolCase, conv_all, make_array

from cnnfast.cpu import activation, conv, norm, pool
from cnnfast.reference import activation as ref_activation
from cnnfast.reference import conv as ref_conv
from cnnfast.reference import norm as ref_norm
from cnnfast.reference import pool as ref_pool
from cnnfast.testing import assert_close, gradient_check

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def tolerance(dtype, scale: float = 1.0) -> dict:
    """rtol/atol for comparing one dtype's results computed two ways (sums of many terms)."""
    if dtype == np.float32:
        return {"rtol": 2e-4 * scale, "atol": 2e-4 * scale}
    return {"rtol": 1e-9, "atol": 1e-9}


def frozen(*arrays):
    """Copies to check afterwards that a kernel left its inputs alone."""
    return [a.copy() for a in arrays]


def assert_unchanged(arrays, copies):
    for a, c in zip(arrays, copies):
        assert np.array_equal(a, c, equal_nan=True), "a kernel modified its input"


# --- convolution ----------------------------------------------------------------------------------

CONV_CASES = {
    # GEMM, stride-1 'same' shifted copy, batched layout; backward-data as a flipped conv.
    "2d-same-odd-nonsquare": ConvCase((2, 5, 7, 9), (4, 5, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Winograd F(2x2, 3x3): odd output sizes (partial tiles), no padding, uneven padding.
    "2d-winograd-odd": ConvCase((2, 8, 11, 13), (9, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-winograd-pad0": ConvCase((1, 10, 12, 11), (8, 10, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    "2d-winograd-pad-2-1": ConvCase((3, 12, 9, 10), (16, 12, 3, 3), (1, 1), (2, 1), (1, 1), 1),
    "2d-winograd-wide": ConvCase((2, 32, 10, 11), (33, 32, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Few taps, wide samples.
    "2d-same-wide": ConvCase((2, 3, 16, 17), (6, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-batch1-stride2-pad1": ConvCase((1, 6, 9, 7), (8, 6, 3, 3), (2, 2), (1, 1), (1, 1), 1),
    "2d-stride-mixed-rect-kernel": ConvCase((2, 4, 8, 9), (3, 4, 3, 2), (2, 1), (1, 0), (1, 1), 1),
    "2d-dilation2-same": ConvCase((2, 4, 9, 8), (5, 4, 3, 3), (1, 1), (2, 2), (2, 2), 1),
    "2d-dilation2-pad1": ConvCase((1, 4, 9, 10), (3, 4, 3, 3), (1, 1), (1, 1), (2, 2), 1),
    # Stride 1 with padding beyond dilation * (KS - 1): backward-data through col2im.
    "2d-pad-gt-kernel": ConvCase((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (3, 3), (1, 1), 1),
    "2d-groups2": ConvCase((2, 8, 7, 6), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 2),
    "2d-groups2-stride2": ConvCase((2, 8, 7, 6), (6, 4, 3, 3), (2, 2), (1, 0), (1, 1), 2),
    # Direct kernel: depthwise, depthwise with a multiplier, a single input channel.
    "2d-depthwise": ConvCase((2, 4, 7, 7), (4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 4),
    "2d-depthwise-stride2": ConvCase((1, 3, 8, 7), (6, 1, 3, 3), (2, 2), (1, 1), (1, 1), 3),
    "2d-one-channel": ConvCase((3, 1, 9, 8), (4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Pointwise: matrix product per sample; and small 1x1 layers through the other paths.
    "2d-1x1-pointwise": ConvCase((2, 6, 16, 17), (5, 6, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-1x1-small-gemm": ConvCase((3, 20, 5, 5), (7, 20, 1, 1), (1, 1), (0, 0), (1, 1), 1),
    "2d-1x1-stride2": ConvCase((2, 20, 7, 8), (9, 20, 1, 1), (2, 2), (0, 0), (1, 1), 1),
    "2d-stride-gt-kernel": ConvCase((1, 18, 8, 7), (2, 18, 2, 2), (3, 3), (1, 1), (1, 1), 1),
    "3d-same": ConvCase((2, 3, 5, 6, 7), (4, 3, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    "3d-stride-pad": ConvCase((1, 4, 6, 5, 7), (3, 4, 3, 3, 2), (2, 1, 2), (1, 1, 0), (1, 1, 1),
                              1),
    "3d-dilation-groups2": ConvCase((2, 6, 5, 6, 5), (4, 3, 2, 3, 2), (1, 1, 1), (1, 2, 1),
                                    (2, 2, 1), 2),
    "3d-depthwise": ConvCase((1, 3, 4, 5, 4), (3, 1, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1),
                             3),
}
CONV_IDS = list(CONV_CASES)


def _check_conv(case, dtype, layout="contiguous", seed=0):
    rng = np.random.default_rng(seed)
    x = make_array(rng, case.x_shape, dtype, layout)
    w = make_array(rng, case.w_shape, dtype, layout)
    y_shape = ref_conv.conv_forward(x, w, *case.args).shape
    gy = make_array(rng, y_shape, dtype, layout)
    copies = frozen(x, w, gy)
    got = conv_all(conv, case, x, w, gy)
    expected = conv_all(ref_conv, case, x, w, gy)
    taps = int(np.prod(case.w_shape[1:]))
    for name, a, e in zip(("y", "gx", "gw"), got, expected):
        assert a.dtype == dtype, name
        assert_close(a, e, name=name, **tolerance(dtype, scale=max(1.0, taps / 50)))
    assert_unchanged((x, w, gy), copies)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case_id", CONV_IDS)
def test_conv_matches_reference(case_id, dtype):
    _check_conv(CONV_CASES[case_id], dtype)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("case_id", ["2d-same-odd-nonsquare", "2d-groups2-stride2",
                                     "2d-one-channel", "2d-1x1-pointwise", "2d-winograd-odd",
                                     "3d-stride-pad"])
def test_conv_non_contiguous_inputs(case_id, layout):
    _check_conv(CONV_CASES[case_id], np.float32, layout)


@pytest.mark.parametrize("case_id", ["2d-same-odd-nonsquare", "2d-same-wide",
                                     "2d-winograd-pad-2-1", "2d-winograd-wide",
                                     "2d-batch1-stride2-pad1",
                                     "2d-pad-gt-kernel", "3d-same", "3d-stride-pad",
                                     "3d-dilation-groups2"])
def test_conv_in_small_chunks_and_row_bands(monkeypatch, case_id):
    """A tiny column budget forces many chunks and, within a sample, bands of output rows
    (whose backward-data contributions overlap at the band edges)."""
    monkeypatch.setattr(conv, "COLS_BUDGET", 64)
    monkeypatch.setattr(conv, "WINOGRAD_BUDGET", 64)
    _check_conv(CONV_CASES[case_id], np.float64)


def test_conv_on_one_thread(monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(conv, "COLS_BUDGET", 256)
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        for case_id in ("2d-same-odd-nonsquare", "2d-batch1-stride2-pad1", "2d-depthwise"):
            _check_conv(CONV_CASES[case_id], np.float64)
    finally:
        numba.set_num_threads(previous)


GRAD_CASES = {
    "2d-same": ConvCase((1, 2, 4, 5), (3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    # Winograd on few channels (thresholds lowered in the test), odd output size
    "2d-winograd": ConvCase((1, 3, 10, 9), (2, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-stride2-groups2": ConvCase((2, 4, 5, 4), (4, 2, 3, 2), (2, 1), (1, 0), (1, 1), 2),
    "2d-dilation": ConvCase((1, 2, 6, 5), (2, 2, 2, 3), (1, 1), (1, 2), (2, 2), 1),
    "2d-depthwise": ConvCase((1, 2, 5, 4), (4, 1, 3, 3), (2, 1), (1, 1), (1, 1), 2),
    "3d": ConvCase((1, 2, 3, 4, 3), (2, 2, 2, 3, 2), (1, 2, 1), (1, 1, 0), (1, 1, 1), 1),
}


@pytest.mark.parametrize("case_id", list(GRAD_CASES))
def test_conv_backward_matches_finite_differences(monkeypatch, case_id):
    monkeypatch.setattr(conv, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv, "WINOGRAD_WEIGHT_MIN_CHANNELS", 1)
    case = GRAD_CASES[case_id]
    rng = np.random.default_rng(3)
    x = make_array(rng, case.x_shape)
    w = make_array(rng, case.w_shape)

    def backward(gy, x, w):
        return (conv.conv_backward_data(gy, w, x.shape, *case.args),
                conv.conv_backward_weight(gy, x, w.shape, *case.args))

    gradient_check(lambda x, w: conv.conv_forward(x, w, *case.args), [x, w], analytic=backward)


@pytest.mark.parametrize("case_id", ["2d-same-odd-nonsquare", "2d-batch1-stride2-pad1",
                                     "2d-depthwise", "2d-winograd-odd", "3d-same"])
def test_conv_deterministic_and_outputs_not_reused(case_id):
    case = CONV_CASES[case_id]
    rng = np.random.default_rng(7)
    x, w = make_array(rng, case.x_shape, np.float32), make_array(rng, case.w_shape, np.float32)
    gy = make_array(rng, ref_conv.conv_forward(x, w, *case.args).shape, np.float32)
    first = conv_all(conv, case, x, w, gy)
    kept = frozen(*first)
    second = conv_all(conv, case, x, w, gy)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)  # same bits
    # A call on other data must not write into arrays handed out before.
    conv_all(conv, case, -x, -w, -gy)
    assert_unchanged(first, kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 4, 3, 2, 3), (3, 2, 1, 1)])
def test_bias_matches_reference(shape, dtype):
    rng = np.random.default_rng(4)
    y = make_array(rng, shape, dtype)
    b = make_array(rng, shape[1:2], dtype)
    assert_close(conv.bias_add(y, b), ref_conv.bias_add(y, b), **tolerance(dtype))
    assert_close(conv.bias_grad(y), ref_conv.bias_grad(y), **tolerance(dtype))
    assert conv.bias_add(y, b).dtype == dtype and conv.bias_grad(y).dtype == dtype
    ys = make_array(rng, shape, dtype, "sliced")
    assert_close(conv.bias_grad(ys), ref_conv.bias_grad(ys), **tolerance(dtype))


def test_bias_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    y, b = make_array(rng, (2, 3, 4, 3)), make_array(rng, (3,))
    gradient_check(conv.bias_add, [y, b], analytic=lambda gy, y, b: (gy, conv.bias_grad(gy)))


# --- pooling --------------------------------------------------------------------------------------

POOL_CASES = {
    "2d-2x2-s2": PoolCase((2, 3, 8, 6), (2, 2), (2, 2), (0, 0)),
    "2d-odd-floor": PoolCase((1, 2, 7, 9), (2, 2), (2, 2), (0, 0)),
    "2d-3x3-s2-pad1": PoolCase((2, 2, 9, 8), (3, 3), (2, 2), (1, 1)),
    "2d-overlap-s1-pad1": PoolCase((1, 3, 5, 6), (3, 3), (1, 1), (1, 1)),
    "2d-rect": PoolCase((2, 2, 7, 8), (3, 2), (1, 3), (1, 0)),
    "3d-2x2x2": PoolCase((1, 2, 4, 6, 5), (2, 2, 2), (2, 2, 2), (0, 0, 0)),
    "3d-mixed-pad": PoolCase((2, 1, 5, 7, 6), (2, 3, 2), (1, 2, 2), (1, 1, 0)),
    "2d-overlap-rect-no-pad": PoolCase((2, 2, 7, 9), (3, 2), (1, 2), (0, 0)),
    "3d-overlap-no-pad": PoolCase((1, 2, 7, 6, 5), (3, 3, 2), (2, 1, 2), (0, 0, 0)),
}
POOL_IDS = list(POOL_CASES)


def untied(rng, shape, dtype, layout="contiguous"):
    """Distinct values (a shuffled range), so that max pooling has no ties."""
    a = make_array(rng, shape, dtype, layout)
    a[...] = rng.permutation(a.size).reshape(shape) * 0.01 - 1
    return a


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case_id", POOL_IDS)
def test_pool_matches_reference(case_id, dtype, layout):
    case = POOL_CASES[case_id]
    rng = np.random.default_rng(5)
    x = untied(rng, case.x_shape, dtype, layout)
    y_ref, idx_ref = ref_pool.max_pool_forward(x, *case.args)
    gy = make_array(rng, y_ref.shape, dtype, layout)
    copies = frozen(x, gy)
    y, idx = pool.max_pool_forward(x, *case.args)
    assert y.dtype == dtype and idx.dtype == np.int64
    assert np.array_equal(y, y_ref) and np.array_equal(idx, idx_ref)
    for got, expected in [
        (pool.max_pool_backward(gy, idx, x.shape),
         ref_pool.max_pool_backward(gy, idx_ref, x.shape)),
        (pool.avg_pool_forward(x, *case.args), ref_pool.avg_pool_forward(x, *case.args)),
        (pool.avg_pool_backward(gy, x.shape, *case.args),
         ref_pool.avg_pool_backward(gy, x.shape, *case.args)),
    ]:
        assert got.dtype == dtype
        assert_close(got, expected, **tolerance(dtype))
    assert_unchanged((x, gy), copies)


def test_max_pool_nan_and_padding():
    x = np.array([[[[-5.0, -7.0, np.nan], [-6.0, np.nan, -1.0]]]], dtype=np.float32)
    for args in [((2, 2), (1, 1), (1, 1)), ((2, 3), (2, 2), (0, 1))]:
        y, idx = pool.max_pool_forward(x, *args)
        y_ref, idx_ref = ref_pool.max_pool_forward(x, *args)
        assert np.array_equal(y, y_ref, equal_nan=True) and np.array_equal(idx, idx_ref)
        assert np.all(idx >= 0)  # padding (0) never beats the negative inputs


@pytest.mark.parametrize("args", [((2, 2), (2, 2), (0, 0)), ((3, 2), (1, 2), (0, 0)),
                                  ((2, 2), (1, 1), (0, 0))])
def test_max_pool_without_padding_nan_ties_and_infinities(args):
    """The no-padding row kernel keeps the reference's rules: first maximum in scan order,
    NaN wins (a later NaN over an earlier one), -inf and ties handled alike."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, (2, 3, 7, 8)).astype(np.float32)  # many ties
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, 12, replace=False)] = np.nan
    flat[rng.choice(flat.size, 6, replace=False)] = -np.inf
    y, idx = pool.max_pool_forward(x, *args)
    y_ref, idx_ref = ref_pool.max_pool_forward(x, *args)
    assert np.array_equal(y, y_ref, equal_nan=True) and np.array_equal(idx, idx_ref)


@pytest.mark.parametrize("case_id", ["2d-3x3-s2-pad1", "2d-overlap-s1-pad1", "3d-mixed-pad"])
def test_pool_backward_matches_finite_differences(case_id):
    case = POOL_CASES[case_id]
    rng = np.random.default_rng(6)
    x = untied(rng, (1,) + case.x_shape[1:], np.float64)

    def max_backward(gy, x):
        return (pool.max_pool_backward(gy, pool.max_pool_forward(x, *case.args)[1], x.shape),)

    gradient_check(lambda x: pool.max_pool_forward(x, *case.args)[0], [x], analytic=max_backward,
                   eps=1e-4)
    gradient_check(lambda x: pool.avg_pool_forward(x, *case.args), [x],
                   analytic=lambda gy, x: (pool.avg_pool_backward(gy, x.shape, *case.args),))


def test_pool_deterministic_and_outputs_not_reused():
    case = POOL_CASES["2d-overlap-s1-pad1"]
    rng = np.random.default_rng(8)
    x = untied(rng, case.x_shape, np.float32)
    gy = make_array(rng, x.shape, np.float32)
    y, idx = pool.max_pool_forward(x, *case.args)
    runs = [pool.max_pool_backward(gy, idx, x.shape) for _ in range(2)]
    runs += [pool.avg_pool_backward(gy, x.shape, *case.args) for _ in range(2)]
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[2], runs[3])
    kept = y.copy()
    pool.max_pool_forward(-x, *case.args)
    assert np.array_equal(y, kept)


# --- activation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_matches_reference(dtype, layout):
    rng = np.random.default_rng(9)
    x = make_array(rng, (3, 4, 5, 7), dtype, layout)
    x[0, 0, 0, :3] = [np.nan, 0.0, -0.0]
    gy = make_array(rng, x.shape, dtype, layout)
    copies = frozen(x, gy)
    y = activation.relu_forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert np.array_equal(y, ref_activation.relu_forward(x), equal_nan=True)
    gx = activation.relu_backward(gy, y)
    assert gx.dtype == dtype
    assert np.array_equal(gx, ref_activation.relu_backward(gy, ref_activation.relu_forward(x)))
    assert_unchanged((x, gy), copies)


def test_relu_large_array_split_across_threads():
    rng = np.random.default_rng(10)
    x = make_array(rng, (3, 5, 101, 211), np.float32)
    gy = make_array(rng, x.shape, np.float32)
    y = activation.relu_forward(x)
    assert np.array_equal(y, ref_activation.relu_forward(x))
    assert np.array_equal(activation.relu_backward(gy, y), ref_activation.relu_backward(gy, y))


def test_relu_backward_matches_finite_differences():
    rng = np.random.default_rng(11)
    x = make_array(rng, (2, 3, 4))
    x[np.abs(x) < 0.1] = 0.5  # away from the kink

    def backward(gy, x):
        return (activation.relu_backward(gy, activation.relu_forward(x)),)

    gradient_check(activation.relu_forward, [x], analytic=backward)


# --- batch norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (2, 5, 3, 4, 5), (1, 2, 1, 1), (8, 70, 3, 3)])
def test_batch_norm_matches_reference(shape, dtype, layout):
    rng = np.random.default_rng(12)
    x = make_array(rng, shape, dtype, layout) * 3 + 5
    gamma, beta = make_array(rng, shape[1:2], dtype), make_array(rng, shape[1:2], dtype)
    gy = make_array(rng, shape, dtype, layout)
    running_mean = make_array(rng, shape[1:2], dtype)
    running_var = rng.random(shape[1]).astype(dtype) + 0.5
    copies = frozen(x, gamma, beta, gy)
    got = norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
    expected = ref_norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
    for name, a, e in zip(("y", "mean", "invstd"), got, expected):
        assert a.dtype == dtype
        assert_close(a, e, name=name, **tolerance(dtype))
    mean, invstd = expected[1], expected[2]
    got = norm.batch_norm_backward(gy, x, gamma, mean, invstd)
    expected = ref_norm.batch_norm_backward(gy, x, gamma, mean, invstd)
    for name, a, e in zip(("gx", "ggamma", "gbeta"), got, expected):
        assert a.dtype == dtype
        assert_close(a, e, name=name, **tolerance(dtype, scale=5))
    y = norm.batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, 1e-5)
    assert y.dtype == dtype
    assert_close(y, ref_norm.batch_norm_forward_eval(x, gamma, beta, running_mean, running_var,
                                                     1e-5), **tolerance(dtype))
    assert_unchanged((x, gamma, beta, gy), copies)


def test_batch_norm_float32_large_offset():
    """Statistics of a channel far from zero (mean 1000, std 1) keep float32 accuracy."""
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((16, 3, 9, 9)) + 1000).astype(np.float32)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    y, mean, invstd = norm.batch_norm_forward_train(x, ones, zeros, 1e-5)
    x64 = x.astype(np.float64)
    exact_invstd = 1 / np.sqrt(x64.var(axis=(0, 2, 3)) + 1e-5)
    assert_close(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6, atol=0)
    assert_close(invstd, exact_invstd, rtol=1e-4, atol=0)
    assert_close(y.std(axis=(0, 2, 3)), np.ones(3), rtol=1e-3, atol=0)


def test_batch_norm_backward_matches_finite_differences():
    rng = np.random.default_rng(14)
    x = make_array(rng, (3, 2, 3, 2))
    gamma, beta = make_array(rng, (2,)), make_array(rng, (2,))

    def forward(x, gamma, beta):
        return norm.batch_norm_forward_train(x, gamma, beta, 1e-5)[0]

    def backward(gy, x, gamma, beta):
        _, mean, invstd = norm.batch_norm_forward_train(x, gamma, beta, 1e-5)
        return norm.batch_norm_backward(gy, x, gamma, mean, invstd)

    gradient_check(forward, [x, gamma, beta], analytic=backward, rtol=1e-5, atol=1e-6)


def test_batch_norm_deterministic():
    rng = np.random.default_rng(15)
    x = make_array(rng, (16, 8, 13, 11), np.float32)
    gamma, beta = make_array(rng, (8,), np.float32), make_array(rng, (8,), np.float32)
    gy = make_array(rng, x.shape, np.float32)
    runs = [norm.batch_norm_forward_train(x, gamma, beta, 1e-5) for _ in range(2)]
    for a, b in zip(*runs):
        assert np.array_equal(a, b)
    back = [norm.batch_norm_backward(gy, x, gamma, runs[0][1], runs[0][2]) for _ in range(2)]
    for a, b in zip(*back):
        assert np.array_equal(a, b)


# --- allocator thresholds (cnnfast.cpu._malloc) ---------------------------------------------------

_FAULTS_SCRIPT = """
import json, resource, sys
import numpy as np
import cnnfast.cpu
from cnnfast.cpu._malloc import malloc_state
# Activation-sized arrays allocated and freed as a training step does (1.6 MiB each).
def step():
    a = [np.ones((64, 8, 28, 28), np.float32) for _ in range(8)]
    return sum(float(x[0, 0, 0, 0]) for x in a)
step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20
print(json.dumps({"faults": faults, "state": malloc_state()}))
"""


def _faults_per_step(tune: str) -> dict:
    env = dict(os.environ, CNNFAST_MALLOC_TUNE=tune)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc allocator only")
def test_malloc_tuning_keeps_activations_off_fresh_pages():
    on, off = _faults_per_step("1"), _faults_per_step("0")
    assert on["state"]["applied"] and on["state"]["mmap_threshold"] == 32 << 20
    assert not off["state"]["applied"] and "CNNFAST_MALLOC_TUNE" in off["state"]["reason"]
    # Without it every 1.6 MiB array is a fresh mmap (about 400 faults each); with it, reuse.
    assert off["faults"] > 1000
    assert on["faults"] < 50
