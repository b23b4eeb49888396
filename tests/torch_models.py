"""PyTorch twins of cnnfast's models, for tests only (torch is a test oracle, never a dependency).

``torch_twin(model)`` builds the torch module that computes what a cnnfast ``SmallCNN`` or
``ResNet`` computes, with parameter names such that ``to_torch_state_dict`` fits it strictly: a
SmallCNN keeps cnnfast's names, a ResNet uses torchvision's (``conv1``, ``bn1``, ``downsample``),
which exercises the renaming.
"""

from __future__ import annotations

import torch
from torch import nn as tnn


def _layers(nd: int):
    if nd == 2:
        return tnn.Conv2d, tnn.BatchNorm2d, tnn.MaxPool2d, tnn.AdaptiveAvgPool2d
    return tnn.Conv3d, tnn.BatchNorm3d, tnn.MaxPool3d, tnn.AdaptiveAvgPool3d


class TorchSmallCNN(tnn.Module):
    def __init__(self, in_channels, num_classes, spatial_dims, channels, batch_norm, dropout):
        super().__init__()
        conv, bn, pool, gap = _layers(spatial_dims)
        blocks, c_in = [], in_channels
        for i, c_out in enumerate(channels):
            layers = [conv(c_in, c_out, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(bn(c_out))
            layers.append(tnn.ReLU())
            if i < len(channels) - 1:
                layers.append(pool(2))
            blocks.append(tnn.Sequential(*layers))
            c_in = c_out
        self.features = tnn.Sequential(*blocks)
        self.pool = gap(1)
        self.fc = tnn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TorchBasicBlock(tnn.Module):
    def __init__(self, c_in, c_out, stride, nd):
        super().__init__()
        conv, bn, _, _ = _layers(nd)
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = bn(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = tnn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False),
                                             bn(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    def __init__(self, in_channels, num_classes, spatial_dims, width, stem, blocks=(2, 2, 2, 2)):
        super().__init__()
        conv, bn, pool, gap = _layers(spatial_dims)
        if stem == "small":
            self.conv1 = conv(in_channels, width, 3, padding=1, bias=False)
            self.maxpool = tnn.Identity()
        else:
            self.conv1 = conv(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = pool(3, stride=2, padding=1)
        self.bn1 = bn(width)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            layers = [TorchBasicBlock(c_in, c_out, stride, spatial_dims)]
            layers += [TorchBasicBlock(c_out, c_out, 1, spatial_dims) for _ in range(n - 1)]
            stages.append(tnn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = gap(1)
        self.fc = tnn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torch_twin(model):
    """The torch module equivalent to the cnnfast ``model`` (untrained weights: load them with
    ``load_state_dict(to_torch_state_dict(model, torchvision_names=True))``)."""
    kw = dict(model.config["kwargs"])
    if model.config["name"] == "smallcnn":
        return TorchSmallCNN(kw["in_channels"], kw["num_classes"], kw["spatial_dims"],
                             kw["channels"], kw["batch_norm"], kw["dropout"])
    return TorchResNet(kw["in_channels"], kw["num_classes"], kw["spatial_dims"], kw["width"],
                       kw["stem"], kw.get("blocks", (2, 2, 2, 2)))
