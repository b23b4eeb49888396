"""Fast CPU kernels: Numba and BLAS through NumPy (contract in cnnfast.dispatch).

Importing this package tunes glibc's allocator thresholds once (see :mod:`cnnfast.cpu._malloc`;
``CNNFAST_MALLOC_TUNE=0`` turns that off). :func:`machine_rates` measures what this CPU can do
(``cnnfast doctor`` prints it, ``cnnfast bench`` measures every row against it).
"""

from __future__ import annotations

import time

from cnnfast.cpu._malloc import tune_malloc

tune_malloc()

GEMM_SIZE = 768  # the sgemm rate is measured on (768 x 768) @ (768 x 768): 0.9 GFLOP


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_rates(seconds: float = 0.1, repeats: int = 3) -> dict:
    """This CPU's float32 rates in GFLOP/s, best of ``repeats``: the FMA ceiling (``fma_1``,
    ``fma_all``: a loop of independent vector FMAs, no memory traffic, on one thread and on all
    of Numba's ``threads``), and a square sgemm by BLAS (``blas_1`` on one thread, ``blas_all``
    on its own threads) and by cnnfast's microkernel (``own_1``, one thread); with the vector
    ``target`` Numba compiles for, whether it has ``avx512`` and the register ``tile``."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from cnnfast.cpu import _microkernel, _parallel

    threads = _parallel.num_threads()
    n = GEMM_SIZE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    out = {"threads": threads, "target": _microkernel.target_name(),
           "avx512": _microkernel.has_avx512(), "tile": [_microkernel.MR, _microkernel.NR],
           "fma_1": _microkernel.fma_ceiling(1, seconds, repeats),
           "fma_all": _microkernel.fma_ceiling(threads, seconds, repeats)}
    with threadpool_limits(1, user_api="blas"):
        out["blas_1"] = flops / _best_seconds(lambda: np.dot(a, b, c), repeats) / 1e9
    out["blas_all"] = flops / _best_seconds(lambda: np.dot(a, b, c), repeats) / 1e9
    out["own_1"] = flops / _best_seconds(lambda: _microkernel.gemm(a, b, c, False),
                                         repeats) / 1e9
    return out
