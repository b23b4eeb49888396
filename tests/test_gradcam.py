"""Grad-CAM: against an independent PyTorch computation (same weights), and on synthetic nodules
whose positions are known (the heatmap's peak should fall inside the nodule)."""

from __future__ import annotations

import numpy as np
import pytest
from cases import randomize_batch_norm

from cnnfast import synthetic
from cnnfast.models import SmallCNN, resnet18
from cnnfast.viz import grad_cam, plot_gradcam, resize_linear


def _torch_grad_cam(torch, twin, layer, x, target):
    """Grad-CAM the textbook way in PyTorch: a forward hook keeps the activation's gradient."""
    import torch.nn.functional as TF

    kept = {}

    def hook(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    handle = layer.register_forward_hook(hook)
    logits = twin(torch.from_numpy(x))
    handle.remove()
    t = logits.argmax(1) if target is None else torch.full((len(x),), target)
    logits[torch.arange(len(x)), t].sum().backward()
    a = kept["a"]
    weights = a.grad.mean(dim=tuple(range(2, a.ndim)), keepdim=True)
    cam = torch.relu((weights * a).sum(1, keepdim=True))
    mode = "bilinear" if a.ndim == 4 else "trilinear"
    cam = TF.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.view(-1, *[1] * (cam.ndim - 1))
    return torch.where(peak > 0, cam / peak.clamp_min(1e-30), 0 * cam).detach().numpy()


@pytest.mark.torch
@pytest.mark.parametrize("case", ["smallcnn2d", "resnet3d-layer4", "resnet2d-layer2"])
def test_grad_cam_matches_pytorch(case, rng):
    torch = pytest.importorskip("torch")
    from torch_models import torch_twin

    from cnnfast.models import to_torch_state_dict

    if case == "smallcnn2d":
        model, x, layer, target = SmallCNN(1, 2, 2, seed=0), (3, 1, 28, 28), None, None
        pick = lambda twin: twin.features[2]  # noqa: E731
    elif case == "resnet3d-layer4":
        model, x, layer, target = resnet18(1, 3, 3, width=4, seed=1), (2, 1, 12, 12, 12), None, 2
        pick = lambda twin: twin.layer4  # noqa: E731
    else:
        model, x, layer, target = resnet18(3, 4, 2, width=4, seed=2), (2, 3, 20, 20), "layer2", 1
        pick = lambda twin: twin.layer2  # noqa: E731
    randomize_batch_norm(model, seed=3)
    twin = torch_twin(model).eval()
    twin.load_state_dict(to_torch_state_dict(model, torchvision_names=True))
    x = rng.standard_normal(x).astype(np.float32)
    ours = grad_cam(model, x, layer=layer, target=target)
    theirs = _torch_grad_cam(torch, twin, pick(twin), x, target)
    assert ours.shape == x.shape[:1] + x.shape[2:]
    assert ours.max() == pytest.approx(1.0)  # not an all-zero map: a real comparison
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_grad_cam_leaves_the_model_as_it_was(rng):
    model = SmallCNN(1, 2, 2, seed=0).train()
    params = list(model.parameters())
    grad_cam(model, rng.standard_normal((2, 1, 16, 16)).astype(np.float32), target=0)
    assert model.training and all(p.requires_grad and p.grad is None for p in params)
    assert "forward" not in model.features[2].__dict__
    with pytest.raises(ValueError, match="target"):
        grad_cam(model, np.zeros((1, 1, 16, 16), np.float32), target=5)
    with pytest.raises(ValueError, match="not a submodule"):
        grad_cam(model, np.zeros((1, 1, 16, 16), np.float32), layer="nope")
    with pytest.raises(ValueError, match="images"):
        grad_cam(model, np.zeros((1, 16, 16), np.float32))


def test_resize_linear_matches_half_pixel_interpolation():
    a = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    out = resize_linear(a, (4, 6))
    assert out.shape == (1, 4, 6)
    np.testing.assert_allclose(out[0, 0], [0, 0.25, 0.75, 1.25, 1.75, 2])  # edge clamped
    np.testing.assert_allclose(out[0, :, 0], [0, 0.75, 2.25, 3])


def test_grad_cam_peaks_inside_synthetic_nodules(tmp_path):
    """After a short training, the heatmap's peak of most correctly found nodules lies inside
    the nodule (chance: the nodule's share of the image, about 2%)."""
    from cnnfast.train import TrainConfig, fit, predict_logits

    ds = synthetic.nodule_dataset(2000, 100, 10, seed=1)
    model = SmallCNN(1, 2, seed=1)
    fit(model, ds, TrainConfig(epochs=6, batch_size=64, lr=3e-3, schedule="cosine", seed=1),
        progress=False)
    images, labels, nodules = synthetic.nodule_ct(300, seed=99, return_nodules=True)
    found = (labels[:, 0] == 1) & (predict_logits(model, images, ds.normalization).argmax(1) == 1)
    assert np.isnan(nodules[labels[:, 0] == 0]).all() and not np.isnan(nodules[found]).any()
    positives = np.flatnonzero(found)
    assert len(positives) > 50
    heat = grad_cam(model, ds.normalization(images[positives]), target=1)
    peaks = np.array([np.unravel_index(h.argmax(), h.shape) for h in heat])
    centre, radius = nodules[positives, :2], nodules[positives, 2]
    hits = ((peaks - centre) ** 2).sum(1) <= radius ** 2
    chance = float(np.mean(np.pi * radius ** 2 / images[0, 0].size))
    print(f"Grad-CAM peak inside the nodule: {hits.mean():.3f} of {len(positives)} correctly "
          f"classified positives (chance {chance:.3f})")
    assert hits.mean() > max(0.3, 10 * chance)
    titles = [f"#{i}" for i in positives[:4]]
    path = plot_gradcam(images[positives[:4]], heat[:4], tmp_path / "g.png", titles)
    assert path.stat().st_size > 1000


def test_plot_gradcam_3d_shows_three_slices(tmp_path, rng):
    images = rng.integers(0, 255, (2, 1, 8, 8, 8)).astype(np.uint8)
    heat = rng.random((2, 8, 8, 8)).astype(np.float32)
    path = plot_gradcam(images, heat, tmp_path / "g3.png", ["a", "b"])
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="do not fit"):
        plot_gradcam(images, heat[:, :4], tmp_path / "bad.png")
