"""The reference pooling kernels against explicit loops and finite differences (against PyTorch,
with the other paths: tests/test_contract.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from cases import PoolCase

from cnnfast.reference import pool as ref
from cnnfast.testing import assert_close, gradient_check

# PyTorch allows padding up to half the kernel; these stay within that.
CASES = {
    "2d-k2s2": PoolCase((2, 3, 6, 6), (2, 2), (2, 2), (0, 0)),
    "2d-batch1-odd-k3s2p1": PoolCase((1, 2, 7, 5), (3, 3), (2, 2), (1, 1)),
    "2d-overlap-k3s1p1": PoolCase((2, 2, 5, 6), (3, 3), (1, 1), (1, 1)),
    "2d-nonsquare-kernel": PoolCase((1, 3, 7, 8), (3, 2), (2, 1), (1, 0)),
    "2d-stride-gt-kernel": PoolCase((1, 2, 8, 7), (2, 2), (3, 3), (0, 1)),
    "3d-k2s2": PoolCase((1, 2, 4, 5, 6), (2, 2, 2), (2, 2, 2), (0, 0, 0)),
    "3d-k3s2p1": PoolCase((2, 2, 5, 4, 5), (3, 3, 2), (2, 1, 2), (1, 1, 1)),
}
CASE_IDS = list(CASES)


def distinct_values(rng, shape, dtype=np.float64, layout="contiguous"):
    """A random permutation of well-separated values (no ties), optionally a non-contiguous view."""
    shape = tuple(shape)
    if layout == "contiguous":
        base_shape, view = shape, lambda a: a
    elif layout == "transposed":
        base_shape, view = shape[::-1], lambda a: a.transpose()
    elif layout == "sliced":
        base_shape, view = shape[:-1] + (2 * shape[-1],), lambda a: a[..., ::2]
    else:
        raise ValueError(layout)
    size = math.prod(base_shape)
    values = (rng.permutation(size) - size / 2) * (4.0 / size + 0.01)
    a = view(values.reshape(base_shape).astype(dtype))
    assert a.shape == shape and (layout == "contiguous") == a.flags.c_contiguous
    return a


def windows(case):
    """Yield (output index, list of (flat in-plane index or None for padding) per window)."""
    size = case.x_shape[2:]
    out = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in zip(size, *case.args))
    for o in itertools.product(*map(range, out)):
        members = []
        for off in itertools.product(*map(range, case.kernel)):
            pos = [oi * st - p + ki for oi, st, p, ki in zip(o, case.stride, case.padding, off)]
            inside = all(0 <= q < s for q, s in zip(pos, size))
            members.append(int(np.ravel_multi_index(pos, size)) if inside else None)
        yield out, o, members


def naive_max_pool(x, case):
    y = idx = None
    for out, o, members in windows(case):
        if y is None:
            y = np.zeros(x.shape[:2] + out)
            idx = np.zeros(x.shape[:2] + out, dtype=np.int64)
        for b, c in itertools.product(*map(range, x.shape[:2])):
            plane = x[b, c].reshape(-1)
            best = max((m for m in members if m is not None), key=lambda m: plane[m])
            y[(b, c) + o], idx[(b, c) + o] = plane[best], best
    return y, idx


def naive_avg_pool(x, case):
    y = None
    for out, o, members in windows(case):
        if y is None:
            y = np.zeros(x.shape[:2] + out)
        for b, c in itertools.product(*map(range, x.shape[:2])):
            plane = x[b, c].reshape(-1)
            y[(b, c) + o] = sum(plane[m] for m in members if m is not None) / len(members)
    return y


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_max_pool_forward_matches_loops(case_id):
    case = CASES[case_id]
    x = distinct_values(np.random.default_rng(1), case.x_shape)
    y, idx = ref.max_pool_forward(x, *case.args)
    y_expected, idx_expected = naive_max_pool(x, case)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, idx_expected)
    assert_close(y, y_expected, name="y")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_avg_pool_forward_matches_loops(case_id):
    case = CASES[case_id]
    x = distinct_values(np.random.default_rng(2), case.x_shape)
    assert_close(ref.avg_pool_forward(x, *case.args), naive_avg_pool(x, case), name="y")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_max_pool_backward_matches_finite_differences(case_id):
    case = CASES[case_id]
    # Values at least 0.01 apart: a 1e-6 step never changes which element wins.
    x = distinct_values(np.random.default_rng(3), case.x_shape)

    def backward(gy, x):
        _, idx = ref.max_pool_forward(x, *case.args)
        return (ref.max_pool_backward(gy, idx, x.shape),)

    gradient_check(lambda x: ref.max_pool_forward(x, *case.args)[0], [x], analytic=backward)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_avg_pool_backward_matches_finite_differences(case_id):
    case = CASES[case_id]
    x = distinct_values(np.random.default_rng(4), case.x_shape)
    gradient_check(lambda x: ref.avg_pool_forward(x, *case.args), [x],
                   analytic=lambda gy, x: (ref.avg_pool_backward(gy, x.shape, *case.args),))


def test_max_pool_padding_never_wins():
    # Every value is negative, so zero padding would win if it were a candidate; the corner
    # window (kernel 2, stride 2, padding 1) covers one real element and three padding ones.
    x = -1.0 - distinct_values(np.random.default_rng(5), (1, 1, 4, 5)) ** 2
    y, idx = ref.max_pool_forward(x, (2, 2), (2, 2), (1, 1))
    assert y.shape == (1, 1, 3, 3)
    assert np.all(y < 0)
    assert y[0, 0, 0, 0] == x[0, 0, 0, 0] and idx[0, 0, 0, 0] == 0
    np.testing.assert_array_equal(y[0, 0], x[0, 0].reshape(-1)[idx[0, 0]])
    _, idx_expected = naive_max_pool(x, PoolCase(x.shape, (2, 2), (2, 2), (1, 1)))
    np.testing.assert_array_equal(idx, idx_expected)


def test_max_pool_first_maximum_wins_ties():
    x = np.zeros((1, 1, 3, 3))
    _, idx = ref.max_pool_forward(x, (3, 3), (1, 1), (1, 1))
    # Each window's first in-bounds element in scan order.
    np.testing.assert_array_equal(idx[0, 0], [[0, 0, 1], [0, 0, 1], [3, 3, 4]])


def test_avg_pool_counts_padding_in_divisor():
    x = np.ones((1, 1, 4, 4))
    y = ref.avg_pool_forward(x, (3, 3), (1, 1), (1, 1))
    assert y[0, 0, 0, 0] == pytest.approx(4 / 9)
    assert y[0, 0, 0, 1] == pytest.approx(6 / 9)
    assert y[0, 0, 1, 1] == pytest.approx(1.0)
    gx = ref.avg_pool_backward(np.ones_like(y), x.shape, (3, 3), (1, 1), (1, 1))
    assert gx[0, 0, 0, 0] == pytest.approx(4 / 9)


ADAPTIVE_CASES = {
    "2d-to-1x1": ((2, 3, 5, 4), (1, 1)),
    "2d-odd-7x5-to-3x2": ((1, 2, 7, 5), (3, 2)),
    "2d-identity": ((1, 2, 5, 5), (5, 5)),
    "2d-equal-bins-6x4-to-3x2": ((2, 2, 6, 4), (3, 2)),
    "3d-equal-bins-4x2x6-to-2x1x3": ((1, 2, 4, 2, 6), (2, 1, 3)),
    "2d-upsample-3-to-5": ((1, 1, 3, 4), (5, 3)),
    "3d-to-1": ((2, 2, 3, 4, 5), (1, 1, 1)),
    "3d-odd": ((1, 2, 5, 6, 7), (2, 4, 3)),
}


def test_adaptive_bins_follow_pytorch():
    assert ref.adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert ref.adaptive_bins(3, 5) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    assert ref.adaptive_bins(4, 1) == [(0, 4)]


@pytest.mark.parametrize("case_id", list(ADAPTIVE_CASES))
def test_adaptive_avg_pool_backward_matches_finite_differences(case_id):
    x_shape, out_size = ADAPTIVE_CASES[case_id]
    x = np.random.default_rng(6).standard_normal(x_shape)
    gradient_check(lambda x: ref.adaptive_avg_pool_forward(x, out_size), [x],
                   analytic=lambda gy, x: (ref.adaptive_avg_pool_backward(gy, x.shape),))
