"""Helpers every test uses: ``assert_close`` with a readable summary, float64 gradient checks,
and the one comparison with PyTorch (``compare_with_torch``, after tinygrad's ``helper_test_op``;
``torch_results`` is its PyTorch half, for tests that run cnnfast's side themselves).

``numerical_gradient`` and ``gradient_check`` work on plain array functions (to check a kernel's
backward) and on ``Tensor`` functions (to check autograd), always in float64 central differences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cnnfast.backend import to_numpy  # noqa: F401 - part of the testing API


def default_tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) suited to comparing results of one dtype computed two ways."""
    if np.dtype(dtype) == np.float64:
        return 1e-9, 1e-10
    return 1e-4, 1e-5


def assert_close(actual, expected, rtol: float | None = None, atol: float | None = None,
                 name: str = "value") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise, shapes equal.

    On failure the message says how many elements differ, the worst one's index and both values,
    and the largest absolute and relative errors.
    """
    a = to_numpy(actual)
    e = to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected shape {e.shape}")
    if rtol is None or atol is None:
        r, t = default_tolerance(e.dtype if e.dtype.kind == "f" else np.float64)
        rtol = r if rtol is None else rtol
        atol = t if atol is None else atol
    a64 = a.astype(np.float64)
    e64 = e.astype(np.float64)
    if not (np.isfinite(a64) == np.isfinite(e64)).all():
        bad = np.argwhere(np.isfinite(a64) != np.isfinite(e64))[0]
        raise AssertionError(f"{name}: finiteness differs at {tuple(bad)}: "
                             f"got {a64[tuple(bad)]}, expected {e64[tuple(bad)]}")
    finite = np.isfinite(e64)
    diff = np.where(finite, np.abs(a64 - e64), 0.0)
    if not np.array_equal(np.where(finite, 0, a64), np.where(finite, 0, e64)):
        raise AssertionError(f"{name}: non-finite values differ")
    limit = atol + rtol * np.abs(np.where(finite, e64, 0.0))
    bad = diff > limit
    if bad.any():
        worst = np.unravel_index(np.argmax(diff - limit), diff.shape)
        rel = diff / np.maximum(np.abs(e64), 1e-300)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ beyond "
            f"rtol={rtol:g}, atol={atol:g} (shape {a.shape}, dtype {a.dtype} vs {e.dtype}).\n"
            f"  worst at index {tuple(int(i) for i in worst)}: got {a64[worst]!r}, "
            f"expected {e64[worst]!r}\n"
            f"  max abs error {diff.max():.3e}, max rel error {np.max(np.where(bad, rel, 0)):.3e}"
        )


def numerical_gradient(f: Callable, inputs: Sequence[np.ndarray], gy: np.ndarray | None = None,
                       eps: float = 1e-6, wrt: Sequence[int] | None = None) -> list[np.ndarray]:
    """Central-difference gradient of ``sum(f(*inputs) * gy)`` with respect to each input.

    ``f`` takes and returns float64 arrays. ``gy`` defaults to ones. ``wrt`` lists the input
    positions to differentiate (all by default); others get ``None``.
    """
    inputs = [np.array(x, dtype=np.float64, copy=True) for x in inputs]
    out = np.asarray(f(*inputs), dtype=np.float64)
    gy = np.ones_like(out) if gy is None else np.asarray(gy, dtype=np.float64)
    positions = range(len(inputs)) if wrt is None else wrt
    grads: list[np.ndarray | None] = [None] * len(inputs)
    for i in positions:
        x = inputs[i]
        g = np.zeros_like(x)
        flat_x = x.reshape(-1)
        flat_g = g.reshape(-1)
        for j in range(flat_x.size):
            keep = flat_x[j]
            flat_x[j] = keep + eps
            plus = np.sum(np.asarray(f(*inputs), dtype=np.float64) * gy)
            flat_x[j] = keep - eps
            minus = np.sum(np.asarray(f(*inputs), dtype=np.float64) * gy)
            flat_x[j] = keep
            flat_g[j] = (plus - minus) / (2 * eps)
        grads[i] = g
    return grads


def gradient_check(f: Callable, inputs: Sequence, analytic: Callable | None = None,
                   gy: np.ndarray | None = None, eps: float = 1e-6, rtol: float = 1e-5,
                   atol: float = 1e-7, wrt: Sequence[int] | None = None, seed: int = 0) -> None:
    """Check analytic gradients against float64 central differences.

    Two forms:
    - ``analytic`` given: ``f(*arrays) -> y`` is a plain array function and
      ``analytic(gy, *arrays)`` returns one gradient per input (``None`` allowed for inputs
      not in ``wrt``). This checks a kernel's backward against its forward.
    - ``analytic`` omitted: ``f(*tensors) -> Tensor`` is an autograd function; the inputs become
      float64 tensors with ``requires_grad=True`` and ``backward`` supplies the gradients.
    ``gy`` (the upstream gradient) defaults to a fixed random array, so that every output
    element's weight differs.
    """
    arrays = [np.array(to_numpy(x), dtype=np.float64) for x in inputs]
    positions = list(range(len(arrays))) if wrt is None else list(wrt)

    if analytic is None:
        from cnnfast.tensor import Tensor

        def as_array_fn(*xs):
            return f(*[Tensor(x) for x in xs]).numpy()
    else:
        as_array_fn = f

    out = np.asarray(as_array_fn(*arrays))
    if gy is None:
        gy = np.random.default_rng(seed).standard_normal(out.shape)
    gy = np.asarray(gy, dtype=np.float64)

    if analytic is None:
        from cnnfast.tensor import Tensor

        tensors = [Tensor(x.copy(), requires_grad=(i in positions)) for i, x in enumerate(arrays)]
        y = f(*tensors)
        y.backward(Tensor(gy))
        got = [t.grad.numpy() if (i in positions and t.grad is not None) else None
               for i, t in enumerate(tensors)]
    else:
        got = list(analytic(gy, *[x.copy() for x in arrays]))

    expected = numerical_gradient(as_array_fn, arrays, gy, eps=eps, wrt=positions)
    for i in positions:
        if got[i] is None:
            raise AssertionError(f"input {i}: analytic gradient is missing")
        assert_close(got[i], expected[i], rtol=rtol, atol=atol, name=f"gradient of input {i}")


# --- comparing with PyTorch (tinygrad's helper_test_op) ----------------------------------------

def torch_results(theirs: Callable, arrays: Sequence[np.ndarray], gy: np.ndarray | None = None,
                  grad: bool = True) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """PyTorch's side of a comparison: ``theirs(*tensors)`` on tensors made from ``arrays``.

    Returns (outputs, input gradients) as NumPy arrays; the gradients (when ``grad``) are those
    of the first output for the upstream gradient ``gy``, ``None`` for an input that got none.
    """
    import torch

    tensors = [torch.tensor(a, requires_grad=grad and a.dtype.kind == "f") for a in arrays]
    outs = theirs(*tensors)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads: list[np.ndarray | None] = []
    if grad:
        outs[0].backward(torch.tensor(gy))
        grads = [None if t.grad is None else t.grad.numpy() for t in tensors]
    return [o.detach().numpy() for o in outs], grads


def compare_with_torch(ours: Callable, theirs: Callable, arrays: Sequence[np.ndarray],
                       device: str = "cpu", dtype=np.float32, grad: bool = True, seed: int = 7,
                       rtol: float | None = None, atol: float | None = None) -> None:
    """``ours`` on cnnfast tensors (on ``device``) and ``theirs`` on PyTorch tensors made from
    the same ``arrays`` (cast to ``dtype``; None: as given): the output (shape and values) and,
    when ``grad``, every input's gradient for one seeded random upstream gradient must agree
    (:func:`assert_close`, ``rtol``/``atol``)."""
    import cnnfast

    if dtype is not None:
        arrays = [a.astype(dtype) for a in arrays]
    xs = [cnnfast.tensor(a, requires_grad=grad, device=device) for a in arrays]
    y = ours(*xs)
    assert y.device == device, f"output on {y.device}, expected {device}"
    gy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    (want, *_), want_grads = torch_results(theirs, arrays, gy, grad)
    assert y.shape == want.shape, f"output shape {y.shape}, expected {want.shape}"
    assert_close(y, want, rtol, atol, name="forward")
    if grad:
        y.backward(cnnfast.tensor(gy, device=device))
        for i, (x, w) in enumerate(zip(xs, want_grads)):
            assert_close(x.grad, w, rtol, atol, name=f"gradient of input {i}")
