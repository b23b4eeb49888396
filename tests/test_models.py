"""Models: forward shapes, a few training steps, 2D and 3D (tiny sizes), and ResNet-18 against an
equivalent PyTorch network."""

from __future__ import annotations

import numpy as np
import pytest

import cnnfast
from cnnfast import nn, optim
from cnnfast.models import SmallCNN, build_model, resnet18


def _x(*shape, seed=0):
    return cnnfast.tensor(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("dims, size", [(2, 12), (3, 8)])
def test_smallcnn_shapes(dims, size):
    model = SmallCNN(in_channels=2, num_classes=3, spatial_dims=dims, channels=(4, 6, 8), seed=0)
    out = model(_x(5, 2, *(size,) * dims))
    assert out.shape == (5, 3)
    maps = model.feature_maps(_x(1, 2, *(size,) * dims))
    assert [m.shape for _, m in maps] == [(1, 4, *(size,) * dims),
                                          (1, 6, *(size // 2,) * dims),
                                          (1, 8, *(size // 4,) * dims)]
    assert model.first_conv.weight.shape == (4, 2) + (3,) * dims


@pytest.mark.parametrize("dims, stem, size, stages", [
    (2, "small", 12, [12, 6, 3, 2]),
    (2, "imagenet", 32, [8, 4, 2, 1]),
    (3, "small", 6, [6, 3, 2, 1]),
])
def test_resnet18_shapes(dims, stem, size, stages):
    model = resnet18(in_channels=1, num_classes=4, spatial_dims=dims, stem=stem, width=2, seed=0)
    x = _x(2, 1, *(size,) * dims)
    assert model(x).shape == (2, 4)
    maps = model.feature_maps(x)
    assert [m.shape[2] for _, m in maps[1:]] == stages
    assert [m.shape[1] for _, m in maps[1:]] == [2, 4, 8, 16]
    n_convs = sum(1 for name, p in model.named_parameters() if p.ndim == dims + 2)
    assert n_convs == 1 + 16 + 3  # stem, 8 blocks x 2 convs, 3 projection shortcuts


def test_resnet18_parameter_count_is_resnet18():
    # CIFAR-style ResNet-18 (3x3 stem), 1 input channel, 14 outputs, as for ChestMNIST
    assert resnet18(1, 14).num_parameters() == 11_174_862
    # ImageNet stem, 3 channels, 1000 classes: torchvision's resnet18 has 11,689,512
    assert resnet18(3, 1000, stem="imagenet").num_parameters() == 11_689_512


@pytest.mark.parametrize("make, dims, size", [
    (lambda: SmallCNN(1, 2, 2, channels=(4, 8), seed=3), 2, 8),
    (lambda: resnet18(1, 2, 2, width=2, seed=3), 2, 8),
    (lambda: SmallCNN(1, 2, 3, channels=(3, 4), seed=3), 3, 6),
    (lambda: resnet18(1, 3, 3, width=2, seed=3), 3, 4),
])
def test_training_steps_reduce_loss(make, dims, size):
    model = make()
    x = _x(6, 1, *(size,) * dims, seed=1)
    y = cnnfast.tensor(np.array([0, 1, 0, 1, 1, 0]))
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.Adam(model.parameters(), lr=0.01)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(4):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [k for k, v in model.state_dict().items() if not np.array_equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_multilabel_step_with_bce():
    model = SmallCNN(1, 6, channels=(4,), seed=0)
    x = _x(4, 1, 8, 8)
    y = cnnfast.tensor(np.random.default_rng(0).integers(0, 2, (4, 6)).astype(np.float32))
    loss = nn.BCEWithLogitsLoss()(model(x), y)
    loss.backward()
    assert model.fc.weight.grad is not None and np.isfinite(loss.item())


def test_seed_fixes_weights_and_config_rebuilds():
    a, b = SmallCNN(seed=7), SmallCNN(seed=7)
    for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(u, v, err_msg=name)
    assert not np.array_equal(SmallCNN(seed=8).first_conv.weight.numpy(),
                              a.first_conv.weight.numpy())
    r = resnet18(3, 5, spatial_dims=3, stem="imagenet", width=2)
    again = build_model(r.config)
    assert again.config == r.config
    assert list(again.state_dict()) == list(r.state_dict())


@pytest.mark.parametrize("kwargs, message", [
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
    ({"channels": ()}, "at least one block"),
    ({"num_classes": 0}, "num_classes must be a positive int"),
])
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SmallCNN(**kwargs)


def test_bad_resnet_and_build_arguments():
    with pytest.raises(ValueError, match="stem must be"):
        resnet18(stem="vgg")
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        build_model({"name": "alexnet"})
    with pytest.raises(ValueError, match="bad arguments for model 'smallcnn'"):
        build_model({"name": "smallcnn", "kwargs": {"depth": 3}})


# --- the same network in PyTorch ----------------------------------------------------------------

def _torch_resnet18(torch, in_channels, num_classes, dims, width, stem):
    """PyTorch twin of cnnfast.models.ResNet with the same parameter names."""
    tnn = torch.nn
    Conv = tnn.Conv2d if dims == 2 else tnn.Conv3d
    BN = tnn.BatchNorm2d if dims == 2 else tnn.BatchNorm3d

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = Conv(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = BN(cout)
            self.conv2 = Conv(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = BN(cout)
            self.shortcut = (tnn.Sequential(Conv(cin, cout, 1, stride, bias=False), BN(cout))
                             if stride != 1 or cin != cout else tnn.Identity())

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            if stem == "small":
                self.stem = tnn.Sequential(Conv(in_channels, width, 3, 1, 1, bias=False),
                                           BN(width), tnn.ReLU())
            else:
                Pool = tnn.MaxPool2d if dims == 2 else tnn.MaxPool3d
                self.stem = tnn.Sequential(Conv(in_channels, width, 7, 2, 3, bias=False),
                                           BN(width), tnn.ReLU(), Pool(3, 2, 1))
            c = width
            for i in range(4):
                out = width * 2 ** i
                setattr(self, f"layer{i + 1}",
                        tnn.Sequential(Block(c, out, 1 if i == 0 else 2), Block(out, out, 1)))
                c = out
            self.fc = tnn.Linear(c, num_classes)

        def forward(self, x):
            x = self.stem(x)
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(x.mean(dim=tuple(range(2, x.ndim))), 1))

    return Net()


@pytest.mark.torch
@pytest.mark.parametrize("dims, stem, size", [(2, "small", 10), (2, "imagenet", 24),
                                              (3, "small", 5)])
def test_resnet18_matches_pytorch(dims, stem, size):
    torch = pytest.importorskip("torch")
    ours = resnet18(2, 3, dims, stem=stem, width=4, seed=0)
    theirs = _torch_resnet18(torch, 2, 3, dims, 4, stem).double()
    state = {k: torch.from_numpy(v.astype(np.float64)) for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_parameters()

    ours.to(dtype=np.float64)
    x = np.random.default_rng(1).normal(size=(3, 2) + (size,) * dims)
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        got = ours(cnnfast.tensor(x)).numpy()
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)
