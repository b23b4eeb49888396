"""Winograd F(2x2, 3x3) convolution for 2D 3x3 stride-1 layers (the bulk of a ResNet).

Each 2x2 block of outputs (a tile) comes from a 4x4 block of the zero-padded input. In the
Winograd basis the 3x3 correlation becomes an elementwise product, and summed over input
channels, 16 matrix products (one per basis element xi):

    U[xi] = (G w G^T)[xi]        (K, C)   filters, transformed once per call
    V[xi] = (B^T d B)[xi]        (C, T)   input tiles
    M[xi] = U[xi] @ V[xi]        (K, T)   BLAS, one thread per chunk of tiles
    y tile = A^T M A                      2x2 outputs per (k, tile)

with B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]], G = [[1,0,0],[1/2,1/2,1/2],
[1/2,-1/2,1/2],[0,0,1]], A^T = [[1,1,1,0],[0,1,-1,-1]]. The products take 16 multiplies per tile
and channel pair where a direct 3x3 takes 36: 2.25 times fewer flops, for transforms that
only add. The transforms' coefficients are 0, +-1 and +-1/2, so float32 results stay within a
few ulps of the direct sum.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from cnnfast.cpu._microkernel import enter_flush, leave_flush, matmul
from cnnfast.cpu._parallel import parallel_kernel


def tiles(out_h: int, out_w: int) -> tuple[int, int]:
    """Tile rows and columns covering an (OH, OW) output."""
    return (out_h + 1) // 2, (out_w + 1) // 2


@parallel_kernel
def transform_filters(w, u):
    """u (16, K, C) = G w G^T for w (K, C, 3, 3), one task per filter."""
    K, C = w.shape[0], w.shape[1]
    half = np.full(1, 0.5, dtype=w.dtype)[0]
    for k in prange(K):
        for c in range(C):
            g = w[k, c]
            # Gg (4 x 3): rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2 of each column
            a00, a01, a02 = g[0, 0], g[0, 1], g[0, 2]
            a10 = (g[0, 0] + g[1, 0] + g[2, 0]) * half
            a11 = (g[0, 1] + g[1, 1] + g[2, 1]) * half
            a12 = (g[0, 2] + g[1, 2] + g[2, 2]) * half
            a20 = (g[0, 0] - g[1, 0] + g[2, 0]) * half
            a21 = (g[0, 1] - g[1, 1] + g[2, 1]) * half
            a22 = (g[0, 2] - g[1, 2] + g[2, 2]) * half
            a30, a31, a32 = g[2, 0], g[2, 1], g[2, 2]
            # (Gg) G^T (4 x 4): the same combination along each row
            u[0, k, c] = a00
            u[1, k, c] = (a00 + a01 + a02) * half
            u[2, k, c] = (a00 - a01 + a02) * half
            u[3, k, c] = a02
            u[4, k, c] = a10
            u[5, k, c] = (a10 + a11 + a12) * half
            u[6, k, c] = (a10 - a11 + a12) * half
            u[7, k, c] = a12
            u[8, k, c] = a20
            u[9, k, c] = (a20 + a21 + a22) * half
            u[10, k, c] = (a20 - a21 + a22) * half
            u[11, k, c] = a22
            u[12, k, c] = a30
            u[13, k, c] = (a30 + a31 + a32) * half
            u[14, k, c] = (a30 - a31 + a32) * half
            u[15, k, c] = a32


@njit(nogil=True, cache=True, inline="always")
def _place(src, dst, r0, c0):
    """dst[r0:r0 + h, c0:c0 + w] = src (h, w): a plane copied into a zero-bordered buffer."""
    h, w = src.shape
    for i in range(h):
        row = dst[r0 + i, c0:c0 + w]
        s = src[i]
        for j in range(w):
            row[j] = s[j]


@njit(nogil=True, cache=True)
def _input_tiles(xp, TH, TW, v, c, t0):
    """v[:, c, t0 + ty * TW + tx] = B^T d B for the 4x4 blocks d of the padded plane xp."""
    for ty in range(TH):
        r0 = xp[2 * ty]
        r1 = xp[2 * ty + 1]
        r2 = xp[2 * ty + 2]
        r3 = xp[2 * ty + 3]
        t = t0 + ty * TW
        for tx in range(TW):
            j = 2 * tx
            # B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), column by column
            a0 = r0[j] - r2[j]
            a1 = r0[j + 1] - r2[j + 1]
            a2 = r0[j + 2] - r2[j + 2]
            a3 = r0[j + 3] - r2[j + 3]
            b0 = r1[j] + r2[j]
            b1 = r1[j + 1] + r2[j + 1]
            b2 = r1[j + 2] + r2[j + 2]
            b3 = r1[j + 3] + r2[j + 3]
            e0 = r2[j] - r1[j]
            e1 = r2[j + 1] - r1[j + 1]
            e2 = r2[j + 2] - r1[j + 2]
            e3 = r2[j + 3] - r1[j + 3]
            f0 = r1[j] - r3[j]
            f1 = r1[j + 1] - r3[j + 1]
            f2 = r1[j + 2] - r3[j + 2]
            f3 = r1[j + 3] - r3[j + 3]
            # (B^T d) B: the same combination along each row
            v[0, c, t + tx] = a0 - a2
            v[1, c, t + tx] = a1 + a2
            v[2, c, t + tx] = a2 - a1
            v[3, c, t + tx] = a1 - a3
            v[4, c, t + tx] = b0 - b2
            v[5, c, t + tx] = b1 + b2
            v[6, c, t + tx] = b2 - b1
            v[7, c, t + tx] = b1 - b3
            v[8, c, t + tx] = e0 - e2
            v[9, c, t + tx] = e1 + e2
            v[10, c, t + tx] = e2 - e1
            v[11, c, t + tx] = e1 - e3
            v[12, c, t + tx] = f0 - f2
            v[13, c, t + tx] = f1 + f2
            v[14, c, t + tx] = f2 - f1
            v[15, c, t + tx] = f1 - f3


@njit(nogil=True, cache=True)
def _output_tiles(m, k, t0, TH, TW, yp):
    """yp (2 TH, 2 TW) = A^T M A for the tiles t0.. of filter k."""
    for ty in range(TH):
        o0 = yp[2 * ty]
        o1 = yp[2 * ty + 1]
        t = t0 + ty * TW
        for tx in range(TW):
            i = t + tx
            # A^T M: rows (m0 + m1 + m2, m1 - m2 - m3) of the 4x4 block, column by column
            p0 = m[0, k, i] + m[4, k, i] + m[8, k, i]
            p1 = m[1, k, i] + m[5, k, i] + m[9, k, i]
            p2 = m[2, k, i] + m[6, k, i] + m[10, k, i]
            p3 = m[3, k, i] + m[7, k, i] + m[11, k, i]
            q0 = m[4, k, i] - m[8, k, i] - m[12, k, i]
            q1 = m[5, k, i] - m[9, k, i] - m[13, k, i]
            q2 = m[6, k, i] - m[10, k, i] - m[14, k, i]
            q3 = m[7, k, i] - m[11, k, i] - m[15, k, i]
            o0[2 * tx] = p0 + p1 + p2
            o0[2 * tx + 1] = p1 - p2 - p3
            o1[2 * tx] = q0 + q1 + q2
            o1[2 * tx + 1] = q1 - q2 - q3


@parallel_kernel
def forward(x, u, y, units, ph, pw, v_buf, m_buf, pad_buf, out_buf, own, flush):
    """y (N, K, OH, OW) for x (N, C, H, W) and the transformed filters u (16, K, C): one task
    per chunk of samples (units[i] = (n0, nb)), each with its own rows of the buffers. ``own``:
    the products run cnnfast's microkernel (else BLAS); ``flush``: flush-to-zero."""
    N, C, H, W = x.shape
    K = u.shape[1]
    OH, OW = y.shape[2], y.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    Hp, Wp = 2 * TH + 2, 2 * TW + 2
    per_sample = TH * TW
    for job in prange(units.shape[0]):
        state = enter_flush(flush)
        t_id = numba.get_thread_id()
        n0, nb = units[job, 0], units[job, 1]
        T = nb * per_sample
        v = v_buf[t_id, :16 * C * T].reshape(16, C, T)
        m = m_buf[t_id, :16 * K * T].reshape(16, K, T)
        xp = pad_buf[t_id, :Hp * Wp].reshape(Hp, Wp)
        yp = out_buf[t_id, :4 * per_sample].reshape(2 * TH, 2 * TW)
        xp[:, :] = 0
        for b in range(nb):
            for c in range(C):
                _place(x[n0 + b, c], xp, ph, pw)
                _input_tiles(xp, TH, TW, v, c, b * per_sample)
        for xi in range(16):
            matmul(u[xi], v[xi], m[xi], own)
        for b in range(nb):
            for k in range(K):
                _output_tiles(m, k, b * per_sample, TH, TW, yp)
                dst = y[n0 + b, k]
                for i in range(OH):
                    d = dst[i]
                    s = yp[i]
                    for j in range(OW):
                        d[j] = s[j]
        leave_flush(state)


# --- backward weight: F(3x3, 2x2) ----------------------------------------------------------------
#
# The weight gradient gw[k, c] (3x3) = sum over tiles of the correlation of a 4x4 input block
# with the 2x2 block of gy it produced: Winograd F(3x3, 2x2) on the same 4x4 tiles, with
# A'^T = [[1,1,1,0],[0,1,-1,0],[0,1,1,1]], G' = [[1,0],[1/2,1/2],[1/2,-1/2],[0,1]] and
# B'^T = S B^T, S = diag(1, 1, 1, -1). S is moved onto the gy side (S G'), so the input tiles
# are the forward's:
#
#     V[xi] (C, T) = (B^T d B)[xi],  Q[xi] (K, T) = (S G' g G'^T S)[xi],
#     P[xi] (K, C) = sum over tiles Q[xi] @ V[xi]^T,  gw[k, c] = A'^T P[:, k, c] A'.


@njit(nogil=True, cache=True)
def _gy_tiles(gp, TH, TW, q, k, t0):
    """q[:, k, t0 + ty * TW + tx] = (S G') g (S G')^T for the 2x2 blocks g of the plane gp."""
    half = np.full(1, 0.5, dtype=gp.dtype)[0]
    for ty in range(TH):
        r0 = gp[2 * ty]
        r1 = gp[2 * ty + 1]
        t = t0 + ty * TW
        for tx in range(TW):
            g00, g01 = r0[2 * tx], r0[2 * tx + 1]
            g10, g11 = r1[2 * tx], r1[2 * tx + 1]
            # (S G') g: rows g0, (g0 + g1) / 2, (g0 - g1) / 2, -g1 of each column
            a00, a01 = g00, g01
            a10, a11 = (g00 + g10) * half, (g01 + g11) * half
            a20, a21 = (g00 - g10) * half, (g01 - g11) * half
            a30, a31 = -g10, -g11
            # ... (S G')^T: the same combination along each row
            q[0, k, t + tx] = a00
            q[1, k, t + tx] = (a00 + a01) * half
            q[2, k, t + tx] = (a00 - a01) * half
            q[3, k, t + tx] = -a01
            q[4, k, t + tx] = a10
            q[5, k, t + tx] = (a10 + a11) * half
            q[6, k, t + tx] = (a10 - a11) * half
            q[7, k, t + tx] = -a11
            q[8, k, t + tx] = a20
            q[9, k, t + tx] = (a20 + a21) * half
            q[10, k, t + tx] = (a20 - a21) * half
            q[11, k, t + tx] = -a21
            q[12, k, t + tx] = a30
            q[13, k, t + tx] = (a30 + a31) * half
            q[14, k, t + tx] = (a30 - a31) * half
            q[15, k, t + tx] = -a31


@parallel_kernel
def backward_weight(x, gy, units, spread, ph, pw, v_buf, q_buf, pad_buf, gpad_buf, prod_buf,
                    partials, own, flush):
    """partials[p] (16, K, C) = sum over the chunks of run p (spread[p]..spread[p + 1]) of
    Q[xi] @ V[xi]^T; one task per run, so the sum's order is fixed."""
    N, C, H, W = x.shape
    K = gy.shape[1]
    OH, OW = gy.shape[2], gy.shape[3]
    TH, TW = (OH + 1) // 2, (OW + 1) // 2
    Hp, Wp = 2 * TH + 2, 2 * TW + 2
    per_sample = TH * TW
    for p in prange(spread.size - 1):
        state = enter_flush(flush)
        xp = pad_buf[p, :Hp * Wp].reshape(Hp, Wp)
        gp = gpad_buf[p, :4 * per_sample].reshape(2 * TH, 2 * TW)
        prod = prod_buf[p, :K * C].reshape(K, C)
        xp[:, :] = 0
        gp[:, :] = 0
        for job in range(spread[p], spread[p + 1]):
            n0, nb = units[job, 0], units[job, 1]
            T = nb * per_sample
            v = v_buf[p, :16 * C * T].reshape(16, C, T)
            q = q_buf[p, :16 * K * T].reshape(16, K, T)
            for b in range(nb):
                for c in range(C):
                    _place(x[n0 + b, c], xp, ph, pw)
                    _input_tiles(xp, TH, TW, v, c, b * per_sample)
                for k in range(K):
                    _place(gy[n0 + b, k], gp, 0, 0)
                    _gy_tiles(gp, TH, TW, q, k, b * per_sample)
            for xi in range(16):
                matmul(q[xi], v[xi].T, prod, own)
                dst = partials[p, xi]
                for k in range(K):
                    d = dst[k]
                    s = prod[k]
                    for c in range(C):
                        d[c] += s[c]
        leave_flush(state)


@parallel_kernel
def filters_from(p16, gw):
    """gw (K, C, 3, 3) = A'^T P A' for P = p16[:, k, c] (16, K, C), one task per filter."""
    K, C = gw.shape[0], gw.shape[1]
    for k in prange(K):
        for c in range(C):
            m = p16[:, k, c]
            # A'^T P: rows m0 + m1 + m2, m1 - m2, m1 + m2 + m3 of the 4x4 block, per column
            r00 = m[0] + m[4] + m[8]
            r01 = m[1] + m[5] + m[9]
            r02 = m[2] + m[6] + m[10]
            r03 = m[3] + m[7] + m[11]
            r10 = m[4] - m[8]
            r11 = m[5] - m[9]
            r12 = m[6] - m[10]
            r13 = m[7] - m[11]
            r20 = m[4] + m[8] + m[12]
            r21 = m[5] + m[9] + m[13]
            r22 = m[6] + m[10] + m[14]
            r23 = m[7] + m[11] + m[15]
            g = gw[k, c]
            g[0, 0] = r00 + r01 + r02
            g[0, 1] = r01 - r02
            g[0, 2] = r01 + r02 + r03
            g[1, 0] = r10 + r11 + r12
            g[1, 1] = r11 - r12
            g[1, 2] = r11 + r12 + r13
            g[2, 0] = r20 + r21 + r22
            g[2, 1] = r21 - r22
            g[2, 2] = r21 + r22 + r23
