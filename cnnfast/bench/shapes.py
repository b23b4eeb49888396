"""Convolution shapes the bench runs: the unique convolutions of ResNet-18 per shape set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnfast.shapes import output_size

SETS = ("r18-28", "r18-64", "r18-3d", "tiny")
# Shape sets: (spatial size, spatial rank, batch).
SET_GEOMETRY = {"r18-28": (28, 2, 32), "r18-64": (64, 2, 32), "r18-3d": (28, 3, 8)}
IN_CHANNELS = 1                           # grayscale medical images (CT, X-ray, MedMNIST 3D)
NUM_CLASSES = 2


@dataclass(frozen=True)
class ConvShape:
    """One convolution: x (N, C, *size) and weight (K, C/groups, *kernel)."""

    shape_id: str
    N: int
    C: int
    K: int
    size: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @property
    def nd(self) -> int:
        return len(self.size)

    @property
    def dil(self) -> tuple[int, ...]:
        return self.dilation or (1,) * self.nd

    @property
    def out(self) -> tuple[int, ...]:
        return output_size(self.size, self.kernel, self.stride, self.padding, self.dil)

    def flops(self, n: int | None = None) -> float:
        """2 * N * K * prod(O) * (C/groups) * prod(KS): one pass (forward or either backward)."""
        n = self.N if n is None else n
        return 2.0 * n * self.K * math.prod(self.out) * (self.C // self.groups) * math.prod(
            self.kernel)

    def label(self) -> str:
        dims = "x".join(map(str, self.size))
        ks = "x".join(map(str, self.kernel))
        return (f"{self.N}x{self.C}x{dims} -> {self.K} k{ks} s{self.stride[0]} "
                f"p{self.padding[0]}")


def resnet18_conv_shapes(size: int, nd: int, batch: int, in_channels: int = IN_CHANNELS,
                         prefix: str = "") -> list[ConvShape]:
    """The unique convolutions of ResNet-18 with a 3x3 stride-1 stem (no max pool).

    Stages of 64, 128, 256, 512 channels; each later stage opens with a 3x3 stride-2 conv
    (``layerX.down``) and a 1x1 stride-2 downsample (``layerX.ds``); the other 3x3 convs of a
    stage (``layerX``) share one shape.
    """
    shapes: list[ConvShape] = []
    seen = set()

    def add(name, c, k, s, ks, stride, pad):
        key = (c, k, s, ks, stride, pad)
        if key not in seen:
            seen.add(key)
            shapes.append(ConvShape(f"{prefix}{name}", batch, c, k, (s,) * nd, (ks,) * nd,
                                    (stride,) * nd, (pad,) * nd))

    s = size
    add("stem", in_channels, 64, s, 3, 1, 1)
    c = 64
    for stage, k in enumerate((64, 128, 256, 512), start=1):
        stride = 1 if stage == 1 else 2
        if stride != 1 or c != k:
            add(f"layer{stage}.down", c, k, s, 3, stride, 1)
            add(f"layer{stage}.ds", c, k, s, 1, stride, 0)
            s = (s - 1) // stride + 1
        add(f"layer{stage}", k, k, s, 3, 1, 1)
        c = k
    return shapes


def _tiny_conv_shapes() -> list[ConvShape]:
    return [
        ConvShape("tiny.conv2d", 2, 3, 4, (7, 6), (3, 3), (1, 1), (1, 1)),
        ConvShape("tiny.conv2d.s2", 2, 4, 6, (6, 6), (3, 3), (2, 2), (1, 1)),
        ConvShape("tiny.conv3d", 1, 2, 3, (5, 5, 4), (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    ]


def conv_shapes(set_name: str) -> list[ConvShape]:
    if set_name == "tiny":
        return _tiny_conv_shapes()
    size, nd, batch = SET_GEOMETRY[set_name]
    return resnet18_conv_shapes(size, nd, batch, prefix=f"{set_name}.")


def act_shape(set_name: str) -> tuple[int, ...]:
    """The first-stage activation (N, 64, *S) of a shape set (pool, ReLU, batch norm)."""
    if set_name == "tiny":
        return (2, 3, 6, 7)
    size, nd, batch = SET_GEOMETRY[set_name]
    return (batch, 64) + (size,) * nd

def all_shape_ids() -> dict[str, str]:
    """Every shape id -> its set."""
    ids = {}
    for set_name in SETS:
        for shape in conv_shapes(set_name):
            ids[shape.shape_id] = set_name
        ids[f"{set_name}.act"] = set_name
    return ids
