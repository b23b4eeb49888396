"""CUDA convolution (2D and 3D): forward, backward data, backward weight, bias.

Every convolution is an implicit GEMM: nothing is unfolded in memory; the GEMM operands are
gathered straight from the NCDHW arrays while they are staged in shared memory. 2D runs as 3D
with D = KD = SD = 1, PD = 0 and dilation 1 along depth. For one group g (Cg = C / G input
channels, Kg = K / G filters, KVOL = KD * KH * KW taps, OSP = OD * OH * OW):

==================  ======================  ==========  ===========================
kernel              GEMM rows               GEMM cols   reduction
==================  ======================  ==========  ===========================
forward             N * OSP output points   Kg filters  Cg * KVOL  (c, kd, kh, kw)
backward data       N * D * H * W inputs    Cg chans    Kg * KVOL  (k, kd, kh, kw)
backward weight     Cg * KVOL  (c, taps)    Kg filters  N * OSP output points
==================  ======================  ==========  ===========================

Each block computes a ``block_m`` x ``block_n`` output tile (:class:`GemmTiles`), walking the
reduction ``block_k`` at a time: every thread gathers a few operand elements of the next slice
into registers (consecutive threads take consecutive memory positions, so loads coalesce) while
the block multiplies the current slice out of shared memory; each thread accumulates a
``micro_m`` x ``micro_n`` micro-tile in registers (rows ``tm + i * threads_m``, columns
``tn + j * threads_n``, so shared-memory reads are conflict-free and stores coalesce).

The (c, kd, kh, kw) -> memory offset decoding of a reduction index comes from a small int64 table
built once per geometry and device (:func:`_x_taps`, :func:`_gy_phase_tables`), so the loaders do
no integer division, except backward weight's one output-position decode per thread and slice.
Backward data is a gather over the output positions each input element feeds (no atomics), split
by stride phase (``gridDim.z``): the input positions d = d0 + i * SD of one phase are reached by
the same taps, so each phase reduces over those taps alone (at stride 2 a quarter of the taps in
2D, an eighth in 3D, where a single GEMM would test them all); backward weight splits its long
reduction over ``gridDim.z`` blocks writing separate partial tiles that a second kernel sums in
split order, so every result is deterministic. Flat offsets are int64.

The three kernels share their slice multiply, register fragments and tile staging as device
functions inlined at the Numba IR level (:func:`._gemm.gemm_steps`); ``cnnfast doctor
--compile`` shows they cost no registers or spills. Under ``set_float32_matmul_precision``
"high" or "medium", float32 convolutions run the same kernels with warp-level TF32 / BF16
tensor-core MMA as their multiply (:func:`mma_tiles`, ``cuda/_mma.py``). The :class:`Geometry`
reaches a kernel as one int64 device array (see ``_runtime.launch``), and forward adds the bias
and applies a ReLU in its epilogue when asked (:func:`conv_bias_relu_forward`), saving those
ops' launches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np
from numba import cuda

from cnnfast import config
from cnnfast.cuda import _runtime as rt
from cnnfast.cuda import autotune
from cnnfast.cuda._channel import channel_map, channel_sum
from cnnfast.cuda._gemm import gemm_steps
from cnnfast.shapes import output_size

Ints = tuple[int, ...]

# Backward weight: enough blocks to fill a large GPU, each reducing at least this many slices.
_TARGET_BLOCKS = 512
_MIN_SLICES_PER_SPLIT = 8
_MAX_SPLITS = 1024

_X_TAP_COLUMNS = 4  # x offset of (c, kd, kh, kw) from the window corner; kd*DD, kh*DH, kw*DW
_GY_TAP_COLUMNS = 5  # gy offset k*OSP; output offsets along d, h, w; w offset of (k, taps)
_GY_PHASE_COLUMNS = 8  # first d, h, w; extents along d, h, w; first tap row; reduction length


class Geometry(NamedTuple):
    """One convolution's sizes, 2D lifted to 3D (D = KD = SD = DD = 1, PD = 0).

    Host code reads the fields by name; a launch passes the tuple as one small int64 device
    array (see ``_runtime.launch``), which the kernels unpack in this field order.
    """

    N: int
    C: int
    D: int
    H: int
    W: int
    K: int
    KD: int
    KH: int
    KW: int
    SD: int
    SH: int
    SW: int
    PD: int
    PH: int
    PW: int
    DD: int
    DH: int
    DW: int
    OD: int
    OH: int
    OW: int
    G: int


def _geometry(x_shape: Ints, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
              groups: int) -> Geometry:
    """The :class:`Geometry` of a convolution of x (N, C, *S) by w (K, C/G, *KS)."""
    lift = 3 - (len(x_shape) - 2)  # 1 for 2D: prepend a depth axis of size 1
    n, c, *size = (int(s) for s in x_shape)
    k, _, *kernel = (int(s) for s in w_shape)
    size = [1] * lift + size
    kernel = [1] * lift + kernel
    stride = [1] * lift + [int(s) for s in stride]
    padding = [0] * lift + [int(p) for p in padding]
    dilation = [1] * lift + [int(d) for d in dilation]
    out = output_size(size, kernel, stride, padding, dilation)
    return Geometry(n, c, *size, k, *kernel, *stride, *padding, *dilation, *out, int(groups))


def _x_taps(geo, like):
    """Table (Cg * KVOL, 4) int64 for reduction index r = (c, kd, kh, kw) of an x gather.

    Column 0 is the offset of x[c, d0 + kd*DD, h0 + kh*DH, w0 + kw*DW] from x[0, d0, h0, w0]
    (channel c of the group); columns 1-3 are kd*DD, kh*DH, kw*DW for the bounds test.
    """
    C, D, H, W, KD, KH, KW = geo.C, geo.D, geo.H, geo.W, geo.KD, geo.KH, geo.KW
    DD, DH, DW = geo.DD, geo.DH, geo.DW
    cg = C // geo.G

    def build():
        c, kd, kh, kw = np.meshgrid(np.arange(cg), np.arange(KD), np.arange(KH), np.arange(KW),
                                    indexing="ij")
        dd, dh, dw = kd * DD, kh * DH, kw * DW
        delta = c * (D * H * W) + (dd * H + dh) * W + dw
        return np.stack([delta, dd, dh, dw], axis=-1).reshape(-1).astype(np.int64)

    return rt.cached_table(("x", cg, KD, KH, KW, DD, DH, DW, D, H, W), build, like)


def _stride_phases(geo) -> list[tuple]:
    """Backward data's stride phases: [(first input index, count, [(tap, output offset)])] per
    axis product. An input position d of phase ``d0`` (d = d0 + i * SD) meets output
    od = i + (d0 + PD - kd*DD) / SD through exactly the taps kd whose kd*DD is congruent to
    d0 + PD modulo SD; the other taps never reach it. Listing only those, a phase's GEMM has no
    dead reduction steps: at stride 2 the gather used to test 9 taps (2D) or 27 (3D) to find
    about 2.25 or 3.4 that count."""
    axes = []
    for size, ks, st, pad, dil in ((geo.D, geo.KD, geo.SD, geo.PD, geo.DD),
                                   (geo.H, geo.KH, geo.SH, geo.PH, geo.DH),
                                   (geo.W, geo.KW, geo.SW, geo.PW, geo.DW)):
        phases = []
        for first in range(st):
            count = max(0, rt.cdiv(size - first, st))
            taps = [(k, (first + pad - k * dil) // st) for k in range(ks)
                    if (first + pad - k * dil) % st == 0]
            phases.append((first, count, taps))
        axes.append(phases)
    return [(pd_, ph_, pw_) for pd_ in axes[0] for ph_ in axes[1] for pw_ in axes[2]]


def _gy_phase_tables(geo, like):
    """Backward data's two tables for one geometry (built once per geometry and device).

    ``phases`` (P, 8) int64, one row per stride phase: first d, h, w; the phase's extent along
    d, h, w; its first row in ``taps``; its reduction length. ``taps`` (sum of lengths, 5) int64,
    the phases' reduction indices r = (k, kd, kh, kw) in that order, only the taps that reach
    the phase: k * OSP (offset of filter k's gy plane), the output offsets along d, h, w, and the
    offset of w[k, 0, kd, kh, kw] within the group's filters (add c * KVOL for channel c)."""
    KH, KW = geo.KH, geo.KW
    cg, kg = geo.C // geo.G, geo.K // geo.G
    kvol = geo.KD * KH * KW
    osp = geo.OD * geo.OH * geo.OW
    key = tuple(geo[1:])  # everything but the batch: N only scales the rows

    def build_phases():
        rows, start = [], 0
        for (d0, nd, td), (h0, nh, th), (w0, nw, tw) in _stride_phases(geo):
            length = kg * len(td) * len(th) * len(tw)
            rows.append([d0, h0, w0, nd, nh, nw, start, length])
            start += length
        return np.array(rows, dtype=np.int64).reshape(-1)

    def build_taps():
        rows = []
        for (_, _, td), (_, _, th), (_, _, tw) in _stride_phases(geo):
            for k in range(kg):
                for kd, od in td:
                    for kh, oh in th:
                        for kw, ow in tw:
                            rows.append([k * osp, od, oh, ow,
                                         k * (cg * kvol) + (kd * KH + kh) * KW + kw])
        return np.array(rows, dtype=np.int64).reshape(-1)

    return (rt.cached_table(("gy phases",) + key, build_phases, like),
            rt.cached_table(("gy taps",) + key, build_taps, like))


# --- kernels --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward_kernel(tiles: rt.GemmTiles, dtype: np.dtype, bias: bool = False,
                    relu: bool = False):
    BM, BN, BK = tiles.block_m, tiles.block_n, tiles.block_k
    NT = tiles.threads
    A_LOADS, A_STEP = BM * BK // NT, NT // BM  # x elements per thread per slice, kk between
    B_LOADS, B_STEP = BN * BK // NT, NT // BK  # w elements per thread per slice, cols between
    TAPS = _X_TAP_COLUMNS
    HAS_BIAS, RELU = bias, relu
    nbt = rt.nb_type(dtype)
    zero = dtype.type(0)
    (A_SHAPE, B_SHAPE, ACC, A_FRAG, B_FRAG, clear, coords, row_of, col_of, multiply_slice,
     stage_a_down, _, stage_b_across) = gemm_steps(tiles, dtype)
    ACC_M, ACC_N = ACC

    @cuda.jit
    def conv_forward_kernel(x, w, b, taps, y, geo):
        # Each block computes a BM x BN tile of group g's y: BM output positions
        # m = (n, od, oh, ow) by BN filters; each thread its accumulators (GemmSteps), stored
        # with the bias added (HAS_BIAS), then clamped at 0 (RELU): what bias_add and
        # relu_forward would compute, bit for bit, without their launches.
        (N, C, D, H, W, K, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW, G) = geo
        cg = C // G
        kg = K // G
        red = cg * KD * KH * KW
        osp = OD * OH * OW
        rows = N * osp
        tiles_n = (kg + BN - 1) // BN
        g = cuda.blockIdx.y // tiles_n
        n0 = (cuda.blockIdx.y % tiles_n) * BN
        m0 = cuda.blockIdx.x * BM
        t = cuda.threadIdx.x
        tm, tn = coords(t)

        a_tile = cuda.shared.array(A_SHAPE, nbt)
        b_tile = cuda.shared.array(B_SHAPE, nbt)
        acc = cuda.local.array(ACC, nbt)
        a_next = cuda.local.array(A_LOADS, nbt)
        b_next = cuda.local.array(B_LOADS, nbt)
        a_frag = cuda.local.array(A_FRAG, nbt)
        b_frag = cuda.local.array(B_FRAG, nbt)
        clear(acc)

        # The output position this thread gathers x for: the same in every slice.
        a_row = t % BM
        a_kk = t // BM
        m = m0 + a_row
        m_ok = m < rows
        n = m // osp
        o = m - n * osp
        od = o // (OH * OW)
        oh = (o // OW) % OH
        ow = o % OW
        d0 = od * SD - PD
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        x_corner = (n * C + g * cg) * (D * H * W) + (d0 * H + h0) * W + w0
        # The reduction index (within a slice) this thread loads w at, and its first filter.
        b_kk = t % BK
        b_col = t // BK
        w_group = g * kg * red

        steps = (red + BK - 1) // BK
        for s in range(steps + 1):
            if s < steps:  # gather slice s into registers while slice s - 1 is multiplied
                for li in range(A_LOADS):
                    r = s * BK + a_kk + li * A_STEP
                    v = zero
                    if m_ok and r < red:
                        d = d0 + taps[r * TAPS + 1]
                        h = h0 + taps[r * TAPS + 2]
                        ww = w0 + taps[r * TAPS + 3]
                        if 0 <= d < D and 0 <= h < H and 0 <= ww < W:
                            v = x[x_corner + taps[r * TAPS]]
                    a_next[li] = v
                r = s * BK + b_kk
                for li in range(B_LOADS):
                    k = n0 + b_col + li * B_STEP
                    v = zero
                    if r < red and k < kg:
                        v = w[w_group + k * red + r]
                    b_next[li] = v
            if s > 0:
                multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, tm, tn)
            cuda.syncthreads()
            if s < steps:
                stage_a_down(a_tile, a_next, a_kk, A_STEP, a_row)
                stage_b_across(b_tile, b_next, b_kk, b_col, B_STEP)
            cuda.syncthreads()

        for i in range(ACC_M):
            m = m0 + row_of(tm, i)
            if m < rows:
                n = m // osp
                y_row = (n * K + g * kg) * osp + (m - n * osp)
                for j in range(ACC_N):
                    k = n0 + col_of(tn, j)
                    if k < kg:
                        v = acc[i, j]
                        if HAS_BIAS:
                            v += b[g * kg + k]
                        if RELU:
                            v = zero if v < zero else v
                        y[y_row + k * osp] = v

    conv_forward_kernel.cnnfast_tiles = tiles  # for cnnfast doctor --compile
    return conv_forward_kernel


@functools.lru_cache(maxsize=None)
def _backward_data_kernel(tiles: rt.GemmTiles, dtype: np.dtype):
    BM, BN, BK = tiles.block_m, tiles.block_n, tiles.block_k
    NT = tiles.threads
    A_LOADS, A_STEP = BM * BK // NT, NT // BM
    B_LOADS, B_STEP = BN * BK // NT, NT // BK
    TAPS, PHASES = _GY_TAP_COLUMNS, _GY_PHASE_COLUMNS
    nbt = rt.nb_type(dtype)
    zero = dtype.type(0)
    (A_SHAPE, B_SHAPE, ACC, A_FRAG, B_FRAG, clear, coords, row_of, col_of, multiply_slice,
     stage_a_down, _, stage_b_across) = gemm_steps(tiles, dtype)
    ACC_M, ACC_N = ACC

    @cuda.jit
    def conv_backward_data_kernel(gy, w, phases, taps, gx, geo):
        # Each block computes a BM x BN tile of group g's gx for stride phase p = blockIdx.z:
        # BM input positions m = (n, i, j, l) of the phase (d = d0 + i*SD, h = h0 + j*SH,
        # w = w0 + l*SW) by BN channels; each thread its accumulators (GemmSteps), gathering gy
        # over the output positions whose window holds m (no atomics), through the phase's
        # taps alone (every one of them reaches m, so no stride-divisibility test).
        (N, C, D, H, W, K, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW, G) = geo
        p = cuda.blockIdx.z * PHASES
        d0 = phases[p]
        h0 = phases[p + 1]
        w0 = phases[p + 2]
        pdn = phases[p + 3]
        phn = phases[p + 4]
        pwn = phases[p + 5]
        tap0 = phases[p + 6]
        red = phases[p + 7]
        psp = pdn * phn * pwn
        rows = N * psp
        m0 = cuda.blockIdx.x * BM
        if m0 >= rows:  # the whole block: this phase has fewer rows than the largest one
            return
        cg = C // G
        kg = K // G
        kvol = KD * KH * KW
        sp = D * H * W
        osp = OD * OH * OW
        tiles_n = (cg + BN - 1) // BN
        g = cuda.blockIdx.y // tiles_n
        n0 = (cuda.blockIdx.y % tiles_n) * BN
        t = cuda.threadIdx.x
        tm, tn = coords(t)

        a_tile = cuda.shared.array(A_SHAPE, nbt)
        b_tile = cuda.shared.array(B_SHAPE, nbt)
        acc = cuda.local.array(ACC, nbt)
        a_next = cuda.local.array(A_LOADS, nbt)
        b_next = cuda.local.array(B_LOADS, nbt)
        a_frag = cuda.local.array(A_FRAG, nbt)
        b_frag = cuda.local.array(B_FRAG, nbt)
        clear(acc)

        # The phase position (i, j, l) this thread gathers gy for: output od = i + tap offset.
        a_row = t % BM
        a_kk = t // BM
        m = m0 + a_row
        m_ok = m < rows
        n = m // psp
        q = m - n * psp
        pi = q // (phn * pwn)
        pj = (q // pwn) % phn
        pl = q % pwn
        gy_group = (n * K + g * kg) * osp
        b_kk = t % BK
        b_col = t // BK
        w_group = g * kg * cg * kvol

        steps = (red + BK - 1) // BK
        for s in range(steps + 1):
            if s < steps:
                for li in range(A_LOADS):
                    r = s * BK + a_kk + li * A_STEP
                    v = zero
                    if m_ok and r < red:
                        tr = (tap0 + r) * TAPS
                        od = pi + taps[tr + 1]
                        oh = pj + taps[tr + 2]
                        ow = pl + taps[tr + 3]
                        if (od >= 0 and oh >= 0 and ow >= 0 and od < OD and oh < OH
                                and ow < OW):
                            v = gy[gy_group + taps[tr] + (od * OH + oh) * OW + ow]
                    a_next[li] = v
                r = s * BK + b_kk
                for li in range(B_LOADS):
                    c = n0 + b_col + li * B_STEP
                    v = zero
                    if r < red and c < cg:
                        v = w[w_group + taps[(tap0 + r) * TAPS + 4] + c * kvol]
                    b_next[li] = v
            if s > 0:
                multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, tm, tn)
            cuda.syncthreads()
            if s < steps:
                stage_a_down(a_tile, a_next, a_kk, A_STEP, a_row)
                stage_b_across(b_tile, b_next, b_kk, b_col, B_STEP)
            cuda.syncthreads()

        for i in range(ACC_M):
            m = m0 + row_of(tm, i)
            if m < rows:
                n = m // psp
                q = m - n * psp
                d = d0 + (q // (phn * pwn)) * SD
                h = h0 + ((q // pwn) % phn) * SH
                x_w = w0 + (q % pwn) * SW
                gx_row = (n * C + g * cg) * sp + (d * H + h) * W + x_w
                for j in range(ACC_N):
                    c = n0 + col_of(tn, j)
                    if c < cg:
                        gx[gx_row + c * sp] = acc[i, j]

    conv_backward_data_kernel.cnnfast_tiles = tiles  # for cnnfast doctor --compile
    return conv_backward_data_kernel


@functools.lru_cache(maxsize=None)
def _backward_weight_kernel(tiles: rt.GemmTiles, dtype: np.dtype):
    BM, BN, BK = tiles.block_m, tiles.block_n, tiles.block_k
    NT = tiles.threads
    LOAD_STEP = NT // BK  # tile rows (or cols) between one thread's loads
    A_LOADS, B_LOADS = BM * BK // NT, BN * BK // NT
    TAPS = _X_TAP_COLUMNS
    nbt = rt.nb_type(dtype)
    zero = dtype.type(0)
    (A_SHAPE, B_SHAPE, ACC, A_FRAG, B_FRAG, clear, coords, row_of, col_of, multiply_slice,
     _, stage_a_across, stage_b_across) = gemm_steps(tiles, dtype)
    ACC_M, ACC_N = ACC

    @cuda.jit
    def conv_backward_weight_kernel(gy, x, taps, part, geo, chunk):
        # Each block computes a BM x BN tile of group g's gw^T, BM reduction columns
        # r = (c, kd, kh, kw) by BN filters, summed over output positions
        # [blockIdx.z * chunk, (blockIdx.z + 1) * chunk) only; each thread its accumulators
        # (GemmSteps). Split z writes its partial to part[z] (gw itself when there is one split).
        (N, C, D, H, W, K, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, OD, OH, OW, G) = geo
        cg = C // G
        kg = K // G
        red = cg * KD * KH * KW
        osp = OD * OH * OW
        total = N * osp
        tiles_n = (kg + BN - 1) // BN
        g = cuda.blockIdx.y // tiles_n
        n0 = (cuda.blockIdx.y % tiles_n) * BN
        m0 = cuda.blockIdx.x * BM
        z = cuda.blockIdx.z
        t = cuda.threadIdx.x
        tm, tn = coords(t)

        a_tile = cuda.shared.array(A_SHAPE, nbt)
        b_tile = cuda.shared.array(B_SHAPE, nbt)
        acc = cuda.local.array(ACC, nbt)
        a_next = cuda.local.array(A_LOADS, nbt)
        b_next = cuda.local.array(B_LOADS, nbt)
        a_frag = cuda.local.array(A_FRAG, nbt)
        b_frag = cuda.local.array(B_FRAG, nbt)
        clear(acc)

        # Both operands are loaded along the reduction (output positions), which is contiguous
        # in gy and strided by SW in x: each thread owns one output position per slice.
        kk_own = t % BK
        col0 = t // BK
        start = z * chunk
        end = min(total, start + chunk)
        steps = (end - start + BK - 1) // BK
        for s in range(steps + 1):
            if s < steps:
                p = start + s * BK + kk_own
                p_ok = p < end
                n = p // osp
                o = p - n * osp
                od = o // (OH * OW)
                oh = (o // OW) % OH
                ow = o % OW
                d0 = od * SD - PD
                h0 = oh * SH - PH
                w0 = ow * SW - PW
                x_corner = (n * C + g * cg) * (D * H * W) + (d0 * H + h0) * W + w0
                gy_pos = (n * K + g * kg) * osp + o
                for li in range(A_LOADS):
                    r = m0 + col0 + li * LOAD_STEP
                    v = zero
                    if p_ok and r < red:
                        d = d0 + taps[r * TAPS + 1]
                        h = h0 + taps[r * TAPS + 2]
                        ww = w0 + taps[r * TAPS + 3]
                        if 0 <= d < D and 0 <= h < H and 0 <= ww < W:
                            v = x[x_corner + taps[r * TAPS]]
                    a_next[li] = v
                for li in range(B_LOADS):
                    k = n0 + col0 + li * LOAD_STEP
                    v = zero
                    if p_ok and k < kg:
                        v = gy[gy_pos + k * osp]
                    b_next[li] = v
            if s > 0:
                multiply_slice(a_tile, b_tile, a_frag, b_frag, acc, tm, tn)
            cuda.syncthreads()
            if s < steps:
                stage_a_across(a_tile, a_next, kk_own, col0, LOAD_STEP)
                stage_b_across(b_tile, b_next, kk_own, col0, LOAD_STEP)
            cuda.syncthreads()

        part_base = z * K * red + g * kg * red
        for j in range(ACC_N):
            k = n0 + col_of(tn, j)
            if k < kg:
                for i in range(ACC_M):
                    r = m0 + row_of(tm, i)
                    if r < red:
                        part[part_base + k * red + r] = acc[i, j]

    conv_backward_weight_kernel.cnnfast_tiles = tiles  # for cnnfast doctor --compile
    return conv_backward_weight_kernel


@functools.lru_cache(maxsize=None)
def _sum_splits_kernel(dtype: np.dtype):
    @cuda.jit
    def sum_splits_kernel(part, gw, splits, size):
        # Each thread sums gw element i (grid-stride over i) over the splits, in split order.
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i < size:
            total = part[i]
            for s in range(1, splits):
                total += part[s * size + i]
            gw[i] = total
            i += cuda.gridDim.x * cuda.blockDim.x

    return sum_splits_kernel


# --- contract functions ---------------------------------------------------------------------

# float32 matmul precision (cnnfast.set_float32_matmul_precision) -> tensor-core operands
_TENSOR_CORE = {"high": "tf32", "medium": "bf16"}


def mma_tiles(dtype) -> rt.MmaTiles | None:
    """The tensor-core tiles a convolution of ``dtype`` runs with: for float32 under
    ``set_float32_matmul_precision("high")`` (``"medium"``) the launch configuration's
    :class:`~._runtime.MmaTiles` with TF32 (BF16) operands; None otherwise (the FP32 SIMT
    kernels, with autotune's tiles). float64 never takes tensor cores."""
    if np.dtype(dtype) != np.float32:
        return None
    mma = _TENSOR_CORE.get(config.get("matmul_precision"))
    return None if mma is None else dataclasses.replace(rt.current_config().mma_tiles,
                                                        precision=mma)


def _run(pass_name: str, geo: Geometry, dtype, run) -> None:
    """``run(tiles)`` with this call's tiles: the one place that picks a convolution's kernel
    family (tensor cores by the matmul precision, else autotune's or the configured tiles)."""
    tiles = mma_tiles(dtype)
    if tiles is None:
        autotune.run_tuned(pass_name, geo, dtype, run)
    else:
        run(tiles)


def _out_shape(geo: Geometry, nd: int) -> tuple[int, ...]:
    return (geo.N, geo.K) + (geo.OD, geo.OH, geo.OW)[3 - nd:]


def conv_forward(x, w, stride: Ints, padding: Ints, dilation: Ints, groups: int):
    """x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O), cross-correlation like PyTorch."""
    return conv_bias_relu_forward(x, w, None, False, stride, padding, dilation, groups)


def conv_bias_relu_forward(x, w, b, relu: bool, stride: Ints, padding: Ints, dilation: Ints,
                           groups: int):
    """y = conv(x, w) [+ b (K,) per channel] [then max(y, 0)], in one launch -> (N, K, *O).

    Bit for bit what conv_forward, bias_add and relu_forward give one after another.
    """
    nd = x.ndim - 2
    geo = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    y = rt.empty(_out_shape(geo, nd), x.dtype, like=x)
    if y.size == 0:
        return y
    kg = geo.K // groups
    w_flat = rt.flat(w)
    args = (rt.flat(x), w_flat, w_flat if b is None else rt.flat(b), _x_taps(geo, like=x),
            y.reshape(-1), geo)

    def run(tiles) -> None:
        grid = (rt.cdiv(y.size // geo.K, tiles.block_m), groups * rt.cdiv(kg, tiles.block_n))
        kernel = _forward_kernel(tiles, np.dtype(x.dtype), b is not None, bool(relu))
        rt.launch(kernel, grid, tiles.threads, *args)

    _run("forward", geo, x.dtype, run)
    return y


def conv_backward_data(gy, w, x_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                       groups: int):
    """gy (N, K, *O), w (K, C // groups, *KS) -> gx (x_shape = (N, C, *S))."""
    geo = _geometry(x_shape, w.shape, stride, padding, dilation, groups)
    gx = rt.empty(tuple(int(s) for s in x_shape), gy.dtype, like=gy)
    if gx.size == 0:
        return gx
    if gy.size == 0:
        gx[...] = 0
        return gx
    cg = geo.C // groups
    phases, taps = _gy_phase_tables(geo, like=gy)
    n_phases = geo.SD * geo.SH * geo.SW
    largest = rt.cdiv(geo.D, geo.SD) * rt.cdiv(geo.H, geo.SH) * rt.cdiv(geo.W, geo.SW)  # phase 0
    args = (rt.flat(gy), rt.flat(w), phases, taps, gx.reshape(-1), geo)

    def run(tiles) -> None:
        grid = (rt.cdiv(geo.N * largest, tiles.block_m), groups * rt.cdiv(cg, tiles.block_n),
                n_phases)
        rt.launch(_backward_data_kernel(tiles, np.dtype(gy.dtype)), grid, tiles.threads, *args)

    _run("backward_data", geo, gy.dtype, run)
    return gx


def _weight_splits(total: int, tile_blocks: int, block_k: int) -> int:
    """How many blocks share backward weight's reduction over ``total`` output positions."""
    wanted = rt.cdiv(_TARGET_BLOCKS, tile_blocks)
    most = rt.cdiv(total, _MIN_SLICES_PER_SPLIT * block_k)
    return max(1, min(wanted, most, _MAX_SPLITS))


def conv_backward_weight(gy, x, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                         groups: int):
    """gy (N, K, *O), x (N, C, *S) -> gw (w_shape = (K, C // groups, *KS))."""
    geo = _geometry(x.shape, w_shape, stride, padding, dilation, groups)
    gw = rt.empty(tuple(int(s) for s in w_shape), gy.dtype, like=gy)
    if gw.size == 0:
        return gw
    total = gy.size // geo.K if geo.K else 0  # N * OSP output positions
    if total == 0:
        gw[...] = 0
        return gw
    kg = geo.K // groups
    red = gw.size // geo.K
    gy_flat, x_flat, taps = rt.flat(gy), rt.flat(x), _x_taps(geo, like=x)

    def run(tiles) -> None:
        tile_blocks = rt.cdiv(red, tiles.block_m) * groups * rt.cdiv(kg, tiles.block_n)
        splits = _weight_splits(total, tile_blocks, tiles.block_k)
        chunk = rt.cdiv(rt.cdiv(total, splits), tiles.block_k) * tiles.block_k
        splits = rt.cdiv(total, chunk)
        part = gw.reshape(-1) if splits == 1 else rt.empty(splits * gw.size, gy.dtype, like=gy)
        grid = (rt.cdiv(red, tiles.block_m), groups * rt.cdiv(kg, tiles.block_n), splits)
        rt.launch(_backward_weight_kernel(tiles, np.dtype(gy.dtype)), grid, tiles.threads,
                  gy_flat, x_flat, taps, part, geo, chunk)
        if splits > 1:
            threads = rt.current_config().threads
            blocks = min(rt.cdiv(gw.size, threads), 4096)
            rt.launch(_sum_splits_kernel(np.dtype(gy.dtype)), blocks, threads,
                      part, gw.reshape(-1), splits, gw.size)

    _run("backward_weight", geo, gy.dtype, run)
    return gw


def bias_add(y, b):
    """y (N, K, *O) + b (K,) broadcast over the channel axis -> a new (N, K, *O) array."""
    return channel_map("bias", y, p=b)


def bias_grad(gy):
    """gy (N, K, *O) -> gb (K,): gy summed over every axis but 1 (fixed-order block reductions)."""
    return channel_sum(gy)
