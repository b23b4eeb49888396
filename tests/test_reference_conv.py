"""The reference convolution against explicit loops, SciPy and finite differences (against
PyTorch, with the other paths: tests/test_contract.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cases import ConvCase, make_array

from cnnfast.reference import conv as ref
from cnnfast.testing import assert_close, gradient_check

CASES = {
    "2d-plain": ConvCase((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1),
    "2d-batch1-odd-stride2-pad1": ConvCase((1, 3, 7, 5), (4, 3, 3, 2), (2, 1), (1, 1), (1, 1), 1),
    "2d-dilation2-pad": ConvCase((2, 2, 7, 6), (3, 2, 3, 3), (1, 1), (2, 1), (2, 2), 1),
    "2d-groups2-stride2": ConvCase((2, 4, 6, 5), (6, 2, 3, 3), (2, 2), (1, 0), (1, 1), 2),
    "2d-depthwise": ConvCase((2, 3, 5, 5), (3, 1, 3, 3), (1, 1), (1, 1), (1, 1), 3),
    "2d-depthwise-multiplier2": ConvCase((1, 2, 5, 4), (4, 1, 2, 3), (1, 2), (0, 1), (1, 1), 2),
    "2d-1x1-stride3": ConvCase((1, 3, 7, 8), (2, 3, 1, 1), (3, 3), (0, 0), (1, 1), 1),
    "2d-stride-gt-kernel": ConvCase((1, 2, 8, 7), (2, 2, 2, 2), (3, 3), (1, 1), (1, 1), 1),
    "3d-plain": ConvCase((1, 2, 4, 5, 3), (3, 2, 2, 3, 2), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1),
    "3d-stride-pad-dil-groups2": ConvCase(
        (2, 4, 4, 5, 4), (4, 2, 3, 2, 2), (2, 1, 2), (1, 0, 1), (1, 2, 1), 2
    ),
}
CASE_IDS = list(CASES)


def naive_conv(x, w, stride, padding, dilation, groups):
    """Cross-correlation by explicit loops over every output element and every term of its sum."""
    n = x.shape[0]
    k, cg = w.shape[:2]
    size, kernel = x.shape[2:], w.shape[2:]
    out = ref.output_size(size, kernel, stride, padding, dilation)
    kg = k // groups
    y = np.zeros((n, k) + out, dtype=np.float64)
    for b, f, o in itertools.product(range(n), range(k), itertools.product(*map(range, out))):
        g = f // kg
        total = 0.0
        for ci, off in itertools.product(range(cg), itertools.product(*map(range, kernel))):
            pos = [oi * s - p + ki * d
                   for oi, s, p, ki, d in zip(o, stride, padding, off, dilation)]
            if all(0 <= q < s for q, s in zip(pos, size)):
                total += x[(b, g * cg + ci) + tuple(pos)] * w[(f, ci) + off]
        y[(b, f) + o] = total
    return y


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_forward_matches_explicit_loops(case_id):
    case = CASES[case_id]
    rng = np.random.default_rng(1)
    x = make_array(rng, case.x_shape)
    w = make_array(rng, case.w_shape)
    assert_close(ref.conv_forward(x, w, *case.args), naive_conv(x, w, *case.args), name="y")


@pytest.mark.parametrize("nd", [2, 3], ids=["2d", "3d"])
def test_forward_matches_scipy_correlate(nd):
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(2)
    x = make_array(rng, (2, 3) + (6, 5, 4)[:nd])
    w = make_array(rng, (4, 3) + (3, 2, 2)[:nd])
    expected = np.stack([
        np.stack([
            sum(signal.correlate(x[b, c], w[k, c], mode="valid") for c in range(3))
            for k in range(4)
        ])
        for b in range(2)
    ])
    ones = (1,) * nd
    assert_close(ref.conv_forward(x, w, ones, (0,) * nd, ones, 1), expected, name="y")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_backward_matches_finite_differences(case_id):
    case = CASES[case_id]
    rng = np.random.default_rng(3)
    x = make_array(rng, case.x_shape)
    w = make_array(rng, case.w_shape)

    def forward(x, w):
        return ref.conv_forward(x, w, *case.args)

    def backward(gy, x, w):
        return (ref.conv_backward_data(gy, w, x.shape, *case.args),
                ref.conv_backward_weight(gy, x, w.shape, *case.args))

    gradient_check(forward, [x, w], analytic=backward)


@pytest.mark.parametrize("nd", [2, 3], ids=["2d", "3d"])
def test_bias_grad_matches_finite_differences(nd):
    rng = np.random.default_rng(4)
    y = make_array(rng, (2, 3) + (4, 3, 2)[:nd])
    b = make_array(rng, (3,))
    gradient_check(ref.bias_add, [y, b], analytic=lambda gy, y, b: (gy, ref.bias_grad(gy)))


def test_uncovered_inputs_get_zero_gradient():
    # Stride 3 with a 1x1 kernel reads only every third row and column.
    rng = np.random.default_rng(5)
    case = CASES["2d-1x1-stride3"]
    gy_shape = (1, 2) + ref.output_size(case.x_shape[2:], (1, 1), *case.args[:3])
    gx = ref.conv_backward_data(make_array(rng, gy_shape), make_array(rng, case.w_shape),
                                case.x_shape, *case.args)
    mask = np.zeros(case.x_shape[2:], dtype=bool)
    mask[::3, ::3] = True
    assert np.all(gx[:, :, ~mask] == 0)
    assert np.all(gx[:, :, mask] != 0)
