"""Weight initialisation (in place, from the global generator or a given one)."""

from __future__ import annotations

import math

import numpy as np

from cnnfast import dispatch, rng
from cnnfast.rng import manual_seed
from cnnfast.tensor import Tensor

__all__ = [
    "fan_in_and_out",
    "kaiming_normal_",
    "kaiming_uniform_",
    "manual_seed",
    "ones_",
    "uniform_",
    "zeros_",
]


def fan_in_and_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight (OUT, IN, *kernel), as PyTorch computes them."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out needs a weight of rank >= 2, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _fill(t: Tensor, values: np.ndarray) -> Tensor:
    t.data[...] = dispatch.to_device(values.astype(t.dtype), t.device)
    return t


def uniform_(t: Tensor, low: float, high: float, generator=None) -> Tensor:
    return _fill(t, rng.resolve(generator).uniform(low, high, size=t.shape))


def kaiming_uniform_(t: Tensor, a: float = 0.0, mode: str = "fan_in", generator=None) -> Tensor:
    """U(-b, b) with b = gain * sqrt(3 / fan), gain = sqrt(2 / (1 + a^2)) (leaky-ReLU slope a)."""
    fan_in, fan_out = fan_in_and_out(t.shape)
    fan = fan_in if mode == "fan_in" else fan_out
    bound = math.sqrt(2.0 / (1 + a * a)) * math.sqrt(3.0 / fan)
    return uniform_(t, -bound, bound, generator)


def kaiming_normal_(t: Tensor, mode: str = "fan_out", generator=None) -> Tensor:
    """N(0, std^2) with std = sqrt(2 / fan): He init for ReLU networks (torchvision's ResNet)."""
    fan_in, fan_out = fan_in_and_out(t.shape)
    std = math.sqrt(2.0 / (fan_in if mode == "fan_in" else fan_out))
    return _fill(t, rng.resolve(generator).normal(0.0, std, size=t.shape))


def zeros_(t: Tensor) -> Tensor:
    t.data[...] = 0
    return t


def ones_(t: Tensor) -> Tensor:
    t.data[...] = 1
    return t
