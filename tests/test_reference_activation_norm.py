"""Reference ReLU, dropout mask, batch norm and linear against finite differences (against PyTorch,
with the other paths: tests/test_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
from cases import make_array

from cnnfast.reference import activation, linear, norm
from cnnfast.testing import assert_close, gradient_check

DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
NORM_SHAPES = {
    "2d": (3, 4, 5, 3),
    "2d-batch1-odd": (1, 3, 5, 7),
    "3d": (2, 3, 3, 4, 5),
}


def away_from_zero(rng, shape):
    """Values with |v| >= 0.1, so a finite-difference step never crosses ReLU's kink."""
    v = rng.standard_normal(shape)
    return np.where(v >= 0, v + 0.1, v - 0.1)


# --- ReLU ---------------------------------------------------------------------------------------

def test_relu_values():
    x = np.array([-2.0, -0.0, 0.0, 0.5, np.nan])
    y = activation.relu_forward(x)
    np.testing.assert_array_equal(y[:4], [0.0, 0.0, 0.0, 0.5])
    assert np.isnan(y[4])
    gx = activation.relu_backward(np.full(5, 3.0), y)
    np.testing.assert_array_equal(gx, [0.0, 0.0, 0.0, 3.0, 0.0])


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 4, 3)], ids=["2d", "3d"])
def test_relu_backward_matches_finite_differences(shape):
    x = away_from_zero(np.random.default_rng(1), shape)
    gradient_check(activation.relu_forward, [x], analytic=lambda gy, x: (
        activation.relu_backward(gy, activation.relu_forward(x)),))


# --- dropout mask -------------------------------------------------------------------------------

@DTYPES
def test_dropout_mask_values_and_rate(dtype):
    p = 0.25
    mask = activation.dropout_mask(np, (50, 40, 10), p, np.random.default_rng(2), dtype)
    assert mask.shape == (50, 40, 10) and mask.dtype == dtype
    kept = mask != 0
    np.testing.assert_array_equal(mask[kept], dtype(1 / (1 - p)))
    assert abs(kept.mean() - (1 - p)) < 0.02  # 20000 draws: the standard error is 0.003


def test_dropout_mask_is_deterministic_for_a_seed():
    first = activation.dropout_mask(np, (4, 5, 6), 0.5, np.random.default_rng(3), np.float32)
    again = activation.dropout_mask(np, (4, 5, 6), 0.5, np.random.default_rng(3), np.float32)
    other = activation.dropout_mask(np, (4, 5, 6), 0.5, np.random.default_rng(4), np.float32)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_dropout_mask_edge_rates():
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(activation.dropout_mask(np, (3, 4), 0.0, rng, np.float64), 1.0)
    np.testing.assert_array_equal(activation.dropout_mask(np, (3, 4), 1.0, rng, np.float64), 0.0)


# --- batch norm ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_id", list(NORM_SHAPES))
def test_batch_norm_backward_matches_finite_differences(shape_id):
    rng = np.random.default_rng(6)
    shape = NORM_SHAPES[shape_id]
    x = make_array(rng, shape)
    gamma = make_array(rng, shape[1:2])
    beta = make_array(rng, shape[1:2])
    eps = 1e-3

    def forward(x, gamma, beta):
        return norm.batch_norm_forward_train(x, gamma, beta, eps)[0]

    def backward(gy, x, gamma, beta):
        _, mean, invstd = norm.batch_norm_forward_train(x, gamma, beta, eps)
        return norm.batch_norm_backward(gy, x, gamma, mean, invstd)

    gradient_check(forward, [x, gamma, beta], analytic=backward, rtol=1e-5, atol=1e-6)


def test_batch_norm_train_statistics():
    rng = np.random.default_rng(7)
    x = 3.0 + 2.0 * make_array(rng, (4, 2, 3, 5))
    y, mean, invstd = norm.batch_norm_forward_train(x, np.ones(2), np.zeros(2), 1e-5)
    assert_close(mean, x.mean(axis=(0, 2, 3)), name="mean")
    assert_close(invstd, 1 / np.sqrt(x.var(axis=(0, 2, 3)) + 1e-5), name="invstd")
    assert_close(y.mean(axis=(0, 2, 3)), np.zeros(2), atol=1e-12, name="mean of y")


# --- linear -------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_backward_matches_finite_differences(with_bias):
    rng = np.random.default_rng(8)
    x, w, b = make_array(rng, (3, 5)), make_array(rng, (4, 5)), make_array(rng, (4,))
    if with_bias:
        gradient_check(linear.linear_forward, [x, w, b],
                       analytic=lambda gy, x, w, b: linear.linear_backward(gy, x, w))
    else:
        gradient_check(lambda x, w: linear.linear_forward(x, w, None), [x, w],
                       analytic=lambda gy, x, w: linear.linear_backward(gy, x, w)[:2])


def test_linear_backward_skips_gradients_not_needed():
    rng = np.random.default_rng(9)
    gy, x, w = make_array(rng, (3, 4)), make_array(rng, (3, 5)), make_array(rng, (4, 5))
    gx, gw, gb = linear.linear_backward(gy, x, w, need_x=False, need_w=True, need_b=False)
    assert gx is None and gb is None and gw.shape == (4, 5)
    gx, gw, gb = linear.linear_backward(gy, x, w, need_x=True, need_w=False, need_b=True)
    assert gw is None and gx.shape == (3, 5) and gb.shape == (4,)
