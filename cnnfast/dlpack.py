"""``from_dlpack``: a Tensor sharing memory with another framework's array (NumPy, CuPy,
PyTorch, ...) through the DLPack protocol; ``Tensor.__dlpack__`` is the other direction."""

from __future__ import annotations

import numpy as np

from cnnfast.tensor import Tensor

_DLPACK_CPU, _DLPACK_CUDA = 1, 2  # DLDeviceType codes (kDLCPU, kDLCUDA)


def from_dlpack(x, requires_grad: bool = False) -> Tensor:
    """A Tensor sharing memory with ``x``, any object with ``__dlpack__`` and
    ``__dlpack_device__`` (a NumPy or CuPy array, a PyTorch tensor, another framework's array).

    Host memory becomes a ``cpu`` tensor over a NumPy view, CUDA memory a ``cuda`` tensor over a
    CuPy view; nothing is copied, so writes on either side are seen by the other. A PyTorch
    tensor that requires grad must be ``.detach()``-ed first (PyTorch refuses to export it).
    Raises ``TypeError`` for an object without the protocol and ``ValueError`` for memory on a
    device cnnfast does not run on.
    """
    if isinstance(x, Tensor):
        return x
    if not (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")):
        raise TypeError(f"from_dlpack: expected an object with __dlpack__ and __dlpack_device__ "
                        f"(a NumPy/CuPy array, a PyTorch tensor, ...), got {type(x).__name__}")
    device_type = int(x.__dlpack_device__()[0])
    if device_type == _DLPACK_CPU:
        data = np.from_dlpack(x)
        device = "cpu"
    elif device_type == _DLPACK_CUDA:
        import cupy  # a CUDA producer means CuPy's world; imported only now

        data = cupy.from_dlpack(x)
        device = "cuda"
    else:
        raise ValueError(f"from_dlpack: memory on DLPack device type {device_type} is not "
                         f"supported (expected {_DLPACK_CPU}: CPU or {_DLPACK_CUDA}: CUDA)")
    return Tensor(data, requires_grad=requires_grad, device=device)
