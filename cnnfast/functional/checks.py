"""Argument checks shared by the public ops: each raises ``ValueError``/``TypeError`` naming
the op, the argument, what it got and what was expected."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

from cnnfast.tensor import FLOAT_DTYPES, Tensor, as_tensor

IntOrTuple = int | Sequence[int]

SPATIAL = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def float_tensor(x, op: str, name: str, device: str | None = None) -> Tensor:
    t = as_tensor(x, device=device, name=f"{op}: {name}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {t.dtype}")
    return t


def check_same(op: str, reference: Tensor, ref_name: str, **others: Tensor | None) -> None:
    """All tensors share ``reference``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{op}: {name} is on device {t.device!r} but {ref_name} is on "
                             f"{reference.device!r}; move them to one device with .to()")
        if t.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has "
                            f"{reference.dtype}; use one dtype")


def batched(x: Tensor, nd: int, op: str) -> tuple[Tensor, bool]:
    """``x`` as a batch ``(N, C, *spatial)`` and whether it came unbatched ``(C, *spatial)``
    (PyTorch's convention: a batch of one, dropped again from the result)."""
    if x.ndim == nd + 1:
        return x.reshape((1,) + x.shape), True
    if x.ndim != nd + 2:
        raise ValueError(f"{op}: input must be {nd + 2}-D {SPATIAL[nd]} or {nd + 1}-D "
                         f"unbatched {SPATIAL[nd].replace('N, ', '')}, got shape {x.shape}")
    return x, False


def unbatched(y, was_unbatched: bool):
    """The result of an op on :func:`batched` input, without the batch axis it added (a tuple
    of results each)."""
    if not was_unbatched:
        return y
    if isinstance(y, tuple):
        return tuple(t.reshape(t.shape[1:]) for t in y)
    return y.reshape(y.shape[1:])


def check_rank(x: Tensor, nd: int, op: str, name: str = "input") -> None:
    if x.ndim != nd + 2:
        raise ValueError(f"{op}: {name} must be {nd + 2}-D {SPATIAL[nd]}, got shape {x.shape}")


def int_arg(value, op: str, name: str) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be an int, got {value!r}")
    return int(value)
