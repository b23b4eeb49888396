"""Reference convolution (2D and 3D): forward, backward data, backward weight, bias.

Written for clarity, independent of any fast algorithm. A convolution is a sum over kernel
offsets: for each offset (kd, kh, kw) the input elements it touches form a strided slice of the
zero-padded input with shape (N, C, OD, OH, OW), and that slice is contracted with the weight
column ``w[:, :, kd, kh, kw]`` (per group) by ``einsum``. The backward passes reuse the same
slices: backward-data scatters into a padded gradient through them, backward-weight contracts
them with ``gy``. The spatial rank ``nd = x.ndim - 2`` (2 or 3) is the only difference between
2D and 3D.

Works on NumPy and CuPy arrays alike (the array module comes from the input).
"""

from __future__ import annotations

import itertools

from cnnfast.backend import array_xp
from cnnfast.shapes import output_size  # O = (S + 2P - dilation * (KS - 1) - 1) // stride + 1

Ints = tuple[int, ...]


def _padded_size(x_shape: Ints, padding: Ints) -> Ints:
    """Spatial size of x (N, C, *S) once padded: S + 2P."""
    return tuple(s + 2 * p for s, p in zip(x_shape[2:], padding))


def _padded(x, padding: Ints):
    """A zero-padded copy of x (N, C, *S) -> (N, C, *(S + 2P))."""
    xp = array_xp(x)
    out = xp.zeros(x.shape[:2] + _padded_size(x.shape, padding), dtype=x.dtype)
    out[_interior(x.shape[2:], padding)] = x
    return out


def _interior(size: Ints, padding: Ints) -> tuple:
    """Index of the unpadded region inside a padded (N, C, *(S + 2P)) array."""
    return (slice(None), slice(None)) + tuple(slice(p, p + s) for s, p in zip(size, padding))


def _window(offset: Ints, out: Ints, stride: Ints, dilation: Ints) -> tuple:
    """Spatial index of the padded-input elements that kernel offset ``offset`` meets.

    Output position o meets padded position o * stride + offset * dilation, so along each axis
    this is the slice starting at offset * dilation with step stride and O elements.
    """
    return tuple(
        slice(k * d, k * d + st * (o - 1) + 1, st)
        for k, o, st, d in zip(offset, out, stride, dilation)
    )


def _spatial_subscripts(out: Ints) -> str:
    """einsum letters for the output's spatial axes ("xy" or "xyz"); einsum can't sum "..."."""
    return "xyz"[:len(out)]


def _kernel_offsets(kernel: Ints):
    return itertools.product(*(range(k) for k in kernel))


def conv_forward(x, w, stride: Ints, padding: Ints, dilation: Ints, groups: int):
    """Cross-correlation like PyTorch's conv2d/conv3d (no bias).

    x (N, C, *S), w (K, C // groups, *KS) -> y (N, K, *O),
    O = (S + 2P - dilation * (KS - 1) - 1) // stride + 1.
    """
    xp = array_xp(x)
    n = x.shape[0]
    k, cg = w.shape[:2]
    kernel = tuple(w.shape[2:])
    out = output_size(x.shape[2:], kernel, stride, padding, dilation)
    kg = k // groups
    # Split channels into groups: (N, G, C/G, ...) and (G, K/G, C/G, ...).
    x_groups = _padded(x, padding).reshape((n, groups, cg) + _padded_size(x.shape, padding))
    w_groups = w.reshape((groups, kg, cg) + kernel)
    y = xp.zeros((n, groups, kg) + out, dtype=x.dtype)
    sp = _spatial_subscripts(out)
    lead = (slice(None),) * 3
    for offset in _kernel_offsets(kernel):
        patch = x_groups[lead + _window(offset, out, stride, dilation)]  # (N, G, C/G, *O)
        y += xp.einsum(f"ngc{sp},gkc->ngk{sp}", patch, w_groups[lead + offset])
    return y.reshape((n, k) + out)


def conv_backward_data(gy, w, x_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                       groups: int):
    """Gradient of conv_forward with respect to x.

    gy (N, K, *O), w (K, C // groups, *KS) -> gx (N, C, *S) with x_shape = (N, C, *S).
    Input positions that no window reaches (trailing rows cut by the stride) get zero.
    """
    xp = array_xp(gy)
    x_shape = tuple(x_shape)
    n, c = x_shape[:2]
    k, cg = w.shape[:2]
    kernel = tuple(w.shape[2:])
    out = tuple(gy.shape[2:])
    kg = k // groups
    padded_size = _padded_size(x_shape, padding)
    gx_groups = xp.zeros((n, groups, cg) + padded_size, dtype=gy.dtype)
    gy_groups = gy.reshape((n, groups, kg) + out)
    w_groups = w.reshape((groups, kg, cg) + kernel)
    sp = _spatial_subscripts(out)
    lead = (slice(None),) * 3
    for offset in _kernel_offsets(kernel):
        # A strided slice has no repeated elements, so += on the view is a correct scatter.
        gx_groups[lead + _window(offset, out, stride, dilation)] += xp.einsum(
            f"ngk{sp},gkc->ngc{sp}", gy_groups, w_groups[lead + offset]
        )
    gx_padded = gx_groups.reshape((n, c) + padded_size)
    return xp.ascontiguousarray(gx_padded[_interior(x_shape[2:], padding)])


def conv_backward_weight(gy, x, w_shape: Ints, stride: Ints, padding: Ints, dilation: Ints,
                         groups: int):
    """Gradient of conv_forward with respect to w.

    gy (N, K, *O), x (N, C, *S) -> gw (K, C // groups, *KS) with w_shape = (K, C // groups, *KS).
    """
    xp = array_xp(gy)
    w_shape = tuple(w_shape)
    n = x.shape[0]
    k, cg = w_shape[:2]
    kernel = w_shape[2:]
    out = tuple(gy.shape[2:])
    kg = k // groups
    x_groups = _padded(x, padding).reshape((n, groups, cg) + _padded_size(x.shape, padding))
    gy_groups = gy.reshape((n, groups, kg) + out)
    gw_groups = xp.zeros((groups, kg, cg) + kernel, dtype=gy.dtype)
    sp = _spatial_subscripts(out)
    lead = (slice(None),) * 3
    for offset in _kernel_offsets(kernel):
        patch = x_groups[lead + _window(offset, out, stride, dilation)]  # (N, G, C/G, *O)
        gw_groups[lead + offset] = xp.einsum(f"ngc{sp},ngk{sp}->gkc", patch, gy_groups)
    return gw_groups.reshape(w_shape)


def bias_add(y, b):
    """y (N, K, *O) + b (K,) broadcast over the channel axis -> (N, K, *O) (a new array)."""
    return y + b.reshape((1, -1) + (1,) * (y.ndim - 2))


def bias_grad(gy):
    """gy (N, K, *O) -> gb (K,): gy summed over every axis but the channel axis 1."""
    return gy.sum(axis=(0,) + tuple(range(2, gy.ndim)))
