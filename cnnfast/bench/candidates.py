"""Candidates: the paths under test (cnnfast's reference, cpu and cuda kernels; PyTorch on the
CPU and with cuDNN), each able to build a callable for an op item and a trainer for a model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from cnnfast import dispatch
from cnnfast.bench.shapes import ConvShape
from cnnfast.bench.workloads import ModelSpec, OpItem

if TYPE_CHECKING:
    from cnnfast.bench.trainers import Trainer

PATHS = ("reference", "cpu", "cuda", "torch", "cudnn")



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
        from cnnfast.bench.trainers import CnnfastTrainer

        return CnnfastTrainer(self, spec, state)


class TorchCandidate(Candidate):
    """PyTorch as the peer: on the CPU (``torch``) or the GPU with cuDNN (``cudnn``)."""

    def __init__(self, name: str = "torch"):
        self.name = name
        self.device_kind = "gpu" if name == "cudnn" else "cpu"
        self._torch = None

    def __getstate__(self):
        # Sent to a worker process without the module: the worker imports torch itself.
        return {**self.__dict__, "_torch": None}

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
        from cnnfast.bench.trainers import TorchTrainer

        return TorchTrainer(self, spec, state)

