"""Benchmark runner: every kernel path side by side with PyTorch, checked before it is timed.

    python -m cnnfast.bench --quick                 # a few representative shapes, < 2 minutes
    python -m cnnfast.bench --out results.json      # the full suite
    python -m cnnfast.bench --compare old.json new.json --threshold 0.10

What it measures
================
- ``conv``: forward, backward-data and backward-weight on the unique convolution shapes of
  ResNet-18 with a 3x3 stride-1 stem (no max pool): 2D at 28 and 64 pixels (batch 32) and 3D at
  28^3 (batch 8). Shape sets ``r18-28``, ``r18-64``, ``r18-3d``; ``tiny`` holds toy shapes for
  the CUDA simulator and for tests.
- ``pool`` (max 3x3/2 pad 1, average 2x2/2), ``relu`` and ``bn`` (training-mode batch norm),
  forward and backward, on the first-stage activation of each shape set (``<set>.act``).
- ``step``: one training step (forward, cross-entropy loss, backward, SGD momentum step) of
  SmallCNN (batch 64, 1x28x28), ResNet-18 (batch 32, 1x28x28) and 3D ResNet-18 (batch 8,
  1x28^3), with the peak memory of one step and the memory growth over ``--memory-steps``
  SmallCNN steps.

Candidates ("paths"): ``reference`` (NumPy oracle), ``cpu`` (Numba/BLAS), ``cuda`` (a GPU through
CuPy, or Numba's simulator with ``--cuda-sim`` on the ``tiny`` shapes only), and PyTorch as the
peer users would otherwise pick: ``torch`` (CPU, with ``torch.set_num_threads`` set to the
threads this machine gives) and ``cudnn`` (PyTorch on the GPU).

How it measures
===============
1. Correctness first: each candidate's result (every output of the op, or a step's loss and every
   parameter gradient) is compared with the reference path on the same inputs. A candidate whose
   result differs (a wrong shape, a NaN, or an error above the tolerance: ops max |got - ref| /
   max |ref| <= 1e-3; steps ||got - ref|| / ||ref|| <= 1e-2 per gradient, since float32 ReLU
   masks may flip on near-zero inputs) is reported as WRONG and not timed; one that raises is
   reported as ERROR. Where the reference would take long (big 3D shapes, the ResNet steps) the
   check runs on a smaller batch of the same shape; the table says so (``ok@2`` = checked at
   batch 2).
2. The check's call is the candidate's first call of the op: its wall time ("1st") includes any
   JIT compilation and is reported apart from the timings.
3. One more untimed warm-up call at the timed shape, then ``repeats`` timed calls per candidate,
   round-robin (the candidate order rotates every repeat), so drift from other load on the
   machine hits all candidates alike. GPU work is synchronised before the clock stops. Calls
   shorter than 20 ms are repeated in an inner loop and averaged. Without ``--repeats``, items
   slower than the per-item budget get fewer repeats (at least 3; 2 in quick mode).
4. Reported: median, IQR and min of the repeats, GFLOP/s (convolutions and steps), and the ratio
   to PyTorch on the same kind of device, ``t_torch / t_path`` (> 1: faster than PyTorch).

The reference path is slow: it is timed only on the ``r18-28`` and ``tiny`` shapes and the
SmallCNN step, with at most 3 repeats (2 in quick mode; ``--reference-all`` times it
everywhere); it is always run as the oracle.

Memory: the peak of one training step is the RSS high-water above the level before the step
(sampled every millisecond after returning free heap pages to the OS), plus, for the NumPy paths,
tracemalloc's peak of traced allocations; the growth is the RSS after ``--memory-steps`` SmallCNN
steps minus before them, in MB.

FLOPs: convolution (each of the three passes) ``2 * N * K * prod(O) * (C / groups) * prod(KS)``;
a training step counts its convolutions and linear layers: 3x the forward (2x for a layer whose
input needs no gradient).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

import cnnfast
from cnnfast import dispatch

SCHEMA = "cnnfast-bench/1"
PATHS = ("reference", "cpu", "cuda", "torch", "cudnn")
OPS = ("conv", "pool", "relu", "bn", "step")
MODELS = ("smallcnn", "resnet18", "resnet18_3d")
SETS = ("r18-28", "r18-64", "r18-3d", "tiny")
# Shape sets: (spatial size, spatial rank, batch).
SET_GEOMETRY = {"r18-28": (28, 2, 32), "r18-64": (64, 2, 32), "r18-3d": (28, 3, 8)}
REFERENCE_SETS = ("r18-28", "tiny")     # where the reference path is timed by default
REFERENCE_MODELS = ("smallcnn",)
REFERENCE_MAX_REPEATS = 3
IN_CHANNELS = 1                           # grayscale medical images (CT, X-ray, MedMNIST 3D)
NUM_CLASSES = 2
# Largest reference convolution (FLOPs) checked at the full batch; bigger ones use fewer samples.
CHECK_FLOPS_FULL = 12e9
CHECK_FLOPS_QUICK = 4e9
# Ops: max |got - ref| / max |ref|. Steps: ||got - ref|| / ||ref|| per gradient, looser: in
# float32 a pre-activation within ~1e-7 of zero can flip its ReLU mask between two correct
# implementations, which moves a few gradient elements by O(1) (seen: 2e-3 on 3D ResNet-18).
TOLERANCE = {"op": 1e-3, "step": 1e-2}
QUICK_SHAPES = ("r18-28.stem", "r18-28.layer1", "r18-28.layer3.down", "r18-28.layer4.ds",
                "r18-64.layer3.ds", "r18-3d.layer4.down", "r18-28.act")
QUICK_MODELS = ("smallcnn", "resnet18")
MIN_SAMPLE_S = 0.02                       # shorter calls are looped to this length per sample


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


# --- shapes and items -----------------------------------------------------------------------------

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
        return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                     zip(self.size, self.kernel, self.stride, self.padding, self.dil))

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


def all_shape_ids() -> dict[str, str]:
    """Every shape id -> its set."""
    ids = {}
    for set_name in SETS:
        for shape in conv_shapes(set_name):
            ids[shape.shape_id] = set_name
        ids[f"{set_name}.act"] = set_name
    return ids


# --- models ---------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]     # (C, *S)
    batch: int
    check_batch: int

    @property
    def nd(self) -> int:
        return len(self.input_shape) - 1


MODEL_SPECS = {
    "smallcnn": ModelSpec("smallcnn", (IN_CHANNELS, 28, 28), 64, 64),
    "resnet18": ModelSpec("resnet18", (IN_CHANNELS, 28, 28), 32, 4),
    "resnet18_3d": ModelSpec("resnet18_3d", (IN_CHANNELS, 28, 28, 28), 8, 2),
}


def build_model(name: str):
    """The cnnfast model ``name`` (:mod:`cnnfast.models`), weights from ``cnnfast.manual_seed``."""
    from cnnfast import models

    if name == "smallcnn":
        return models.SmallCNN(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    return models.resnet18(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                           spatial_dims=3 if name == "resnet18_3d" else 2, stem="small")


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


# --- the torch mirror of a cnnfast model ----------------------------------------------------------

def torch_mirror(model):
    """A PyTorch module computing what the cnnfast ``model`` computes, with the same names.

    Standard layers map to their torch.nn twins; any other module becomes a torch module holding
    the converted children and running the cnnfast class's own ``forward`` (which works when it
    only calls its submodules and tensor methods). Weights are not copied (see ``load``).
    """
    import torch

    from cnnfast import nn

    tnn = torch.nn

    def convert(m):
        if isinstance(m, nn.Sequential):
            from collections import OrderedDict
            return tnn.Sequential(OrderedDict((k, convert(c)) for k, c in m._modules.items()))
        for cls, tcls in ((nn.Conv2d, tnn.Conv2d), (nn.Conv3d, tnn.Conv3d)):
            if isinstance(m, cls):
                return tcls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, bias=m.bias is not None)
        for cls, tcls in ((nn.BatchNorm2d, tnn.BatchNorm2d), (nn.BatchNorm3d, tnn.BatchNorm3d)):
            if isinstance(m, cls):
                return tcls(m.num_features, m.eps, m.momentum, affine=m.weight is not None,
                            track_running_stats=m.running_mean is not None)
        for cls, tcls in ((nn.MaxPool2d, tnn.MaxPool2d), (nn.MaxPool3d, tnn.MaxPool3d),
                          (nn.AvgPool2d, tnn.AvgPool2d), (nn.AvgPool3d, tnn.AvgPool3d)):
            if isinstance(m, cls):
                return tcls(m.kernel_size, m.stride, m.padding)
        if isinstance(m, nn.AdaptiveAvgPool3d):
            return tnn.AdaptiveAvgPool3d(m.output_size)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return tnn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, nn.Linear):
            return tnn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        if isinstance(m, nn.Flatten):
            return tnn.Flatten(m.start_dim, m.end_dim)
        if isinstance(m, nn.Dropout):
            return tnn.Dropout(m.p)
        simple = {nn.ReLU: tnn.ReLU, nn.Sigmoid: tnn.Sigmoid, nn.Identity: tnn.Identity}
        for cls, tcls in simple.items():
            if type(m) is cls:
                return tcls()
        shim_cls = type(f"Torch{type(m).__name__}", (tnn.Module,), {"forward": type(m).forward})
        shim = shim_cls()
        for name, value in vars(m).items():
            if name.startswith("_") or name == "training":
                continue
            if name in m._modules or name in m._parameters or name in m._buffers:
                continue
            if value is None or isinstance(value, (bool, int, float, str, tuple)):
                setattr(shim, name, value)
        for name, child in m._modules.items():
            shim.add_module(name, None if child is None else convert(child))
        for name, p in m._parameters.items():
            shim.register_parameter(name, None if p is None else
                                    tnn.Parameter(torch.zeros(p.shape, dtype=torch.float32)))
        for name, b in m._buffers.items():
            shim.register_buffer(name, None if b is None else torch.zeros(b.shape))
        return shim

    return convert(model)


def _set_dropout(model, p: float | None, saved: dict | None = None) -> dict:
    """Set every dropout's p (both libraries name it ``p``); return the previous values."""
    saved = {} if saved is None else saved
    previous = {}
    for name, m in model.named_modules():
        if type(m).__name__ == "Dropout":
            previous[name] = m.p
            m.p = saved.get(name, p) if p is None else p
    return previous


# --- candidates -----------------------------------------------------------------------------------

class Candidate:
    """One path under test. Subclasses build callables for op items and trainers for models."""

    name = ""
    device_kind = "cpu"      # which PyTorch peer it is compared with: torch (cpu) or cudnn (gpu)

    def unavailable(self) -> str | None:
        return None

    def unavailable_for(self, item: OpItem | ModelSpec) -> str | None:
        return None

    def native(self, a: np.ndarray):
        return a

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def sync(self) -> None:
        pass

    def op_fn(self, item: OpItem, inputs: dict) -> Callable[[], tuple]:
        raise NotImplementedError

    def trainer(self, spec: ModelSpec, state: dict) -> Trainer:
        raise NotImplementedError


def kernel_call(k, item: OpItem, a: dict) -> Callable[[], tuple]:
    """A no-argument callable running ``item`` with kernel namespace ``k`` on inputs ``a``."""
    p = item.params
    if item.op == "conv":
        s: ConvShape = p["shape"]
        args = (s.stride, s.padding, s.dil, s.groups)
        x, w, gy = a["x"], a["w"], a["gy"]
        if item.phase == "fwd":
            return lambda: (k.conv_forward(x, w, *args),)
        if item.phase == "bwd_data":
            return lambda: (k.conv_backward_data(gy, w, tuple(x.shape), *args),)
        return lambda: (k.conv_backward_weight(gy, x, tuple(w.shape), *args),)
    if item.op == "pool":
        x, gy = a["x"], a["gy"]
        kern, st, pad = p["kernel"], p["stride"], p["padding"]
        if item.phase == "max_fwd":
            return lambda: tuple(k.max_pool_forward(x, kern, st, pad))
        if item.phase == "max_bwd":
            idx = a["idx"]
            return lambda: (k.max_pool_backward(gy, idx, tuple(x.shape)),)
        if item.phase == "avg_fwd":
            return lambda: (k.avg_pool_forward(x, kern, st, pad),)
        return lambda: (k.avg_pool_backward(gy, tuple(x.shape), kern, st, pad),)
    if item.op == "relu":
        if item.phase == "fwd":
            return lambda: (k.relu_forward(a["x"]),)
        return lambda: (k.relu_backward(a["gy"], a["y"]),)
    eps = p["eps"]
    if item.phase == "fwd":
        return lambda: tuple(k.batch_norm_forward_train(a["x"], a["gamma"], a["beta"], eps))
    return lambda: tuple(k.batch_norm_backward(a["gy"], a["x"], a["gamma"], a["mean"],
                                               a["invstd"]))


def family_kernels(path: str, family: str):
    """The kernel namespace of one path's op family, or raise ImportError/AttributeError.

    Uses :func:`cnnfast.dispatch.kernels_of` when the whole path is importable; while a path is
    being written, one family can be benchmarked before the others exist.
    """
    try:
        return dispatch.kernels_of(path)
    except (ImportError, AttributeError):
        import importlib
        from types import SimpleNamespace

        module = importlib.import_module(f"cnnfast.{path}.{family}")
        return SimpleNamespace(**{n: getattr(module, n) for n in dispatch.KERNEL_OPS[family]})


class KernelCandidate(Candidate):
    """A cnnfast kernel path: reference, cpu or cuda."""

    def __init__(self, path: str, cuda_sim_allowed: bool = False):
        self.name = self.path = path
        self.device = "cuda" if path == "cuda" else "cpu"
        self.device_kind = "gpu" if path == "cuda" and not dispatch.cuda_simulated() else "cpu"
        self.cuda_sim_allowed = cuda_sim_allowed
        self._family_reason: dict[str, str | None] = {}

    def unavailable(self) -> str | None:
        if self.path != "cuda":
            return None
        if dispatch.cuda_simulated():
            if not self.cuda_sim_allowed:
                return "NUMBA_ENABLE_CUDASIM is set: the simulator runs only with --cuda-sim"
            return None
        if not dispatch.gpu_present():
            return ("no GPU (CuPy sees no CUDA device); the simulator runs tiny shapes on request "
                    "(--cuda-sim, or CNNFAST_BENCH_CUDA_SIM=1 for the pytest suites)")
        return None

    def _family(self, family: str) -> str | None:
        if family not in self._family_reason:
            try:
                family_kernels(self.path, family)
                self._family_reason[family] = None
            except Exception as e:  # noqa: BLE001 - a missing or broken kernel module
                self._family_reason[family] = (f"{self.path} {family} kernels not available "
                                               f"({type(e).__name__}: {e})")
        return self._family_reason[family]

    def unavailable_for(self, item) -> str | None:
        simulated = self.path == "cuda" and dispatch.cuda_simulated()
        if isinstance(item, ModelSpec):
            if simulated:
                return "the CUDA simulator runs ops on tiny shapes only, no training steps"
            for family in dispatch.KERNEL_OPS:
                reason = self._family(family)
                if reason:
                    return reason
            return None
        if simulated and item.set_name != "tiny":
            return "the CUDA simulator runs tiny shapes only"
        return self._family(item.family)

    def native(self, a):
        return dispatch.to_device(a, self.device)

    def to_numpy(self, a):
        return dispatch.to_device(a, "cpu")

    def sync(self):
        if self.device_kind == "gpu":
            import cupy

            cupy.cuda.runtime.deviceSynchronize()

    @contextlib.contextmanager
    def selected(self):
        if self.device == "cpu":
            with dispatch.cpu_path("fast" if self.path == "cpu" else "reference"):
                yield
        else:
            yield

    def op_fn(self, item, inputs):
        return kernel_call(family_kernels(self.path, item.family), item, inputs)

    def trainer(self, spec, state):
        return CnnfastTrainer(self, spec, state)


class TorchCandidate(Candidate):
    """PyTorch as the peer: on the CPU (``torch``) or the GPU with cuDNN (``cudnn``)."""

    def __init__(self, name: str = "torch"):
        self.name = name
        self.device_kind = "gpu" if name == "cudnn" else "cpu"
        self._torch = None

    def unavailable(self) -> str | None:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed"
        self._torch = torch
        if self.name == "cudnn" and not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
        return None

    @property
    def dev(self) -> str:
        return "cuda" if self.name == "cudnn" else "cpu"

    def native(self, a):
        t = self._torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.dev) if self.dev != "cpu" else t

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def sync(self):
        if self.dev == "cuda":
            self._torch.cuda.synchronize()

    def op_fn(self, item, a):
        torch = self._torch
        aten = torch.ops.aten
        F = torch.nn.functional
        p = item.params
        if item.op == "conv":
            s: ConvShape = p["shape"]
            nd = s.nd
            conv = F.conv2d if nd == 2 else F.conv3d
            x, w, gy = a["x"], a["w"], a["gy"]
            st, pad, dil = list(s.stride), list(s.padding), list(s.dil)
            if item.phase == "fwd":
                return lambda: (conv(x, w, None, s.stride, s.padding, s.dil, s.groups),)
            mask = [True, False, False] if item.phase == "bwd_data" else [False, True, False]
            out = 0 if item.phase == "bwd_data" else 1

            def backward():
                return (aten.convolution_backward(gy, x, w, None, st, pad, dil, False, [0] * nd,
                                                  s.groups, mask)[out],)
            return backward
        if item.op == "pool":
            x, gy = a["x"], a["gy"]
            nd = x.dim() - 2
            kern, st, pad = list(p["kernel"]), list(p["stride"]), list(p["padding"])
            max_fwd = aten.max_pool2d_with_indices if nd == 2 else aten.max_pool3d_with_indices
            max_bwd = (aten.max_pool2d_with_indices_backward if nd == 2
                       else aten.max_pool3d_with_indices_backward)
            avg_fwd = F.avg_pool2d if nd == 2 else F.avg_pool3d
            avg_bwd = aten.avg_pool2d_backward if nd == 2 else aten.avg_pool3d_backward
            if item.phase == "max_fwd":
                return lambda: tuple(max_fwd(x, kern, st, pad))
            if item.phase == "max_bwd":
                idx = a["idx"]
                return lambda: (max_bwd(gy, x, kern, st, pad, [1] * nd, False, idx),)
            if item.phase == "avg_fwd":
                return lambda: (avg_fwd(x, kern, st, pad),)
            return lambda: (avg_bwd(gy, x, kern, st, pad, False, True, None),)
        if item.op == "relu":
            if item.phase == "fwd":
                return lambda: (torch.relu(a["x"]),)
            return lambda: (aten.threshold_backward(a["gy"], a["y"], 0),)
        eps = p["eps"]
        if item.phase == "fwd":
            return lambda: tuple(aten.native_batch_norm(a["x"], a["gamma"], a["beta"], None,
                                                        None, True, 0.0, eps))
        return lambda: tuple(aten.native_batch_norm_backward(
            a["gy"], a["x"], a["gamma"], None, None, a["mean"], a["invstd"], True, eps,
            [True, True, True]))

    def trainer(self, spec, state):
        return TorchTrainer(self, spec, state)


# --- trainers -------------------------------------------------------------------------------------

class Trainer:
    """One model on one candidate: ``check(x, y)`` gives (loss, grads) at the initial weights;
    ``step()`` runs one full training step on the timed batch."""

    model = None

    def check(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        raise NotImplementedError

    def prepare(self, x: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class CnnfastTrainer(Trainer):
    def __init__(self, cand: KernelCandidate, spec: ModelSpec, state: dict):
        from cnnfast import nn, optim

        self.cand = cand
        self.model = build_model(spec.name)
        self.model.load_state_dict(state)
        if cand.device == "cuda":
            self.model.to("cuda")
        self.model.train()
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.records: list | None = None

    def _tensors(self, x, y):
        return (cnnfast.tensor(x, device=self.cand.device),
                cnnfast.tensor(y, device=self.cand.device))

    def check(self, x, y):
        xt, yt = self._tensors(x, y)
        saved = _set_dropout(self.model, 0.0)
        records: list = []
        try:
            with self.cand.selected(), _record_layers(self.model, records):
                self.model.zero_grad()
                loss = self.loss_fn(self.model(xt), yt)
                loss.backward()
        finally:
            _set_dropout(self.model, None, saved)
        self.records = records
        grads = {name: self.cand.to_numpy(p.grad.data) if p.grad is not None else None
                 for name, p in self.model.named_parameters()}
        self.model.zero_grad()
        return float(loss.item()), grads

    def prepare(self, x, y):
        self.xt, self.yt = self._tensors(x, y)

    def step(self):
        with self.cand.selected():
            self.opt.zero_grad()
            loss = self.loss_fn(self.model(self.xt), self.yt)
            loss.backward()
            self.opt.step()
        self.cand.sync()


class TorchTrainer(Trainer):
    def __init__(self, cand: TorchCandidate, spec: ModelSpec, state: dict):
        torch = cand._torch
        self.cand, self.torch = cand, torch
        self.model = torch_mirror(build_model(spec.name))
        own = self.model.state_dict()
        missing = [k for k in state if k not in own]
        if missing:
            raise ValueError(f"the torch mirror lacks {missing[:3]}")
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                   strict=False)
        self.model.to(cand.dev).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def _tensors(self, x, y):
        return self.cand.native(x), self.cand.native(y)

    def check(self, x, y):
        xt, yt = self._tensors(x, y)
        saved = _set_dropout(self.model, 0.0)
        try:
            self.model.zero_grad(set_to_none=True)
            loss = self.torch.nn.functional.cross_entropy(self.model(xt), yt)
            loss.backward()
        finally:
            _set_dropout(self.model, None, saved)
        grads = {name: None if p.grad is None else p.grad.detach().cpu().numpy()
                 for name, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        return float(loss.item()), grads

    def prepare(self, x, y):
        self.xt, self.yt = self._tensors(x, y)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.xt), self.yt)
        loss.backward()
        self.opt.step()
        self.cand.sync()


# --- correctness ----------------------------------------------------------------------------------

def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected|; inf for a shape mismatch or non-finite values."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    if got.shape != expected.shape:
        return math.inf
    if expected.size == 0:
        return 0.0
    if expected.dtype.kind in "iub":
        return 0.0 if np.array_equal(got, expected) else math.inf
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.isfinite(g).all():
        return math.inf
    scale = float(np.max(np.abs(e)))
    return float(np.max(np.abs(g - e))) / (scale if scale > 0 else 1.0)


def compare_outputs(got: Sequence, expected: Sequence, tol: float) -> tuple[bool, float, str]:
    """(ok, worst error, what differed) over matching output tuples."""
    if len(got) != len(expected):
        return False, math.inf, f"{len(got)} outputs, expected {len(expected)}"
    worst, what = 0.0, ""
    for i, (g, e) in enumerate(zip(got, expected)):
        err = relative_error(g, e)
        if err > worst or math.isnan(err):
            worst = err
            what = (f"output {i}: shape {np.shape(g)} vs {np.shape(e)}" if np.shape(g) !=
                    np.shape(e) else f"output {i}: relative error {err:.2e}")
    return worst <= tol, worst, what


def relative_l2_error(got, expected) -> float:
    """||got - expected|| / ||expected||; inf for a shape mismatch or non-finite values."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape or not np.isfinite(got).all():
        return math.inf
    norm = float(np.linalg.norm(expected))
    return float(np.linalg.norm(got - expected)) / (norm if norm > 0 else 1.0)


def compare_grads(got: tuple, expected: tuple, tol: float) -> tuple[bool, float, str]:
    """A step's (loss, {name: gradient}) against the reference's: the loss and each gradient
    within ``tol`` (relative L2)."""
    loss, grads = got
    ref_loss, ref_grads = expected
    worst = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    what = f"loss {loss:.6g} vs {ref_loss:.6g}"
    if not math.isfinite(loss):
        worst = math.inf
    for name, ref in ref_grads.items():
        g = grads.get(name)
        if g is None:
            return False, math.inf, f"no gradient for {name}"
        err = relative_l2_error(g, ref)
        if err > worst:
            worst, what = err, f"gradient of {name}: relative error {err:.2e}"
    return worst <= tol, worst, what


# --- checked callables (for the pytest-benchmark suites) ------------------------------------------

class CheckFailed(AssertionError):
    """A candidate's result differs from the reference: it must not be timed."""


def reference_timed(item: OpItem | ModelSpec, everywhere: bool = False) -> bool:
    """Whether the (slow) reference path is timed on ``item`` by default."""
    if everywhere:
        return True
    if isinstance(item, ModelSpec):
        return item.name in REFERENCE_MODELS
    return item.set_name in REFERENCE_SETS


def check_batch_for(item: OpItem, quick: bool = False, override: int | None = None) -> int:
    """The batch the correctness check runs at: the full batch unless the reference would take
    long (``override``: a batch, or 0 for always the full batch)."""
    if override == 0:
        return item.batch
    if override:
        return min(override, item.batch)
    flops = item.flops()
    budget = CHECK_FLOPS_QUICK if quick else CHECK_FLOPS_FULL
    if flops is None or flops <= budget:
        return item.batch
    return max(1, min(item.batch, int(item.batch * budget / flops)))


def checked_op(item: OpItem, cand: Candidate, check_batch: int | None = None) -> Callable[[], None]:
    """Check ``cand`` on ``item`` against the reference (raise :class:`CheckFailed` when it
    differs), then return a callable running it at the full batch, synchronised."""
    n = check_batch or check_batch_for(item)
    inputs = item.make_inputs(n)
    expected = kernel_call(family_kernels("reference", item.family), item, inputs)()
    got = cand.op_fn(item, {k: cand.native(v) for k, v in inputs.items()})()
    cand.sync()
    ok, _, what = compare_outputs(tuple(cand.to_numpy(g) for g in got), expected,
                                  TOLERANCE["op"])
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on {item.id} (checked at batch {n}): {what}")
    full = inputs if n == item.batch else item.make_inputs(item.batch)
    fn = cand.op_fn(item, {k: cand.native(v) for k, v in full.items()})

    def run():
        fn()
        cand.sync()
    return run


def checked_step(spec: ModelSpec, cand: Candidate, seed: int = 0) -> Callable[[], None]:
    """Check a training step of ``cand`` against the reference (loss and every gradient at
    ``spec.check_batch``), then return one full training step at ``spec.batch``."""
    cnnfast.manual_seed(seed)
    state = build_model(spec.name).state_dict()
    xc, yc = _model_data(spec, spec.check_batch)
    expected = KernelCandidate("reference").trainer(spec, state).check(xc, yc)
    trainer = cand.trainer(spec, state)
    ok, _, what = compare_grads(trainer.check(xc, yc), expected, TOLERANCE["step"])
    if not ok:
        raise CheckFailed(f"{cand.name} is WRONG on the {spec.name} step (checked at batch "
                          f"{spec.check_batch}): {what}")
    trainer.prepare(*_model_data(spec, spec.batch))
    return trainer.step


# --- timing ---------------------------------------------------------------------------------------

def _timed(fn: Callable, sync: Callable, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (run ``inner`` times), with the garbage collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        return (time.perf_counter() - start) / inner
    finally:
        if enabled:
            gc.enable()


def _stats(times: list[float]) -> dict:
    if not times:
        return {}
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "iqr_s": q[2] - q[0], "min_s": ts[0],
            "max_s": ts[-1]}


@dataclass
class Entry:
    """One candidate being timed on one item."""

    cand: Candidate
    fn: Callable
    row: dict
    repeats: int
    inner: int = 1
    times: list = field(default_factory=list)


def inner_loops(call_s: float) -> int:
    """Calls per sample so that a sample lasts about MIN_SAMPLE_S."""
    if call_s >= MIN_SAMPLE_S:
        return 1
    return max(1, min(1000, int(MIN_SAMPLE_S / max(call_s, 1e-7))))


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Cores' worth of CPU time that ran (anything but idle and I/O wait) during ``seconds``,
    from /proc/stat; called while this process sleeps, it is what other processes used. None
    where /proc/stat is missing. Unlike the load average, it is not raised by kernel threads that
    wait uninterruptibly without using a CPU (a VM can show a load of 1 while idle)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = total1 - total0
    if ticks <= 0:
        return None
    return (os.cpu_count() or 1) * (ticks - (idle1 - idle0)) / ticks


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def round_robin(entries: list[Entry]) -> None:
    """Time the (warmed-up) entries in turn, ``e.repeats`` samples each, rotating the order
    every repeat so that drift in the machine's load hits every entry alike."""
    rounds = max((e.repeats for e in entries), default=0)
    for r in range(rounds):
        gc.collect(1)   # the young generations: what the last round left (a full pass is slow)
        shift = r % max(len(entries), 1)
        for e in entries[shift:] + entries[:shift]:
            if len(e.times) < e.repeats:
                e.times.append(_timed(e.fn, e.cand.sync, e.inner))
    load = load_average()
    for e in entries:
        e.row.update(_stats(e.times))
        e.row["load_1m"] = load
        e.row["times_s"] = e.times
        e.row["repeats"] = len(e.times)
        e.row["inner_loops"] = e.inner


# --- memory ---------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssSampler:
    """Samples the RSS every millisecond in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


MB = 1024 * 1024


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that the RSS
    before a step is what is live, not what earlier steps left cached; a no-op elsewhere."""
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_step_memory(trainer: Trainer, numpy_path: bool) -> dict:
    """Peak memory of one step: RSS above the level before the step (sampled every ms, after
    :func:`release_free_memory`), and for NumPy paths also tracemalloc's peak of traced (NumPy)
    allocations above the level before."""
    release_free_memory()
    out = {}
    if numpy_path:
        tracemalloc.start()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
    try:
        with RssSampler() as sampler:
            trainer.step()
        out["peak_rss_mb"] = (sampler.peak - sampler.start) / MB
        if numpy_path:
            out["peak_traced_mb"] = (tracemalloc.get_traced_memory()[1] - base) / MB
    finally:
        if numpy_path:
            tracemalloc.stop()
    return out


def measure_growth(trainer: Trainer, steps: int, settle: int = 3) -> dict:
    """RSS growth over ``steps`` steps after ``settle`` steps (allocator pools filled)."""
    for _ in range(settle):
        trainer.step()
    release_free_memory()
    before = rss_bytes()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    release_free_memory()
    return {"steps": steps, "growth_mb": (rss_bytes() - before) / MB,
            "rss_mb": rss_bytes() / MB, "seconds": time.perf_counter() - start}


# --- options and the run --------------------------------------------------------------------------

@dataclass
class Options:
    quick: bool = False
    paths: tuple[str, ...] = PATHS
    ops: tuple[str, ...] = OPS
    models: tuple[str, ...] = MODELS
    shapes: tuple[str, ...] = ()          # shape ids after expanding set names
    repeats: int | None = None            # None: 5 (quick 3), fewer for slow items
    memory_steps: int = 200
    cuda_sim: bool = False
    threads: int = 0
    check_batch: int | None = None        # None: automatic; 0: always the full batch
    step_batch: int | None = None
    reference_all: bool = False
    item_budget_s: float = 20.0           # time per candidate and item above which repeats drop
    progress: bool = True
    out: str | None = None
    seed: int = 0


def machine_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str | None:
    if dispatch.cuda_simulated():
        return None
    if dispatch.gpu_present():
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - report what can be found
            return "CUDA GPU"
    torch = sys.modules.get("torch")   # only when a torch candidate loaded it
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def versions() -> dict:
    """Versions of Python and the libraries, from package metadata (nothing heavy is imported)."""
    from importlib import metadata

    out = {"python": platform.python_version(), "numpy": np.__version__,
           "cnnfast": cnnfast.__version__}
    for name, dists in (("numba", ("numba",)), ("torch", ("torch",)),
                        ("cupy", ("cupy", "cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x"))):
        out[name] = None
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[name] = metadata.version(dist)
                break
    return out


def machine_info(options: Options) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads_available": machine_threads(),
        "threads_used": options.threads,
        "platform": platform.platform(),
        "gpu": gpu_name(),
        "cuda_simulator": dispatch.cuda_simulated(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_start"] = os.getloadavg()
    info["cpu_busy_start"] = cpu_busy()
    return info


def make_candidates(options: Options) -> list[Candidate]:
    cands: list[Candidate] = []
    for name in options.paths:
        if name in ("torch", "cudnn"):
            cands.append(TorchCandidate(name))
        else:
            cands.append(KernelCandidate(name, cuda_sim_allowed=options.cuda_sim))
    return cands


def _set_threads(n: int, cands: list[Candidate]) -> dict:
    used = {}
    for c in cands:
        if isinstance(c, TorchCandidate) and c.unavailable() is None:
            c._torch.set_num_threads(n)
            used["torch"] = c._torch.get_num_threads()
    if any(getattr(c, "path", None) == "cpu" for c in cands):
        try:
            import numba

            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            used["numba"] = numba.get_num_threads()
        except ImportError:
            pass
    return used


class Runner:
    def __init__(self, options: Options, candidates: list[Candidate] | None = None):
        self.o = options
        self.cands = candidates if candidates is not None else make_candidates(options)
        self.reference = KernelCandidate("reference")
        self.results: list[dict] = []
        self.memory: list[dict] = []
        self.notes: list[str] = []
        self.unavailable: dict[str, str] = {}

    def _reference_timed(self, item) -> bool:
        return reference_timed(item, self.o.reference_all)

    def _repeats(self, cand: Candidate, warm_s: float) -> int:
        if self.o.repeats is not None:
            r = self.o.repeats
        else:
            r = 3 if self.o.quick else 5
            if warm_s * r > self.o.item_budget_s:
                r = max(3 if not self.o.quick else 2, int(self.o.item_budget_s / warm_s))
                r = min(r, 3 if self.o.quick else 5)
        if cand.name == "reference":
            r = min(r, REFERENCE_MAX_REPEATS - (1 if self.o.quick else 0))
        return r

    def _row(self, item_id, op, phase, shape_id, set_name, label, batch, cand) -> dict:
        return {"id": item_id, "op": op, "phase": phase, "shape_id": shape_id, "set": set_name,
                "shape": label, "batch": batch, "path": cand.name, "status": "skipped",
                "reason": None, "check_batch": None, "check_error": None, "first_call_s": None,
                "median_s": None, "gflop": None, "gflops": None, "vs_torch": None}

    def _check_batch(self, item: OpItem) -> int:
        return check_batch_for(item, self.o.quick, self.o.check_batch)

    def _rows_and_active(self, item, *fields) -> tuple[list[dict], list]:
        """A result row per candidate for ``item`` (an OpItem or a ModelSpec; ``fields`` are
        :meth:`_row`'s before ``cand``), and the (candidate, row) pairs that will run; the
        others' rows say why not."""
        rows, active = [], []
        for cand in self.cands:
            row = self._row(*fields, cand)
            rows.append(row)
            reason = self.unavailable.get(cand.name) or cand.unavailable_for(item)
            if reason is None and cand.name == "reference" and not self._reference_timed(item):
                reason = "reference timed on small shapes only (--reference-all)"
            if reason:
                row["reason"] = reason
                continue
            active.append((cand, row))
        return rows, active

    def run_item(self, item: OpItem) -> None:
        entries = []
        rows, active = self._rows_and_active(item, item.id, item.op, item.phase, item.shape_id,
                                             item.set_name, item.label, item.batch)
        if not active:
            self.results.extend(rows)
            return
        n_check = self._check_batch(item)
        check_inputs = item.make_inputs(n_check)
        expected = kernel_call(family_kernels("reference", item.family), item, check_inputs)()
        full_inputs = check_inputs if n_check == item.batch else None
        for cand, row in active:
            row["check_batch"] = n_check
            try:
                native = {k: cand.native(v) for k, v in check_inputs.items()}
                start = time.perf_counter()
                got = cand.op_fn(item, native)()
                cand.sync()
                row["first_call_s"] = time.perf_counter() - start
                got = tuple(cand.to_numpy(g) for g in got)
                ok, err, what = compare_outputs(got, expected, TOLERANCE["op"])
                row["check_error"] = err if math.isfinite(err) else None
                if not ok:
                    row["status"], row["reason"] = "WRONG", what
                    continue
                if full_inputs is None:
                    full_inputs = item.make_inputs(item.batch)
                native = {k: cand.native(v) for k, v in full_inputs.items()}
                fn = cand.op_fn(item, native)
                row["status"] = "ok"
                row["gflop"] = None if item.flops() is None else item.flops() / 1e9
                entries.append(Entry(cand, fn, row, 0))
            except Exception as e:  # noqa: BLE001 - one broken path must not stop the run
                row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
        del expected, check_inputs
        self._time(entries)
        self.results.extend(rows)

    def _time(self, entries: list[Entry]) -> None:
        # one untimed warm-up each at the timed shape decides the repeats and inner loops
        gc.collect()
        for e in entries:
            try:
                t = _timed(e.fn, e.cand.sync)
            except Exception as ex:  # noqa: BLE001
                e.row["status"], e.row["reason"] = "ERROR", f"{type(ex).__name__}: {ex}"
                continue
            e.row["warmup_s"] = t
            e.repeats = self._repeats(e.cand, t)
            e.inner = inner_loops(t)
        entries[:] = [e for e in entries if e.row["status"] == "ok"]
        round_robin(entries)
        for e in entries:
            if e.row.get("gflop") and e.row.get("median_s"):
                e.row["gflops"] = e.row["gflop"] / e.row["median_s"]

    def run_model(self, spec: ModelSpec) -> list[tuple[Candidate, Trainer]]:
        if self.o.step_batch:
            spec = ModelSpec(spec.name, spec.input_shape, self.o.step_batch,
                             min(spec.check_batch, self.o.step_batch))
        if self.o.check_batch is not None:
            n = spec.batch if self.o.check_batch == 0 else min(self.o.check_batch, spec.batch)
            spec = ModelSpec(spec.name, spec.input_shape, spec.batch, n)
        item_id = f"step.train/{spec.name}"
        dims = "x".join(map(str, spec.input_shape))
        label = f"{spec.batch}x{dims}"
        rows, active = self._rows_and_active(spec, item_id, "step", "train", spec.name, "model",
                                             label, spec.batch)
        trained = []
        if not active:
            self.results.extend(rows)
            return trained
        cnnfast.manual_seed(self.o.seed)
        state = build_model(spec.name).state_dict()
        xc, yc = _model_data(spec, spec.check_batch)
        ref_trainer = self.reference.trainer(spec, state)
        expected = ref_trainer.check(xc, yc)
        flops = _step_flops_per_sample(ref_trainer.records) * spec.batch
        del ref_trainer
        xf, yf = _model_data(spec, spec.batch)
        entries = []
        for cand, row in active:
            row["check_batch"] = spec.check_batch
            try:
                trainer = cand.trainer(spec, state)
                start = time.perf_counter()
                got = trainer.check(xc, yc)
                row["first_call_s"] = time.perf_counter() - start
                ok, err, what = compare_grads(got, expected, TOLERANCE["step"])
                row["check_error"] = err if math.isfinite(err) else None
                if not ok:
                    row["status"], row["reason"] = "WRONG", what
                    continue
                trainer.prepare(xf, yf)
                row["status"], row["gflop"] = "ok", flops / 1e9
                entries.append(Entry(cand, trainer.step, row, 0))
                trained.append((cand, trainer, row))
            except Exception as e:  # noqa: BLE001
                row["status"], row["reason"] = "ERROR", f"{type(e).__name__}: {e}"
        self._time(entries)
        for cand, trainer, row in trained:
            if row["status"] != "ok":
                continue
            try:
                row.update(measure_step_memory(trainer, isinstance(cand, KernelCandidate)
                                               and cand.device == "cpu"))
            except Exception as e:  # noqa: BLE001
                row["memory_error"] = f"{type(e).__name__}: {e}"
        self.results.extend(rows)
        return [(c, t) for c, t, r in trained if r["status"] == "ok"]

    def run(self) -> None:
        for cand in self.cands:
            reason = cand.unavailable()
            if reason:
                self.unavailable[cand.name] = reason
                self.notes.append(f"{cand.name}: not run ({reason})")
        items = op_items(self.o.ops, self.o.shapes)
        models = [MODEL_SPECS[m] for m in self.o.models] if "step" in self.o.ops else []
        total = len(items) + len(models)
        bar = _progress(total, self.o.progress)
        try:
            for item in items:
                bar.set_description(item.id)
                self.run_item(item)
                bar.update(1)
            for spec in models:
                bar.set_description(f"step.train/{spec.name}")
                trained = self.run_model(spec)
                if spec.name == "smallcnn" and self.o.memory_steps > 0:
                    for cand, trainer in trained:
                        bar.set_description(f"memory/{spec.name}/{cand.name}")
                        try:
                            growth = measure_growth(trainer, self.o.memory_steps)
                        except Exception as e:  # noqa: BLE001
                            growth = {"error": f"{type(e).__name__}: {e}"}
                        self.memory.append({"model": spec.name, "path": cand.name, **growth})
                del trained
                bar.update(1)
        finally:
            bar.close()
        self._ratios()

    def _ratios(self) -> None:
        peer = {"cpu": "torch", "gpu": "cudnn"}
        kinds = {c.name: c.device_kind for c in self.cands}
        kinds.setdefault("reference", "cpu")
        by_id: dict[str, dict[str, dict]] = {}
        for row in self.results:
            by_id.setdefault(row["id"], {})[row["path"]] = row
        for rows in by_id.values():
            for path, row in rows.items():
                ref = rows.get(peer[kinds.get(path, "cpu")])
                if row.get("median_s") and ref and ref.get("median_s"):
                    row["vs_torch"] = ref["median_s"] / row["median_s"]


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        class _Quiet:
            def set_description(self, *_):
                pass

            def update(self, *_):
                pass

            def close(self):
                pass
        return _Quiet()
    return tqdm(total=total, file=sys.stderr, unit="item", dynamic_ncols=True, leave=False)


def run_benchmarks(options: Options, candidates: list[Candidate] | None = None) -> dict:
    """Run the benchmarks ``options`` select and return the report (what ``--out`` writes)."""
    runner = Runner(options, candidates)
    options.threads = options.threads or machine_threads()
    threads = _set_threads(options.threads, runner.cands)
    started = _dt.datetime.now().astimezone()
    machine = machine_info(options)          # the load average before the run
    machine["threads"] = threads
    # Every candidate (PyTorch too) runs under the allocator settings a cnnfast user gets.
    from cnnfast.cpu._malloc import tune_malloc

    machine["malloc"] = tune_malloc()
    t0 = time.perf_counter()
    runner.run()
    machine["gpu"] = gpu_name()              # torch may have loaded since
    with contextlib.suppress(OSError, AttributeError):
        machine["load_avg_end"] = os.getloadavg()
    opts = asdict(options)
    return {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine,
        "versions": versions(),
        "options": opts,
        "notes": runner.notes,
        "results": runner.results,
        "memory": runner.memory,
    }


# --- printing -------------------------------------------------------------------------------------

def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _status(row: dict) -> str:
    if row["status"] == "ok":
        if row["path"] == "reference":
            return "oracle"
        if row["check_batch"] is not None and row["check_batch"] != row["batch"]:
            return f"ok@{row['check_batch']}"
        return "ok"
    return row["status"]


def busy_note(report: dict) -> str | None:
    """A warning when other processes competed for the cores: before the run, more than half
    the threads' worth of CPU used by others over one second (``cpu_busy_start``; where that is
    missing, a 1-minute load above half the threads), or during it a 1-minute load above the
    threads this run uses plus one."""
    m = report["machine"]
    threads = m.get("threads_available") or 1
    busy = m.get("cpu_busy_start")
    start = busy if busy is not None else (m.get("load_avg_start") or [0])[0]
    what = "CPUs busy" if busy is not None else "1-minute load"
    during = [r["load_1m"] for r in report["results"] if r.get("load_1m") is not None]
    peak = max(during, default=0.0)
    if start > threads / 2 or peak > threads + 1:
        return (f"the machine was busy ({what} {start:.1f} at the start, 1-minute load up to "
                f"{peak:.1f} during the run, on {threads} threads): multi-threaded timings, "
                "PyTorch's most of all, are inflated; see each row's load_1m in the JSON")
    return None


def format_table(report: dict) -> str:
    rows = report["results"]
    m = report["machine"]
    threads = m.get("threads", {})
    lines = [
        f"cnnfast bench  {report['created']}  cnnfast {report['versions']['cnnfast']}",
        f"machine: {m['cpu']}, {m['cores']} cores ({m['threads_available']} available)"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + (f"; torch {report['versions']['torch']} with {threads['torch']} threads"
           if "torch" in threads else "")
        + (f"; numba {threads['numba']} threads" if "numba" in threads else "")
        + ("; glibc malloc thresholds raised (cnnfast.cpu._malloc)"
           if m.get("malloc", {}).get("applied") else ""),
        "median of round-robin repeats (warm-up excluded); 1st = first call incl. JIT compile "
        "(at the check batch); vs torch = t_torch / t_path (>1: faster than PyTorch)",
    ]
    busy = busy_note(report)
    if busy:
        lines.append(f"WARNING: {busy}")
    if not report["options"]["reference_all"]:
        most = REFERENCE_MAX_REPEATS - (1 if report["options"]["quick"] else 0)
        lines.append("reference: timed only on r18-28/tiny shapes and the SmallCNN step, at most "
                     f"{most} repeats (--reference-all: everywhere); always the oracle")
    header = ("op", "shape", "path", "check", "1st", "median", "IQR", "GFLOP/s", "vs torch")
    table = []
    skipped: dict[tuple[str, str], int] = {}
    last_id = None
    for row in rows:
        if row["status"] == "skipped":
            key = (row["path"], row["reason"] or "?")
            skipped[key] = skipped.get(key, 0) + 1
            continue
        first = row["id"] != last_id
        last_id = row["id"]
        op = f"{row['op']} {row['phase']}" if first else ""
        shape = f"{row['shape_id']} {row['shape']}" if first else ""
        if row["status"] in ("WRONG", "ERROR"):
            table.append((op, shape, row["path"], row["status"], _fmt_time(row["first_call_s"]),
                          "", "", "", "", row["reason"] or ""))
            continue
        table.append((op, shape, row["path"], _status(row), _fmt_time(row["first_call_s"]),
                      _fmt_time(row.get("median_s")), _fmt_time(row.get("iqr_s")),
                      _fmt(row.get("gflops"), ".1f"), _fmt(row.get("vs_torch"), ".2f"), None))
    if table:
        widths = [max(len(str(r[i])) for r in table + [header]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append("")
        lines.append(fmt.format(*header))
        lines.append("  ".join("-" * w for w in widths))
        for r in table:
            if r[-1] is not None:   # WRONG or ERROR: the reason instead of the timings
                cells = [f"{v:<{w}}" if i < 4 else f"{v:>{w}}"
                         for i, (v, w) in enumerate(zip(r[:5], widths))]
                lines.append("  ".join(cells) + "  " + r[-1])
            else:
                lines.append(fmt.format(*r[:-1]))
    steps = [r for r in rows if r["op"] == "step" and r["status"] == "ok"]
    if steps:
        lines += ["", "training step memory (one step: RSS peak above the start; NumPy "
                  "allocations traced by tracemalloc)"]
        for r in steps:
            traced = r.get("peak_traced_mb")
            lines.append(f"  {r['shape_id']:<12} {r['path']:<10} peak RSS "
                         f"{_fmt(r.get('peak_rss_mb'), '8.1f')} MB"
                         + ("" if traced is None else f"   traced {traced:8.1f} MB"))
    if report["memory"]:
        lines += ["", "memory growth (RSS after N steps minus before, after 3 settling steps)"]
        for r in report["memory"]:
            if "error" in r:
                lines.append(f"  {r['model']:<12} {r['path']:<10} ERROR {r['error']}")
            else:
                lines.append(f"  {r['model']:<12} {r['path']:<10} {r['steps']} steps: "
                             f"{r['growth_mb']:+.1f} MB  (RSS {r['rss_mb']:.0f} MB, "
                             f"{r['seconds']:.1f} s)")
    if skipped:
        lines += ["", "not run:"]
        for (path, reason), count in skipped.items():
            lines.append(f"  {path}: {reason} ({count} item{'s' if count > 1 else ''})")
    lines.append("")
    lines.append(f"wall time {report['wall_s']:.1f} s")
    return "\n".join(lines)


# --- compare --------------------------------------------------------------------------------------

def load_report(path: str) -> dict:
    try:
        with open(path) as f:
            report = json.load(f)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a cnnfast bench report (schema {SCHEMA})")
    return report


def compare_reports(old: dict, new: dict, threshold: float = 0.10,
                    metric: str = "median") -> tuple[list[dict], str]:
    """Match rows by (item id, path) and flag regressions: a path that was ok and now is WRONG or
    ERROR, or one slower by more than ``threshold`` (a fraction). ``metric="median"`` compares
    median times; ``"vs_torch"`` compares each path's time relative to PyTorch in the same run
    (``slowdown = old vs_torch / new vs_torch``), which cancels drift in the machine's speed
    between the two runs (the PyTorch rows themselves are then not compared)."""
    old_rows = {(r["id"], r["path"]): r for r in old["results"]}
    lines = []
    if old["machine"].get("cpu") != new["machine"].get("cpu"):
        lines.append(f"note: different machines ({old['machine'].get('cpu')} vs "
                     f"{new['machine'].get('cpu')})")
    compared = []
    for r in new["results"]:
        o = old_rows.get((r["id"], r["path"]))
        if o is None:
            continue
        entry = {"id": r["id"], "path": r["path"], "old_s": o.get("median_s"),
                 "new_s": r.get("median_s"), "ratio": None, "regression": False, "why": ""}
        if metric == "vs_torch":
            before, after = o.get("vs_torch"), r.get("vs_torch")
            slowdown = before / after if before and after else None
            if r["path"] in ("torch", "cudnn"):
                slowdown = None
        else:
            before, after = entry["old_s"], entry["new_s"]
            slowdown = after / before if before and after else None
        if o["status"] == "ok" and r["status"] in ("WRONG", "ERROR"):
            entry["regression"], entry["why"] = True, f"now {r['status']}: {r['reason']}"
        elif slowdown is not None:
            entry["ratio"] = slowdown
            if slowdown > 1 + threshold:
                entry["regression"] = True
                entry["why"] = f"{(slowdown - 1) * 100:.0f}% slower" + (
                    " relative to torch" if metric == "vs_torch" else "")
        else:
            continue
        compared.append(entry)
    regressions = [e for e in compared if e["regression"]]
    what = "relative to PyTorch in each run" if metric == "vs_torch" else "median times"
    lines.append(f"compared {len(compared)} figures ({what}); threshold {threshold * 100:.0f}% "
                 "slower; slowdown = new / old (> 1: slower)")
    width = max((len(e["id"]) for e in compared), default=10)
    for e in sorted(compared, key=lambda e: -(e["ratio"] or math.inf)):
        flag = "REGRESSION" if e["regression"] else ""
        ratio = "-" if e["ratio"] is None else f"{e['ratio']:.2f}x"
        lines.append(f"  {e['id']:<{width}}  {e['path']:<10} {_fmt_time(e['old_s']):>10} -> "
                     f"{_fmt_time(e['new_s']):>10}  {ratio:>6}  {flag} {e['why']}".rstrip())
    lines.append(f"{len(regressions)} regression(s)" if regressions else "no regressions")
    return regressions, "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnfast bench", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few representative shapes, SmallCNN and ResNet-18 steps, 3 repeats "
                        "(under two minutes on 2 cores)")
    p.add_argument("--paths", help=f"comma list of {', '.join(PATHS)} (default: all available)")
    p.add_argument("--ops", help=f"comma list of {', '.join(OPS)} (default: all)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: all; quick: "
                                    f"{', '.join(QUICK_MODELS)})")
    p.add_argument("--shapes", help=f"comma list of shape sets ({', '.join(SETS)}) or shape ids "
                                    "such as r18-28.layer1 or r18-3d.act (see --list)")
    p.add_argument("--list", action="store_true", help="list the shape ids and exit")
    p.add_argument("--repeats", type=int, help="timed repeats per candidate (default 5, quick 3; "
                                               "slow items get fewer unless this is given)")
    p.add_argument("--memory-steps", type=int,
                   help="SmallCNN steps for the memory-growth figure (default 200, quick 20; "
                        "0 skips it)")
    p.add_argument("--check-batch", help="batch of the correctness check: a number, or 'full' "
                                         "(default: full where the reference is cheap)")
    p.add_argument("--step-batch", type=int, help="override the batch of every training step")
    p.add_argument("--reference-all", action="store_true",
                   help="time the reference path on every shape and model")
    p.add_argument("--cuda-sim", action="store_true",
                   help="run the cuda path in Numba's simulator (no GPU), tiny shapes only")
    p.add_argument("--threads", type=int, help="threads for PyTorch and Numba "
                                               "(default: what the machine gives)")
    p.add_argument("--out", help="write the JSON report here (default: "
                                 "cnnfast-bench-<date>.json; '-' writes none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                   help="compare two JSON reports; exit 1 when a regression is flagged")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="--compare: slower by more than this fraction is a regression "
                        "(default 0.10)")
    p.add_argument("--metric", choices=("median", "vs_torch"), default="median",
                   help="--compare: median times, or each path's time relative to PyTorch in "
                        "the same run (robust to a machine that got slower or busier)")
    return p


def _choices(text: str | None, allowed: Sequence[str], what: str,
             aliases: dict | None = None) -> tuple[str, ...] | None:
    if text is None:
        return None
    chosen = []
    for name in (t.strip() for t in text.split(",")):
        name = (aliases or {}).get(name, name)
        if name not in allowed:
            raise UsageError(f"unknown {what} {name!r} (choose from {', '.join(allowed)})")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise UsageError(f"--{what}s is empty")
    return tuple(chosen)


def options_from_args(args: argparse.Namespace) -> Options:
    paths = _choices(args.paths, PATHS, "path") or PATHS
    ops = _choices(args.ops, OPS, "op", {"relu": "relu", "batchnorm": "bn", "train": "step",
                                          "pooling": "pool"}) or OPS
    models = _choices(args.models, MODELS, "model", {"resnet18-3d": "resnet18_3d"})
    known = all_shape_ids()
    if args.shapes:
        shape_ids: list[str] = []
        for name in (s.strip() for s in args.shapes.split(",")):
            if name in SETS:
                shape_ids += [i for i, s in known.items() if s == name]
            elif name in known:
                shape_ids.append(name)
            else:
                raise UsageError(f"unknown shape {name!r} (a set: {', '.join(SETS)}, or an id "
                                 "from --list)")
    elif args.quick:
        shape_ids = list(QUICK_SHAPES)
    else:
        shape_ids = [i for i, s in known.items() if s != "tiny"]
    if args.cuda_sim and not args.shapes:
        shape_ids += [i for i, s in known.items() if s == "tiny"]
    for name, value in (("--repeats", args.repeats), ("--memory-steps", args.memory_steps),
                        ("--step-batch", args.step_batch), ("--threads", args.threads)):
        if value is not None and value < (0 if name == "--memory-steps" else 1):
            raise UsageError(f"{name} must be a positive number, got {value}")
    check_batch = None
    if args.check_batch is not None:
        if args.check_batch == "full":
            check_batch = 0
        elif args.check_batch.isdigit() and int(args.check_batch) >= 1:
            check_batch = int(args.check_batch)
        else:
            raise UsageError(f"--check-batch must be a positive number or 'full', "
                             f"got {args.check_batch!r}")
    if args.step_batch is not None and args.step_batch < 2:
        raise UsageError("--step-batch must be at least 2 (batch norm needs two samples)")
    quick = args.quick
    return Options(
        quick=quick, paths=paths, ops=ops,
        models=models or (QUICK_MODELS if quick else MODELS),
        shapes=tuple(dict.fromkeys(shape_ids)),
        repeats=args.repeats,
        memory_steps=(args.memory_steps if args.memory_steps is not None
                      else (20 if quick else 200)),
        cuda_sim=args.cuda_sim,
        threads=args.threads or machine_threads(),
        check_batch=check_batch, step_batch=args.step_batch,
        reference_all=args.reference_all, progress=not args.no_progress,
        out=args.out, item_budget_s=6.0 if quick else 20.0,
    )


def _enable_simulator() -> None:
    """Set NUMBA_ENABLE_CUDASIM before Numba loads; refuse when it already loaded without it."""
    if dispatch.cuda_simulated():
        return
    if "numba" in sys.modules:
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise UsageError("--cuda-sim must be given before Numba is imported in this process "
                             "(set NUMBA_ENABLE_CUDASIM=1 instead)")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def _default_out() -> str:
    return f"cnnfast-bench-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"


def main(argv: list[str] | None = None) -> int:
    """``cnnfast bench``: run the benchmarks (or ``--compare`` two reports). Returns the exit code:
    0 ok, 1 a regression flagged by ``--compare``, 2 bad input."""
    try:
        args = _parser().parse_args(argv)
        if args.compare:
            old, new = (load_report(p) for p in args.compare)
            if args.threshold < 0:
                raise UsageError(f"--threshold must be >= 0, got {args.threshold}")
            regressions, text = compare_reports(old, new, args.threshold, args.metric)
            print(text)
            return 1 if regressions else 0
        if args.list:
            for shape_id, set_name in all_shape_ids().items():
                print(f"{set_name:<8} {shape_id}")
            return 0
        options = options_from_args(args)
        if options.cuda_sim:
            _enable_simulator()
        out = options.out or _default_out()
        if out != "-":
            parent = os.path.dirname(os.path.abspath(out))
            if not os.path.isdir(parent):
                raise UsageError(f"--out: directory {parent} does not exist")
    except UsageError as e:
        print(f"cnnfast bench: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help
        return int(e.code or 0)
    report = run_benchmarks(options)
    print(format_table(report))
    if out != "-":
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        os.replace(tmp, out)
        print(f"report written to {out}")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, ConvShape):
        return asdict(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:          # output piped into head
        sys.exit(0)
