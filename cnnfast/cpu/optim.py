"""Fast CPU optimizer update (``optimizer_update`` of the kernel contract): one Numba parallel
loop over blocks of the flat parameters, the twin of :mod:`cnnfast.cuda.optim` (same rules and
arithmetic, element by element; see :mod:`cnnfast.reference.optim` for the arguments)."""

from __future__ import annotations

import numpy as np
from numba import prange

from cnnfast.cpu._parallel import parallel_kernel

RULES = ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw")
BLOCK = 1 << 14   # elements per parallel task


def optimizer_update(rule: str, p, g, m, v, lr: float, a: float, b: float, weight_decay: float,
                     eps: float, c2: float, first: bool) -> None:
    """Update ``p`` (and the state buffers ``m``, ``v``) in place; see the reference."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if p.size == 0:
        return
    dt = p.dtype.type  # scalars rounded to the dtype first, as the host code's arithmetic does
    none = np.empty(0, p.dtype)
    _update(RULES.index(rule), p, g, none if m is None else m, none if v is None else v,
            dt(lr), dt(a), dt(1.0 - a), dt(b), dt(1.0 - b), dt(weight_decay),
            dt(1.0 - weight_decay), dt(eps), dt(c2), weight_decay != 0.0, bool(first))


@parallel_kernel
def _update(rule, p, g, m, v, lr, a, one_minus_a, b, one_minus_b, wd, decay, eps, c2, decays,
            first):
    # Each task updates one block of elements; rule: the index in RULES (0 sgd, 1 momentum,
    # 2 nesterov, 3 adam, 4 adamw).
    for block in prange((p.size + BLOCK - 1) // BLOCK):
        for i in range(block * BLOCK, min(p.size, (block + 1) * BLOCK)):
            gi = g[i]
            pi = p[i]
            if rule == 4:
                if decays:
                    pi = pi * decay
            elif decays:
                gi = gi + wd * pi
            if rule == 0:
                pi = pi - lr * gi
            elif rule == 1 or rule == 2:
                buf = gi if first else m[i] * a + one_minus_b * gi
                m[i] = buf
                pi = pi - lr * (gi + a * buf if rule == 2 else buf)
            else:
                mi = m[i] * a + one_minus_a * gi
                vi = v[i] * b + one_minus_b * (gi * gi)
                m[i] = mi
                v[i] = vi
                pi = pi - lr * (mi / (np.sqrt(vi) / c2 + eps))
            p[i] = pi
