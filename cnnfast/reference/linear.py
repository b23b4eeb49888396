"""Linear (fully connected) layer, shared by every path: runs on NumPy and CuPy arrays alike."""

from __future__ import annotations


def linear_forward(x, w, b=None):
    """y = x @ w.T + b: x (N, IN), w (OUT, IN), b (OUT,) or None -> y (N, OUT)."""
    y = x @ w.T
    if b is not None:
        y = y + b
    return y


def linear_backward(gy, x, w, need_x: bool = True, need_w: bool = True, need_b: bool = True):
    """Gradients of linear_forward: gy (N, OUT), x (N, IN), w (OUT, IN) -> (gx, gw, gb).

    gx (N, IN) = gy @ w, gw (OUT, IN) = gy.T @ x, gb (OUT,) = gy summed over N; each is None
    when not needed.
    """
    gx = gy @ w if need_x else None
    gw = gy.T @ x if need_w else None
    gb = gy.sum(axis=0) if need_b else None
    return gx, gw, gb
