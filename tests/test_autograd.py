"""The autograd core: graph walking, accumulation, no_grad, shape ops, devices."""

from __future__ import annotations

import numpy as np
import pytest

import cnnfast
from cnnfast import functional as F
from cnnfast.testing import assert_close, gradient_check


def test_reused_node_accumulates_gradient():
    x = cnnfast.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * x + x  # x used three times
    y.sum().backward()
    assert_close(x.grad, 2 * np.array([1.0, 2.0, 3.0]) + 1)


def test_diamond_graph_gradient():
    x = cnnfast.tensor([0.5, -1.5], requires_grad=True, dtype=np.float64)
    a = x.exp()
    b = a * 3.0
    c = a * a
    (b + c).sum().backward()  # d/dx (3 e^x + e^2x) = 3 e^x + 2 e^2x
    e = np.exp([0.5, -1.5])
    assert_close(x.grad, 3 * e + 2 * e * e)


def test_deep_chain_has_no_recursion_limit():
    x = cnnfast.tensor([1.0], requires_grad=True, dtype=np.float64)
    y = x
    for _ in range(5000):
        y = y * 1.0001
    y.backward()
    assert_close(x.grad, [1.0001 ** 5000], rtol=1e-9)


def test_grad_accumulates_across_backward_calls():
    x = cnnfast.tensor([2.0], requires_grad=True)
    (x * 3).sum().backward()
    (x * 4).sum().backward()
    assert_close(x.grad, [7.0])


def test_no_grad_records_nothing():
    w = cnnfast.tensor(np.ones((2, 2), np.float32), requires_grad=True)
    with cnnfast.no_grad():
        y = w @ w
    assert not y.requires_grad and y.is_leaf
    assert cnnfast.is_grad_enabled()


def test_unneeded_gradients_are_skipped():
    x = cnnfast.tensor(np.ones((1, 1, 4, 4), np.float32))  # an input: no gradient wanted
    w = cnnfast.tensor(np.ones((1, 1, 3, 3), np.float32), requires_grad=True)
    y = F.conv2d(x, w)
    assert y._ctx.needs_input_grad == (False, True, False)
    assert y._ctx.w is None  # backward-data will not run, so the weight is not kept
    y.sum().backward()
    assert x.grad is None and w.grad is not None


def test_backward_needs_scalar_or_grad():
    x = cnnfast.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2).backward()
    with pytest.raises(ValueError, match="shape"):
        (x * 2).backward(cnnfast.tensor([1.0]))
    with pytest.raises(RuntimeError, match="does not require grad"):
        cnnfast.tensor([1.0]).backward()


def test_elementwise_and_shape_ops_gradient(rng):
    a, b = rng.standard_normal((3, 4)), rng.uniform(0.5, 2.0, (4,))
    gradient_check(lambda a, b: ((a * b - b / (a * a + 1.0)) ** 2).sum(axis=1), [a, b])
    gradient_check(lambda a, b: (a.exp() + b.log()).mean(axis=0, keepdims=True), [a, b])
    gradient_check(lambda a: a.reshape(2, 6).transpose().flatten()[3:9], [a])
    gradient_check(lambda a: (-a).sigmoid() @ a.T, [a])
    gradient_check(lambda a: a[np.array([0, 0, 2])], [a])  # repeated index accumulates


def test_sigmoid_is_stable():
    x = cnnfast.tensor(np.array([-1e4, 0.0, 1e4], np.float32), requires_grad=True)
    y = x.sigmoid()
    assert_close(y, [0.0, 0.5, 1.0])
    y.sum().backward()
    assert np.isfinite(x.grad.numpy()).all()


def test_tensor_factory_dtypes_and_errors():
    assert cnnfast.tensor([1.0, 2.0]).dtype == np.float32
    assert cnnfast.tensor(np.zeros(2)).dtype == np.float64
    assert cnnfast.tensor([1, 2]).dtype.kind == "i"
    with pytest.raises(TypeError, match="float32 or float64"):
        cnnfast.tensor([1, 2], requires_grad=True)
    with pytest.raises(ValueError, match="device"):
        cnnfast.tensor([1.0], device="tpu")


def test_to_dtype_carries_gradient_back():
    x = cnnfast.tensor([1.0, 2.0], requires_grad=True)
    y = x.double() * 2
    assert y.dtype == np.float64
    y.sum().backward()
    assert x.grad.dtype == np.float32
    assert_close(x.grad, [2.0, 2.0])


def test_cuda_tensor_round_trip_and_device_mixing():
    x = cnnfast.tensor([1.0, 2.0], requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda"
    (y * 3).sum().backward()
    assert x.grad.device == "cpu"
    assert_close(x.grad, [3.0, 3.0])
    with pytest.raises(ValueError, match="'cpu'.*'cuda'|'cuda'.*'cpu'"):
        x + y
    with pytest.raises(ValueError, match="device"):
        F.conv2d(cnnfast.tensor(np.zeros((1, 1, 3, 3), np.float32), device="cuda"),
                 cnnfast.tensor(np.zeros((1, 1, 2, 2), np.float32)))


def test_cuda_unavailable_gives_a_clear_error(monkeypatch):
    from cnnfast import backend

    monkeypatch.setattr(backend, "cuda_simulated", lambda: False)
    monkeypatch.setattr(backend, "_gpu_present", False)
    with pytest.raises(RuntimeError, match="NUMBA_ENABLE_CUDASIM=1"):
        cnnfast.tensor([1.0], device="cuda")


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, cnnfast; heavy = [m for m in ('numba', 'cupy', 'matplotlib', 'torch') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_path_choice():
    from cnnfast import dispatch

    assert cnnfast.get_cpu_path() in ("fast", "reference")
    with cnnfast.cpu_path("reference"):
        assert dispatch.kernels("cpu").path == "reference"
    with pytest.raises(ValueError, match="cpu path"):
        cnnfast.set_cpu_path("gpu")


# --- declared op parameters (issue #19, item 6) ---------------------------------------------------

def test_functions_declare_their_parameters():
    """Each op names its parameters in __init__: a misspelt one is a TypeError, not an
    attribute nobody reads."""
    import inspect

    from cnnfast.functional.conv import Conv
    from cnnfast.functional.pool import MaxPool

    assert list(inspect.signature(Conv).parameters) == ["stride", "padding", "dilation",
                                                        "groups", "relu"]
    with pytest.raises(TypeError):
        Conv((1, 1), (0, 0), (1, 1), 1, strides=2)
    with pytest.raises(TypeError):
        MaxPool((2, 2), (2, 2), (0, 0), (1, 1), False, indices=[])


def test_max_pool_indices_are_a_second_output_without_a_graph():
    from cnnfast.functional.pool import MaxPool

    x = cnnfast.tensor(np.arange(16.0).reshape(1, 1, 4, 4), requires_grad=True)
    y, idx = MaxPool((2, 2), (2, 2), (0, 0), (1, 1), False).apply(x)
    assert y.requires_grad and not idx.requires_grad and idx.dtype == np.int64
    assert idx.tolist() == [[[[5, 7], [13, 15]]]]
    y2, idx2 = F.max_pool2d(x, 2, return_indices=True)
    assert_close(y2, y.numpy())
    assert idx2.tolist() == idx.tolist()
    y2.sum().backward()
    assert x.grad.numpy().reshape(-1)[[5, 7, 13, 15]].tolist() == [1.0] * 4
    assert x.grad.numpy().sum() == 4.0


# --- regressions found by PyTorch's OpInfo samples (issue #21) ---------------------------------

def test_transpose_of_two_axes_swaps_them_whatever_their_order():
    """Bug 1: ``transpose(0, 1)`` of a 2-D tensor returned it unchanged (forward and grad)."""
    a = np.arange(6.0).reshape(2, 3)
    for axes in ((0, 1), (1, 0), (-1, 0), (0, -1)):
        x = cnnfast.tensor(a, requires_grad=True)
        y = x.transpose(*axes)
        np.testing.assert_array_equal(y.numpy(), a.T)
        gy = np.arange(6.0).reshape(3, 2) + 1
        y.backward(cnnfast.tensor(gy))
        np.testing.assert_array_equal(x.grad.numpy(), gy.T)
    b = np.arange(24.0).reshape(2, 3, 4)
    x = cnnfast.tensor(b)
    np.testing.assert_array_equal(x.transpose(0, 2).numpy(), b.swapaxes(0, 2))
    np.testing.assert_array_equal(x.transpose(2, 0, 1).numpy(), b.transpose(2, 0, 1))
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), b.transpose(1, 2, 0))
    with pytest.raises(ValueError, match="permute"):
        x.permute(0, 0, 1)
    with pytest.raises(ValueError, match="transpose: axis 3"):
        x.transpose(0, 3)


def test_transpose_of_a_scalar_is_the_scalar():
    """Bug 2: ``transpose(0, 0)`` of a 0-d tensor raised ZeroDivisionError."""
    x = cnnfast.tensor(np.array(2.5), requires_grad=True)
    y = x.transpose(0, 0)
    assert y.shape == () and y.item() == 2.5
    y.backward()
    assert x.grad.item() == 1.0
    assert x.transpose(-1, 0).shape == ()


def test_pytorch_spellings_of_shape_helpers():
    x = cnnfast.tensor(np.arange(6.0).reshape(2, 1, 3), requires_grad=True)
    assert x.size == 6 and x.size() == (2, 1, 3) and x.size(0) == 2 and x.size(-1) == 3
    assert x.squeeze(1).shape == (2, 3) and x.squeeze(0).shape == (2, 1, 3)
    assert cnnfast.squeeze(x).shape == (2, 3) and cnnfast.unsqueeze(x, -1).shape == (2, 1, 3, 1)
    assert x.to(cnnfast.float32).dtype == np.float32 and x.long().dtype == np.int64
    y = cnnfast.cat([x, x * 2.0], dim=1)
    assert y.shape == (2, 2, 3)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 1, 3), 3.0))
    with pytest.raises(ValueError, match="cat: tensors must share"):
        cnnfast.cat([x, cnnfast.tensor(np.zeros((2, 2, 2)))], dim=1)
    with pytest.raises(ValueError, match="size: axis 3"):
        x.size(3)
