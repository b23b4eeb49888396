"""Workloads: op items (one pass of one op on one shape, with its inputs) and model specs (one
training step of a cnnfast model, with its data and FLOP count)."""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cnnfast import dispatch
from cnnfast.bench.shapes import IN_CHANNELS, NUM_CLASSES, SETS, ConvShape, act_shape, conv_shapes

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


def _model_data(spec: ModelSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_seed(f"data/{spec.name}"))
    x = rng.standard_normal((n,) + spec.input_shape).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
    return x, y


@contextlib.contextmanager
def _record_layers(model, records: list):
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


def _step_flops_per_sample(records: list) -> float:
    """Forward + backward FLOPs per sample of the recorded conv and linear layers."""
    total = 0.0
    for kind, _, w_shape, y_shape, needs_grad in records:
        if kind == "Linear":
            fwd = 2.0 * w_shape[0] * w_shape[1]
        else:  # 2 * K * prod(O) * (C/groups) * prod(KS); w is (K, C/groups, *KS)
            fwd = 2.0 * y_shape[1] * math.prod(y_shape[2:]) * math.prod(w_shape[1:])
        total += fwd * (3 if needs_grad else 2)
    return total

