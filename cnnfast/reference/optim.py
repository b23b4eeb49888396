"""The optimizer update of the kernel contract (``optimizer_update``), in NumPy: the oracle of
the one-launch update that :class:`cnnfast.optim.Optimizer` runs over a group's flat buffers.

PyTorch's rules (SGD with momentum, dampening and Nesterov; Adam; AdamW), the scalars rounded to
the parameters' dtype first and the arithmetic in that dtype, as the per-parameter host code in
:mod:`cnnfast.optim` does. Unlike the other kernels it writes its inputs: ``p`` and the state
buffers ``m``, ``v`` are updated in place. Written against ``xp``: NumPy or CuPy arrays.
"""

from __future__ import annotations

from cnnfast.backend import array_xp

RULES = ("sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw")


def optimizer_update(rule: str, p, g, m, v, lr: float, a: float, b: float, weight_decay: float,
                     eps: float, c2: float, first: bool) -> None:
    """Update the flat parameters ``p`` in place from the gradients ``g`` (1-D, p's shape and
    dtype). SGD rules: ``m`` the momentum buffer (``None`` for plain ``sgd``), ``a`` the
    momentum, ``b`` the dampening, ``first``: the buffer starts as ``g``. Adam rules: ``m`` and
    ``v`` the moments, ``a`` = beta1, ``b`` = beta2, ``lr`` already divided by 1 - beta1^t,
    ``c2`` = sqrt(1 - beta2^t); ``adamw`` decays ``p`` by 1 - ``weight_decay`` first (the caller
    passes lr * weight_decay), the others add ``weight_decay * p`` to the gradient."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    dt = p.dtype.type
    if rule == "adamw":
        if weight_decay != 0.0:
            p *= dt(1.0 - weight_decay)
    elif weight_decay != 0.0:
        g = g + dt(weight_decay) * p
    if rule == "sgd":
        p -= dt(lr) * g
    elif rule in ("sgd_momentum", "sgd_nesterov"):
        m[...] = g if first else m * dt(a) + dt(1.0 - b) * g
        p -= dt(lr) * (g + dt(a) * m if rule == "sgd_nesterov" else m)
    else:
        m[...] = m * dt(a) + dt(1.0 - a) * g
        v[...] = v * dt(b) + dt(1.0 - b) * (g * g)
        p -= dt(lr) * (m / (array_xp(p).sqrt(v) / dt(c2) + dt(eps)))
