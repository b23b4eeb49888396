"""Tensor, the autograd graph, ``backward`` and ``no_grad``.

Each op is a :class:`Function` that declares its parameters in ``__init__``, with ``forward``
(arrays in, one array out, or a tuple whose extra outputs carry no gradient) and ``backward``
(the output's gradient in, one gradient per input out). ``forward`` saves only what ``backward``
needs and reads ``self.needs_input_grad`` to skip the rest; ``backward`` returns ``None`` for
inputs nobody asked a gradient for. ``Tensor.backward`` walks the graph in reverse topological
order with an explicit stack (no recursion, so a 5,000-op chain is fine) and sums the gradients
of a tensor used more than once.

``Function`` and grad mode live in :mod:`cnnfast.autograd`, the Functions behind the Tensor's
operators and methods in :mod:`cnnfast.ops`, the neural-network ops (convolution, pooling, batch
norm, losses) in :mod:`cnnfast.functional`.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from cnnfast import dispatch
from cnnfast.autograd import Function, topological_order
from cnnfast.ops import (
    Add,
    Cat,
    Convert,
    Div,
    Exp,
    GetItem,
    Log,
    MatMul,
    Mul,
    Neg,
    Pow,
    PowTensor,
    Reshape,
    Sigmoid,
    Sub,
    Sum,
    Transpose,
)

__all__ = ["FLOAT_DTYPES", "Function", "Tensor", "as_tensor", "tensor"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Tensor:
    """An array (NumPy on ``cpu``, CuPy on ``cuda``) with an optional gradient and graph node."""

    __array_priority__ = 1000  # so ndarray <op> Tensor defers to Tensor's reflected op

    def __init__(self, data, requires_grad: bool = False, device: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if device is None:
            device = "cuda" if dispatch.is_cupy_array(data) else "cpu"
        elif device not in dispatch.DEVICES:
            raise ValueError(f"device must be one of {dispatch.DEVICES}, got {device!r}")
        if device == "cuda":
            dispatch.require_cuda()
        data = dispatch.to_device(data, device)
        if data.dtype == np.float16 or (requires_grad and data.dtype not in FLOAT_DTYPES):
            raise TypeError(f"tensor: requires_grad needs float32 or float64 data, got {data.dtype}"
                            if requires_grad else f"tensor: unsupported dtype {data.dtype}")
        self.data = data
        self.device = device
        self.requires_grad = bool(requires_grad)
        self.grad: Tensor | None = None
        self._ctx: Function | None = None

    # --- basic properties -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> Size:
        """The number of elements, an int that can also be called as PyTorch's ``size()``:
        ``t.size()`` is the shape, ``t.size(d)`` its length along axis ``d``."""
        return Size(int(self.data.size), self.shape)

    @classmethod
    def from_op(cls, data, device: str, ctx: Function | None) -> Tensor:
        """The result of an op: ``data`` on ``device``, made by ``ctx`` (None: no graph)."""
        t = Tensor.__new__(Tensor)
        t.data, t.device, t.grad, t._ctx = data, device, None, ctx
        t.requires_grad = ctx is not None
        return t

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = ", device='cuda'" if self.device == "cuda" else ""
        return f"tensor({np.array2string(self.numpy(), precision=4, threshold=20)}{dev}{grad})"

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when on ``cuda``)."""
        if dispatch.is_cupy_array(self.data):
            return self.data.get()
        return self.data

    # --- DLPack (zero-copy exchange with NumPy, CuPy, PyTorch, ...) --------------------------
    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Export the data as a DLPack capsule that shares its memory (the array API protocol).

        The consumer sees this tensor's array itself (a NumPy array on ``cpu``, a CuPy array on
        ``cuda``): writes through either side are seen by the other. Gradients and the graph do
        not travel. Only the keywords a caller actually gives are passed on, so older NumPy and
        CuPy versions keep working for the common call ``__dlpack__()``.
        """
        given = {"stream": stream, "max_version": max_version, "dl_device": dl_device,
                 "copy": copy}
        return self.data.__dlpack__(**{k: v for k, v in given.items() if v is not None})

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(device_type, device_id)`` of the data: ``(1, 0)`` for host memory, ``(2, id)`` for
        a CUDA device."""
        return self.data.__dlpack_device__()

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item(): tensor has {self.size} elements, expected exactly 1")
        return self.numpy().reshape(-1)[0].item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """The same data without a graph (shares memory)."""
        t = Tensor.__new__(Tensor)
        t.data, t.device = self.data, self.device
        t.requires_grad, t.grad, t._ctx = False, None, None
        return t

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag and self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"requires_grad needs float32 or float64 data, got {self.dtype}")
        self.requires_grad = flag
        return self

    def to(self, device: str | None = None, dtype=None) -> Tensor:
        """A copy on ``device`` and/or of ``dtype`` (``to(np.float64)`` alone is a dtype, as in
        PyTorch); gradients flow back through it."""
        if device is not None and not isinstance(device, str):
            device, dtype = None, device
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if device == self.device and dtype == self.dtype:
            return self
        return Convert(device, dtype).apply(self)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self) -> Tensor:
        return self.to("cuda")

    def long(self) -> Tensor:
        """An int64 copy (no gradient: class indices)."""
        return Tensor(self.data.astype(np.int64), device=self.device)

    def squeeze(self, dim: int | None = None) -> Tensor:
        """Without axis ``dim`` if its length is 1 (every length-1 axis when None)."""
        if dim is None:
            return self.reshape(tuple(s for s in self.shape if s != 1))
        axis = _wrap_axis(dim, self.ndim, "squeeze")
        if not self.ndim or self.shape[axis] != 1:
            return self
        return self.reshape(self.shape[:axis] + self.shape[axis + 1:])

    def unsqueeze(self, dim: int) -> Tensor:
        """With a new axis of length 1 at ``dim`` (in ``[-ndim - 1, ndim]``)."""
        axis = _wrap_axis(dim, self.ndim + 1, "unsqueeze")
        return self.reshape(self.shape[:axis] + (1,) + self.shape[axis:])

    def float(self) -> Tensor:
        return self.to(dtype=np.float32)

    def double(self) -> Tensor:
        return self.to(dtype=np.float64)

    @property
    def xp(self):
        return dispatch.array_xp(self.data)

    # --- autograd -------------------------------------------------------------------------------
    def backward(self, grad: Tensor | Any = None) -> None:
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad`` that requires it."""
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad and has no graph")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward(): grad can be implicit only for a scalar output, "
                                   f"got shape {self.shape}")
            grad_data = self.xp.ones_like(self.data)
        else:
            grad_data = dispatch.to_device(grad.data if isinstance(grad, Tensor) else grad,
                                           self.device)
            if tuple(grad_data.shape) != self.shape:
                raise ValueError(f"backward(): grad has shape {tuple(grad_data.shape)}, "
                                 f"expected {self.shape}")
            grad_data = grad_data.astype(self.dtype, copy=False)

        grads: dict[int, Any] = {id(self): grad_data}
        for node in reversed(topological_order(self)):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None:
                if node.requires_grad:
                    if node.grad is None:
                        node.grad = Tensor(g.copy() if g is grad_data else g, device=node.device)
                    else:
                        node.grad.data = node.grad.data + g
                    # A leaf is visited once, after every op that uses it: its gradient is final.
                    for hook in getattr(node, "_grad_hooks", ()):
                        hook(node)
                continue
            input_grads = ctx.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            for inp, ig in zip(ctx.inputs, input_grads):
                if inp is None or ig is None or not inp.requires_grad:
                    continue
                key = id(inp)
                grads[key] = grads[key] + ig if key in grads else ig

    def zero_grad(self) -> None:
        self.grad = None

    def register_post_accumulate_grad_hook(self, hook) -> None:
        """Call ``hook(self)`` during ``backward`` as soon as this leaf's ``.grad`` is final (all
        its uses processed); used by :mod:`cnnfast.distributed` to start a gradient allreduce
        while backward still runs (PyTorch's hook of the same name)."""
        if not self.is_leaf:
            raise RuntimeError("register_post_accumulate_grad_hook: only a leaf tensor's "
                               "gradient is accumulated")
        hooks = self.__dict__.setdefault("_grad_hooks", [])
        hooks.append(hook)

    # --- arithmetic -------------------------------------------------------------------------------
    def _operand(self, other) -> Tensor:
        if isinstance(other, Tensor):
            if other.device != self.device:
                raise ValueError(f"cannot combine a tensor on {self.device!r} with one on "
                                 f"{other.device!r}; move one with .to()")
            return other
        data = np.asarray(other)
        if data.dtype.kind in "biuf":
            data = data.astype(self.dtype if self.dtype.kind == "f" else data.dtype)
        return Tensor(data, device=self.device)

    def __add__(self, other):
        return Add().apply(self, self._operand(other))

    def __radd__(self, other):
        return Add().apply(self._operand(other), self)

    def __sub__(self, other):
        return Sub().apply(self, self._operand(other))

    def __rsub__(self, other):
        return Sub().apply(self._operand(other), self)

    def __mul__(self, other):
        return Mul().apply(self, self._operand(other))

    def __rmul__(self, other):
        return Mul().apply(self._operand(other), self)

    def __truediv__(self, other):
        return Div().apply(self, self._operand(other))

    def __rtruediv__(self, other):
        return Div().apply(self._operand(other), self)

    def __neg__(self):
        return Neg().apply(self)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or np.ndim(exponent):
            return PowTensor().apply(self, self._operand(exponent))
        return Pow(float(exponent)).apply(self)

    def __rpow__(self, base):
        return PowTensor().apply(self._operand(base), self)

    # PyTorch's method spellings of the operators
    def add(self, other, alpha: float = 1):
        """``self + alpha * other``."""
        return self + (other if alpha == 1 else self._operand(other) * alpha)

    def sub(self, other, alpha: float = 1):
        """``self - alpha * other``."""
        return self - (other if alpha == 1 else self._operand(other) * alpha)

    def div(self, other, rounding_mode: str | None = None):
        """``self / other``; ``rounding_mode`` ``'trunc'`` or ``'floor'`` rounds the quotient
        (a step function: no gradient, as PyTorch's is zero)."""
        if rounding_mode is None:
            return self / other
        if rounding_mode not in ("trunc", "floor"):
            raise ValueError(f"div: rounding_mode must be None, 'trunc' or 'floor', "
                             f"got {rounding_mode!r}")
        q = (self / other).data
        return Tensor(self.xp.trunc(q) if rounding_mode == "trunc" else self.xp.floor(q),
                      device=self.device)


    def __matmul__(self, other):
        return MatMul().apply(self, self._operand(other))

    def __rmatmul__(self, other):
        return MatMul().apply(self._operand(other), self)

    mul, pow, matmul = __mul__, __pow__, __matmul__

    def _compare(self, other, op) -> Tensor:
        other = other.data if isinstance(other, Tensor) else other
        return Tensor(op(self.data, other), device=self.device)

    def __gt__(self, other):
        return self._compare(other, operator.gt)

    def __lt__(self, other):
        return self._compare(other, operator.lt)

    def __ge__(self, other):
        return self._compare(other, operator.ge)

    def __le__(self, other):
        return self._compare(other, operator.le)

    __hash__ = object.__hash__

    def exp(self):
        return Exp().apply(self)

    def log(self):
        return Log().apply(self)

    def sigmoid(self):
        return Sigmoid().apply(self)

    def sum(self, dim=None, keepdim: bool = False, *, axis=None, keepdims: bool | None = None):
        """Sum over ``dim`` (an int, a tuple, or None / ``()`` for all axes, as in PyTorch);
        NumPy's ``axis``/``keepdims`` spellings are accepted too."""
        axes = _normalize_axis(dim if axis is None else axis, self.ndim)
        return Sum(axes, bool(keepdim if keepdims is None else keepdims)).apply(self)

    def mean(self, dim=None, keepdim: bool = False, *, axis=None, keepdims: bool | None = None):
        """Mean over ``dim``; arguments as :meth:`sum`."""
        axes = _normalize_axis(dim if axis is None else axis, self.ndim)
        count = int(np.prod([self.shape[a] for a in axes])) if axes else 1
        keep = bool(keepdim if keepdims is None else keepdims)
        return self.sum(axes, keep) * (1.0 / count if count else float("nan"))

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape(tuple(int(s) for s in shape)).apply(self)

    def view(self, *shape):
        return self.reshape(*shape)

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        start = start_dim % max(self.ndim, 1)
        end = end_dim % max(self.ndim, 1)
        if self.ndim == 0:
            return self.reshape(1)
        merged = int(np.prod(self.shape[start:end + 1]))
        return self.reshape(self.shape[:start] + (merged,) + self.shape[end + 1:])

    def transpose(self, *axes):
        """``transpose(a, b)`` swaps two axes (PyTorch); ``transpose()`` reverses them all;
        ``transpose(p0, p1, p2, ...)`` or ``transpose((p0, ...))`` permutes (NumPy)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if len(axes) == 2:
            a, b = (_wrap_axis(ax, self.ndim, "transpose") for ax in axes)
            order = list(range(self.ndim))
            if self.ndim:
                order[a], order[b] = order[b], order[a]
            return Transpose(tuple(order)).apply(self)
        return self.permute(*axes) if axes else self.permute(*reversed(range(self.ndim)))

    def permute(self, *dims):
        """The axes in the order ``dims`` (a permutation of ``range(ndim)``; negatives wrap)."""
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        order = tuple(_wrap_axis(d, self.ndim, "permute") for d in dims)
        if sorted(order) != list(range(self.ndim)):
            raise ValueError(f"permute: dims {tuple(dims)} are not a permutation of the "
                             f"{self.ndim} axes of a tensor of shape {self.shape}")
        return Transpose(order).apply(self)

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        return GetItem(index).apply(self)


class Size(int):
    """A tensor's element count that PyTorch code can also call: ``t.size()`` -> shape,
    ``t.size(d)`` -> ``shape[d]``."""

    def __new__(cls, count: int, shape: tuple[int, ...]):
        obj = super().__new__(cls, count)
        obj.shape = shape
        return obj

    def __call__(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[_wrap_axis(dim, len(self.shape),
                                                                    "size")]


def _normalize_axis(axis, ndim: int) -> tuple[int, ...]:
    """Reduction axes as sorted non-negative ints: None and ``()`` mean every axis (PyTorch);
    a 0-d tensor takes axis 0 or -1 (and reduces over nothing)."""
    if axis is None or (isinstance(axis, (tuple, list)) and not axis):
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    out = {_wrap_axis(a, ndim, "sum") for a in axis}
    return tuple(sorted(out)) if ndim else ()


def _wrap_axis(axis, ndim: int, op: str) -> int:
    """``axis`` in ``[-ndim, ndim)`` as a non-negative int; a 0-d tensor takes -1 and 0 (axis 0
    of a scalar is itself, as in PyTorch)."""
    rank = max(ndim, 1)
    if (not isinstance(axis, (int, np.integer)) or isinstance(axis, bool)
            or not -rank <= axis < rank):
        raise ValueError(f"{op}: axis {axis!r} is out of range for a tensor of rank {ndim}")
    return int(axis) % rank if ndim else 0


def as_tensor(x, device: str | None = None, name: str = "input") -> Tensor:
    """``x`` if it is a Tensor, else a new Tensor around the NumPy/CuPy array ``x``."""
    if isinstance(x, Tensor):
        return x
    array_like = (np.ndarray, np.generic, list, tuple, float, int)
    if isinstance(x, array_like) or dispatch.is_cupy_array(x):
        return Tensor(np.asarray(x) if isinstance(x, (list, tuple, float, int)) else x,
                      device=device)
    raise TypeError(f"{name}: expected a Tensor or a NumPy/CuPy array, got {type(x).__name__}")


def tensor(data, requires_grad: bool = False, device: str = "cpu", dtype=None) -> Tensor:
    """A new tensor holding a copy of ``data`` on ``device``.

    Python floats become float32 (like PyTorch); NumPy arrays keep their dtype unless ``dtype``
    is given.
    """
    if isinstance(data, Tensor):
        data = data.numpy()
    if dispatch.is_cupy_array(data):
        array = data.copy()
    else:
        array = np.array(data, copy=True)
        if not isinstance(data, np.ndarray) and array.dtype == np.float64:
            array = array.astype(np.float32)
    if dtype is not None:
        array = array.astype(dtype)
    return Tensor(array, requires_grad=requires_grad, device=device)


def cat(tensors, dim: int = 0) -> Tensor:
    """The tensors joined along axis ``dim`` (PyTorch's ``torch.cat``); one shape but ``dim``,
    one device and dtype."""
    tensors = [as_tensor(t, name="cat: tensors") for t in tensors]
    if not tensors:
        raise ValueError("cat: tensors must hold at least one tensor")
    first = tensors[0]
    axis = _wrap_axis(dim, first.ndim, "cat")
    for t in tensors[1:]:
        if (t.ndim != first.ndim or t.shape[:axis] + t.shape[axis + 1:]
                != first.shape[:axis] + first.shape[axis + 1:] or t.dtype != first.dtype):
            raise ValueError(f"cat: tensors must share dtype and every axis but {axis}, got "
                             f"{first.shape} {first.dtype} and {t.shape} {t.dtype}")
    return Cat(axis).apply(*tensors)
