"""Workloads: what the bench runs. The convolution shapes of ResNet-18 per shape set, op items
(one pass of one op on one shape, with its inputs) and model specs (one training step of a cnnfast
model, with its data and FLOP count)."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnfast import dispatch
from cnnfast.shapes import output_size

# --- convolution shapes ---------------------------------------------------------------------------

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


# --- op items and model specs ---------------------------------------------------------------------

OPS = ("conv", "pool", "relu", "bn", "step")
MODELS = ("smallcnn", "resnet18", "resnet18_3d")


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


def _randn(rng, shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@dataclass
class OpItem:
    """One op pass on one shape; ``make_inputs(n)`` gives its NumPy inputs at batch ``n``."""

    op: str            # conv, pool, relu, bn
    phase: str         # fwd, bwd_data, bwd_weight, max_fwd, ...
    shape_id: str
    set_name: str
    batch: int
    label: str
    params: dict
    family: str        # kernel family in the dispatch contract
    flops_per_sample: float | None = None

    @property
    def id(self) -> str:
        return f"{self.op}.{self.phase}/{self.shape_id}"

    def flops(self, n: int | None = None) -> float | None:
        if self.flops_per_sample is None:
            return None
        return self.flops_per_sample * (self.batch if n is None else n)

    def make_inputs(self, n: int) -> dict:
        rng = np.random.default_rng(_seed(self.id))
        p = self.params
        if self.op == "conv":
            shape: ConvShape = p["shape"]
            fan_in = shape.C // shape.groups * math.prod(shape.kernel)
            return {
                "x": _randn(rng, (n, shape.C) + shape.size),
                "w": _randn(rng, (shape.K, shape.C // shape.groups) + shape.kernel,
                            1 / math.sqrt(fan_in)),
                "gy": _randn(rng, (n, shape.K) + shape.out),
            }
        x_shape = (n,) + tuple(p["x_shape"][1:])
        x = _randn(rng, x_shape)
        ref = dispatch.kernels_of("reference")
        if self.op == "pool":
            if p["kind"] == "max":
                y, idx = ref.max_pool_forward(x, p["kernel"], p["stride"], p["padding"])
                return {"x": x, "idx": idx, "gy": _randn(rng, y.shape)}
            y = ref.avg_pool_forward(x, p["kernel"], p["stride"], p["padding"])
            return {"x": x, "gy": _randn(rng, y.shape)}
        if self.op == "relu":
            return {"x": x, "y": ref.relu_forward(x), "gy": _randn(rng, x_shape)}
        # bn
        c = x_shape[1]
        gamma = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        beta = (0.1 * rng.standard_normal(c)).astype(np.float32)
        x = x * 2 + 0.5
        _, mean, invstd = ref.batch_norm_forward_train(x, gamma, beta, p["eps"])
        return {"x": x, "gamma": gamma, "beta": beta, "gy": _randn(rng, x_shape),
                "mean": mean, "invstd": invstd}


def op_items(ops: Sequence[str], shape_ids: Sequence[str]) -> list[OpItem]:
    """Every op item of ``ops`` on the selected shape ids (conv shapes and ``<set>.act``)."""
    wanted = set(shape_ids)
    items: list[OpItem] = []
    for set_name in SETS:
        if "conv" in ops:
            for shape in conv_shapes(set_name):
                if shape.shape_id not in wanted:
                    continue
                for phase in ("fwd", "bwd_data", "bwd_weight"):
                    items.append(OpItem("conv", phase, shape.shape_id, set_name, shape.N,
                                        shape.label(), {"shape": shape}, "conv",
                                        shape.flops(1)))
        act_id = f"{set_name}.act"
        if act_id not in wanted:
            continue
        xs = act_shape(set_name)
        nd = len(xs) - 2
        dims = "x".join(map(str, xs))
        if "pool" in ops:
            for kind, k, s, pad in (("max", 3, 2, 1), ("avg", 2, 2, 0)):
                params = {"kind": kind, "x_shape": xs, "kernel": (k,) * nd, "stride": (s,) * nd,
                          "padding": (pad,) * nd}
                for phase in ("fwd", "bwd"):
                    items.append(OpItem("pool", f"{kind}_{phase}", act_id, set_name, xs[0],
                                        f"{dims} {kind} {k}/{s} p{pad}", params, "pool"))
        if "relu" in ops:
            for phase in ("fwd", "bwd"):
                items.append(OpItem("relu", phase, act_id, set_name, xs[0], dims,
                                    {"x_shape": xs}, "activation"))
        if "bn" in ops:
            for phase in ("fwd", "bwd"):
                items.append(OpItem("bn", phase, act_id, set_name, xs[0], dims,
                                    {"x_shape": xs, "eps": 1e-5}, "norm"))
    return items


@dataclass
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]     # (C, *S)
    batch: int
    check_batch: int
    stem: str = "small"              # ResNet-18's stem: "small" (28 pixels) or "imagenet"

    @property
    def nd(self) -> int:
        return len(self.input_shape) - 1


MODEL_SPECS = {
    "smallcnn": ModelSpec("smallcnn", (IN_CHANNELS, 28, 28), 64, 64),
    "resnet18": ModelSpec("resnet18", (IN_CHANNELS, 28, 28), 32, 4),
    "resnet18_3d": ModelSpec("resnet18_3d", (IN_CHANNELS, 28, 28, 28), 8, 2),
}


def build_model(name: str, stem: str = "small"):
    """The cnnfast model ``name`` (:mod:`cnnfast.models`), weights from ``cnnfast.manual_seed``;
    ``stem`` is ResNet-18's ("small": 3x3 stride 1; "imagenet": 7x7 stride 2 and a max pool)."""
    from cnnfast import models

    if name == "smallcnn":
        return models.SmallCNN(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    return models.resnet18(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                           spatial_dims=3 if name == "resnet18_3d" else 2, stem=stem)


def model_data(spec: ModelSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_seed(f"data/{spec.name}"))
    x = rng.standard_normal((n,) + spec.input_shape).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return x, y


@contextlib.contextmanager
def record_layers(model, records: list):
    """Record (kind, x shape, weight shape, y shape, x needs grad) of every conv and linear."""
    from cnnfast import nn

    wrapped = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            def forward(x, _m=m):
                y = type(_m).forward(_m, x)
                records.append((type(_m).__name__, tuple(x.shape), tuple(_m.weight.shape),
                                tuple(y.shape), bool(getattr(x, "requires_grad", False))))
                return y
            object.__setattr__(m, "forward", forward)
            wrapped.append(m)
    try:
        yield
    finally:
        for m in wrapped:
            object.__delattr__(m, "forward")


def step_flops_per_sample(records: list) -> float:
    """Forward + backward FLOPs per sample of the recorded conv and linear layers."""
    total = 0.0
    for kind, _, w_shape, y_shape, needs_grad in records:
        if kind == "Linear":
            fwd = 2.0 * w_shape[0] * w_shape[1]
        else:  # 2 * K * prod(O) * (C/groups) * prod(KS); w is (K, C/groups, *KS)
            fwd = 2.0 * y_shape[1] * math.prod(y_shape[2:]) * math.prod(w_shape[1:])
        total += fwd * (3 if needs_grad else 2)
    return total

