"""Plots as headless PNG files: first-layer filters, feature maps, ROC curves, training curves,
sample images.

Matplotlib is imported only when a plot is drawn, and only its object-oriented API with the Agg
canvas is used (no pyplot, no global backend switch), so this works on servers and in threads.
Every function writes one PNG and returns its path. 3D data is shown as its middle slice along
depth (filters: one row of depth slices per filter).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

_DPI = 110


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight", facecolor="white")
    return path


def _numpy(a) -> np.ndarray:
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        return a.numpy()
    return np.asarray(a)


def plot_filters(weight, path: str | Path, title: str = "First-layer filters") -> Path:
    """A grid of convolution filters ``(K, C, KH, KW)`` or ``(K, C, KD, KH, KW)``.

    One panel per filter (channels averaged when C > 1), on one shared diverging colour scale
    (red positive, blue negative, white 0) with a colour bar, so filters compare by strength.
    Weights of kernels up to 5x5 are printed in their cells. 3D filters show their depth
    slices side by side.
    """
    w = _numpy(weight).astype(np.float64)
    if w.ndim not in (4, 5):
        raise ValueError(f"weight: expected (K, C, KH, KW) or (K, C, KD, KH, KW), got {w.shape}")
    channels = w.shape[1]
    w = w.mean(axis=1)  # (K, KH, KW) or (K, KD, KH, KW)
    depth_ticks: list[float] = []
    if w.ndim == 4:  # 3D: lay depth slices out left to right, one pixel of gap
        k, kd, kh, kw = w.shape
        tiled = np.full((k, kh, kd * (kw + 1) - 1), np.nan)
        for d in range(kd):
            tiled[:, :, d * (kw + 1):d * (kw + 1) + kw] = w[:, d]
        w = tiled
        depth_ticks = [d * (kw + 1) + (kw - 1) / 2 for d in range(kd)]
    k, ph, pw = w.shape
    vmax = float(np.nanmax(np.abs(w))) or 1.0
    cell = 0.38 if max(ph, pw) <= 5 else 0.17  # inches per weight
    panel_w, panel_h = max(pw * cell, 0.9), max(ph * cell, 0.9)
    max_cols = max(1, int(12 // (panel_w + 0.25)))
    rows = math.ceil(k / max_cols)
    cols = math.ceil(k / rows)  # balanced rows rather than one short last row
    height = rows * (panel_h + 0.5) + 0.7
    fig = _figure(cols * (panel_w + 0.25) + 1.1, height)
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[panel_w] * cols + [0.12],
                            top=1 - 0.65 / height, bottom=0.3 / height)
    annotate = ph <= 5 and pw <= 5 and k <= 32
    image = None
    for i in range(rows * cols):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        image = ax.imshow(w[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(f"filter {i + 1}", fontsize=8)
        if depth_ticks:
            ax.set_xticks(depth_ticks, [f"depth {d + 1}" for d in range(len(depth_ticks))],
                          fontsize=6)
            ax.tick_params(length=0)
        if annotate:
            for (r, c), v in np.ndenumerate(w[i]):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if abs(v) > 0.6 * vmax else "black")
    cax = fig.add_subplot(grid[:, cols])
    fig.colorbar(image, cax=cax, label="weight" + (" (mean over channels)" if channels > 1 else ""))
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_feature_maps(maps: Sequence[tuple[str, np.ndarray]], image: np.ndarray,
                      path: str | Path, max_channels: int = 8,
                      title: str = "Feature maps of one input") -> Path:
    """The input image and, one row per layer, up to ``max_channels`` of its feature maps.

    ``maps`` is ``[(name, (1, K, *S)), ...]`` (a model's ``feature_maps(x)``); ``image`` is the
    input ``(C, *S)`` as the model saw it. Each map has its own grey scale (black = 0), so weak
    but structured responses stay visible; 3D maps show their middle depth slice.
    """
    image = _numpy(image)
    arrays = [(name, _numpy(m)[0]) for name, m in maps]
    cols = max_channels
    rows = len(arrays) + 1  # the first row shows the input
    fig = _figure(1.3 * cols + 0.6, 1.4 * rows + 0.5)
    grid = fig.add_gridspec(rows, cols, hspace=0.35)

    def middle(a: np.ndarray) -> np.ndarray:
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    ax = fig.add_subplot(grid[0, 0])
    if image.shape[0] == 3 and image.ndim == 3:
        shown = np.moveaxis(image, 0, -1)
        shown = (shown - shown.min()) / (np.ptp(shown) or 1.0)
    else:
        shown = middle(image.mean(axis=0))
    ax.imshow(shown, cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(f"input\n{'x'.join(map(str, image.shape[1:]))}", fontsize=8)
    for r, (name, fm) in enumerate(arrays, start=1):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= fm.shape[0]:
                ax.axis("off")
                continue
            plane = middle(fm[c])
            ax.imshow(plane, cmap="gray", vmin=min(0.0, float(plane.min())),
                      vmax=max(float(plane.max()), 1e-6), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(f"{name}\n{fm.shape[0]} ch, {'x'.join(map(str, fm.shape[1:]))}",
                              fontsize=8)
            if r == 1:
                ax.set_title(f"channel {c + 1}", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: str | Path,
             title: str = "ROC curves (test set)") -> Path:
    """ROC curves, one per label: ``[(name, fpr, tpr, auc), ...]`` (see
    :func:`cnnfast.metrics.roc_curves`), with the AUROC in the legend and the chance diagonal."""
    fig = _figure(5.6, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (0.500)")
    colors = _colors(len(curves))
    for (name, fpr, tpr, auc), color in zip(curves, colors):
        ax.plot(fpr, tpr, color=color, linewidth=1.8, label=f"{name} ({auc:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="label (AUROC)", title_fontsize=8)
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def plot_training_curves(history: Sequence[dict], path: str | Path,
                         title: str = "Training") -> Path:
    """Loss (train and validation) and validation AUROC/accuracy per epoch; the best epoch (by
    validation AUROC) is marked. ``history`` is :meth:`cnnfast.train.FitResult.history_dicts`."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [h["epoch"] for h in history]
    fig = _figure(10.0, 3.8)
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", markersize=3,
             label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", markersize=3,
             label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("Loss", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    aucs = [np.nan if h["val_auc"] is None else h["val_auc"] for h in history]
    ax2.plot(epochs, aucs, marker="o", markersize=3, color="C2", label="val AUROC")
    ax2.plot(epochs, [h["val_acc"] for h in history], marker="o", markersize=3, color="C4",
             alpha=0.7, label="val accuracy")
    if np.isfinite(aucs).any():
        best = int(np.nanargmax(aucs))
        ax2.axvline(epochs[best], color="0.5", linestyle=":", linewidth=1)
        ax2.annotate(f"best {aucs[best]:.3f}\n(epoch {epochs[best]})", (epochs[best], aucs[best]),
                     textcoords="offset points", xytext=(-10, -28), ha="right", fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_title("Validation", fontsize=10)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.set_xlim(0.5, max(epochs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_samples(images: np.ndarray, labels: np.ndarray, path: str | Path,
                 label_names: Sequence[str] | None = None, multilabel: bool = False,
                 n: int = 16, title: str = "Sample images") -> Path:
    """A grid of raw images ``(N, C, *S)`` with their labels as titles (3D: middle slice)."""
    images = np.asarray(images)[:n]
    labels = np.asarray(labels)[:n]
    cols = min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    title_lines = 3 if multilabel else 1
    height = (1.45 + 0.14 * title_lines) * rows + 0.6
    fig = _figure(1.5 * cols, height)
    fig.subplots_adjust(top=1 - (0.35 + 0.14 * title_lines) / height,
                        hspace=0.15 * title_lines + 0.2)
    for i, (img, lab) in enumerate(zip(images, labels)):
        ax = fig.add_subplot(rows, cols, i + 1)
        if img.shape[0] == 3 and img.ndim == 3:
            ax.imshow(np.moveaxis(img, 0, -1))
        else:
            plane = img[0] if img.ndim == 3 else img[0, img.shape[1] // 2]
            scale = {"vmin": 0, "vmax": 255} if plane.dtype == np.uint8 else {}
            ax.imshow(plane, cmap="gray", interpolation="nearest", **scale)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(_label_text(lab, label_names, multilabel), fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _label_text(lab: np.ndarray, names: Sequence[str] | None, multilabel: bool) -> str:
    lab = np.atleast_1d(lab)
    if multilabel:
        present = [names[j] if names else str(j) for j in np.flatnonzero(lab)]
        return "\n".join(present[:3]) + ("..." if len(present) > 3 else "") or "(none)"
    value = int(lab[0])
    return names[value] if names and value < len(names) else str(value)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_all(model, dataset, scores: np.ndarray, history: Sequence[dict] | None,
             out_dir: str | Path, normalization: Callable | None = None,
             index: int | None = None) -> dict[str, Path]:
    """The standard set of plots for a trained model on ``dataset``'s test split.

    Writes ``filters.png``, ``feature_maps.png`` (of one positive test image when there is one),
    ``roc.png``, ``samples.png`` and, with a ``history``, ``training_curves.png`` into
    ``out_dir``; returns ``{kind: path}``.
    """
    import cnnfast
    from cnnfast.dataset import MULTILABEL
    from cnnfast.metrics import roc_curves

    out_dir = Path(out_dir)
    test = dataset.test
    normalization = normalization or dataset.normalization
    paths = {}
    paths["filters"] = plot_filters(model.first_conv.weight, out_dir / "filters.png",
                                    title=f"First-layer filters ({type(model).__name__})")
    if index is None:
        positives = np.flatnonzero(test.labels.max(axis=1) > 0)
        index = int(positives[0]) if len(positives) else 0
    x = normalization(test.images[index:index + 1])
    was_training = model.training
    model.eval()
    with cnnfast.no_grad():
        device = next(iter(model.parameters())).device
        maps = model.feature_maps(cnnfast.tensor(x, device=device))
    model.train(was_training)
    label = _label_text(test.labels[index], dataset.label_names, dataset.task == MULTILABEL)
    note = ", middle depth slice" if dataset.spatial_dims == 3 else ""
    paths["feature_maps"] = plot_feature_maps(
        maps, x[0], out_dir / "feature_maps.png",
        title=f"Feature maps of test image {index} ({label.replace(chr(10), ', ')}{note})")
    curves = roc_curves(test.labels, scores, dataset.task, dataset.label_names)
    paths["roc"] = plot_roc(curves, out_dir / "roc.png",
                            title=f"ROC curves, {dataset.name} test set")
    paths["samples"] = plot_samples(test.images, test.labels, out_dir / "samples.png",
                                    dataset.label_names, dataset.task == MULTILABEL,
                                    title=f"{dataset.name}: test images"
                                    + (" (middle depth slice)" if note else ""))
    if history:
        paths["training_curves"] = plot_training_curves(
            history, out_dir / "training_curves.png", title=f"Training on {dataset.name}")
    return paths


# --- Grad-CAM -----------------------------------------------------------------------------------

def _default_cam_layer(model):
    """The last convolutional stage: a ResNet's ``layer4``, a SmallCNN's last block."""
    for name in ("layer4", "features"):
        layer = getattr(model, name, None)
        if layer is not None:
            return layer if name == "layer4" else layer[len(layer) - 1]
    raise ValueError(f"grad_cam: no default layer for a {type(model).__name__}; pass layer= "
                     f"(a submodule or its dotted name)")


def _resolve_layer(model, layer):
    if layer is None:
        return _default_cam_layer(model)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"grad_cam: layer {layer!r} is not a submodule of the model "
                             f"(e.g. {', '.join(list(modules)[1:6])}, ...)")
        return modules[layer]
    if not any(m is layer for m in model.modules()):
        raise ValueError(f"grad_cam: layer {type(layer).__name__} is not part of the model")
    return layer


def resize_linear(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize the trailing axes of ``a`` to ``shape`` by (bi/tri)linear interpolation with
    half-pixel centres (PyTorch's ``interpolate(..., align_corners=False)``)."""
    a = np.asarray(a, dtype=np.float64)
    lead = a.ndim - len(shape)
    for axis, out in zip(range(lead, a.ndim), shape):
        size = a.shape[axis]
        if size == out:
            continue
        src = np.maximum((np.arange(out) + 0.5) * (size / out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), size - 1)
        i1 = np.minimum(i0 + 1, size - 1)
        frac = (src - i0).reshape((-1,) + (1,) * (a.ndim - axis - 1))
        a = np.take(a, i0, axis=axis) * (1 - frac) + np.take(a, i1, axis=axis) * frac
    return a


def grad_cam(model, images, layer=None, target=None) -> np.ndarray:
    """Grad-CAM heatmaps ``(N, *S)`` in [0, 1] for ``images`` ``(N, C, *S)`` (normalised, as the
    model takes them; a Tensor or an array), 2D or 3D.

    For each image, the activation ``A`` ``(K, *S')`` of ``layer`` (default: the last
    convolutional stage, ``layer4`` of a ResNet or the last block of a SmallCNN; or a submodule,
    or its dotted name) is weighted per channel by the mean over ``S'`` of d logit[target] / d A
    (from cnnfast's autograd), summed over channels, passed through ReLU, resized to ``S``
    (linear, half-pixel centres) and divided by its maximum (an all-zero map stays zero).
    ``target``: None for each image's predicted class (the largest logit), an int for one class
    for all, or a sequence of ``N`` ints. The model runs in evaluation mode; its mode, and its
    parameters' ``requires_grad`` and ``.grad``, are left as they were.
    """
    import cnnfast
    from cnnfast.tensor import Tensor, as_tensor

    x = as_tensor(images, name="grad_cam: images")
    if x.ndim not in (4, 5):
        raise ValueError(f"grad_cam: images must be (N, C, H, W) or (N, C, D, H, W), got shape "
                         f"{x.shape}")
    x = x.detach()
    module = _resolve_layer(model, layer)
    captured: list[Tensor] = []
    original_forward = module.forward

    def capturing_forward(*args, **kwargs):
        # The activation becomes a leaf that requires grad: backward stops there and leaves its
        # gradient in .grad, with no hook machinery in the autograd core.
        out = original_forward(*args, **kwargs).detach().requires_grad_(True)
        captured.append(out)
        return out

    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    object.__setattr__(module, "forward", capturing_forward)
    try:
        for p in params:
            p.requires_grad = False  # only the path from the activation is recorded
        model.eval()
        with cnnfast.enable_grad():
            logits = model(x)
        if len(captured) != 1:
            raise ValueError(f"grad_cam: layer {type(module).__name__} ran {len(captured)} times "
                             f"in one forward pass; choose a layer that runs once")
        n, classes = logits.shape
        if target is None:
            chosen = logits.numpy().argmax(axis=1)
        else:
            chosen = np.broadcast_to(np.asarray(target), (n,)).astype(np.int64)
            if chosen.min() < 0 or chosen.max() >= classes:
                raise ValueError(f"grad_cam: target must name classes in [0, {classes - 1}], "
                                 f"got {target!r}")
        onehot = np.zeros((n, classes), dtype=logits.dtype)
        onehot[np.arange(n), chosen] = 1
        logits.backward(onehot)  # d sum_i logit[i, target_i]; images are independent in eval
        activation = captured[0].numpy().astype(np.float64)
        grad = captured[0].grad.numpy().astype(np.float64)
    finally:
        object.__delattr__(module, "forward")
        model.train(was_training)
        for p, (flag, g) in zip(params, saved):
            p.requires_grad, p.grad = flag, g
    spatial_axes = tuple(range(2, activation.ndim))
    weights = grad.mean(axis=spatial_axes, keepdims=True)
    cam = np.maximum((weights * activation).sum(axis=1), 0.0)
    cam = resize_linear(cam, x.shape[2:])
    peak = cam.reshape(n, -1).max(axis=1).reshape((n,) + (1,) * (cam.ndim - 1))
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def _display_planes(img: np.ndarray) -> list[np.ndarray]:
    """What to show of one image ``(C, *S)``: 2D -> [grey or RGB plane]; 3D -> its three middle
    slices (axial, coronal, sagittal), channels averaged."""
    if img.ndim == 3:
        if img.shape[0] == 3:
            rgb = np.moveaxis(img, 0, -1).astype(np.float64)
            return [(rgb - rgb.min()) / (np.ptp(rgb) or 1.0)]
        return [img.mean(axis=0)]
    vol = img.mean(axis=0)
    d, h, w = vol.shape
    return [vol[d // 2], vol[:, h // 2], vol[:, :, w // 2]]


def _heat_planes(heat: np.ndarray) -> list[np.ndarray]:
    if heat.ndim == 2:
        return [heat]
    d, h, w = heat.shape
    return [heat[d // 2], heat[:, h // 2], heat[:, :, w // 2]]


def plot_gradcam(images: np.ndarray, heatmaps: np.ndarray, path: str | Path,
                 titles: Sequence[str] | None = None, title: str = "Grad-CAM",
                 alpha: float = 0.45) -> Path:
    """Heatmaps ``(N, *S)`` in [0, 1] over their images ``(N, C, *S)`` (raw or normalised),
    one panel per image with ``titles[i]`` above it; 3D images show their three middle slices
    (axial, coronal, sagittal) side by side."""
    images, heatmaps = _numpy(images), _numpy(heatmaps)
    if images.shape[0] != heatmaps.shape[0] or images.shape[2:] != heatmaps.shape[1:]:
        raise ValueError(f"plot_gradcam: heatmaps {heatmaps.shape} do not fit images "
                         f"{images.shape} (expected (N, *S) for images (N, C, *S))")
    n = len(images)
    views = 1 if images.ndim == 4 else 3
    per_row = max(1, 8 // views)
    cols = min(n, per_row) * views
    rows = max(1, math.ceil(n / per_row))
    lines = max((t.count("\n") + 1 for t in titles), default=1) if titles else 1
    height = (1.5 + 0.13 * lines) * rows + 0.6
    fig = _figure(1.5 * cols + 0.2, height)
    fig.subplots_adjust(top=1 - (0.35 + 0.13 * lines) / height, hspace=0.15 * lines + 0.2,
                        wspace=0.05)
    names = ("axial", "coronal", "sagittal")
    for i in range(n):
        for v, (plane, heat) in enumerate(zip(_display_planes(images[i]),
                                              _heat_planes(heatmaps[i]))):
            ax = fig.add_subplot(rows, cols, (i // per_row) * cols + (i % per_row) * views + v + 1)
            ax.imshow(plane, cmap=None if plane.ndim == 3 else "gray", interpolation="nearest")
            ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0,
                      interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            text = titles[i] if titles else f"image {i}"
            if views == 3:
                text = f"{text}\n{names[v]}" if v == 1 else names[v]
            ax.set_title(text, fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def gradcam_titles(true_labels, scores: np.ndarray, label_names: Sequence[str] | None,
                   multilabel: bool, indices: Sequence | None = None) -> list[str]:
    """Panel titles ``"#i true: ... / pred: ..."``: the true label(s) (when known) and the
    predicted one(s) (largest probability; multi-label: every label at >= 0.5)."""
    titles = []
    scores = np.asarray(scores)
    for i in range(len(scores)):
        if multilabel:
            pred = _label_text((scores[i] >= 0.5).astype(int), label_names, True)
        else:
            pred = _label_text(np.array([scores[i].argmax()]), label_names, False)
        head = f"#{indices[i] if indices is not None else i}"
        pred = pred.replace("\n", ", ")
        if true_labels is None:
            titles.append(f"{head}\npred: {pred}")
        else:
            true = _label_text(true_labels[i], label_names, multilabel).replace("\n", ", ")
            titles.append(f"{head} true: {true}\npred: {pred}")
    return titles


def plot_gradcam_split(model, dataset, scores: np.ndarray, normalization: Callable,
                       path: str | Path, n: int = 16, device: str = "cpu") -> Path:
    """Grad-CAM of the predicted class over the first ``n`` test images of ``dataset``, each
    titled with its true and predicted label (``scores``: the test split's probabilities)."""
    import cnnfast
    from cnnfast.dataset import MULTILABEL

    n = min(n, len(dataset.test))
    images = dataset.test.images[:n]
    heat = grad_cam(model, cnnfast.tensor(normalization(images), device=device))
    titles = gradcam_titles(dataset.test.labels[:n], scores[:n], dataset.label_names,
                            dataset.task == MULTILABEL)
    note = " (middle slices)" if dataset.spatial_dims == 3 else ""
    return plot_gradcam(images, heat, path, titles,
                        title=f"Grad-CAM of the predicted class, {dataset.name} test "
                              f"images{note}")
