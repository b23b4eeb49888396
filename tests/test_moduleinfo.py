"""PyTorch's own ModuleInfo samples (``module_db``) through ``cnnfast.nn``: each module is built
with the sample's constructor arguments in both libraries, must have PyTorch's ``state_dict``
keys and shapes, is given PyTorch's initial values, and then forward (training and, where the
modes differ, evaluation), every input and parameter gradient and the updated buffers must match
PyTorch's, in float64 and float32, on the reference and fast CPU paths.

Every sample passes or is listed in :data:`SKIPS` (and then cnnfast must refuse it with a
ValueError/TypeError naming the argument). Deliberate differences are in :data:`TORCH_ONLY_KEYS`.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal needs it

from opinfo_harness import describe  # noqa: E402

import cnnfast  # noqa: E402
from cnnfast import dispatch, nn  # noqa: E402

# torch.nn class name -> the cnnfast module of the same name
NAMES = ["AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AvgPool2d", "AvgPool3d", "BatchNorm1d",
         "BatchNorm2d", "BatchNorm3d", "BCEWithLogitsLoss", "CircularPad1d", "CircularPad2d",
         "CircularPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "Conv2d", "Conv3d",
         "CrossEntropyLoss", "Linear", "LogSoftmax", "MaxPool2d", "MaxPool3d", "ReflectionPad1d",
         "ReflectionPad2d", "ReflectionPad3d", "ReLU", "ReplicationPad1d", "ReplicationPad2d",
         "ReplicationPad3d", "Sigmoid", "Softmax", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d"]

# PyTorch's batch-norm step counter: cnnfast's batch norm uses its fixed momentum only (see
# cnnfast.models.from_torch_state_dict, which drops it too).
TORCH_ONLY_KEYS = ("num_batches_tracked",)

# module name -> [(what the sample has, a word cnnfast's error must contain, the reason)]
def _momentum_none(ctor, fwd) -> bool:
    momentum = ctor.args[2] if len(ctor.args) > 2 else ctor.kwargs.get("momentum", 0.1)
    return momentum is None


SKIPS: dict = {
    f"BatchNorm{n}d": [(_momentum_none, "momentum",
                        "momentum=None (a cumulative average over num_batches_tracked)")]
    for n in (1, 2, 3)
}

TOLERANCES = {np.float64: {"rtol": 1e-7, "atol": 1e-9}, np.float32: {"rtol": 2e-4, "atol": 2e-5}}
TORCH_DTYPES = {np.float64: torch.float64, np.float32: torch.float32}


def _module_infos():
    from torch.testing._internal.common_modules import module_db

    found = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in NAMES}
    assert set(found) == set(NAMES), f"gone from this torch: {set(NAMES) - set(found)}"
    return found


_INFOS = {}


def _info(name):
    if not _INFOS:
        _INFOS.update(_module_infos())
    return _INFOS[name]


def _convert(v, dtype):
    if isinstance(v, torch.Tensor):
        return cnnfast.tensor(v.detach().numpy().copy(), requires_grad=v.requires_grad)
    if isinstance(v, torch.dtype):
        return {torch.float32: np.float32, torch.float64: np.float64}[v]
    if isinstance(v, (list, tuple)):
        return type(v)(_convert(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _convert(x, dtype) for k, x in v.items()}
    return v


def _describe(ctor, fwd) -> str:
    d = describe
    return f"{d(ctor.args)} {d(ctor.kwargs)} -> {d(fwd.args)} {d(fwd.kwargs)}"


def _run(name, sample, dtype) -> tuple[str, str]:
    """('passed' | 'unsupported' | 'failed', message) of one ModuleInput."""
    tol = TOLERANCES[dtype]
    ctor, fwd = sample.constructor_input, sample.forward_input
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(*ctor.args, **ctor.kwargs).to(TORCH_DTYPES[dtype])
    kwargs = dict(_convert(ctor.kwargs, dtype))
    try:
        ours = getattr(nn, name)(*_convert(ctor.args, dtype), **kwargs)
        ours.to(dtype=dtype)
    except (ValueError, TypeError) as e:
        return "unsupported", f"constructor: {type(e).__name__}: {e}"
    expected = {k: v for k, v in theirs.state_dict().items()
                if not k.endswith(TORCH_ONLY_KEYS)}
    got = ours.state_dict()
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    if {k: tuple(v.shape) for k, v in got.items()} != shapes:
        return "failed", f"state_dict {[(k, v.shape) for k, v in got.items()]} != {shapes}"
    ours.load_state_dict({k: v.numpy() for k, v in expected.items()})
    modes = [True, False] if _info(name).train_and_eval_differ else [True]
    for training in modes:
        theirs.train(training)
        ours.train(training)
        t_args = [a.detach().clone().requires_grad_(a.requires_grad)
                  if isinstance(a, torch.Tensor) else a for a in fwd.args]
        t_kwargs = dict(fwd.kwargs)
        if "input" in t_kwargs:  # cnnfast's forward takes its input positionally
            t_args = [t_kwargs.pop("input").detach().clone().requires_grad_()] + t_args
        c_args = _convert(t_args, dtype)
        try:
            y = ours(*c_args, **_convert(t_kwargs, dtype))
        except (ValueError, TypeError) as e:
            return "unsupported", f"forward: {type(e).__name__}: {e}"
        ty = theirs(*t_args, **t_kwargs)
        if isinstance(ty, tuple):  # MaxPool's return_indices
            for a, b in zip(y, ty):
                np.testing.assert_allclose(a.numpy(), b.detach().numpy(), **tol)
            y, ty = y[0], ty[0]
        if tuple(y.shape) != tuple(ty.shape):
            return "failed", f"output shape {y.shape}, PyTorch {tuple(ty.shape)}"
        try:
            np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), **tol)
            for k, v in theirs.state_dict().items():  # running statistics after forward
                if not k.endswith(TORCH_ONLY_KEYS):
                    np.testing.assert_allclose(ours.state_dict()[k], v.numpy(), **tol)
        except AssertionError as e:
            return "failed", f"forward (training={training}): {str(e).strip().splitlines()[0]}"
        if not ty.requires_grad:
            continue
        rng = np.random.default_rng(zlib.crc32(_describe(ctor, fwd).encode()))
        gy = rng.standard_normal(tuple(ty.shape)).astype(dtype)
        ty.backward(torch.from_numpy(gy))
        y.backward(cnnfast.tensor(gy))
        pairs = [(f"input {i}", c, t) for i, (c, t) in enumerate(zip(c_args, t_args))
                 if isinstance(t, torch.Tensor) and t.requires_grad]
        params = dict(theirs.named_parameters())
        pairs += [(n, p, params[n]) for n, p in ours.named_parameters()]
        for what, c, t in pairs:
            want = np.zeros(tuple(t.shape), dtype) if t.grad is None else t.grad.numpy()
            have = np.zeros(tuple(c.shape), dtype) if c.grad is None else c.grad.numpy()
            try:
                np.testing.assert_allclose(have, want, **tol)
            except AssertionError as e:
                return "failed", f"gradient of {what}: {str(e).strip().splitlines()[0]}"
        theirs.zero_grad()
        ours.zero_grad()
    return "passed", ""


def _listed(name, sample):
    for matches, word, reason in SKIPS.get(name, ()):
        if matches(sample.constructor_input, sample.forward_input):
            return word, reason
    return None


@pytest.mark.torch
@pytest.mark.parametrize("path", ["reference", "fast"], ids=["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_module_samples(name, dtype, path):
    info = _info(name)
    torch.manual_seed(0)
    samples = info.module_inputs_func(info, device="cpu", dtype=TORCH_DTYPES[dtype],
                                      requires_grad=True, training=True)
    problems = []
    with dispatch.cpu_path(path):
        for sample in samples:
            status, message = _run(name, sample, dtype)
            listed = _listed(name, sample)
            where = f"{name} {_describe(sample.constructor_input, sample.forward_input)}"
            if listed is None and status != "passed":
                problems.append(f"{where}: {status}: {message}")
            elif listed is not None and (status != "unsupported" or listed[0] not in message):
                problems.append(f"{where}: listed ({listed[1]}) but {status}: {message}")
    assert not problems, f"{len(problems)} of {len(samples)} samples:\n" + "\n".join(problems)
