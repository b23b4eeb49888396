"""Models: ``SmallCNN`` and ``resnet18``, for 2D ``(N, C, H, W)`` and 3D ``(N, C, D, H, W)`` input.

Both end in global average pooling and a linear head, so they take any input size that survives
their downsampling, and output logits ``(N, num_classes)`` (binary tasks: 2 classes, softmax +
cross-entropy as in the MedMNIST benchmark; multi-label: one logit per label, sigmoid + BCE).

Every model keeps ``model.config`` = ``{"name": ..., "kwargs": {...}}``, enough for
:func:`build_model` to rebuild it; checkpoints store it so a file knows its architecture.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cnnfast import nn
from cnnfast.tensor import Tensor


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class SmallCNN(nn.Module):
    """Conv-ReLU-pool blocks, then global average pooling and a linear layer.

    ``channels=(8, 16, 32)`` gives: conv3x3(C->8) [BN] ReLU maxpool2, conv3x3(8->16) [BN] ReLU
    maxpool2, conv3x3(16->32) [BN] ReLU, global average pool, linear(32 -> num_classes).
    A ``(N, C, 28, 28)`` input becomes ``(N, 8, 14, 14)``, ``(N, 16, 7, 7)``, ``(N, 32, 7, 7)``,
    ``(N, 32)``, ``(N, num_classes)``. Batch norm (on by default) makes short training runs stable.
    ``seed`` fixes the initial weights (``None``: the global generator of
    ``cnnfast.manual_seed``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2,
                 channels: Sequence[int] = (8, 16, 32), batch_norm: bool = True,
                 dropout: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        channels = [int(c) for c in channels]
        if not channels:
            raise ValueError("channels must name at least one block")
        _check_positive(**{f"channels[{i}]": c for i, c in enumerate(channels)})
        conv, bn, pool, gap = _layers(spatial_dims)
        rng = np.random.default_rng(seed) if seed is not None else None
        self.config = {"name": "smallcnn", "kwargs": {
            "in_channels": int(in_channels), "num_classes": int(num_classes),
            "spatial_dims": int(spatial_dims), "channels": channels,
            "batch_norm": bool(batch_norm), "dropout": float(dropout)}}
        self.spatial_dims = spatial_dims
        blocks = []
        c_in = in_channels
        for i, c_out in enumerate(channels):
            layers = [conv(c_in, c_out, 3, padding=1, bias=not batch_norm, rng=rng)]
            if batch_norm:
                layers.append(bn(c_out))
            layers.append(nn.ReLU())
            if i < len(channels) - 1:
                layers.append(pool(2))
            blocks.append(nn.Sequential(*layers))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = gap(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout, rng=rng) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes, rng=rng)

    @property
    def first_conv(self):
        return self.features[0][0]

    def forward(self, x):
        """``(N, C, *S)`` -> logits ``(N, num_classes)``."""
        return self.fc(self.dropout(self.flatten(self.pool(self.features(x)))))

    def feature_maps(self, x) -> list[tuple[str, Tensor]]:
        """Each block's activations after its ReLU (before pooling), for plots:
        ``[(name, (N, K, *S')), ...]``."""
        maps = []
        for i, block in enumerate(self.features):
            for layer in block:
                x = layer(x)
                if isinstance(layer, nn.ReLU):
                    maps.append((f"block {i + 1} (conv-ReLU)", x))
        return maps


def _relu_after(layer, x, relu):
    """relu(layer(x)), as one fused op when the layer offers it (cnnfast's convolutions and
    batch norms: fewer kernel launches on cuda); a PyTorch mirror's layer runs unfused."""
    fused = getattr(layer, "forward_relu", None)
    return fused(x) if fused is not None else relu(layer(x))


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the input (through a 1x1
    strided conv + BN when the shape changes), then ReLU. ``(N, C, *S) -> (N, K, *S/stride)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, spatial_dims: int,
                 rng=None) -> None:
        super().__init__()
        conv, bn, _, _ = _layers(spatial_dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False,
                          rng=rng)
        self.bn1 = bn(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False, rng=rng)
        self.bn2 = bn(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng),
                bn(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = _relu_after(self.bn1, self.conv1(x), self.relu)
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks, 2D or 3D.

    ``stem="small"`` (MedMNIST's ResNet-18 (28)): conv3x3 stride 1 + BN + ReLU, no max-pool, so
    28-pixel inputs keep their resolution into the first stage. ``stem="imagenet"`` (MedMNIST's
    ResNet-18 (224), torchvision's stem): conv7x7 stride 2 + BN + ReLU + maxpool3x3 stride 2.
    Stages of ``blocks`` basic blocks with ``width * (1, 2, 4, 8)`` channels and strides
    ``(1, 2, 2, 2)``, then global average pooling and a linear head. For a 28x28 input with the
    small stem the stages output 28, 14, 7, 4 pixels.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2,
                 blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, stem: str = "small",
                 seed: int | None = None, name: str = "resnet") -> None:
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
        if stem not in ("small", "imagenet"):
            raise ValueError(f"stem must be 'small' or 'imagenet', got {stem!r}")
        conv, bn, pool, gap = _layers(spatial_dims)
        rng = np.random.default_rng(seed) if seed is not None else None
        blocks = [int(b) for b in blocks]
        self.config = {"name": name, "kwargs": {
            "in_channels": int(in_channels), "num_classes": int(num_classes),
            "spatial_dims": int(spatial_dims), "width": int(width), "stem": stem}}
        if name == "resnet":
            self.config["kwargs"]["blocks"] = blocks
        self.spatial_dims = spatial_dims
        if stem == "small":
            self.stem = nn.Sequential(conv(in_channels, width, 3, padding=1, bias=False, rng=rng),
                                      bn(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(conv(in_channels, width, 7, stride=2, padding=3, bias=False,
                                           rng=rng),
                                      bn(width), nn.ReLU(), pool(3, stride=2, padding=1))
        stages = []
        c_in = width
        for i, n_blocks in enumerate(blocks):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(c_in, c_out, stride, spatial_dims, rng)]
            layers += [BasicBlock(c_out, c_out, 1, spatial_dims, rng) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = gap(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes, rng=rng)

    @property
    def first_conv(self):
        return self.stem[0]

    def forward(self, x):
        """``(N, C, *S)`` -> logits ``(N, num_classes)``."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))

    def feature_maps(self, x) -> list[tuple[str, Tensor]]:
        """The stem's and each stage's output for input ``x``, for plots."""
        maps = [("stem", self.stem(x))]
        x = maps[0][1]
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            x = stage(x)
            maps.append((f"layer{i + 1}", x))
        return maps


def resnet18(in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2,
             stem: str = "small", width: int = 64, seed: int | None = None) -> ResNet:
    """ResNet-18 as in the MedMNIST v2 benchmark (2D, or 3D with every conv 3D).

    ``stem="small"`` for 28-pixel inputs (3x3 stride-1 stem, no max-pool), ``"imagenet"`` for
    larger images (7x7 stride-2 + max-pool). ``width`` (64 in ResNet-18) scales every stage;
    small widths are for tests.
    """
    return ResNet(in_channels, num_classes, spatial_dims, (2, 2, 2, 2), width, stem, seed,
                  name="resnet18")


MODELS = {"smallcnn": SmallCNN, "resnet18": resnet18, "resnet": ResNet}


def build_model(config: dict) -> nn.Module:
    """A fresh model from ``{"name": ..., "kwargs": {...}}`` (a model's ``config``)."""
    name = config.get("name") if isinstance(config, dict) else None
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    try:
        return MODELS[name](**config.get("kwargs", {}))
    except TypeError as exc:
        raise ValueError(f"bad arguments for model {name!r}: {exc}") from None


# --- PyTorch state dicts ------------------------------------------------------------------------

# torchvision's ResNet names the stem and the projection shortcut differently; everything else
# (layer1.0.conv1.weight, bn running statistics, fc.*) is named alike.
_TORCHVISION_RESNET_NAMES = (("stem.0.", "conv1."), ("stem.1.", "bn1."),
                             (".shortcut.", ".downsample."))
_TORCH_ONLY_SUFFIX = ".num_batches_tracked"  # batch-norm step counter cnnfast does not keep


def _as_numpy(value, name: str) -> np.ndarray:
    """A NumPy copy of a torch tensor (any device, requiring grad or not) or an array-like."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    try:
        return np.array(value, copy=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"state dict entry {name!r}: expected a torch tensor or a NumPy array, "
                        f"got {type(value).__name__} ({exc})") from None


def _rename(name: str, model: nn.Module, to_torchvision: bool) -> str:
    """A ResNet entry's name in torchvision's naming (or back); other models' names unchanged.
    Prefixes (``stem.0.``) match only at the start, infixes (``.shortcut.``) anywhere."""
    if not isinstance(model, ResNet):
        return name
    for ours, theirs in _TORCHVISION_RESNET_NAMES:
        old, new = (ours, theirs) if to_torchvision else (theirs, ours)
        if old.startswith("."):
            name = name.replace(old, new)
        elif name.startswith(old):
            name = new + name[len(old):]
    return name


def from_torch_state_dict(model: nn.Module, state_dict, strict: bool = True) -> nn.Module:
    """Load a PyTorch ``state_dict`` (name -> ``torch.Tensor`` or NumPy array) into ``model``.

    Names are cnnfast's (``model.state_dict()``'s keys); for a ResNet, torchvision's names
    (``conv1``/``bn1`` for the stem, ``downsample`` for the projection shortcut) are accepted as
    well. PyTorch's ``*.num_batches_tracked`` counters are dropped (cnnfast's batch norm uses a
    fixed momentum). Tensors may live on any torch device and require grad; torch itself is never
    imported here. Everything is checked before anything is written (see
    :meth:`cnnfast.nn.Module.load_state_dict`): a missing, unexpected or mis-shaped entry raises
    ``ValueError`` and leaves the model untouched. Returns ``model``.
    """
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict: expected a mapping of name -> tensor, got "
                        f"{type(state_dict).__name__}")
    converted = {}
    for name, value in state_dict.items():
        if str(name).endswith(_TORCH_ONLY_SUFFIX):
            continue
        converted[_rename(str(name), model, to_torchvision=False)] = _as_numpy(value, str(name))
    model.load_state_dict(converted, strict=strict)
    return model


def to_torch_state_dict(model: nn.Module, torchvision_names: bool = False,
                        as_numpy: bool = False) -> dict:
    """``model``'s parameters and buffers as a PyTorch ``state_dict`` for the equivalent torch
    module: ``{name: torch.Tensor}`` (CPU copies), with a ``num_batches_tracked`` counter (0)
    beside each batch norm's running statistics so ``torch_module.load_state_dict(sd)`` is strict-
    clean. ``torchvision_names=True`` renames a ResNet's entries to torchvision's (``conv1``,
    ``bn1``, ``downsample``). ``as_numpy=True`` returns NumPy arrays and needs no torch; otherwise
    torch is imported now (``ImportError`` with a hint when it is missing).
    """
    state = {}
    for name, value in model.state_dict().items():
        if torchvision_names:
            name = _rename(name, model, to_torchvision=True)
        state[name] = value
        if name.endswith(".running_var"):
            state[name[:-len(".running_var")] + _TORCH_ONLY_SUFFIX] = np.array(0, np.int64)
    if as_numpy:
        return state
    try:
        import torch
    except ImportError:
        raise ImportError("to_torch_state_dict needs PyTorch (pip install torch), or pass "
                          "as_numpy=True for NumPy arrays") from None
    return {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in state.items()}
