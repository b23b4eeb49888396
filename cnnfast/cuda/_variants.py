"""Every kernel variant the CUDA path can launch, found by calling its host functions.

:func:`kernel_variants` runs each public kernel function of ``cnnfast.cuda`` (and the fused ops
and the optimizer update) on tiny host arrays inside ``_runtime.count_launches(record_only=True)``:
nothing executes, but every launch is recorded with its kernel, argument types and block size.
Each dtype, each shipped tile configuration, 2D and 3D, every fused flag and every kernel mode
is reached (the tensor-core convolutions with each shipped ``MmaTiles`` and precision), along
with the branches that only large inputs take (backward weight's split reduction, max pooling's
reach table in global memory). ``cnnfast doctor --compile`` compiles each distinct (kernel,
argument types) pair with the real compiler; the test suite checks that every launch a training
step makes in the simulator is among them.
"""

from __future__ import annotations

import functools

import numpy as np

from cnnfast import config
from cnnfast.cuda import _runtime as rt
from cnnfast.cuda import autotune

SHIPPED_TILES = {"gpu": rt.GPU_TILES, "small": rt.SMALL_TILES}
# autotune's other candidates, which it tries for float32 convolutions only
TUNED_TILES = {f"tuned {t.block_m}x{t.block_n}": t for t in autotune.CANDIDATES
               if t not in SHIPPED_TILES.values()}
SHIPPED_MMA_TILES = {"gpu": rt.GPU_MMA_TILES, "small": rt.SMALL_MMA_TILES}
DTYPES = (np.float32, np.float64)
TENSOR_CORE_PRECISIONS = ("high", "medium")  # float32 matmul precisions with MMA kernels


def _conv_ops(dtype, nd: int) -> None:
    from cnnfast.cuda import conv

    rng = np.random.default_rng(0)
    # 12 x 12 (x 3) output positions: more than backward weight's one-split minimum (8 slices)
    x = rng.standard_normal((2, 4) + (3,) * (nd - 2) + (12, 12)).astype(dtype)
    w = rng.standard_normal((6, 2) + (3,) * nd).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    args = ((1,) * nd, (1,) * nd, (1,) * nd, 2)
    y = conv.conv_forward(x, w, *args)
    for bias, relu in ((b, False), (None, True), (b, True)):
        conv.conv_bias_relu_forward(x, w, bias, relu, *args)
    conv.conv_backward_data(y, w, x.shape, *args)
    conv.conv_backward_weight(y, x, w.shape, *args)
    conv.bias_add(y, b)
    conv.bias_grad(y)


def _other_ops(dtype, nd: int) -> None:
    from cnnfast.cuda import activation, norm, pool

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3) + (4,) * nd).astype(dtype)
    c = np.ones(3, dtype)
    window = ((2,) * nd, (2,) * nd, (0,) * nd)
    y = activation.relu_forward(x)
    activation.relu_backward(x, y)
    out, idx = pool.max_pool_forward(x, *window)
    pool.max_pool_backward(out, idx, x.shape)
    pool.max_pool_backward(out, idx, x.shape, kernel=window[0], stride=window[1],
                           padding=window[2])
    pool.avg_pool_backward(pool.avg_pool_forward(x, *window), x.shape, *window)
    for relu in (False, True):
        train = norm.batch_norm_relu_forward_train if relu else norm.batch_norm_forward_train
        yb, mean, invstd = train(x, c, c, 1e-5)
        if relu:
            norm.batch_norm_relu_backward(x, x, yb, c, mean, invstd)
            norm.batch_norm_relu_forward_eval(x, c, c, c, c, 1e-5)
        else:
            norm.batch_norm_backward(x, x, c, mean, invstd)
            norm.batch_norm_forward_eval(x, c, c, c, c, 1e-5)


def _long_pool_axis(dtype) -> None:
    """Max pooling backward over an axis longer than the shared-memory reach table holds."""
    from cnnfast.cuda import pool

    x = np.zeros((1, 1, 1, 1, 4100), dtype)
    window = ((1, 1, 2), (1, 1, 2), (0, 0, 0))
    out, idx = pool.max_pool_forward(x, *window)
    pool.max_pool_backward(out, idx, x.shape)


def _optimizer(dtype) -> None:
    from cnnfast.cuda import optim

    p = np.zeros(10, dtype)
    for rule in optim.RULES:
        m = p.copy() if rule != "sgd" else None
        v = p.copy() if rule.startswith("adam") else None
        optim.optimizer_update(rule, p, p.copy(), m, v, 0.1, 0.9, 0.0, 0.0, 1e-8, 1.0, False)


def kernel_variants() -> list[tuple[str, rt.LaunchRecord]]:
    """[(configuration label, launch record)] for each distinct (kernel, argument types) the
    CUDA path launches under the shipped launch configurations; nothing runs."""
    seen: dict[tuple, tuple[str, rt.LaunchRecord]] = {}

    def record(label: str, ops) -> None:
        with rt.count_launches(record_only=True) as records:
            ops()
        for r in records:
            key = (id(r.dispatcher), r.types)
            if key not in seen or r.block > seen[key][1].block:
                seen[key] = (label, r)  # occupancy at the largest block it gets

    def everything(dtype, nd: int) -> None:
        _conv_ops(dtype, nd)
        _other_ops(dtype, nd)
        if nd == 3:
            _long_pool_axis(dtype)
            _optimizer(dtype)

    with config.using_config(cuda_autotune=False):  # each configuration's own kernels
        for tiles_name, tiles in SHIPPED_TILES.items():
            threads = 256 if tiles_name == "gpu" else 32
            with rt.launch_config(tiles=tiles, threads=threads):
                for dtype in DTYPES:
                    for nd in (2, 3):
                        record(f"{tiles_name} {np.dtype(dtype).name} {nd}d",
                               functools.partial(everything, dtype, nd))
        for tiles_name, tiles in TUNED_TILES.items():
            with rt.launch_config(tiles=tiles, threads=256):
                for dtype in autotune.TUNED_DTYPES:
                    for nd in (2, 3):
                        record(f"{tiles_name} {dtype.name} {nd}d",
                               functools.partial(_conv_ops, dtype, nd))
        # the tensor-core convolutions: float32 under each precision that selects them
        for tiles_name, tiles in SHIPPED_MMA_TILES.items():
            with rt.launch_config(mma_tiles=tiles):
                for precision in TENSOR_CORE_PRECISIONS:
                    for nd in (2, 3):
                        with config.using_config(matmul_precision=precision):
                            record(f"{tiles_name} float32 {nd}d",
                                   functools.partial(_conv_ops, np.float32, nd))
    return list(seen.values())


def closure_constants(dispatcher) -> str:
    """The compile-time constants a kernel factory baked in, as ``NAME=value`` words (with a
    convolution kernel's micro-tile, or its MMA precision and warp grid)."""
    func = getattr(dispatcher, "py_func", None)
    if func is None or func.__closure__ is None:
        return ""
    words = []
    tiles = getattr(dispatcher, "cnnfast_tiles", None)  # a convolution kernel's tile shape
    if isinstance(tiles, rt.MmaTiles):
        words += [f"MMA={tiles.precision}", f"WM={tiles.warps_m}", f"WN={tiles.warps_n}"]
    elif isinstance(tiles, rt.GemmTiles):
        words += [f"RM={tiles.micro_m}", f"RN={tiles.micro_n}"]
    for name, cell in zip(func.__code__.co_freevars, func.__closure__):
        value = cell.cell_contents
        if isinstance(value, (bool, int, np.integer)) and name.isupper():
            words.append(f"{name}={int(value)}")
        elif name == "nbt":
            words.append(f"dtype={value}")
    return " ".join(words)


def links_cuda_c(dispatcher) -> bool:
    """Whether a kernel calls the CUDA C wrappers of kernels/mma.cu (a tensor-core kernel)."""
    return isinstance(getattr(dispatcher, "cnnfast_tiles", None), rt.MmaTiles)
