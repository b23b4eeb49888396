"""The autograd machinery under the Tensor, a leaf: the ``Function`` base class (one node of
the graph), grad mode (``no_grad``, ``enable_grad``), the graph's topological order, and undoing
NumPy broadcasting in a gradient. The ops are in :mod:`cnnfast.ops` (elementwise and shape) and
:mod:`cnnfast.functional`; the Tensor, in :mod:`cnnfast.tensor`, builds each op's result
(``Tensor.from_op``), so this module never imports it.

A graph node is a tensor whose ``_ctx`` (the ``Function`` that made it, or None for a leaf) lists
its ``inputs``; only inputs that require grad are walked.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["Function", "enable_grad", "is_grad_enabled", "no_grad", "topological_order",
           "unbroadcast"]

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within the block, ops record no graph (for evaluation and optimizer updates)."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


@contextlib.contextmanager
def enable_grad():
    previous = is_grad_enabled()
    _state.grad_enabled = True
    try:
        yield
    finally:
        _state.grad_enabled = previous


def topological_order(root) -> list:
    """Nodes reachable from ``root``, each after all of its inputs (iterative DFS)."""
    order: list = []
    visited: set[int] = set()
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if node._ctx is not None:
            for inp in node._ctx.inputs:
                if inp is not None and inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    return order


def unbroadcast(g, shape: tuple[int, ...]):
    """Sum ``g`` down to ``shape`` (undoing NumPy broadcasting)."""
    if tuple(g.shape) == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


class Function:
    """One differentiable op. A subclass declares its parameters in ``__init__`` and defines
    ``forward(*arrays)`` and ``backward(gy)``; ``Op(params...).apply(*inputs)`` runs it.

    Inputs may be ``Tensor`` or ``None`` (an absent optional input such as a bias). ``forward``
    returns one array, or a tuple whose first array is the differentiable output and whose
    others come back as plain tensors without a graph (max pooling's indices); ``apply``
    returns the same arity. A ``Function`` object is one node of one graph: apply it once.
    """

    inputs: tuple
    needs_input_grad: tuple[bool, ...]
    device: str

    def apply(self, *inputs):
        present = [t for t in inputs if t is not None]
        self.device = present[0].device
        for t in present[1:]:
            if t.device != self.device:
                raise ValueError(f"{type(self).__name__}: inputs are on different devices "
                                 f"({self.device!r} and {t.device!r}); move them with .to()")
        record = is_grad_enabled()
        self.needs_input_grad = tuple(record and t is not None and t.requires_grad
                                      for t in inputs)
        out = self.forward(*[None if t is None else t.data for t in inputs])
        extra = ()
        if isinstance(out, tuple):
            out, extra = out[0], out[1:]
        device = getattr(self, "out_device", self.device)
        requires_grad = any(self.needs_input_grad)
        if requires_grad:
            self.inputs = inputs
        # the input's own type builds the results (this module never imports the Tensor)
        make = present[0].from_op
        result = make(out, device, self if requires_grad else None)
        if extra:
            return (result,) + tuple(make(a, device, None) for a in extra)
        return result

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError
