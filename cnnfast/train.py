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
from cnnfast.rng import default_generator
from cnnfast.state import (
    TrainingState,
    TrainingStateError,
    check_resumable,
    generator_state,
    module_generators,
    set_generator_state,
    write_state,
)
from cnnfast.state import signature as state_signature
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
    if dataset.preprocessing is not None:  # from `cnnfast prepare`: predict repeats it on scans
        meta["preprocessing"] = dataset.preprocessing
    if config is not None:
        meta["train_config"] = config.to_dict()
    meta.update(extra)
    return meta


def fit(model: nn.Module, dataset: MedicalDataset, config: TrainConfig | None = None,
        checkpoint_path: str | Path | None = None, progress: bool = True,
        log: Callable[[str], None] | None = None, parallel=None,
        state_path: str | Path | None = None, save_every: int | None = None,
        resume: TrainingState | None = None) -> FitResult:
    """Train ``model`` on ``dataset.train``, scoring ``dataset.val`` after every epoch.

    The weights with the best validation AUROC are kept: written to ``checkpoint_path`` (when
    given) each time they improve, and loaded back into ``model`` at the end. A tqdm bar shows
    the epoch, the running training loss and the last validation AUROC. ``log`` (e.g.
    ``print``) receives one line per epoch.

    ``parallel`` (a :class:`cnnfast.distributed.DataParallel`, from
    :func:`cnnfast.distributed.from_environment`) trains data-parallel: ``config.batch_size`` is
    the global batch, each rank runs its shard, gradients are summed over the ranks, validation
    is sharded; only rank 0 shows progress, logs and writes the checkpoint.

    With ``state_path`` the whole training state (:mod:`cnnfast.state`) is written there
    atomically after every epoch and every ``save_every`` optimizer steps; ``resume`` (a state
    read back with :func:`cnnfast.state.read_state` and checked against this run's signature)
    continues from it, ending with the same bits as an uninterrupted run (data-parallel: rank 0
    writes the state, every rank is given it to resume). A non-finite loss
    raises ``FloatingPointError`` naming the epoch and step before the step is taken, so the
    model and the state file keep the last good weights.
    """
    config = config or TrainConfig()
    check_device(config.device)
    if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
        raise ValueError(f"save_every must be a positive int or None, got {save_every!r}")
    run = _prepare_run(model, dataset, config, state_path, parallel, resume)
    if parallel is not None and not parallel.is_main:  # rank 0 alone shows, logs and writes
        progress, log, checkpoint_path = False, None, None
    start = time.perf_counter()
    bar = _Progress(config.epochs * len(run.loader), run.done_batches(), progress, log)
    try:
        for epoch in range(run.epochs_done + 1, config.epochs + 1):
            lr = run.optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            _train_epoch(run, epoch, bar, save_every)
            if run.schedule is not None:
                run.schedule.step()
            record, metrics = _validate(run, epoch, lr, epoch_start)
            improved = _keep_best(run, epoch, metrics, checkpoint_path)
            run.save(epochs_done=epoch)
            bar.end_epoch(record, epoch_line(epoch, config.epochs, lr, record, improved))
    finally:
        bar.close()
    model.load_state_dict(run.result.best_state)
    run.result.seconds = time.perf_counter() - start
    return run.result


# --- the pieces of a fit run (each tested on its own in tests/test_train_parts.py) ------------

def _prepare_run(model: nn.Module, dataset: MedicalDataset, config: TrainConfig,
                 state_path: str | Path | None, parallel, resume: TrainingState | None):
    """Seed, move the model, build the loader, loss, optimizer and schedule; continue from
    ``resume``; set up data parallelism. Returns the run's :class:`_RunState`."""
    cnnfast.manual_seed(config.seed)  # dropout masks and anything else drawn globally
    model.to(config.device)
    flips = RandomFlip(axes=config.flip_axes) if config.flip_axes else None
    loader = DataLoader(dataset.train, config.batch_size, shuffle=True, seed=config.seed,
                        normalization=dataset.normalization, transform=flips)
    loss_fn = loss_for(dataset.task)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    run = _RunState(model, dataset, config, optimizer, schedule, loader, FitResult(), state_path,
                    parallel)
    run.loss_fn = loss_fn
    if resume is not None:
        run.restore(resume)  # before the set-up below, which broadcasts rank 0's state anyway
    if parallel is not None:
        _setup_parallel(parallel, model, optimizer, loader, config)
    return run


def _train_epoch(run, epoch: int, bar, save_every: int | None) -> None:
    """One pass over the training split (from where a resumed epoch stopped): a step per batch,
    the training state saved every ``save_every`` steps, the running loss summed over ranks."""
    run.model.train()
    loader = run.loader
    order, first = run.take_epoch_position()
    if order is None:
        order = loader.epoch_order()
    bar.start_epoch(epoch, run.config.epochs)
    for i in range(first, len(loader)):
        value, n = _train_step(run, *loader.batch(order, i), epoch, i)
        run.loss_sum += value * n
        run.seen += n
        run.global_step += 1
        if save_every and run.global_step % save_every == 0 and i + 1 < len(loader):
            run.save(epochs_done=epoch - 1, order=order, batches_done=i + 1)
        bar.step(run.loss_sum / run.seen, run.result.history)
    if run.parallel is not None:  # the epoch's loss over all ranks' samples
        run.loss_sum, run.seen = run.parallel.sum(run.loss_sum, run.seen)


def _train_step(run, x: np.ndarray, y: np.ndarray, epoch: int, i: int) -> tuple[float, int]:
    """Forward, loss, backward and optimizer step on batch ``i`` (data-parallel: this rank's
    share of it); returns (loss, samples). A non-finite loss raises ``FloatingPointError`` before
    the step is taken, with the batch-norm statistics of this batch undone."""
    parallel, device = run.parallel, run.config.device
    if parallel is not None:  # this rank's share of the global batch
        x, y, share = parallel.shard_batch(x, y)
    buffers = run.copy_buffers()
    logits = run.model(cnnfast.tensor(x, device=device))
    loss = run.loss_fn(logits, _targets(y, run.dataset.task, device))
    value = loss.item()
    if not math.isfinite(value):
        run.put_buffers(buffers)
        raise FloatingPointError(run.diverged_message(value, epoch, i))
    run.optimizer.zero_grad()
    if parallel is None:
        loss.backward()
    else:
        parallel.backward(loss, share)
    run.optimizer.step()
    return value, len(x)


def _validate(run, epoch: int, lr: float, epoch_start: float):
    """Score the validation split (sharded over the ranks) and append the epoch's record to the
    history; returns (record, validation metrics). Resets the running training loss."""
    model, dataset, config = run.model, run.dataset, run.config
    task = dataset.task
    logits = predict_logits(model, dataset.val.images, dataset.normalization,
                            config.eval_batch_size, config.device, run.parallel)
    metrics = evaluate_scores(dataset.val.labels, scores_from_logits(logits, task), task,
                              dataset.label_names)
    record = EpochRecord(epoch, run.loss_sum / max(run.seen, 1),
                         numpy_loss(logits, dataset.val.labels, task), metrics.auc, metrics.acc,
                         lr, time.perf_counter() - epoch_start)
    run.loss_sum, run.seen = 0.0, 0
    run.result.history.append(record)
    return record, metrics


def _keep_best(run, epoch: int, metrics, checkpoint_path: str | Path | None) -> bool:
    """Keep the weights when the validation AUROC improved (the first epoch always does), and
    write them to ``checkpoint_path`` when given; returns whether they improved."""
    result = run.result
    improved = metrics.auc > result.best_val_auc or result.best_state is None
    if improved:
        result.best_epoch, result.best_val_auc = epoch, metrics.auc
        result.best_state = run.model.state_dict()
        if checkpoint_path is not None:
            meta = checkpoint_meta(run.model, run.dataset, run.config, epoch=epoch,
                                   metrics={"val": metrics.to_dict()},
                                   history=result.history_dicts())
            result.checkpoint = save_checkpoint(checkpoint_path, result.best_state, meta)
    return improved


def epoch_line(epoch: int, epochs: int, lr: float, record: EpochRecord, improved: bool) -> str:
    """The log line of one epoch."""
    return (f"epoch {epoch:3d}/{epochs}  lr {lr:.2e}  train loss {record.train_loss:.4f}  "
            f"val loss {record.val_loss:.4f}  val AUROC {record.val_auc:.4f}  val acc "
            f"{record.val_acc:.4f}" + ("  *best*" if improved else ""))


class _Progress:
    """The progress bar of a fit run (tqdm: epoch, running loss, last validation AUROC) and its
    log, which receives :func:`epoch_line` after every epoch (``log=None``: no lines)."""

    def __init__(self, total: int, initial: int, enabled: bool,
                 log: Callable[[str], None] | None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, disable=not enabled, unit="batch", dynamic_ncols=True,
                        leave=False, initial=initial)
        self.log = log

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.bar.set_description(f"epoch {epoch}/{epochs}")

    def step(self, train_loss: float, history: list) -> None:
        self.bar.update(1)
        postfix = {"loss": f"{train_loss:.4f}"}
        if history:
            postfix["val_auc"] = f"{history[-1].val_auc:.4f}"
        self.bar.set_postfix(postfix, refresh=False)

    def end_epoch(self, record: EpochRecord, line: str) -> None:
        self.bar.set_postfix({"loss": f"{record.train_loss:.4f}",
                              "val_auc": f"{record.val_auc:.4f}"})
        if self.log is not None:
            with self._tqdm.external_write_mode():
                self.log(line)

    def close(self) -> None:
        self.bar.close()


class _RunState:
    """Where a :func:`fit` run stands, and its training-state file: captures everything into a
    :class:`~cnnfast.state.TrainingState` (:meth:`save`) and puts a saved one back
    (:meth:`restore`)."""

    def __init__(self, model, dataset, config, optimizer, schedule, loader, result,
                 path: str | Path | None, parallel=None) -> None:
        self.model, self.dataset, self.config, self.optimizer = model, dataset, config, optimizer
        self.loss_fn = None  # set by _prepare_run
        self.schedule, self.loader, self.result = schedule, loader, result  # single-process
        self.path = Path(path) if path is not None else None
        self.parallel = parallel
        self.writer = parallel is None or parallel.is_main
        self.signature = state_signature(model, dataset, config) if path is not None else None
        self.epochs_done = 0
        self.global_step = 0
        self.loss_sum, self.seen = 0.0, 0
        self._order: np.ndarray | None = None
        self._batches_done = 0

    def done_batches(self) -> int:
        return self.epochs_done * len(self.loader) + self._batches_done

    def take_epoch_position(self) -> tuple[np.ndarray | None, int]:
        """The restored (order, first batch) of the epoch in progress, once; else (None, 0)."""
        position = (self._order, self._batches_done)
        self._order, self._batches_done = None, 0
        return position

    def restore_global_generator(self, state: TrainingState) -> None:
        """The global generator (dropout masks): rank 0's in the file, and every rank's
        (data-parallel ranks keep one process's streams and draw the global batch's masks)."""
        set_generator_state(default_generator(), state.rng["global"], "global")

    def copy_buffers(self) -> list:
        """Copies of the model's buffers (batch-norm running statistics: small)."""
        return [b.data.copy() for _, b in self.model.named_buffers()]

    def put_buffers(self, copies: list) -> None:
        for (_, b), saved in zip(self.model.named_buffers(), copies):
            b.data[...] = saved

    def diverged_message(self, value: float, epoch: int, i: int) -> str:
        where = f"epoch {epoch}, step {i + 1} of {len(self.loader)} (step {self.global_step + 1} " \
                "of the run)"
        kept = ""
        if self.path is not None and self.path.exists():
            kept = f"; the last good training state is in {self.path}"
        return (f"training diverged: the loss is {value} in {where}, before that step was "
                f"taken{kept}; try a smaller --lr")

    def _rng_states(self) -> dict:
        return {"global": generator_state(default_generator()),
                "loader": generator_state(self.loader.rng),
                "modules": {name: generator_state(g)
                            for name, g in module_generators(self.model).items()}}

    def save(self, epochs_done: int, order: np.ndarray | None = None,
             batches_done: int = 0) -> None:
        """Write the state (rank 0). Data-parallel, every rank calls it at the same step: the
        running loss of a part-done epoch is summed over the ranks (a collective) first."""
        if self.path is None:
            return
        loss_sum, seen = self.loss_sum, self.seen
        if self.parallel is not None and order is not None:
            loss_sum, seen = self.parallel.sum(loss_sum, seen)
        if not self.writer:
            return
        result = self.result
        state = TrainingState(
            signature=self.signature, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            schedule_epoch=self.schedule.last_epoch if self.schedule is not None else None,
            rng=self._rng_states(), epochs_done=epochs_done, batches_done=batches_done,
            order=order, loss_sum=loss_sum, seen=seen, global_step=self.global_step,
            best_epoch=result.best_epoch, best_val_auc=result.best_val_auc,
            best_state=result.best_state, history=result.history_dicts(),
            finished=epochs_done >= self.config.epochs)
        write_state(self.path, state)

    def restore(self, state: TrainingState) -> None:
        if self.signature is not None:
            check_resumable(state, self.signature, str(self.path))
        where = str(self.path or "training state")
        try:
            self.model.load_state_dict(state.model, strict=True)
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as exc:
            raise TrainingStateError(f"{where}: does not fit this model: {exc}") from None
        if self.schedule is not None and state.schedule_epoch is not None:
            self.schedule.last_epoch = int(state.schedule_epoch)
            self.schedule._apply()
        self.restore_global_generator(state)
        set_generator_state(self.loader.rng, state.rng["loader"], "of the data loader")
        generators = module_generators(self.model)
        for name, saved in state.rng.get("modules", {}).items():
            if name not in generators:
                raise TrainingStateError(f"{where}: no random generator {name} in this model")
            set_generator_state(generators[name], saved, name)
        self.epochs_done = state.epochs_done
        self.global_step = state.global_step
        self.loss_sum, self.seen = state.loss_sum, state.seen
        if not self.writer:  # the saved sums are over all ranks: rank 0 carries them on
            self.loss_sum, self.seen = 0.0, 0
        if state.order is not None:
            if len(state.order) != len(self.loader.images):
                raise TrainingStateError(f"{where}: its sample order has {len(state.order)} "
                                         f"entries, the training split {len(self.loader.images)}")
            self._order, self._batches_done = state.order, state.batches_done
        result = self.result
        result.history = [EpochRecord(**r) for r in state.history]
        result.best_epoch, result.best_val_auc = state.best_epoch, state.best_val_auc
        result.best_state = state.best_state


def _setup_parallel(parallel, model: nn.Module, optimizer, loader: DataLoader,
                    config: TrainConfig) -> None:
    """Data-parallel set-up for :func:`fit`: SyncBatchNorm, rank 0's weights and optimizer
    state everywhere, gradient hooks; every rank must get a share of every batch."""
    parallel.check_batches(len(loader.images), loader.batch_size, loader.drop_last)
    parallel.setup(model, optimizer)


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
