"""``optimizer_update`` of the kernel contract on every path (reference, cpu, cuda in the
simulator or on a GPU) against PyTorch's optimizers: two steps from fresh state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnfast import dispatch
from cnnfast.testing import assert_close

RULES = ["sgd", "sgd_momentum", "sgd_nesterov", "adam", "adamw"]
HYPER = {"lr": 0.1, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.05,
         "betas": (0.8, 0.95), "eps": 1e-6}


def _torch_steps(torch, rule, p0, grads):
    p = torch.tensor(p0, requires_grad=True)
    h = HYPER
    if rule.startswith("sgd"):
        momentum = 0.0 if rule == "sgd" else h["momentum"]
        opt = torch.optim.SGD([p], lr=h["lr"], momentum=momentum,
                              dampening=0.0 if rule == "sgd_nesterov" else h["dampening"],
                              nesterov=rule == "sgd_nesterov", weight_decay=h["weight_decay"])
    else:
        cls = torch.optim.AdamW if rule == "adamw" else torch.optim.Adam
        opt = cls([p], lr=h["lr"], betas=h["betas"], eps=h["eps"],
                  weight_decay=h["weight_decay"])
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    return p.detach().numpy()


def _kernel_steps(k, rule, p0, grads, device):
    h = HYPER
    p = dispatch.to_device(p0.copy(), device)
    m = dispatch.to_device(np.zeros_like(p0), device) if rule != "sgd" else None
    v = dispatch.to_device(np.zeros_like(p0), device) if rule.startswith("adam") else None
    for t, g in enumerate(grads, start=1):
        g = dispatch.to_device(g, device)
        if rule.startswith("sgd"):
            dampening = 0.0 if rule == "sgd_nesterov" else h["dampening"]
            k.optimizer_update(rule, p, g, m, v, h["lr"], h["momentum"], dampening,
                               h["weight_decay"], 0.0, 1.0, t == 1)
        else:
            b1, b2 = h["betas"]
            wd = h["lr"] * h["weight_decay"] if rule == "adamw" else h["weight_decay"]
            k.optimizer_update(rule, p, g, m, v, h["lr"] / (1 - b1 ** t), b1, b2, wd, h["eps"],
                               math.sqrt(1 - b2 ** t), False)
    return dispatch.to_device(p, "cpu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("path", dispatch.KERNEL_PATHS)
def test_optimizer_update_matches_torch(path, rule, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(RULES.index(rule))
    n = 1000 if path == "cuda" else 40000   # the cpu twin's blocks: more than one
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(2)]
    device = "cuda" if path == "cuda" else "cpu"
    got = _kernel_steps(dispatch.kernels_of(path), rule, p0, grads, device)
    want = _torch_steps(torch, rule, p0, grads)
    assert_close(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12,
                 atol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("path", dispatch.KERNEL_PATHS)
def test_optimizer_update_refuses_an_unknown_rule(path):
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="rule"):
        dispatch.kernels_of(path).optimizer_update("lion", p, p.copy(), None, None, 0.1, 0.0,
                                                   0.0, 0.0, 0.0, 1.0, False)
