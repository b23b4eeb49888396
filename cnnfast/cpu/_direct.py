"""Direct float32 convolution (2D and 3D, any stride, padding and dilation, groups 1):
cnnfast's microkernel reading the input in place, with no column matrix.

The input is copied once into a zero-padded array cut into stride phases,
``xq[n, c, ad, ah, aw, i, j, l] = xp[n, c, i*SD + ad, j*SH + ah, l*SW + aw]`` (N, C, phases,
Qd, Qh, Qw), xp the padded input (for stride 1 there is one phase: xq is xp). An input position
``o * S + k * DL`` of tap k is phase ``k * DL % S``, place ``o + k * DL // S`` in it. In one depth
slice od of the output, number the output positions ``j = oh * Qw + ow`` (ow < OW; the
positions with ow >= OW are computed and thrown away). A kernel tap p = (c, kd, kh, kw) then
reads, for every j, ``xqf[base + offs[p] + j]`` (:func:`tap_offsets`), ``base`` the slice's
start: for every tap, the row of the implicit column matrix is a contiguous run of xq. So

- forward: ``y_ext[k, j] = sum_p w[k, p] * xqf[base + offs[p] + j]`` is a GEMM whose B rows are
  read in place (:func:`_microkernel.microkernel_b_rows`), A = the filters packed in MR-row
  panels once per call (:func:`_microkernel.pack_a`); the kept columns of y_ext are copied into y;
- backward-weight: ``gw^T[p, k] = sum_(n, od, j) xqf[base + offs[p] + j] * gy_ext[k, j]`` is a
  GEMM whose A rows are read in place (:func:`_microkernel.microkernel_a_rows`) and B = gy with
  zeros at the thrown-away columns, packed per slice; one partial sum per thread, added in
  thread order. (A non-finite input that only a thrown-away column meets for some tap makes
  that tap's gradient NaN, where the reference has a finite value; every other tap of that
  input already has a non-finite gradient.)
- backward-data with stride 1 is a forward convolution (conv.py flips the filters); with a
  larger stride it stays on the column-matrix path.

The wasted share is the thrown-away columns: ``(OH - 1) * Qw + OW`` positions computed per
slice for ``OH * OW`` kept (:func:`efficiency`); conv.py takes this path only where it is small.
Work is split into tasks of (sample, depth slice, run of column tiles, run of filter panels),
several per thread even for batch 1. Every output element is summed by one task in a fixed
order: the same bits on every run for a given thread count.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnfast.cpu._microkernel import (
    MR,
    NR,
    enter_flush,
    leave_flush,
    microkernel_a_rows,
    microkernel_b_rows,
    pack_a,
)

Ints = tuple[int, ...]

# Elements of a task's output tiles (256 KiB in float32): they are added into once per K block
# of taps, so they should stay in L2.
TILE_BUDGET = 1 << 16
# Taps (forward) or positions (backward-weight) per K block (measured on ResNet layers: 128 to
# 512 within 5%, 512 best).
DIRECT_KC = 512



def phase_size(size: Ints, pd: Ints, st: Ints) -> Ints:
    """(Qd, Qh, Qw): each padded extent cut into ``stride`` phases, ceil((S + 2P) / stride)."""
    return tuple(-(-(s + 2 * p) // t) for s, p, t in zip(size, pd, st))


def columns(out: Ints, size_q: Ints) -> int:
    """Positions computed per depth slice: (OH - 1) * Qw + OW."""
    return (out[1] - 1) * size_q[2] + out[2]


def efficiency(out: Ints, size: Ints, pd: Ints, st: Ints) -> float:
    """Kept over computed output positions (column tiles of NR included)."""
    computed = -(-columns(out, phase_size(size, pd, st)) // NR) * NR
    return out[1] * out[2] / computed


def phase_input(x5: np.ndarray, pd: Ints, st: Ints) -> np.ndarray:
    """x (N, C, D, H, W) zero-padded by pd and cut into stride phases, flattened:
    xq[n, c, ad, ah, aw, i, j, l] = xp[n, c, i*SD + ad, j*SH + ah, l*SW + aw] (a stride-1 layer
    has one phase: xq is xp), with 2 * NR zeros of slack at the end (the last column tile reads
    up to a tile past the last position)."""
    N, C = x5.shape[:2]
    size_q = phase_size(x5.shape[2:], pd, st)
    full = tuple(q * t for q, t in zip(size_q, st))
    phases = st[0] * st[1] * st[2]
    total = N * C * phases * size_q[0] * size_q[1] * size_q[2]
    if phases == 1:  # the common case, in parallel (a 3D activation is tens of megabytes)
        flat = np.empty(total + 2 * NR, dtype=np.float32)
        flat[total:] = 0
        _pad_into(x5, pd[0], pd[1], pd[2], flat[:total].reshape((N, C) + full))
        return flat
    flat = np.zeros(total + 2 * NR, dtype=np.float32)
    D, H, W = x5.shape[2:]
    xp = np.zeros((N, C) + full, dtype=np.float32)
    xp[:, :, pd[0]:pd[0] + D, pd[1]:pd[1] + H, pd[2]:pd[2] + W] = x5
    if phases > 1:
        split = xp.reshape(N, C, size_q[0], st[0], size_q[1], st[1], size_q[2], st[2])
        flat[:total].reshape(N, C, st[0], st[1], st[2], *size_q)[...] = split.transpose(
            0, 1, 3, 5, 7, 2, 4, 6)
    return flat


@njit(parallel=True, cache=True)
def _pad_into(x, pd0, pd1, pd2, out):
    """out (N, C, Dp, Hp, Wp) = x (N, C, D, H, W) placed at (pd0, pd1, pd2), zeros around it;
    one task per (n, c) plane."""
    N, C, D, H, W = x.shape
    for task in prange(N * C):
        n = task // C
        c = task - n * C
        plane = out[n, c]
        plane[:, :, :] = 0
        for d in range(D):
            for h in range(H):
                src = x[n, c, d, h]
                dst = plane[d + pd0, h + pd1]
                for w in range(W):
                    dst[w + pd2] = src[w]


def tap_offsets(C: int, ks: Ints, dl: Ints, st: Ints, size_q: Ints, rows: int) -> np.ndarray:
    """offs[p] for p = (c, kd, kh, kw) in weight order, zero-padded to ``rows`` entries: where
    the tap's run starts in :func:`phase_input`'s array, from the start of a depth slice."""
    Qd, Qh, Qw = size_q
    c, kd, kh, kw = np.meshgrid(np.arange(C), np.arange(ks[0]), np.arange(ks[1]),
                                np.arange(ks[2]), indexing="ij")
    (ad, qd), (ah, qh), (aw, qw) = ((k * d % t, k * d // t) for k, d, t in
                                    zip((kd, kh, kw), dl, st))
    phase = (c * st[0] + ad) * st[1] * st[2] + ah * st[2] + aw
    offs = (phase * (Qd * Qh * Qw) + qd * Qh * Qw + qh * Qw + qw).ravel()
    out = np.zeros(rows, dtype=np.int64)
    out[:offs.size] = offs
    return out


def forward_tasks(N: int, OD: int, col_tiles: int, panels: int, threads: int) -> np.ndarray:
    """Tasks (n, od, t0, t1, q0, q1): column tiles t0..t1 and filter panels q0..q1 of one
    slice. Slices are cut into runs of column tiles, then of panels, until there are at least
    two tasks per thread (batch 1 runs in parallel too)."""
    want = 2 * threads
    slices = N * OD
    tile_runs = min(col_tiles, max(1, -(-want // slices),
                                   -(-col_tiles * panels * MR * NR // TILE_BUDGET)))
    panel_runs = min(panels, max(1, -(-want // (slices * tile_runs))))
    tasks = []
    for n in range(N):
        for od in range(OD):
            for a in range(tile_runs):
                t0, t1 = col_tiles * a // tile_runs, col_tiles * (a + 1) // tile_runs
                for b in range(panel_runs):
                    q0, q1 = panels * b // panel_runs, panels * (b + 1) // panel_runs
                    tasks.append((n, od, t0, t1, q0, q1))
    return np.array(tasks, dtype=np.int64).reshape(-1, 6)


def forward(x5, w5, st: Ints, pd: Ints, dl: Ints, threads: int, flush: bool, y5) -> None:
    """y (N, K, OD, OH, OW) of the convolution of x (N, C, D, H, W) with w (K, C, *KS),
    float32."""
    N, C = x5.shape[:2]
    K = w5.shape[0]
    ks = w5.shape[2:]
    size_q = phase_size(x5.shape[2:], pd, st)
    out = y5.shape[2:]
    taps = C * ks[0] * ks[1] * ks[2]
    J = columns(out, size_q)
    col_tiles = -(-J // NR)
    panels = -(-K // MR)
    tasks = forward_tasks(N, out[0], col_tiles, panels, threads)
    widest = int(((tasks[:, 3] - tasks[:, 2]) * (tasks[:, 5] - tasks[:, 4])).max())
    buf = np.empty((threads, widest * MR * NR), dtype=np.float32)
    phases = st[0] * st[1] * st[2]
    _forward_kernel(phase_input(x5, pd, st), pack_a(w5.reshape(K, taps)),
                    tap_offsets(C, ks, dl, st, size_q, taps), tasks, C * phases, size_q, y5,
                    buf, flush)


@njit(parallel=True, cache=True)
def _forward_kernel(xpf, apack, offs, tasks, C, size_p, y, buf, flush):
    """One task per row of ``tasks``: the tile products over every K block of taps into the
    thread's buffer, then the kept columns into y."""
    K, OH, OW = y.shape[1], y.shape[3], y.shape[4]
    Dp, Hp, Wp = size_p
    plane = Hp * Wp
    taps = offs.size
    for t in prange(tasks.shape[0]):
        state = enter_flush(flush)
        tid = numba.get_thread_id()
        n, od, t0, t1, q0, q1 = (tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3],
                                 tasks[t, 4], tasks[t, 5])
        ncols = (t1 - t0) * NR
        tile = buf[tid]
        base = n * C * Dp * plane + od * plane
        for p0 in range(0, taps, DIRECT_KC):
            kc = min(DIRECT_KC, taps - p0)
            acc = 1 if p0 > 0 else 0
            for jt in range(t0, t1):
                for q in range(q0, q1):
                    microkernel_b_rows(kc, apack, (q * taps + p0) * MR, xpf, base + jt * NR,
                                       offs, p0, tile, (q - q0) * MR * ncols + (jt - t0) * NR,
                                       ncols, acc)
        j0, j1 = t0 * NR, t1 * NR
        for k in range(q0 * MR, min(q1 * MR, K)):
            src = tile[(k - q0 * MR) * ncols:(k - q0 * MR + 1) * ncols]
            dst = y[n, k, od]
            for oh in range(max(0, j0 // Wp), min(OH, -(-j1 // Wp))):
                row = dst[oh]
                lo = max(0, j0 - oh * Wp)
                hi = min(OW, j1 - oh * Wp)
                for ow in range(lo, hi):
                    row[ow] = src[oh * Wp + ow - j0]
        leave_flush(state)


def backward_weight(gy5, x5, ks: Ints, st: Ints, pd: Ints, dl: Ints, threads: int,
                    flush: bool):
    """gw (K, C, *KS) of the convolution, from gy (N, K, OD, OH, OW) and x, float32."""
    N, C = x5.shape[:2]
    K = gy5.shape[1]
    size_q = phase_size(x5.shape[2:], pd, st)
    out = gy5.shape[2:]
    taps = C * ks[0] * ks[1] * ks[2]
    rows = -(-taps // MR) * MR
    Kp = -(-K // NR) * NR
    J = columns(out, size_q)
    slices = N * out[0]
    runs = min(threads, slices)
    spread = np.array([slices * r // runs for r in range(runs + 1)], dtype=np.int64)
    partials = np.zeros((runs, rows, Kp), dtype=np.float32)
    bpack = np.empty((runs, Kp * J), dtype=np.float32)
    phases = st[0] * st[1] * st[2]
    _backward_weight_kernel(phase_input(x5, pd, st), np.ascontiguousarray(gy5),
                            tap_offsets(C, ks, dl, st, size_q, rows), spread, C * phases, size_q,
                            J, bpack, partials, flush)
    total = partials[0]
    for p in partials[1:]:
        total += p  # partial sums added in a fixed order
    return np.ascontiguousarray(total[:taps, :K].T).reshape((K, C) + tuple(ks))


@njit(parallel=True, cache=True)
def _backward_weight_kernel(xpf, gy, offs, spread, C, size_p, J, bpack_buf, partials, flush):
    """partials[r] (rows, Kp) = sum over the slices of run r of x_windows (taps, J) @ gy_ext^T
    (J, K): gy_ext^T packed per slice into NR-wide panels, zero at the thrown-away columns."""
    K, OD, OH, OW = gy.shape[1], gy.shape[2], gy.shape[3], gy.shape[4]
    Dp, Hp, Wp = size_p
    plane = Hp * Wp
    rows, Kp = partials.shape[1], partials.shape[2]
    for r in prange(spread.size - 1):
        state = enter_flush(flush)
        bpack = bpack_buf[r]
        part = partials[r]
        for s in range(spread[r], spread[r + 1]):
            n = s // OD
            od = s - n * OD
            bpack[:] = 0
            for k in range(K):
                q, kk = k // NR, k % NR
                src = gy[n, k, od]
                for oh in range(OH):
                    row = src[oh]
                    for ow in range(OW):
                        bpack[(q * J + oh * Wp + ow) * NR + kk] = row[ow]
            base = n * C * Dp * plane + od * plane
            for j0 in range(0, J, DIRECT_KC):
                kc = min(DIRECT_KC, J - j0)
                for q in range(Kp // NR):
                    for ip in range(rows // MR):
                        microkernel_a_rows(kc, xpf, base + j0, offs, ip * MR, bpack,
                                           (q * J + j0) * NR, part, ip * MR * Kp + q * NR, Kp,
                                           1)
        leave_flush(state)
