"""cnnfast: hand-written CUDA and CPU kernels for small CNNs, under a PyTorch-shaped autograd.

    import cnnfast
    from cnnfast import nn, functional as F, optim

Importing cnnfast is cheap: NumPy only. Kernel paths (Numba, CuPy) load on first use.
"""

import numpy as np

from cnnfast import functional, nn, optim
from cnnfast._version import __version__
from cnnfast.autograd import enable_grad, is_grad_enabled, no_grad
from cnnfast.dispatch import (
    cpu_path,
    cuda_available,
    get_cpu_path,
    get_float32_matmul_precision,
    set_cpu_path,
    set_float32_matmul_precision,
)
from cnnfast.dlpack import from_dlpack
from cnnfast.rng import manual_seed
from cnnfast.tensor import Tensor, cat, tensor

# PyTorch's dtype names, for code written against torch (``x.to(cnnfast.float32)``)
float32, float64, int64 = np.float32, np.float64, np.int64


def squeeze(x: Tensor, dim: int | None = None) -> Tensor:
    """``x.squeeze(dim)`` (PyTorch's ``torch.squeeze``)."""
    return x.squeeze(dim)


def unsqueeze(x: Tensor, dim: int) -> Tensor:
    """``x.unsqueeze(dim)``."""
    return x.unsqueeze(dim)


def export_onnx(model, path, input_shape, **kwargs):
    """Write ``model`` as an ONNX file; see :func:`cnnfast.export.export_onnx` (``onnx`` is
    imported only now)."""
    from cnnfast.export import export_onnx as _export

    return _export(model, path, input_shape, **kwargs)


__all__ = [
    "Tensor",
    "cat",
    "float32",
    "float64",
    "int64",
    "squeeze",
    "unsqueeze",
    "__version__",
    "cpu_path",
    "cuda_available",
    "enable_grad",
    "export_onnx",
    "from_dlpack",
    "functional",
    "get_cpu_path",
    "get_float32_matmul_precision",
    "is_grad_enabled",
    "manual_seed",
    "nn",
    "no_grad",
    "optim",
    "set_cpu_path",
    "set_float32_matmul_precision",
    "tensor",
]
