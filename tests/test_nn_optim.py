"""Modules (registration, state dicts, modes, devices), optimizers and schedules against PyTorch,
and a small CNN learning a generated two-class image task end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cnnfast
from cnnfast import functional as F
from cnnfast import nn, optim
from cnnfast.testing import assert_close


def _torch():
    return pytest.importorskip("torch")


def small_net(nd: int = 2) -> nn.Module:
    conv, bn, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if nd == 2
                      else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d))
    gap = nn.AdaptiveAvgPool2d(1) if nd == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(), pool(2),
                         conv(4, 8, 3, padding=1), nn.ReLU(), gap, nn.Flatten(), nn.Linear(8, 1))


def test_parameters_and_buffers_are_registered():
    net = small_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias",
                     "8.weight", "8.bias"]
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var"]
    assert net.num_parameters() == 4 * 9 + 4 + 4 + 4 + 8 * 4 * 9 + 8 + 8 + 1


def test_state_dict_round_trip_and_refusals():
    cnnfast.manual_seed(0)
    a, b = small_net(), small_net()
    assert not np.array_equal(a.state_dict()["0.weight"], b.state_dict()["0.weight"])
    b.load_state_dict(a.state_dict())
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(va, vb, err_msg=k)

    before = b.state_dict()
    broken = dict(a.state_dict())
    broken["0.weight"] = np.zeros((4, 1, 5, 5), np.float32)
    broken["extra.weight"] = np.zeros(3, np.float32)
    del broken["8.bias"]
    with pytest.raises(ValueError) as info:
        b.load_state_dict(broken)
    message = str(info.value)
    for words in ("missing keys ['8.bias']", "unexpected keys ['extra.weight']",
                  "'0.weight' has shape (4, 1, 5, 5), expected (4, 1, 3, 3)"):
        assert words in message
    for k, v in b.state_dict().items():  # nothing was half-loaded
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_train_eval_switches_batch_norm_statistics(rng):
    net = nn.Sequential(nn.BatchNorm2d(2))
    x = cnnfast.tensor(rng.standard_normal((4, 2, 3, 3)).astype(np.float32) * 3 + 5)
    net.train()
    y = net(x).numpy()
    assert abs(y.mean()) < 1e-5  # batch statistics
    assert_close(net[0].running_mean, 0.1 * x.numpy().mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    net.eval()
    assert not net[0].training
    y_eval = net(x).numpy()
    assert y_eval.mean() > 1  # running statistics are still near (0, 1)


def test_module_to_cuda_and_back(rng):
    net = small_net()
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    expected = net(cnnfast.tensor(x)).numpy()
    net.to("cuda")
    assert all(p.device == "cuda" for p in net.parameters())
    got = net(cnnfast.tensor(x, device="cuda"))
    assert got.device == "cuda"
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    net.to("cpu")
    assert all(p.device == "cpu" for p in net.parameters())


@pytest.mark.parametrize("kind", ["sgd", "sgd-momentum", "sgd-nesterov-wd", "adam", "adamw"])
def test_optimizers_match_torch(kind, rng):
    t = _torch()
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    ours_p = nn.Parameter(w0.copy())
    theirs_p = t.nn.Parameter(t.tensor(w0.copy()))
    make = {
        "sgd": (lambda p: optim.SGD([p], lr=0.1), lambda p: t.optim.SGD([p], lr=0.1)),
        "sgd-momentum": (lambda p: optim.SGD([p], lr=0.1, momentum=0.9),
                         lambda p: t.optim.SGD([p], lr=0.1, momentum=0.9)),
        "sgd-nesterov-wd": (
            lambda p: optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
            lambda p: t.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        "adam": (lambda p: optim.Adam([p], lr=0.01, weight_decay=1e-3),
                 lambda p: t.optim.Adam([p], lr=0.01, weight_decay=1e-3)),
        "adamw": (lambda p: optim.AdamW([p], lr=0.01, weight_decay=0.1),
                  lambda p: t.optim.AdamW([p], lr=0.01, weight_decay=0.1)),
    }[kind]
    ours, theirs = make[0](ours_p), make[1](theirs_p)
    for g in grads:
        ours_p.grad = cnnfast.tensor(g)
        theirs_p.grad = t.tensor(g)
        ours.step()
        theirs.step()
    assert_close(ours_p, theirs_p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    p = nn.Parameter(np.zeros(1, np.float32))
    opt = optim.Adam([p], lr=1e-3)
    sched = optim.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert np.allclose(lrs, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    opt = optim.SGD([p], lr=1.0)
    cos = optim.CosineAnnealingLR(opt, T_max=4)
    values = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        cos.step()
        values.append(opt.param_groups[0]["lr"])
    assert np.allclose(values, [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(5)])


def test_optimizer_bad_input():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="requires_grad"):
        optim.SGD([cnnfast.tensor([1.0])], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optim.Adam([nn.Parameter(np.zeros(1, np.float32))], lr=-1)


def test_layer_bad_input():
    with pytest.raises(ValueError, match="groups=3"):
        nn.Conv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="in_channels"):
        nn.Conv3d(0, 6, 3)
    with pytest.raises(ValueError, match="4-D"):
        nn.BatchNorm2d(3)(cnnfast.tensor(np.zeros((2, 3, 4, 4, 4), np.float32)))


def _two_class_images(rng, n: int):
    """Class 1 has a bright 3x3 blob at a random place, class 0 a dark one, on noise."""
    x = rng.normal(0, 0.3, (n, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(1, 9, 2)
        x[i, 0, r:r + 3, c:c + 3] += 1.5 if y[i] else -1.5
    return x, y.astype(np.float32)[:, None]


@pytest.mark.parametrize("cpu", ["reference", "fast"])
def test_small_cnn_learns_a_two_class_task(cpu):
    rng = np.random.default_rng(0)
    cnnfast.manual_seed(0)
    x, y = _two_class_images(rng, 256)
    net = small_net()
    opt = optim.Adam(net.parameters(), lr=0.01)
    losses = []
    with cnnfast.cpu_path(cpu):
        for _epoch in range(6):
            for i in range(0, 256, 32):
                loss = F.binary_cross_entropy_with_logits(net(x[i:i + 32]), y[i:i + 32])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        net.eval()
        x_test, y_test = _two_class_images(rng, 128)
        with cnnfast.no_grad():
            accuracy = ((net(x_test).numpy() > 0) == (y_test > 0.5)).mean()
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert accuracy > 0.9


def test_training_step_on_cuda_matches_reference(rng):
    """One full step (forward, backward, SGD) of a tiny CNN on the cuda path vs the reference."""
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    y = np.array([[1.0], [0.0]], np.float32)
    results = []
    for device, cpu in (("cpu", "reference"), ("cuda", "fast")):
        cnnfast.manual_seed(3)
        net = small_net().to(device)
        opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        with cnnfast.cpu_path(cpu):
            loss = F.binary_cross_entropy_with_logits(net(cnnfast.tensor(x, device=device)),
                                                      cnnfast.tensor(y, device=device))
            loss.backward()
            opt.step()
        results.append((loss.item(), net.to("cpu").state_dict()))
    assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6, name="loss")
    for k in results[0][1]:
        assert_close(results[1][1][k], results[0][1][k], rtol=1e-4, atol=1e-5, name=k)


def test_sequential_fusion_is_explicit_and_keeps_instance_forward_overrides():
    """A profiler's forward installed on the instance runs inside Sequential (it used to be
    skipped: the conv was fused with the ReLU after it); ``fuse_relu=False`` turns fusion off."""
    conv = nn.Conv2d(1, 2, 3, rng=np.random.default_rng(0))
    seq = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU())
    assert seq.fused_pairs() == [0, 3]
    assert nn.Sequential(*seq, fuse_relu=False).fused_pairs() == []
    x = cnnfast.tensor(np.random.default_rng(1).standard_normal((2, 1, 5, 5)).astype(np.float32))
    expected = seq(x).numpy()
    calls = []

    def counted(inp, _m=conv):
        calls.append(inp.shape)
        return type(_m).forward(_m, inp)

    object.__setattr__(conv, "forward", counted)
    assert seq.fused_pairs() == [3]
    np.testing.assert_array_equal(seq(x).numpy(), expected)
    assert calls == [(2, 1, 5, 5)]
    object.__delattr__(conv, "forward")
    relu = seq[4]
    object.__setattr__(relu, "forward", lambda inp: inp)  # an overridden ReLU is no ReLU to fuse
    assert seq.fused_pairs() == [0]


def test_convert_sync_batchnorm_keeps_batchnorm1d_one_dimensional():
    from cnnfast.nn.sync_batchnorm import SyncBatchNorm1d, convert_sync_batchnorm

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = cnnfast.tensor(np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32))
    expected = model(x).numpy()
    convert_sync_batchnorm(model, group=None)
    assert type(model[1]) is SyncBatchNorm1d
    np.testing.assert_array_equal(model(x).numpy(), expected)  # no group: plain batch norm
