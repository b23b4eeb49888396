"""Training and evaluation: a fit loop that keeps the best-validation-AUROC weights, prediction,
MedMNIST-style evaluation, and loading a checkpoint back into a model.

The default :class:`TrainConfig` is the MedMNIST v2 ResNet recipe: Adam, lr 0.001, batch 128,
100 epochs, lr x0.1 at epochs 50 and 75; BCE-with-logits for multi-label tasks, softmax
cross-entropy otherwise; the model kept is the one with the best validation AUROC.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import cnnfast
from cnnfast import dispatch, nn, optim
from cnnfast.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cnnfast.data import MULTILABEL, DataLoader, MedicalDataset, Normalization, Split
from cnnfast.metrics import Metrics, evaluate_scores, scores_from_logits
from cnnfast.models import build_model
from cnnfast.transforms import RandomFlip

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("multistep", "cosine", "none")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit` (defaults: the MedMNIST v2 recipe).

    ``milestones`` are epochs at which the lr is multiplied by ``gamma`` (``"multistep"``); when
    ``None`` they are 50% and 75% of ``epochs`` (50 and 75 of 100, as in MedMNIST).
    ``flip_axes`` turns on random flips along those spatial axes (see
    :func:`cnnfast.transforms.random_flip`); none by default, as in MedMNIST.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "multistep"
    milestones: Sequence[int] | None = None
    gamma: float = 0.1
    seed: int = 0
    device: str = "cpu"
    flip_axes: Sequence[int] = ()
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_device(self.device)

    def resolved_milestones(self) -> list[int]:
        if self.milestones is not None:
            return [int(m) for m in self.milestones]
        # At 50% and 75% of the run; a milestone at epoch 0 would lower the rate from the
        # start (a 1-epoch run would train at lr * gamma**2), so short runs drop those.
        return sorted({m for m in (int(0.5 * self.epochs), int(0.75 * self.epochs)) if m >= 1})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["milestones"] = self.resolved_milestones()
        d["flip_axes"] = list(self.flip_axes)
        return d


def check_device(device: str) -> None:
    """Raise ``ValueError`` for an unknown device and ``RuntimeError`` for cuda without a GPU."""
    if device not in dispatch.DEVICES:
        raise ValueError(f"device must be one of {dispatch.DEVICES}, got {device!r}")
    if device == "cuda":
        dispatch.require_cuda()


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    val_acc: float
    lr: float
    seconds: float


@dataclass
class FitResult:
    """What :func:`fit` learned: per-epoch history and the best epoch's weights (already loaded
    into the model)."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_auc: float = -math.inf
    best_state: dict | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0

    def history_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.history]


# --- losses and predictions ---------------------------------------------------------------------

def loss_for(task: str, pos_weight: np.ndarray | None = None) -> nn.Module:
    """BCE-with-logits for multi-label tasks, softmax cross-entropy otherwise (MedMNIST)."""
    if task == MULTILABEL:
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return nn.CrossEntropyLoss()


def _targets(labels: np.ndarray, task: str, device: str):
    """Labels ``(B, L)`` -> the loss's target: float ``(B, L)`` (multi-label) or int ``(B,)``."""
    if task == MULTILABEL:
        return cnnfast.tensor(labels.astype(np.float32), device=device)
    return cnnfast.tensor(labels[:, 0].astype(np.int64), device=device)


def numpy_loss(logits: np.ndarray, labels: np.ndarray, task: str) -> float:
    """The training loss's value computed in NumPy float64 (for validation curves)."""
    z = np.asarray(logits, np.float64)
    if task == MULTILABEL:
        y = labels.astype(np.float64)
        return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(z)), labels[:, 0]]))


def predict_logits(model: nn.Module, images: np.ndarray, normalization: Callable | None = None,
                   batch_size: int = 256, device: str = "cpu", parallel=None) -> np.ndarray:
    """Model logits ``(N, K)`` for raw ``images`` ``(N, C, *S)``, in eval mode, without autograd.

    The model's train/eval mode is restored afterwards. With ``parallel`` (a
    :class:`cnnfast.distributed.DataParallel`) each rank scores its share of the images and
    every rank gets all ``N`` rows.
    """
    if parallel is not None:
        local = predict_logits(model, images[parallel.shard(len(images))], normalization,
                               batch_size, device)
        return parallel.gather_rows(local.astype(np.float32, copy=False), len(images))
    was_training = model.training
    model.eval()
    out = []
    try:
        with cnnfast.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size]
                x = normalization(x) if normalization is not None else x.astype(np.float32)
                out.append(model(cnnfast.tensor(x, device=device)).numpy())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out)


def evaluate(model: nn.Module, split: Split, task: str, label_names: Sequence[str] | None = None,
             normalization: Callable | None = None, batch_size: int = 256, device: str = "cpu",
             parallel=None) -> tuple[Metrics, np.ndarray]:
    """MedMNIST metrics of ``model`` on ``split``; returns ``(metrics, scores)`` where scores are
    ``(N, K)`` probabilities (softmax, or sigmoid for multi-label). ``parallel``: scored in
    shards over the ranks (see :func:`predict_logits`)."""
    logits = predict_logits(model, split.images, normalization, batch_size, device, parallel)
    scores = scores_from_logits(logits, task)
    return evaluate_scores(split.labels, scores, task, label_names), scores


# --- fitting ------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, config: TrainConfig):
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return optim.SGD(params, lr=config.lr, momentum=config.momentum,
                         weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_schedule(optimizer, config: TrainConfig):
    if config.schedule == "multistep":
        return optim.MultiStepLR(optimizer, config.resolved_milestones(), config.gamma)
    if config.schedule == "cosine":
        return optim.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def checkpoint_meta(model: nn.Module, dataset: MedicalDataset, config: TrainConfig | None = None,
                    **extra) -> dict:
    """The JSON header for a checkpoint of ``model`` trained on ``dataset``."""
    meta = {
        "model": copy.deepcopy(model.config),
        "task": dataset.task,
        "label_names": list(dataset.label_names),
        "normalization": dataset.normalization.to_dict(),
        "data": {"name": dataset.name, "synthetic": dataset.synthetic,
                 "in_channels": dataset.in_channels, "image_shape": list(dataset.image_shape),
                 "spatial_dims": dataset.spatial_dims},
    }
    if config is not None:
        meta["train_config"] = config.to_dict()
    meta.update(extra)
    return meta


def fit(model: nn.Module, dataset: MedicalDataset, config: TrainConfig | None = None,
        checkpoint_path: str | Path | None = None, progress: bool = True,
        log: Callable[[str], None] | None = None, parallel=None) -> FitResult:
    """Train ``model`` on ``dataset.train``, scoring ``dataset.val`` after every epoch.

    The weights with the best validation AUROC are kept: written to ``checkpoint_path`` (when
    given) each time they improve, and loaded back into ``model`` at the end. A tqdm bar shows
    the epoch, the running training loss and the last validation AUROC. ``log`` (e.g.
    ``print``) receives one line per epoch.

    ``parallel`` (a :class:`cnnfast.distributed.DataParallel`, from
    :func:`cnnfast.distributed.from_environment`) trains data-parallel: ``config.batch_size`` is
    the global batch, each rank runs its shard, gradients are summed over the ranks, validation
    is sharded; only rank 0 shows progress, logs and writes the checkpoint.
    """
    config = config or TrainConfig()
    device = config.device
    check_device(device)
    cnnfast.manual_seed(config.seed)  # dropout masks and anything else drawn globally
    model.to(device)
    task = dataset.task
    flips = RandomFlip(axes=config.flip_axes) if config.flip_axes else None
    loader = DataLoader(dataset.train, config.batch_size, shuffle=True, seed=config.seed,
                        normalization=dataset.normalization, transform=flips)
    loss_fn = loss_for(task)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    if parallel is not None:
        loader = _setup_parallel(parallel, model, optimizer, loader, config)
        progress, log = progress and parallel.is_main, log if parallel.is_main else None
        if not parallel.is_main:
            checkpoint_path = None
    result = FitResult()
    start = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs * len(loader), disable=not progress, unit="batch",
               dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, config.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            total, seen = 0.0, 0
            bar.set_description(f"epoch {epoch}/{config.epochs}")
            for x, y in loader:
                logits = model(cnnfast.tensor(x, device=device))
                loss = loss_fn(logits, _targets(y, task, device))
                optimizer.zero_grad()
                if parallel is None:
                    loss.backward()
                else:
                    parallel.backward(loss, loader.fraction)
                optimizer.step()
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"training diverged: loss is {value} in epoch "
                                             f"{epoch}; try a smaller --lr")
                total += value * len(x)
                seen += len(x)
                bar.update(1)
                postfix = {"loss": f"{total / seen:.4f}"}
                if result.history:
                    postfix["val_auc"] = f"{result.history[-1].val_auc:.4f}"
                bar.set_postfix(postfix, refresh=False)
            if schedule is not None:
                schedule.step()
            if parallel is not None:  # the epoch's loss over all ranks' samples
                total, seen = parallel.sum(total, seen)
            logits = predict_logits(model, dataset.val.images, dataset.normalization,
                                    config.eval_batch_size, device, parallel)
            metrics = evaluate_scores(dataset.val.labels, scores_from_logits(logits, task), task,
                                      dataset.label_names)
            record = EpochRecord(epoch, total / max(seen, 1),
                                 numpy_loss(logits, dataset.val.labels, task), metrics.auc,
                                 metrics.acc, lr, time.perf_counter() - epoch_start)
            result.history.append(record)
            bar.set_postfix({"loss": f"{record.train_loss:.4f}",
                             "val_auc": f"{record.val_auc:.4f}"})
            improved = metrics.auc > result.best_val_auc or result.best_state is None
            if improved:
                result.best_epoch, result.best_val_auc = epoch, metrics.auc
                result.best_state = model.state_dict()
                if checkpoint_path is not None:
                    result.checkpoint = save_checkpoint(checkpoint_path, result.best_state,
                                                        checkpoint_meta(
                        model, dataset, config, epoch=epoch,
                        metrics={"val": metrics.to_dict()},
                        history=result.history_dicts()))
            if log is not None:
                with tqdm.external_write_mode():
                    log(f"epoch {epoch:3d}/{config.epochs}  lr {lr:.2e}  train loss "
                        f"{record.train_loss:.4f}  val loss {record.val_loss:.4f}  val AUROC "
                        f"{record.val_auc:.4f}  val acc {record.val_acc:.4f}"
                        + ("  *best*" if improved else ""))
    finally:
        bar.close()
    model.load_state_dict(result.best_state)
    result.seconds = time.perf_counter() - start
    return result


def _setup_parallel(parallel, model: nn.Module, optimizer, loader: DataLoader,
                    config: TrainConfig):
    """Data-parallel set-up for :func:`fit`: SyncBatchNorm, rank 0's weights and optimizer
    state everywhere, gradient hooks; returns this rank's shard of ``loader``."""
    parallel.setup(model, optimizer, config.seed)
    return parallel.shard_loader(loader)


# --- checkpoints back into models ---------------------------------------------------------------

def model_from_checkpoint(ckpt: Checkpoint | str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (in eval mode).

    Raises :class:`~cnnfast.checkpoint.CheckpointError` when the header names no known model or
    the weights do not fit it.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    config = ckpt.model_config
    where = ckpt.path or "checkpoint"
    try:
        model = build_model(config)
    except ValueError as exc:
        raise CheckpointError(f"{where}: cannot rebuild its model ({exc})") from None
    load_weights(model, ckpt)
    check_device(device)
    return model.to(device).eval()


def load_weights(model: nn.Module, ckpt: Checkpoint | str | Path) -> nn.Module:
    """Load a checkpoint's weights into ``model``; a checkpoint of another architecture is
    refused with :class:`~cnnfast.checkpoint.CheckpointError` and the model is left untouched."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    where = ckpt.path or "checkpoint"
    saved = ckpt.model_config.get("name", "?")
    ours = getattr(model, "config", {}).get("name", type(model).__name__)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except ValueError as exc:
        raise CheckpointError(f"{where}: weights of a {saved!r} model do not fit this {ours!r} "
                              f"model: {exc}") from None
    return model


def check_fits(ckpt: Checkpoint, dataset: MedicalDataset) -> None:
    """Refuse (:class:`~cnnfast.checkpoint.CheckpointError`) a checkpoint whose model cannot take
    ``dataset``: other spatial rank, channel count, task or number of outputs."""
    kwargs = ckpt.model_config.get("kwargs", {})
    where = ckpt.path or "checkpoint"
    name = ckpt.model_config.get("name", "?")
    problems = []
    if kwargs.get("spatial_dims", dataset.spatial_dims) != dataset.spatial_dims:
        problems.append(f"it is a {kwargs['spatial_dims']}D {name} but the data is "
                        f"{dataset.spatial_dims}D")
    if kwargs.get("in_channels", dataset.in_channels) != dataset.in_channels:
        problems.append(f"it takes {kwargs['in_channels']} input channel(s) but the images have "
                        f"{dataset.in_channels}")
    if ckpt.task is not None and ckpt.task != dataset.task:
        problems.append(f"it was trained for a {ckpt.task!r} task but the data is "
                        f"{dataset.task!r}")
    if kwargs.get("num_classes", dataset.num_outputs) != dataset.num_outputs:
        kind = "labels" if dataset.task == MULTILABEL else "classes"
        problems.append(f"it has {kwargs['num_classes']} outputs but the data has "
                        f"{dataset.num_outputs} {kind}")
    if problems:
        raise CheckpointError(f"{where} does not fit {dataset.name}: " + "; ".join(problems))


def normalization_of(ckpt: Checkpoint, dataset: MedicalDataset) -> Normalization:
    """The normalisation a checkpoint was trained with (falls back to the dataset's)."""
    if ckpt.normalization:
        return Normalization.from_dict(ckpt.normalization)
    return dataset.normalization
