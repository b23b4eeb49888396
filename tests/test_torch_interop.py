"""PyTorch interop: state dicts both ways (equal outputs to 1e-5) and DLPack zero-copy exchange."""

from __future__ import annotations

import numpy as np
import pytest

import cnnfast
from cnnfast.models import SmallCNN, from_torch_state_dict, resnet18, to_torch_state_dict

torch = pytest.importorskip("torch")
from cases import randomize_batch_norm  # noqa: E402
from torch_models import torch_twin  # noqa: E402 - needs torch

pytestmark = pytest.mark.torch

MODELS = {
    "smallcnn2d": lambda: SmallCNN(1, 2, 2, seed=0),
    "smallcnn3d-nobn": lambda: SmallCNN(2, 3, 3, channels=(4, 6), batch_norm=False, seed=1),
    "resnet18-2d-small": lambda: resnet18(3, 4, 2, stem="small", width=4, seed=2),
    "resnet18-2d-imagenet": lambda: resnet18(1, 2, 2, stem="imagenet", width=4, seed=3),
    "resnet18-3d-small": lambda: resnet18(1, 2, 3, stem="small", width=2, seed=4),
}


def _input(model, rng):
    kw = model.config["kwargs"]
    size = 16 if kw["spatial_dims"] == 2 else 8
    shape = (2, kw["in_channels"]) + (size,) * kw["spatial_dims"]
    return rng.standard_normal(shape).astype(np.float32)


def _logits(model, x):
    with cnnfast.no_grad():
        return model.eval()(cnnfast.tensor(x)).numpy()


@pytest.mark.parametrize("name", list(MODELS))
def test_to_torch_state_dict_gives_equal_outputs(name, rng):
    model = MODELS[name]()
    randomize_batch_norm(model, seed=5)
    twin = torch_twin(model).eval()
    twin.load_state_dict(to_torch_state_dict(model, torchvision_names=True), strict=True)
    x = _input(model, rng)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_logits(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["smallcnn2d", "resnet18-2d-imagenet"])
def test_from_torch_state_dict_gives_equal_outputs(name, rng):
    model = MODELS[name]()
    twin = torch_twin(model)
    torch.manual_seed(0)
    with torch.no_grad():  # torch's own init plus random running statistics
        for m in twin.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    twin.eval()
    sd = twin.state_dict()
    sd = {k: (v.requires_grad_(True) if v.is_floating_point() else v) for k, v in sd.items()}
    from_torch_state_dict(model, sd)
    x = _input(model, rng)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_logits(model, x), expected, rtol=1e-5, atol=1e-5)
    # NumPy arrays are accepted as well, and cnnfast names round-trip.
    again = MODELS[name]()
    from_torch_state_dict(again, to_torch_state_dict(model, as_numpy=True))
    np.testing.assert_array_equal(_logits(again, x), _logits(model, x))


def test_from_torch_state_dict_refuses_a_mismatch_untouched():
    model = SmallCNN(1, 2, 2, seed=0)
    before = model.state_dict()
    sd = to_torch_state_dict(model)
    sd["fc.weight"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="fc.weight"):
        from_torch_state_dict(model, sd)
    del sd["fc.weight"]
    with pytest.raises(ValueError, match="missing keys"):
        from_torch_state_dict(model, sd)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    with pytest.raises(TypeError, match="state_dict"):
        from_torch_state_dict(model, [1, 2])


# --- DLPack ---------------------------------------------------------------------------------------

def test_dlpack_numpy_shares_memory_both_ways():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = cnnfast.from_dlpack(a)
    assert t.device == "cpu" and t.shape == (3, 4) and t.dtype == np.float32
    a[0, 0] = 100.0
    assert t.numpy()[0, 0] == 100.0
    t.data[2, 3] = -7.0
    assert a[2, 3] == -7.0
    back = np.from_dlpack(t)  # Tensor.__dlpack__ / __dlpack_device__
    assert t.__dlpack_device__() == (1, 0)
    back[1, 1] = 42.0
    assert a[1, 1] == 42.0 and t.numpy()[1, 1] == 42.0


def test_dlpack_torch_shares_memory_both_ways():
    src = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    t = cnnfast.from_dlpack(src)
    assert t.dtype == np.float64 and t.shape == (2, 3, 4)
    src[1, 2, 3] = 1000.0
    assert t.numpy()[1, 2, 3] == 1000.0
    out = cnnfast.tensor(np.ones((2, 5), np.float32)) * 3.0
    tt = torch.from_dlpack(out)
    tt[0, 0] = -1.0
    assert out.numpy()[0, 0] == -1.0
    # A cnnfast op runs on the shared memory and its gradient flows as usual.
    x = cnnfast.from_dlpack(torch.ones(2, 3), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), 2 * np.ones((2, 3), np.float32))


def test_from_dlpack_refuses_other_objects():
    with pytest.raises(TypeError, match="__dlpack__"):
        cnnfast.from_dlpack([1.0, 2.0])
    t = cnnfast.tensor([1.0, 2.0])
    assert cnnfast.from_dlpack(t) is t
