"""The library's global random generator (weight init, dropout), seeded by ``manual_seed``."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the global generator; the same seed gives the same initial weights and masks."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def default_generator() -> np.random.Generator:
    return _generator


def resolve(rng: np.random.Generator | int | None) -> np.random.Generator:
    """``rng`` itself, a new generator for an int seed, or the global one for ``None``."""
    if rng is None:
        return _generator
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)
