"""The paths under test: cnnfast's reference, cpu and cuda kernels, and PyTorch on the CPU and
with cuDNN. Each candidate builds a callable for an op item and a trainer (one model on that path,
for the correctness check and the timed step) for a model spec; :func:`torch_mirror` gives
PyTorch the same model, layer for layer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import cnnfast
from cnnfast import dispatch
from cnnfast.bench.workloads import ConvShape, ModelSpec, OpItem, build_model, record_layers

PATHS = dispatch.KERNEL_PATHS + ("torch", "cudnn")   # cnnfast's kernel paths, then PyTorch


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


class KernelCandidate(Candidate):
    """A cnnfast kernel path: reference, cpu or cuda."""

    def __init__(self, path: str, cuda_sim_allowed: bool = False):
        self.name = self.path = path
        self.device = "cuda" if path == "cuda" else "cpu"
        self.device_kind = "gpu" if path == "cuda" and not dispatch.cuda_simulated() else "cpu"
        self.cuda_sim_allowed = cuda_sim_allowed
        self._kernels_reason: str | None | bool = False   # False: not looked up yet

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

    def _kernels_missing(self) -> str | None:
        """Why this path's kernels cannot be imported here, or None (looked up once)."""
        if self._kernels_reason is False:
            try:
                dispatch.kernels_of(self.path)
                self._kernels_reason = None
            except Exception as e:  # noqa: BLE001 - a missing or broken kernel module
                self._kernels_reason = (f"{self.path} kernels not available "
                                        f"({type(e).__name__}: {e})")
        return self._kernels_reason

    def unavailable_for(self, item) -> str | None:
        simulated = self.path == "cuda" and dispatch.cuda_simulated()
        if isinstance(item, ModelSpec):
            if simulated:
                return "the CUDA simulator runs ops on tiny shapes only, no training steps"
            return self._kernels_missing()
        if simulated and item.set_name != "tiny":
            return "the CUDA simulator runs tiny shapes only"
        return self._kernels_missing()

    def native(self, a):
        return dispatch.to_device(a, self.device)

    def to_numpy(self, a):
        return dispatch.to_device(a, "cpu")

    def sync(self):
        if self.device_kind == "gpu":
            import cupy

            cupy.cuda.runtime.deviceSynchronize()

    def selected(self):
        """The context that runs this path (:func:`cnnfast.dispatch.using_path`)."""
        return dispatch.using_path(self.path)

    def op_fn(self, item, inputs):
        return kernel_call(dispatch.kernels_of(self.path), item, inputs)

    def trainer(self, spec, state):
        return CnnfastTrainer(self, spec, state)


class TorchCandidate(Candidate):
    """PyTorch as the peer: on the CPU (``torch``) or the GPU with cuDNN (``cudnn``)."""

    def __init__(self, name: str = "torch"):
        self.name = name
        self.device_kind = "gpu" if name == "cudnn" else "cpu"
        self.torch = None

    def __getstate__(self):
        # Sent to a worker process without the module: the worker imports torch itself.
        return {**self.__dict__, "torch": None}

    def unavailable(self) -> str | None:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed"
        self.torch = torch
        if self.name == "cudnn" and not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
        return None

    @property
    def dev(self) -> str:
        return "cuda" if self.name == "cudnn" else "cpu"

    def native(self, a):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.dev) if self.dev != "cpu" else t

    def to_numpy(self, a):
        return a.detach().cpu().numpy()

    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def op_fn(self, item, a):
        torch = self.torch
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

    def to_dtype(self, dtype) -> None:
        """Cast the model's parameters and buffers (float64 for the correctness check)."""
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class CnnfastTrainer(Trainer):
    def __init__(self, cand: KernelCandidate, spec: ModelSpec, state: dict):
        from cnnfast import nn, optim

        self.cand = cand
        self.model = build_model(spec.name, spec.stem)
        self.model.load_state_dict(state)
        if cand.device == "cuda":
            self.model.to("cuda")
        self.model.train()
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.records: list | None = None

    def to_dtype(self, dtype):
        self.model.to(dtype=dtype)

    def _tensors(self, x, y):
        return (cnnfast.tensor(x, device=self.cand.device),
                cnnfast.tensor(y, device=self.cand.device))

    def check(self, x, y):
        xt, yt = self._tensors(x, y)
        saved = _set_dropout(self.model, 0.0)
        records: list = []
        try:
            with self.cand.selected(), record_layers(self.model, records):
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
        torch = cand.torch
        self.cand, self.torch = cand, torch
        self.model = torch_mirror(build_model(spec.name, spec.stem))
        own = self.model.state_dict()
        missing = [k for k in state if k not in own]
        if missing:
            raise ValueError(f"the torch mirror lacks {missing[:3]}")
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                   strict=False)
        self.model.to(cand.dev).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def to_dtype(self, dtype):
        self.model.to(dtype=getattr(self.torch, np.dtype(dtype).name))

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


# --- the PyTorch mirror of a cnnfast model --------------------------------------------------------

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
