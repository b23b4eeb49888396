"""Deterministic float64 sums for the fast CPU kernels.

Without fastmath LLVM keeps a floating-point sum in source order, a chain of dependent adds
that runs at one element per add latency. These helpers keep eight partial sums side by side
(element i goes to lane i % 8) and combine them in a fixed tree at the end: three times faster,
and still the same bits on every run, whatever the thread count.
"""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True, inline="always")
def sum_f64(a):
    """Sum of a 1D array view in float64."""
    n = a.size
    m = n - n % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for i in range(0, m, 8):
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        s4 += a[i + 4]
        s5 += a[i + 5]
        s6 += a[i + 6]
        s7 += a[i + 7]
    total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    for i in range(m, n):
        total += a[i]
    return total


@njit(nogil=True, cache=True, inline="always")
def centered_sums_f64(a, shift):
    """(sum(a - shift), sum((a - shift)**2)) of a 1D array view, in float64."""
    n = a.size
    m = n - n % 4
    s0 = s1 = s2 = s3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    for i in range(0, m, 4):
        d0 = a[i] - shift
        d1 = a[i + 1] - shift
        d2 = a[i + 2] - shift
        d3 = a[i + 3] - shift
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
    total = (s0 + s1) + (s2 + s3)
    squares = (q0 + q1) + (q2 + q3)
    for i in range(m, n):
        d = a[i] - shift
        total += d
        squares += d * d
    return total, squares


@njit(nogil=True, cache=True, inline="always")
def dot_centered_f64(g, a, shift):
    """(sum(g), sum(g * (a - shift))) of two 1D array views of one length, in float64."""
    n = g.size
    m = n - n % 4
    s0 = s1 = s2 = s3 = 0.0
    p0 = p1 = p2 = p3 = 0.0
    for i in range(0, m, 4):
        g0 = float(g[i])
        g1 = float(g[i + 1])
        g2 = float(g[i + 2])
        g3 = float(g[i + 3])
        s0 += g0
        s1 += g1
        s2 += g2
        s3 += g3
        p0 += g0 * (a[i] - shift)
        p1 += g1 * (a[i + 1] - shift)
        p2 += g2 * (a[i + 2] - shift)
        p3 += g3 * (a[i + 3] - shift)
    total = (s0 + s1) + (s2 + s3)
    products = (p0 + p1) + (p2 + p3)
    for i in range(m, n):
        gi = float(g[i])
        total += gi
        products += gi * (a[i] - shift)
    return total, products
