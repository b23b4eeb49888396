"""Modules, losses and initialisation, PyTorch-shaped."""

from cnnfast.nn import init
from cnnfast.nn.layers import (
                               AdaptiveAvgPool2d,
                               AdaptiveAvgPool3d,
                               AvgPool2d,
                               AvgPool3d,
                               BatchNorm2d,
                               BatchNorm3d,
                               ConstantPad,
                               Conv2d,
                               Conv3d,
                               Dropout,
                               Flatten,
                               Identity,
                               Linear,
                               MaxPool2d,
                               MaxPool3d,
                               ReLU,
                               Sequential,
                               Sigmoid,
)
from cnnfast.nn.loss import BCEWithLogitsLoss, CrossEntropyLoss
from cnnfast.nn.module import Module, Parameter

__all__ = [
                               "AdaptiveAvgPool2d",
                               "AdaptiveAvgPool3d",
                               "AvgPool2d",
                               "AvgPool3d",
                               "BCEWithLogitsLoss",
                               "BatchNorm2d",
                               "BatchNorm3d",
                               "Conv2d",
                               "ConstantPad",
                               "Conv3d",
                               "CrossEntropyLoss",
                               "Dropout",
                               "Flatten",
                               "Identity",
                               "Linear",
                               "MaxPool2d",
                               "MaxPool3d",
                               "Module",
                               "Parameter",
                               "ReLU",
                               "Sequential",
                               "Sigmoid",
                               "init",
]
