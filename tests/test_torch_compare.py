"""``cnnfast.testing.compare_with_torch``, the one comparison with PyTorch: it passes on the
same op and fails on a wrong output and on a wrong gradient alone."""

from __future__ import annotations

import numpy as np
import pytest

from cnnfast.testing import compare_with_torch, torch_results


@pytest.fixture
def arrays():
    pytest.importorskip("torch")
    return [np.random.default_rng(0).standard_normal((3, 4))]


def test_the_same_op_passes(arrays):
    compare_with_torch(lambda x: (x * x).sum(axis=1), lambda t: (t * t).sum(dim=1), arrays)


def test_a_wrong_output_fails(arrays):
    with pytest.raises(AssertionError, match="forward"):
        compare_with_torch(lambda x: x * 2.0, lambda t: t * 2.001, arrays)


def test_a_wrong_gradient_alone_fails(arrays):
    # the same values forward; PyTorch's gradient is half of ours (one factor detached)
    with pytest.raises(AssertionError, match="gradient of input 0"):
        compare_with_torch(lambda x: x * x, lambda t: t * t.detach(), arrays)


def test_a_wrong_shape_fails(arrays):
    with pytest.raises(AssertionError, match="shape"):
        compare_with_torch(lambda x: x.reshape(4, 3), lambda t: t, arrays, grad=False)


def test_torch_results_gives_outputs_and_gradients(arrays):
    outs, grads = torch_results(lambda t: (t * 3, t.sum()), arrays, np.ones((3, 4)))
    np.testing.assert_allclose(outs[0], arrays[0] * 3)
    np.testing.assert_allclose(grads[0], np.full((3, 4), 3.0))
