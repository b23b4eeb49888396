"""The elementwise and shape ops behind the Tensor's operators and methods (``+``, ``*``, ``@``,
``**``, ``exp``, ``sum``, ``reshape``, indexing, ...), and joining (:class:`Cat`, behind
:func:`cnnfast.cat`), each a :class:`~cnnfast.autograd.Function` on arrays (NumPy or CuPy through
``dispatch.array_xp``)."""

from __future__ import annotations

import numpy as np

from cnnfast import dispatch
from cnnfast.autograd import Function, unbroadcast


class Convert(Function):
    """Copy to another device and/or dtype; the gradient goes back the same way."""

    def __init__(self, device: str, dtype):
        self.out_device = device
        self.dtype = np.dtype(dtype)

    def forward(self, x):
        self.source = (self.device, x.dtype)
        return dispatch.to_device(x, self.out_device).astype(self.dtype, copy=False)

    def backward(self, gy):
        source_device, source_dtype = self.source
        return dispatch.to_device(gy, source_device).astype(source_dtype, copy=False)


class Add(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy, sa) if self.needs_input_grad[0] else None,
                unbroadcast(gy, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy, sa) if self.needs_input_grad[0] else None,
                unbroadcast(-gy, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        self.shapes = (a.shape, b.shape)
        return a * b

    def backward(self, gy):
        sa, sb = self.shapes
        return (unbroadcast(gy * self.b, sa) if self.needs_input_grad[0] else None,
                unbroadcast(gy * self.a, sb) if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(gy / self.b, self.a.shape)
        if self.needs_input_grad[1]:
            gb = unbroadcast(-gy * self.a / (self.b * self.b), self.b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


class Pow(Function):
    def __init__(self, exponent: float):
        self.exponent = exponent

    def forward(self, a):
        self.a = a
        return a ** self.exponent

    def backward(self, gy):
        return gy * self.exponent * self.a ** (self.exponent - 1)


class PowTensor(Function):
    """``a ** b`` for a tensor exponent (broadcast); d/db is ``a ** b * log(a)``, taken as 0
    where ``a == 0`` and ``b >= 0`` (PyTorch's convention)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        self.y = a ** b
        return self.y

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        a, b = self.a, self.b
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(gy * b * a ** (b - 1), a.shape)
        if self.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                d = self.y * xp.log(a)
            d = xp.where((a == 0) & (b >= 0), 0, d)
            gb = unbroadcast(gy * d, b.shape)
        return ga, gb


class Exp(Function):
    def forward(self, a):
        self.y = dispatch.array_xp(a).exp(a)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    def forward(self, a):
        self.a = a
        return dispatch.array_xp(a).log(a)

    def backward(self, gy):
        return gy / self.a


class Sigmoid(Function):
    def forward(self, a):
        xp = dispatch.array_xp(a)
        self.y = (0.5 * (1 + xp.tanh(0.5 * a))).astype(a.dtype, copy=False)  # stable for any |a|
        return self.y

    def backward(self, gy):
        return gy * self.y * (1 - self.y)


class MatMul(Function):
    """NumPy's and PyTorch's matmul: 1-D operands are vectors, leading axes broadcast."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: operands must be at least 1-D, got shapes {a.shape} and "
                             f"{b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"matmul: inner sizes differ, shapes {a.shape} and {b.shape}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a  # (.., M, K)
        b2 = b[:, None] if b.ndim == 1 else b  # (.., K, P)
        g = xp.expand_dims(gy, -1) if b.ndim == 1 else gy
        g = xp.expand_dims(g, -2) if a.ndim == 1 else g  # (.., M, P)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(g @ xp.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            gb = unbroadcast(xp.swapaxes(a2, -1, -2) @ g, b2.shape).reshape(b.shape)
        return ga, gb


class Sum(Function):
    def __init__(self, axis: tuple[int, ...], keepdims: bool):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.shape = a.shape
        return a.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        if not self.keepdims:
            gy = xp.expand_dims(gy, self.axis) if self.axis else gy
        return xp.broadcast_to(gy, self.shape).copy()


class Reshape(Function):
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def forward(self, a):
        self.in_shape = a.shape
        try:
            return a.reshape(self.shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {tuple(a.shape)} "
                             f"into {self.shape}") from None

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes: tuple[int, ...]):
        self.axes = axes

    def forward(self, a):
        return a.transpose(self.axes)

    def backward(self, gy):
        return gy.transpose(tuple(np.argsort(self.axes)))


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, a):
        self.in_shape, self.in_dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        g = xp.zeros(self.in_shape, dtype=self.in_dtype)
        if xp is np:
            np.add.at(g, self.index, gy)  # duplicates in an index array accumulate
        else:
            import cupyx

            cupyx.scatter_add(g, self.index, gy)
        return g


class Cat(Function):
    """Join the inputs along ``axis``; backward splits the gradient back."""

    def __init__(self, axis: int):
        self.axis = axis

    def forward(self, *arrays):
        self.sizes = [a.shape[self.axis] for a in arrays]
        return dispatch.array_xp(arrays[0]).concatenate(arrays, axis=self.axis)

    def backward(self, gy):
        xp = dispatch.array_xp(gy)
        parts = xp.split(gy, np.cumsum(self.sizes)[:-1].tolist(), axis=self.axis)
        return tuple(p if need else None for p, need in zip(parts, self.needs_input_grad))
