"""One-launch optimizer updates (SGD, Adam, AdamW) over flat parameter buffers.

:class:`cnnfast.optim.Optimizer` keeps the parameters of a group on the cuda device in one flat
buffer (each parameter's data a view of it) and concatenates their gradients into another, so
one grid-stride kernel updates every parameter: one launch a step instead of a handful of CuPy
elementwise launches per parameter. The update rules are PyTorch's, written out as the
per-parameter host code in ``cnnfast.optim`` writes them; the arithmetic is in the parameters'
dtype (the compiler may fuse a multiply and an add, so the last bit can differ from the host).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from cnnfast.cuda import _runtime as rt

RULES = ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw")
SGD, SGD_MOMENTUM, SGD_NESTEROV, ADAM, ADAMW = range(len(RULES))  # the kernel's rule numbers
_MAX_BLOCKS = 4096


@functools.lru_cache(maxsize=None)
def _update_kernel(rule: int, dtype: np.dtype):
    RULE = rule
    nbt = rt.nb_type(dtype)

    @cuda.jit
    def optimizer_update_kernel(p, g, m, v, size, lr, a, b, weight_decay, eps, c2, first):
        # Each thread updates elements i = its global id + multiples of the grid size of the
        # flat parameters p with gradients g and state m (momentum buffer / first moment) and
        # v (second moment). SGD*: a = momentum, b = dampening, first: the buffer starts as g.
        # ADAM*: a = beta1, b = beta2, lr = lr / (1 - beta1^t), c2 = sqrt(1 - beta2^t); ADAMW
        # decays p by 1 - weight_decay first (the caller passes lr * weight_decay).
        # Scalars are rounded to the dtype first, as the host code's NumPy arithmetic does.
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        lr_ = nbt(lr)
        a_ = nbt(a)
        one_minus_a = nbt(1.0 - a)
        b_ = nbt(b)
        one_minus_b = nbt(1.0 - b)
        wd = nbt(weight_decay)
        decay = nbt(1.0 - weight_decay)
        eps_ = nbt(eps)
        c2_ = nbt(c2)
        while i < size:
            gi = g[i]
            pi = p[i]
            if RULE == ADAMW:
                if weight_decay != 0.0:
                    pi = pi * decay
            elif weight_decay != 0.0:
                gi = gi + wd * pi
            if RULE == SGD:
                pi = pi - lr_ * gi
            elif RULE == SGD_MOMENTUM or RULE == SGD_NESTEROV:
                buf = gi
                if not first:
                    buf = m[i] * a_ + one_minus_b * gi
                m[i] = buf
                step = gi + a_ * buf if RULE == SGD_NESTEROV else buf
                pi = pi - lr_ * step
            else:
                mi = m[i] * a_ + one_minus_a * gi
                vi = v[i] * b_ + one_minus_b * (gi * gi)
                m[i] = mi
                v[i] = vi
                pi = pi - lr_ * (mi / (nbt(math.sqrt(vi)) / c2_ + eps_))
            p[i] = pi
            i += cuda.gridDim.x * cuda.blockDim.x

    return optimizer_update_kernel


def optimizer_update(rule: str, p, g, m, v, lr: float, a: float, b: float, weight_decay: float,
                     eps: float, c2: float, first: bool) -> None:
    """Update the flat parameters ``p`` in place from gradients ``g`` (same shape and dtype);
    ``m`` and ``v`` are flat state buffers, or None where the rule keeps none (the arguments:
    :mod:`cnnfast.reference.optim`)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    size = p.size
    if size == 0:
        return
    # An unused state slot gets a placeholder of its own, not an alias of p: the simulator
    # copies every array argument back after a launch, and an alias would undo the update.
    placeholder = rt.cached_table(("no state", np.dtype(p.dtype).str),
                                  lambda: np.zeros(1, p.dtype), like=p)
    m = placeholder if m is None else m
    v = placeholder if v is None else v
    threads = rt.current_config().threads
    blocks = max(1, min(rt.cdiv(size, threads), _MAX_BLOCKS))
    kernel = _update_kernel(RULES.index(rule), np.dtype(p.dtype))
    rt.launch(kernel, blocks, threads, p, g, m, v, size, float(lr), float(a), float(b),
              float(weight_decay), float(eps), float(c2), bool(first))
