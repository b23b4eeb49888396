"""The one place that picks a kernel path for a device.

Kernel contract
===============
Every path package (``cnnfast.reference``, ``cnnfast.cpu``, ``cnnfast.cuda``) has the modules
``conv``, ``pool``, ``activation``, ``norm`` and ``optim`` and they export the functions below
with exactly these signatures. Kernels are plain array-in, array-out functions: they never see a
``Tensor``, never validate (``cnnfast.functional`` validates before any kernel runs), never
modify their inputs (``optimizer_update`` apart), and return arrays of the input dtype (float32
or float64). ``nd`` is the spatial rank (2 or 3), ``x.ndim == nd + 2``; ``stride``,
``padding``, ``dilation``, ``kernel`` are tuples of ``nd`` Python ints.

conv
    conv_forward(x, w, stride, padding, dilation, groups) -> y
        x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O),
        O = (S + 2P - dilation * (KS - 1) - 1) // stride + 1 (cross-correlation, like PyTorch).
    conv_backward_data(gy, w, x_shape, stride, padding, dilation, groups) -> gx  (x_shape)
    conv_backward_weight(gy, x, w_shape, stride, padding, dilation, groups) -> gw  (w_shape)
    bias_add(y, b) -> y + b broadcast over channel axis 1            b (K,)
    bias_grad(gy) -> gb (K,) = gy summed over every axis but 1

pool
    max_pool_forward(x, kernel, stride, padding, dilation=None, ceil_mode=False) -> (y, idx)
        O = :func:`cnnfast.shapes.output_size` (PyTorch's, ceil mode included); taps at
        ``o * stride - padding + k * dilation`` (``None``: 1). Padding never wins. ``idx``
        (int64, y's shape) is the flat index, within one (n, c) plane of the *unpadded* input,
        of the first maximum in window scan order (like PyTorch).
    max_pool_backward(gy, idx, x_shape) -> gx   (overlapping windows accumulate)
    avg_pool_forward(x, kernel, stride, padding, ceil_mode=False, count_include_pad=True,
                     divisor_override=None) -> y
        Each window's in-bounds sum over its divisor, PyTorch's rule
        (:func:`cnnfast.shapes.avg_pool_divisor`): the count of window positions inside the
        input and its padding (``count_include_pad``; prod(kernel) unless ceil mode's last
        window hangs over), or inside the input only, or ``divisor_override``.
    avg_pool_backward(gy, x_shape, kernel, stride, padding, ceil_mode=False,
                      count_include_pad=True, divisor_override=None) -> gx

activation
    relu_forward(x) -> y
    relu_backward(gy, y) -> gx = gy where y > 0 else 0

norm  (per channel over N and the spatial axes; mean/invstd/gamma/beta have shape (C,))
    batch_norm_forward_train(x, gamma, beta, eps) -> (y, mean, invstd)
        biased batch variance; invstd = 1 / sqrt(var + eps); mean and invstd in x's dtype.
    batch_norm_forward_eval(x, gamma, beta, running_mean, running_var, eps) -> y
    batch_norm_backward(gy, x, gamma, mean, invstd) -> (gx, ggamma, gbeta)   (training mode)

optim  (the one kernel that writes its inputs: ``p``, ``m``, ``v`` are updated in place)
    optimizer_update(rule, p, g, m, v, lr, a, b, weight_decay, eps, c2, first) -> None
        One step of PyTorch's SGD (``"sgd"``, ``"sgd_momentum"``, ``"sgd_nesterov"``), Adam
        (``"adam"``) or AdamW (``"adamw"``) over flat parameters ``p`` with gradients ``g`` and
        state buffers ``m``, ``v`` (None where the rule keeps none), in p's dtype; the scalars'
        meaning per rule is in :mod:`cnnfast.reference.optim`. :class:`cnnfast.optim.Optimizer`
        runs it once per parameter group on the cuda device.

Fused ops (optional: a path that lacks one gets it composed from the ops above, with the same
results; ``cnnfast.cuda`` runs each in fewer launches)
    conv_bias_relu_forward(x, w, b, relu, stride, padding, dilation, groups) -> y
        conv_forward, then bias_add when b is not None, then relu_forward when relu.
    batch_norm_relu_forward_train(x, gamma, beta, eps) -> (relu(y), mean, invstd)
    batch_norm_relu_forward_eval(x, gamma, beta, running_mean, running_var, eps) -> relu(y)
    batch_norm_relu_backward(gy, x, y, gamma, mean, invstd) -> (gx, ggamma, gbeta)
        y is the fused forward's output: batch_norm_backward(relu_backward(gy, y), ...).

Ops that are the same array code on every path (linear, adaptive average pooling, dropout, the
elementwise arithmetic of autograd) live in ``cnnfast.reference`` and are written against ``xp``
so they run on NumPy and CuPy arrays alike; :func:`kernels` hands them to every path.

Paths
=====
A kernel path is named by its package, the one list :data:`KERNEL_PATHS` (tests, the bench and
the docs use these names): ``"reference"``, ``"cpu"``, ``"cuda"``. :func:`kernels_of` looks a
path's kernels up; :func:`kernels` is the same lookup for the path that runs a device now
(:func:`path_name`); :func:`using_path` runs a block on a named path.
device ``"cpu"``: the ``cpu`` path (``cnnfast.cpu``, the default, which :func:`set_cpu_path`
and ``CNNFAST_CPU_PATH`` call ``"fast"``) or the ``reference`` path, chosen with
:func:`set_cpu_path` or the :func:`cpu_path` context manager.
device ``"cuda"``: ``cnnfast.cuda`` (Numba CUDA kernels on CuPy arrays, or in Numba's CUDA
simulator on NumPy arrays when ``NUMBA_ENABLE_CUDASIM=1``).

Which array module an array or device uses, and device moves, are :mod:`cnnfast.backend`'s job.
"""

from __future__ import annotations

import contextlib
import importlib
from types import SimpleNamespace

# The array-backend helpers live in the leaf cnnfast.backend; dispatch re-exports them so that
# ``dispatch.to_device`` and friends keep working where callers already use them.
from cnnfast import config
from cnnfast.backend import (  # noqa: F401 - re-exports
    array_xp,
    cuda_available,
    cuda_simulated,
    device_xp,
    gpu_present,
    is_cupy_array,
    require_cuda,
    to_device,
)

KERNEL_OPS = {
    "conv": ("conv_forward", "conv_backward_data", "conv_backward_weight", "bias_add", "bias_grad"),
    "pool": ("max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward"),
    "activation": ("relu_forward", "relu_backward"),
    "norm": ("batch_norm_forward_train", "batch_norm_forward_eval", "batch_norm_backward"),
    "optim": ("optimizer_update",),
}
SHARED_OPS = {
    "linear": ("linear_forward", "linear_backward"),
    "pool": ("adaptive_avg_pool_forward", "adaptive_avg_pool_backward"),
    "activation": ("dropout_mask",),
}
FUSED_OPS = {
    "conv": ("conv_bias_relu_forward",),
    "norm": ("batch_norm_relu_forward_train", "batch_norm_relu_forward_eval",
             "batch_norm_relu_backward"),
}
KERNEL_PATHS = ("reference", "cpu", "cuda")   # the kernel packages
CPU_PATHS = config.CPU_PATHS                  # set_cpu_path's names: "fast" (cpu), "reference"
_CPU_CHOICE = {"cpu": "fast", "reference": "reference"}
DEVICES = ("cpu", "cuda")

_cache: dict[str, SimpleNamespace] = {}


def set_cpu_path(path: str) -> None:
    """Choose the CPU kernel path: ``"fast"`` (Numba/BLAS, default) or ``"reference"`` (NumPy)."""
    config.set_option("cpu_path", _checked_cpu_path(path))


def get_cpu_path() -> str:
    """The CPU path in force: set_cpu_path or cpu_path, else ``$CNNFAST_CPU_PATH``, else fast."""
    return config.get("cpu_path")


def _checked_cpu_path(path: str) -> str:
    if path not in CPU_PATHS:
        raise ValueError(f"cpu path must be one of {CPU_PATHS}, got {path!r}")
    return path


@contextlib.contextmanager
def cpu_path(path: str):
    """Run the block on the given CPU path, then restore the previous one."""
    with config.using_config(cpu_path=_checked_cpu_path(path)):
        yield


def set_float32_matmul_precision(precision: str) -> None:
    """How float32 convolutions multiply on ``cuda`` (PyTorch's names): ``"highest"`` FP32
    kernels (the default), ``"high"`` TF32 tensor cores, ``"medium"`` BF16 tensor cores, both
    with float32 accumulation (sm_80 or newer). The CPU paths and float64 ignore it; also
    ``$CNNFAST_MATMUL_PRECISION``."""
    config.set_option("matmul_precision", _checked_precision(precision))


def get_float32_matmul_precision() -> str:
    """The float32 matmul precision in force (``"highest"`` unless set)."""
    return config.get("matmul_precision")


def _checked_precision(precision: str) -> str:
    if precision not in config.MATMUL_PRECISIONS:
        raise ValueError(f"float32 matmul precision must be one of {config.MATMUL_PRECISIONS}, "
                         f"got {precision!r}")
    return precision


def _load(package: str) -> SimpleNamespace:
    """Collect every contract op of one path package into a namespace (imported lazily)."""
    if package in _cache:
        return _cache[package]
    ns = {}
    for family, names in SHARED_OPS.items():
        module = importlib.import_module(f"cnnfast.reference.{family}")
        for name in names:
            ns[name] = getattr(module, name)
    for family, names in KERNEL_OPS.items():
        module = importlib.import_module(f"cnnfast.{package}.{family}")
        for name in names:
            ns[name] = getattr(module, name)
    composed = _composed_fused_ops(ns)
    for family, names in FUSED_OPS.items():
        module = importlib.import_module(f"cnnfast.{package}.{family}")
        for name in names:
            ns[name] = getattr(module, name, None) or composed[name]
    ns["path"] = package
    _cache[package] = SimpleNamespace(**ns)
    return _cache[package]


def _composed_fused_ops(ns: dict) -> dict:
    """The fused ops built from the plain ones, for a path that has no kernels of its own."""

    def conv_bias_relu_forward(x, w, b, relu, stride, padding, dilation, groups):
        y = ns["conv_forward"](x, w, stride, padding, dilation, groups)
        if b is not None:
            y = ns["bias_add"](y, b)
        return ns["relu_forward"](y) if relu else y

    def batch_norm_relu_forward_train(x, gamma, beta, eps):
        y, mean, invstd = ns["batch_norm_forward_train"](x, gamma, beta, eps)
        return ns["relu_forward"](y), mean, invstd

    def batch_norm_relu_forward_eval(x, gamma, beta, running_mean, running_var, eps):
        return ns["relu_forward"](ns["batch_norm_forward_eval"](x, gamma, beta, running_mean,
                                                                running_var, eps))

    def batch_norm_relu_backward(gy, x, y, gamma, mean, invstd):
        return ns["batch_norm_backward"](ns["relu_backward"](gy, y), x, gamma, mean, invstd)

    return {f.__name__: f for f in (conv_bias_relu_forward, batch_norm_relu_forward_train,
                                    batch_norm_relu_forward_eval, batch_norm_relu_backward)}


def path_name(device: str) -> str:
    """The kernel package that runs ``device`` now: 'reference', 'cpu' or 'cuda'."""
    if device == "cuda":
        return "cuda"
    return "cpu" if get_cpu_path() == "fast" else "reference"


def kernels(device: str) -> SimpleNamespace:
    """The kernel functions for ``device`` under the current path choice:
    ``kernels_of(path_name(device))``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda":
        require_cuda()
    return _load(path_name(device))


def kernels_of(path: str) -> SimpleNamespace:
    """The kernel functions of one of :data:`KERNEL_PATHS`."""
    if path not in KERNEL_PATHS:
        raise ValueError(f"path must be one of {KERNEL_PATHS}, got {path!r}")
    return _load(path)


def device_of(path: str) -> str:
    """The device a kernel path runs on: ``"cuda"`` for the cuda path, else ``"cpu"``."""
    if path not in KERNEL_PATHS:
        raise ValueError(f"path must be one of {KERNEL_PATHS}, got {path!r}")
    return "cuda" if path == "cuda" else "cpu"


@contextlib.contextmanager
def using_path(path: str):
    """Run the block with ``path`` (one of :data:`KERNEL_PATHS`) running its device; yields
    that device. On the cpu device this is :func:`cpu_path` under its user-facing name."""
    device = device_of(path)
    if device == "cuda":
        yield device
    else:
        with cpu_path(_CPU_CHOICE[path]):
            yield device
