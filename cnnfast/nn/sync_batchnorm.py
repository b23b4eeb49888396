"""``SyncBatchNorm``: batch norm whose statistics span every rank of a data-parallel run.

With data parallelism each rank holds a shard of the global batch. Plain batch norm would
normalise each shard by its own statistics, so the result would depend on the number of ranks;
``SyncBatchNorm`` sums per-channel counts, sums and sums of squares over the ranks (forward) and
the two per-channel sums of the gradient (backward), so every rank normalises by the statistics
of the whole global batch, exactly as one process would.

The module knows nothing of MPI: it calls ``group.sum_over_ranks(v)`` on a float64 NumPy vector,
which every rank must call in the same order and which returns the same bits on every rank
(:class:`cnnfast.distributed.Communicator` sums in rank order). Without a group (or with one
rank, or in eval mode) it is an ordinary ``BatchNorm2d``/``BatchNorm3d``.

Statistics are accumulated in float64: ``var = E[x^2] - mean^2`` then loses nothing a float32
result can see for any realistic activation scale.
"""

from __future__ import annotations

import numpy as np

from cnnfast import backend
from cnnfast.nn.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from cnnfast.nn.module import Module
from cnnfast.tensor import Function, Tensor, as_tensor


def _per_channel(v, ndim: int):
    """(C,) -> (1, C, 1, ...) to broadcast against (N, C, *S)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _to_host(a) -> np.ndarray:
    return np.asarray(backend.to_device(a, "cpu"))


class SyncBatchNormFunction(Function):
    """Training-mode batch norm over the global batch. Inputs x (N, C, *S), gamma, beta (C,).

    Forward: one ``sum_over_ranks`` of ``[count, sum x (C), sum x^2 (C)]``; backward: one of
    ``[sum gy (C), sum gy * xhat (C)]``. gamma's and beta's gradients are returned per rank (the
    data-parallel gradient reduction sums them like every other parameter gradient).
    ``running_mean``/``running_var`` (arrays, or None) are updated in place.
    """

    def __init__(self, group, running_mean, running_var, momentum: float, eps: float):
        self.group, self.running_mean, self.running_var = group, running_mean, running_var
        self.momentum, self.eps = momentum, eps

    def forward(self, x, gamma, beta):
        xp = backend.array_xp(x)
        axes = (0,) + tuple(range(2, x.ndim))
        C = x.shape[1]
        xd = x.astype(np.float64)
        local = np.concatenate([[x.size // C], _to_host(xd.sum(axis=axes)),
                                _to_host((xd * xd).sum(axis=axes))])
        total = self.group.sum_over_ranks(local)
        count = total[0]
        if count <= 1:
            raise ValueError(f"SyncBatchNorm: training needs more than one value per channel "
                             f"over all ranks, got {int(count)}")
        mean = total[1:C + 1] / count
        var = np.maximum(total[C + 1:] / count - mean * mean, 0.0)
        invstd = 1.0 / np.sqrt(var + self.eps)
        if self.running_mean is not None:
            m = self.momentum
            unbiased = var * (count / (count - 1))
            self.running_mean[...] = backend.to_device(
                ((1 - m) * _to_host(self.running_mean) + m * mean).astype(x.dtype), self.device)
            self.running_var[...] = backend.to_device(
                ((1 - m) * _to_host(self.running_var) + m * unbiased).astype(x.dtype),
                self.device)
        mean_x = xp.asarray(backend.to_device(mean.astype(x.dtype), self.device))
        invstd_x = xp.asarray(backend.to_device(invstd.astype(x.dtype), self.device))
        xhat = (x - _per_channel(mean_x, x.ndim)) * _per_channel(invstd_x, x.ndim)
        if any(self.needs_input_grad):
            self.xhat, self.gamma, self.invstd, self.count = xhat, gamma, invstd_x, count
        y = xhat * _per_channel(gamma, x.ndim) + _per_channel(beta, x.ndim)
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = backend.array_xp(gy)
        xhat, ndim = self.xhat, gy.ndim
        axes = (0,) + tuple(range(2, ndim))
        gbeta = gy.sum(axis=axes, dtype=np.float64)
        ggamma = (gy * xhat).sum(axis=axes, dtype=np.float64)
        C = gbeta.shape[0]
        total = self.group.sum_over_ranks(np.concatenate([_to_host(gbeta), _to_host(ggamma)]))
        dtype = gy.dtype.type
        g_beta = xp.asarray(backend.to_device(total[:C].astype(gy.dtype), self.device))
        g_gamma = xp.asarray(backend.to_device(total[C:].astype(gy.dtype), self.device))
        # gx = gamma * invstd / M * (M * gy - sum(gy) - xhat * sum(gy * xhat)), sums global
        scale = _per_channel(self.gamma * self.invstd / dtype(self.count), ndim)
        gx = scale * (dtype(self.count) * gy - _per_channel(g_beta, ndim)
                      - xhat * _per_channel(g_gamma, ndim))
        need = self.needs_input_grad
        return (gx.astype(gy.dtype, copy=False) if need[0] else None,
                ggamma.astype(gy.dtype) if need[1] else None,
                gbeta.astype(gy.dtype) if need[2] else None)


class _SyncMixin:
    """forward() of a SyncBatchNorm: the global-batch function in training with a group."""

    group = None

    def forward(self, x):
        group = self.group
        if not self.training or group is None or group.size == 1:
            return super().forward(x)
        x = as_tensor(x, name="SyncBatchNorm input")
        ranks = (2, 3) if self.nd == 1 else (self.nd + 2,)
        if x.ndim not in ranks:
            raise ValueError(f"{type(self).__name__}: input must be "
                             f"{' or '.join(f'{r}-D' for r in ranks)}, got shape {x.shape}")
        C = self.num_features
        if x.shape[1] != C:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[1]} channels, "
                             f"expected {C}")
        xp = x.xp
        gamma = self.weight if self.weight is not None else Tensor(xp.ones(C, x.dtype),
                                                                    device=x.device)
        beta = self.bias if self.bias is not None else Tensor(xp.zeros(C, x.dtype),
                                                               device=x.device)
        rm = None if self.running_mean is None else self.running_mean.data
        rv = None if self.running_var is None else self.running_var.data
        return SyncBatchNormFunction(group, rm, rv, float(self.momentum),
                                     float(self.eps)).apply(x, gamma, beta)


class SyncBatchNorm1d(_SyncMixin, BatchNorm1d):
    """``BatchNorm1d`` with statistics over the global batch of a data-parallel run."""


class SyncBatchNorm2d(_SyncMixin, BatchNorm2d):
    """``BatchNorm2d`` with statistics over the global batch of a data-parallel run."""


class SyncBatchNorm3d(_SyncMixin, BatchNorm3d):
    """``BatchNorm3d`` with statistics over the global batch of a data-parallel run."""


def convert_sync_batchnorm(module: Module, group) -> Module:
    """Turn every ``BatchNorm2d``/``BatchNorm3d`` in ``module`` into its synchronised twin, in
    place (same parameters, buffers and state-dict names), bound to ``group``; returns
    ``module``. Already-converted layers are re-bound to ``group``."""
    for m in module.modules():
        if isinstance(m, BatchNormBase):
            if not isinstance(m, _SyncMixin):
                # Same attributes and registries, only the class changes: state-dict names and
                # checkpoints stay those of plain batch norm.
                synced = {1: SyncBatchNorm1d, 2: SyncBatchNorm2d, 3: SyncBatchNorm3d}[m.nd]
                object.__setattr__(m, "__class__", synced)
            object.__setattr__(m, "group", group)
    return module
