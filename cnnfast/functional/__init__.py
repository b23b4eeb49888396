"""The public ops, PyTorch-shaped: validate the arguments, then run an autograd ``Function``.

Every public function checks its inputs first and raises ``ValueError``/``TypeError`` naming the
argument, what it got and what was expected — before any kernel runs. The ``Function`` classes,
one module per op family (the kernels' file names, plus ``pad``, ``linear`` and ``loss``), call
the kernels of the tensor's device through :func:`cnnfast.dispatch.kernels` (the path is fixed
at forward time and reused in backward). Each accepts a ``Tensor`` or a NumPy/CuPy array.
"""

from cnnfast.functional.activation import dropout, log_softmax, relu, sigmoid, softmax
from cnnfast.functional.conv import conv2d, conv2d_relu, conv3d, conv3d_relu
from cnnfast.functional.linear import linear
from cnnfast.functional.loss import binary_cross_entropy_with_logits, cross_entropy
from cnnfast.functional.norm import batch_norm, batch_norm_relu
from cnnfast.functional.pad import pad
from cnnfast.functional.pool import (
    adaptive_avg_pool2d,
    adaptive_avg_pool3d,
    avg_pool2d,
    avg_pool3d,
    max_pool2d,
    max_pool3d,
)

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "avg_pool2d",
    "avg_pool3d",
    "batch_norm",
    "batch_norm_relu",
    "binary_cross_entropy_with_logits",
    "conv2d",
    "conv2d_relu",
    "conv3d",
    "conv3d_relu",
    "cross_entropy",
    "dropout",
    "linear",
    "log_softmax",
    "max_pool2d",
    "max_pool3d",
    "pad",
    "relu",
    "sigmoid",
    "softmax",
]
