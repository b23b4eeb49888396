"""The block-level GEMM steps the convolution kernels of :mod:`cnnfast.cuda.conv` share.

A convolution kernel gathers its operands (its own business: the geometry) into registers,
stages them in shared tiles and multiplies the staged slice into per-thread accumulators, then
stores them. The staging, the multiply and where each accumulator lands in the block's output
tile depend only on the tile configuration, and live here: FP32 SIMT register blocking for
:class:`~._runtime.GemmTiles`, warp-level tensor-core MMA (:mod:`._mma`) for
:class:`~._runtime.MmaTiles`. The kernels see one :class:`GemmSteps` either way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import cuda

from cnnfast.cuda import _mma
from cnnfast.cuda import _runtime as rt


class GemmSteps(NamedTuple):
    """What the three GEMM kernels take from their tile configuration (:func:`gemm_steps`)."""

    a_shape: tuple  # shared tiles (BK, BM + pad) and (BK, BN + pad)
    b_shape: tuple
    acc: tuple  # a thread's accumulators and register fragments
    a_frag: tuple
    b_frag: tuple
    clear: object
    coords: object
    row_of: object
    col_of: object
    multiply_slice: object
    stage_a_down: object
    stage_a_across: object
    stage_b_across: object


@functools.lru_cache(maxsize=None)
def gemm_steps(tiles, dtype: np.dtype) -> GemmSteps:
    """The device functions the three GEMM kernels share, inlined at the Numba IR level (so the
    register arrays they take stay in registers): ``clear(acc)``; ``coords(t)`` -> (u, v), with
    which accumulator ``acc[i, j]`` of thread t holds block-tile row ``row_of(u, i)`` and column
    ``col_of(v, j)``; ``multiply_slice`` (acc += one BK-deep slice of the staged tiles, through
    register fragments); ``stage_a_down``, ``stage_a_across`` and ``stage_b_across`` (a thread's
    gathered elements into a tile, along the reduction or along the tile's columns).

    :class:`~._runtime.GemmTiles` give the FP32 SIMT multiply (each thread an RM x RN
    micro-tile at rows tm + i * TM, columns tn + j * TN: conflict-free shared reads);
    :class:`~._runtime.MmaTiles` the tensor-core one of :func:`._mma.warp_steps`.
    """
    BK = tiles.block_k
    NT = tiles.threads
    A_LOADS, B_LOADS = tiles.block_m * BK // NT, tiles.block_n * BK // NT
    zero = dtype.type(0)

    if isinstance(tiles, rt.MmaTiles):
        pad, acc, a_frag, b_frag, coords, row_of, col_of, multiply_slice = _mma.warp_steps(tiles)
    else:
        pad = 1
        RM, RN, TM, TN = tiles.micro_m, tiles.micro_n, tiles.threads_m, tiles.threads_n
        acc, a_frag, b_frag = (RM, RN), (RM,), (RN,)

        @cuda.jit(device=True, inline="always")
        def coords(t):
            return t % TM, t // TM

        @cuda.jit(device=True, inline="always")
        def row_of(tm, i):
            return tm + i * TM

        @cuda.jit(device=True, inline="always")
        def col_of(tn, j):
            return tn + j * TN

        @cuda.jit(device=True, inline="always")
        def multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, tm, tn):
            # This thread's rows tm + i * TM and columns tn + j * TN: conflict-free shared reads.
            for kk in range(BK):
                for i in range(RM):
                    a_frag[i] = a_tile[kk, tm + i * TM]
                for j in range(RN):
                    b_frag[j] = b_tile[kk, tn + j * TN]
                for i in range(RM):
                    for j in range(RN):
                        acc[i, j] += a_frag[i] * b_frag[j]

    ACC_M, ACC_N = acc

    @cuda.jit(device=True, inline="always")
    def clear(acc):
        for i in range(ACC_M):
            for j in range(ACC_N):
                acc[i, j] = zero

    @cuda.jit(device=True, inline="always")
    def stage_a_down(tile, values, kk, step, col):
        for li in range(A_LOADS):
            tile[kk + li * step, col] = values[li]

    @cuda.jit(device=True, inline="always")
    def stage_a_across(tile, values, kk, col, step):
        for li in range(A_LOADS):
            tile[kk, col + li * step] = values[li]

    @cuda.jit(device=True, inline="always")
    def stage_b_across(tile, values, kk, col, step):
        for li in range(B_LOADS):
            tile[kk, col + li * step] = values[li]

    return GemmSteps((BK, tiles.block_m + pad), (BK, tiles.block_n + pad), acc, a_frag, b_frag,
                     clear, coords, row_of, col_of, multiply_slice, stage_a_down, stage_a_across,
                     stage_b_across)
