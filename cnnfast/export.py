"""ONNX export: a cnnfast model as an ONNX graph that takes raw images and returns probabilities.

The graph is built node by node with ``onnx.helper`` from cnnfast's own modules (no PyTorch, no
tracing): each module type has one converter below that emits its ONNX nodes and tracks the
activation shape, so layers whose ONNX form needs a fixed size (average pooling in ceil mode or
with a divisor override) get their constants at export time.

What the exported graph does, for ``images`` ``(N, C, *S)`` float32 as the ``.npz`` stores them
(0-255 for MedMNIST; ``N`` is a dynamic axis):

1. the checkpoint's normalisation, ``(x * scale - mean) / std`` (the same float32 ops as
   :class:`cnnfast.data.Normalization`);
2. the model in evaluation mode (batch norm uses its running statistics, dropout is off);
3. class probabilities ``(N, K)``: softmax over classes, or a sigmoid per label for multi-label
   tasks, as ``cnnfast evaluate`` scores them.

The model's metadata (``metadata_props``) holds ``label_names`` and ``normalization`` (JSON),
``task``, ``model`` (the cnnfast config, JSON), ``input_layout`` and ``cnnfast_version``.
``onnx`` is imported only when an export runs; ``pip install "cnnfast[onnx]"`` brings it and
onnxruntime.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cnnfast import nn
from cnnfast._io import atomic_write
from cnnfast.models import BasicBlock, ResNet, SmallCNN
from cnnfast.shapes import output_size

DEFAULT_OPSET = 17


class ExportError(ValueError):
    """The model (or an argument) cannot be expressed as the ONNX graph asked for."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError('ONNX export needs the onnx package: pip install "cnnfast[onnx]"'
                          ) from None
    return onnx


class _Graph:
    """Nodes, initializers and fresh names for one export; ``shape`` is the activation's
    ``(C, *S)`` (the batch axis is dynamic and not tracked)."""

    def __init__(self, onnx):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array) -> str:
        """A float32 (or given-dtype) initializer; returns its name."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array),
                                                                   name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _param(t) -> np.ndarray:
    return None if t is None else np.asarray(t.numpy(), dtype=np.float32)


def _tuple(value, nd: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * nd


# --- converters: (graph, module, x, shape) -> (x, shape) ---------------------------------------

def _conv(g: _Graph, m, x: str, shape):
    w = _param(m.weight)
    nd = w.ndim - 2
    stride, padding = _tuple(m.stride, nd), _tuple(m.padding, nd)
    dilation = _tuple(m.dilation, nd)
    inputs = [x, g.const("conv_w", w)] + ([g.const("conv_b", _param(m.bias))]
                                          if m.bias is not None else [])
    y = g.node("Conv", inputs, kernel_shape=list(w.shape[2:]), strides=list(stride),
               pads=list(padding) * 2, dilations=list(dilation), group=int(m.groups))
    spatial = output_size(shape[1:], w.shape[2:], stride, padding, dilation)
    return y, (w.shape[0],) + spatial


def _batch_norm(g: _Graph, m, x: str, shape):
    c = m.num_features
    scale = _param(m.weight) if m.weight is not None else np.ones(c, np.float32)
    bias = _param(m.bias) if m.bias is not None else np.zeros(c, np.float32)
    if m.running_mean is None:
        raise ExportError(f"{type(m).__name__} without running statistics cannot be exported "
                          f"(evaluation mode needs them)")
    y = g.node("BatchNormalization",
               [x, g.const("bn_scale", scale), g.const("bn_bias", bias),
                g.const("bn_mean", _param(m.running_mean)), g.const("bn_var",
                                                                    _param(m.running_var))],
               epsilon=float(m.eps))
    return y, shape


def _pool_args(m, nd: int):
    kernel = _tuple(m.kernel_size, nd)
    stride = kernel if m.stride is None else _tuple(m.stride, nd)
    padding = _tuple(m.padding, nd)
    return kernel, stride, padding


def _max_pool(g: _Graph, m, x: str, shape):
    nd = len(shape) - 1
    kernel, stride, padding = _pool_args(m, nd)
    dilation = _tuple(getattr(m, "dilation", 1), nd)
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    if getattr(m, "return_indices", False):
        raise ExportError("MaxPool with return_indices=True returns two tensors; only a model "
                          "whose layers each return one tensor can be exported")
    y = g.node("MaxPool", [x], kernel_shape=list(kernel), strides=list(stride),
               pads=list(padding) * 2, dilations=list(dilation), ceil_mode=int(ceil_mode))
    return y, shape[:1] + output_size(shape[1:], kernel, stride, padding, dilation, ceil_mode)


def _avg_pool(g: _Graph, m, x: str, shape):
    nd = len(shape) - 1
    kernel, stride, padding = _pool_args(m, nd)
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    include_pad = bool(getattr(m, "count_include_pad", True))
    divisor_override = getattr(m, "divisor_override", None)
    out = output_size(shape[1:], kernel, stride, padding, None, ceil_mode)
    if not ceil_mode and divisor_override is None:
        y = g.node("AveragePool", [x], kernel_shape=list(kernel), strides=list(stride),
                   pads=list(padding) * 2, count_include_pad=int(include_pad))
        return y, shape[:1] + out
    # Runtimes disagree on divisors in ceil mode, so spell it out: zero-pad so that every window
    # lies inside (the ceil-mode overhang included), take window sums (mean * window size) and
    # divide by cnnfast's own divisor map, a constant for this input size.
    from cnnfast.shapes import avg_pool_divisor

    extra = [max(0, (o - 1) * st + k - (s + 2 * p))
             for s, k, st, p, o in zip(shape[1:], kernel, stride, padding, out)]
    pads = [0, 0] + list(padding) + [0, 0] + [p + e for p, e in zip(padding, extra)]
    padded = g.node("Pad", [x, g.const("pads", np.array(pads, np.int64))], mode="constant")
    mean = g.node("AveragePool", [padded], kernel_shape=list(kernel), strides=list(stride))
    divisor = avg_pool_divisor(shape[1:], kernel, stride, padding, out, include_pad,
                               divisor_override)
    scale = (math.prod(kernel) / divisor).astype(np.float32)
    y = g.node("Mul", [mean, g.const("avg_scale", scale[None, None])])
    return y, shape[:1] + out


def _adaptive_avg_pool(g: _Graph, m, x: str, shape):
    nd = len(shape) - 1
    size = _tuple(m.output_size, nd)
    if all(o == 1 for o in size):
        return g.node("GlobalAveragePool", [x]), shape[:1] + size
    if any(s % o for s, o in zip(shape[1:], size)):
        raise ExportError(f"adaptive average pooling from {shape[1:]} to {size} has unequal bins; "
                          f"only equal bins (input size divisible by output size) are exported")
    kernel = [s // o for s, o in zip(shape[1:], size)]
    return g.node("AveragePool", [x], kernel_shape=kernel, strides=kernel), shape[:1] + size


def _linear(g: _Graph, m, x: str, shape):
    w = _param(m.weight)
    inputs = [x, g.const("fc_w", w)] + ([g.const("fc_b", _param(m.bias))]
                                        if m.bias is not None else [])
    return g.node("Gemm", inputs, transB=1), (w.shape[0],)


def _flatten(g: _Graph, m, x: str, shape):
    if m.start_dim != 1 or m.end_dim != -1:
        raise ExportError(f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}): only "
                          f"Flatten(1, -1) is exported")
    return g.node("Flatten", [x], axis=1), (math.prod(shape),)


def _constant_pad(g: _Graph, m, x: str, shape):
    pads = [int(p) for p in m.padding]
    rank = len(shape) + 1  # with the batch axis
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):  # F.pad order: last axis first, (left, right) pairs
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    y = g.node("Pad", [x, g.const("pads", np.array(begin + end, np.int64)),
                       g.const("pad_value", np.float32(m.value))], mode="constant")
    full = (0,) + tuple(shape)
    return y, tuple(s + b + e for s, b, e in zip(full, begin, end))[1:]


def _sequential(g: _Graph, m, x: str, shape):
    for child in m:
        x, shape = _convert(g, child, x, shape)
    return x, shape


def _basic_block(g: _Graph, m: BasicBlock, x: str, shape):
    out, out_shape = _sequential(g, [m.conv1, m.bn1, m.relu, m.conv2, m.bn2], x, shape)
    short, _ = _convert(g, m.shortcut, x, shape)
    return g.node("Relu", [g.node("Add", [out, short])]), out_shape


def _small_cnn(g: _Graph, m: SmallCNN, x: str, shape):
    return _sequential(g, [m.features, m.pool, m.flatten, m.dropout, m.fc], x, shape)


def _resnet(g: _Graph, m: ResNet, x: str, shape):
    return _sequential(g, [m.stem, m.layer1, m.layer2, m.layer3, m.layer4, m.pool, m.flatten,
                           m.fc], x, shape)


def _identity(g: _Graph, m, x: str, shape):
    return x, shape


def _unary(op: str):
    def convert(g: _Graph, m, x: str, shape):
        return g.node(op, [x]), shape
    return convert


_CONVERTERS = [
    (SmallCNN, _small_cnn), (ResNet, _resnet), (BasicBlock, _basic_block),
    (nn.Sequential, _sequential), ((nn.Conv2d, nn.Conv3d), _conv),
    ((nn.BatchNorm2d, nn.BatchNorm3d), _batch_norm), ((nn.MaxPool2d, nn.MaxPool3d), _max_pool),
    ((nn.AvgPool2d, nn.AvgPool3d), _avg_pool),
    ((nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), _adaptive_avg_pool), (nn.Linear, _linear),
    (nn.Flatten, _flatten), (nn.ConstantPad, _constant_pad), (nn.ReLU, _unary("Relu")),
    (nn.Sigmoid, _unary("Sigmoid")),
    ((nn.Identity, nn.Dropout), _identity),
]


def _convert(g: _Graph, module, x: str, shape):
    if isinstance(module, list):
        return _sequential(g, module, x, shape)
    for types, converter in _CONVERTERS:
        if isinstance(module, types):
            return converter(g, module, x, tuple(int(s) for s in shape))
    raise ExportError(f"cannot export a {type(module).__name__} module to ONNX (supported: "
                      f"SmallCNN, ResNet and the nn layers they are built from)")


# --- public API ---------------------------------------------------------------------------------

def _normalization_dict(normalization) -> dict | None:
    if normalization is None:
        return None
    if hasattr(normalization, "to_dict"):
        return normalization.to_dict()
    if isinstance(normalization, dict) and {"scale", "mean", "std"} <= set(normalization):
        return {k: float(normalization[k]) for k in ("scale", "mean", "std")}
    raise ExportError(f"normalization: expected a cnnfast.data.Normalization or a dict with "
                      f"scale, mean and std, got {normalization!r}")


def build_onnx(model: nn.Module, input_shape: Sequence[int], *, normalization=None,
               task: str | None = None, label_names: Sequence[str] | None = None,
               opset: int = DEFAULT_OPSET, output: str = "probabilities"):
    """The ``onnx.ModelProto`` of ``model`` for raw images of shape ``(N, *input_shape)``.

    ``input_shape`` is ``(C, *S)`` (``N`` stays dynamic). ``normalization``: a
    :class:`~cnnfast.data.Normalization` (or its dict) applied inside the graph, ``None`` for
    none. ``task`` decides the output: softmax, or sigmoid for multi-label
    (``"multi-label, binary-class"``); ``output="logits"`` returns the logits instead.
    """
    onnx = _onnx()
    from cnnfast._version import __version__
    from cnnfast.dataset import MULTILABEL

    input_shape = tuple(int(s) for s in input_shape)
    spatial_dims = getattr(model, "spatial_dims", None)
    if len(input_shape) not in (3, 4) or min(input_shape) < 1:
        raise ExportError(f"input_shape must be (C, H, W) or (C, D, H, W) positive ints, got "
                          f"{input_shape}")
    if spatial_dims is not None and len(input_shape) != spatial_dims + 1:
        raise ExportError(f"input_shape {input_shape} does not fit a {spatial_dims}D model "
                          f"(expected {spatial_dims + 1} entries: C and {spatial_dims} sizes)")
    if not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ExportError(f"opset must be an int >= {DEFAULT_OPSET}, got {opset!r}")
    if output not in ("probabilities", "logits"):
        raise ExportError(f"output must be 'probabilities' or 'logits', got {output!r}")
    norm = _normalization_dict(normalization)
    g = _Graph(onnx)
    x = "images"
    if norm is not None:
        x = g.node("Mul", [x, g.const("scale", np.float32(norm["scale"]))], "scaled")
        x = g.node("Sub", [x, g.const("mean", np.float32(norm["mean"]))], "centred")
        x = g.node("Div", [x, g.const("std", np.float32(norm["std"]))], "normalized")
    logits, out_shape = _convert(g, model, x, input_shape)
    if len(out_shape) != 1:
        raise ExportError(f"the model's output has shape (N, {out_shape}); expected (N, K)")
    if output == "logits":
        final = logits
    elif task == MULTILABEL:
        final = g.node("Sigmoid", [logits])
    else:
        final = g.node("Softmax", [logits], axis=1)
    g.nodes.append(onnx.helper.make_node("Identity", [final], [output], name=output))
    classes = out_shape[0]
    if label_names is not None and len(label_names) != classes:
        raise ExportError(f"label_names has {len(label_names)} entries but the model has "
                          f"{classes} outputs")
    graph = onnx.helper.make_graph(
        g.nodes, f"cnnfast_{getattr(model, 'config', {}).get('name', type(model).__name__)}",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                            ["N", *input_shape])],
        [onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, ["N", classes])],
        initializer=g.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="cnnfast", producer_version=str(__version__))
    meta = {
        "cnnfast_version": str(__version__),
        "label_names": json.dumps(list(label_names) if label_names is not None
                                  else [str(i) for i in range(classes)]),
        "task": str(task or ""),
        "normalization": json.dumps(norm),
        "model": json.dumps(getattr(model, "config", {"name": type(model).__name__})),
        "input_layout": "N x C x " + " x ".join("DHW"[-(len(input_shape) - 1):])
                        + " float32, raw pixel values as stored in the .npz",
        "output": output,
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *,
                normalization=None, task: str | None = None,
                label_names: Sequence[str] | None = None, opset: int = DEFAULT_OPSET,
                output: str = "probabilities") -> Path:
    """Write ``model`` as an ONNX file (atomically) and return its path.

    ``input_shape`` ``(C, *S)``; ``normalization`` (applied inside the graph), ``task`` (softmax
    or sigmoid output) and ``label_names`` (stored in the metadata) as in :func:`build_onnx`.
    The graph passes ``onnx.checker`` before anything is written.

        export_onnx(model, "model.onnx", (1, 28, 28), normalization=Normalization.medmnist(2),
                    task="binary-class", label_names=["normal", "pneumonia"])
    """
    proto = build_onnx(model, input_shape, normalization=normalization, task=task,
                       label_names=label_names, opset=opset, output=output)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(proto.SerializeToString())
    return path
