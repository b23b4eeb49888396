"""The ``cnnfast`` command line: ``demo``, ``train``, ``evaluate``, ``plot``, ``download``,
``export``, ``predict`` and ``bench``.

Every command checks its inputs (data file, checkpoint, device) before it writes anything; a bad
input ends with one line ``cnnfast <command>: error: ...`` on stderr and exit status 2.
Set ``CNNFAST_DEBUG=1`` to get the full traceback instead.

``bench`` belongs to :mod:`cnnfast.bench`: everything after ``bench`` goes to
``cnnfast.bench.main(argv)``, imported only then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- argument types -----------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --- shared steps -------------------------------------------------------------------------------

def _user_errors() -> tuple[type[BaseException], ...]:
    from cnnfast.checkpoint import CheckpointError
    from cnnfast.data import DataError, DownloadError
    from cnnfast.state import TrainingStateError

    return (CLIError, DataError, DownloadError, CheckpointError, TrainingStateError, OSError)


def _check_device(device: str) -> None:
    from cnnfast.train import check_device

    try:
        check_device(device)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc).split(". ")[0] + " (use --device cpu)") from None


def _load_data(args: argparse.Namespace):
    from cnnfast.data import load_dataset

    return load_dataset(args.data, size=getattr(args, "size", None),
                        root=getattr(args, "data_root", None),
                        base_url=getattr(args, "base_url", None),
                        progress=not getattr(args, "no_progress", False),
                        seed=getattr(args, "data_seed", 0),
                        num_classes=getattr(args, "num_classes", None))


def _check_writable(out: Path) -> None:
    """Refuse an output path that exists as a file, before anything is written."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")


def _write_json(path: Path, obj) -> Path:
    from cnnfast._io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    return print


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, metavar="FILE.npz|NAME",
                   help="a MedMNIST-style .npz file; a MedMNIST name such as pneumoniamnist, "
                        "nodulemnist3d or chestmnist_64 (downloaded to --data-root when "
                        "missing); or synthetic-nodule2d, synthetic-nodule3d, "
                        "synthetic-chestxray")
    p.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=None,
                   help="image size of a MedMNIST name (default 28)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where MedMNIST files are looked for and downloaded "
                        "(default $CNNFAST_DATA_DIR or ~/.medmnist)")
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="download from this URL instead of the MedMNIST Zenodo record")
    p.add_argument("--data-seed", type=int, default=0, metavar="N",
                   help="seed of a synthetic dataset (default 0)")
    p.add_argument("--num-classes", type=_positive_int, default=None, metavar="K",
                   help="classes of a single-label .npz whose task is not known (labels "
                        "0..K-1, some possibly absent from train); otherwise every class must "
                        "occur in train")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="train data-parallel on N local processes (starts mpiexec -n N; needs "
                        "cnnfast[mpi]). Under 'mpiexec -n N cnnfast train' leave it out. "
                        "--batch-size stays the global batch")
    p.add_argument("--no-sync-bn", action="store_true",
                   help="data-parallel: normalise each rank's shard by its own batch "
                        "statistics (default: SyncBatchNorm over the global batch, so the "
                        "result does not depend on the number of ranks)")


def _add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the training whose state is in --out (same arguments; the "
                        "result is bitwise that of an uninterrupted run)")
    p.add_argument("--save-every", type=_positive_int, default=None, metavar="STEPS",
                   help="also write the training state every STEPS optimizer steps (it is "
                        "always written after every epoch)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to run (default cpu); cuda needs a GPU with CuPy")


# --- demo ---------------------------------------------------------------------------------------

DEMO = {"n_train": 6000, "n_val": 1000, "n_test": 1000, "epochs": 20}
DEMO_QUICK = {"n_train": 300, "n_val": 100, "n_test": 200, "epochs": 2}


def cmd_demo(args: argparse.Namespace) -> int:
    from cnnfast import synthetic
    from cnnfast.models import SmallCNN

    _check_device(args.device)
    out = Path(args.out)
    _check_writable(out)
    sizes = dict(DEMO_QUICK if args.quick else DEMO)
    if args.epochs:
        sizes["epochs"] = args.epochs
    epochs = sizes.pop("epochs")
    start = time.perf_counter()
    print("cnnfast demo: a SmallCNN learns to spot lung nodules in SYNTHETIC CT-like slices")
    print("(generated by cnnfast.synthetic from shapes and noise: no patient data; numbers here "
          "say nothing clinical)")
    dataset = synthetic.nodule_dataset(seed=args.seed, spatial_dims=2, **sizes)
    print(f"data:  {dataset.summary()}")
    model = SmallCNN(dataset.in_channels, dataset.num_outputs, seed=args.seed)
    from cnnfast.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, schedule="cosine",
                         seed=args.seed, device=args.device)
    print(f"model: SmallCNN {model.config['kwargs']['channels']} filters, "
          f"{model.num_parameters():,} parameters; Adam lr {config.lr:g}, cosine schedule, "
          f"batch {config.batch_size}, {epochs} epochs, device {args.device}")
    return _train_and_report(args, dataset, model, config, out, start, demo=True)


def _train_and_report(args, dataset, model, config, out: Path, start: float, demo: bool,
                      parallel=None) -> int:
    """Fit, score the test split, write checkpoint/metrics/plots to ``out``, print a summary.

    ``parallel``: a data-parallel run (every rank trains and scores its shard; rank 0 alone
    writes and prints). The training holds ``out``'s run lock (rank 0's) and keeps its
    training state there (resumable with ``--resume``, see :mod:`cnnfast.state`): rank 0 writes
    it, every rank reads it.
    """
    import contextlib

    from cnnfast.state import STATE_NAME
    from cnnfast.train import fit

    main_rank = parallel is None or parallel.is_main
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / f"{model.config['name']}.ckpt"
    with _run_lock(out) if main_rank else contextlib.nullcontext():
        resume = _resume_state(args, out, announce=main_rank)
        result = fit(model, dataset, config, checkpoint_path=ckpt_path,
                     progress=not args.no_progress, log=_log(args), parallel=parallel,
                     state_path=out / STATE_NAME, save_every=getattr(args, "save_every", None),
                     resume=resume)
        return _report(args, dataset, model, config, out, start, demo, ckpt_path, result,
                       parallel)


def _report(args, dataset, model, config, out: Path, start: float, demo: bool, ckpt_path: Path,
            result, parallel=None) -> int:
    from cnnfast import viz
    from cnnfast.checkpoint import save_checkpoint
    from cnnfast.train import checkpoint_meta, evaluate

    test, scores = evaluate(model, dataset.test, dataset.task, dataset.label_names,
                            dataset.normalization, config.eval_batch_size, config.device,
                            parallel=parallel)
    if parallel is not None and not parallel.is_main:
        return 0
    metrics = {"val": {"auc": result.best_val_auc, "epoch": result.best_epoch},
               "test": test.to_dict()}
    save_checkpoint(ckpt_path, result.best_state, checkpoint_meta(
        model, dataset, config, epoch=result.best_epoch, metrics=metrics,
        history=result.history_dicts()))
    _write_json(out / "metrics.json", {"dataset": dataset.name, "model": model.config,
                                       "train_config": config.to_dict(), "metrics": metrics,
                                       "history": result.history_dicts()})
    plots = viz.plot_all(model, dataset, scores, result.history_dicts(), out)
    baseline = _linear_baseline(dataset) if demo else None
    elapsed = time.perf_counter() - start

    print()
    print(f"test set ({len(dataset.test)} images), model from epoch {result.best_epoch} "
          f"(best validation AUROC {result.best_val_auc:.4f}):")
    print(test.table())
    if demo:
        print(f"\ntest AUROC {test.auc:.4f}, accuracy {test.acc:.4f}")
        if baseline is not None:
            print(f"baseline: logistic regression on raw pixels, test AUROC {baseline:.4f}")
    else:
        print(f"\ntest AUROC {test.auc:.4f}, accuracy {test.acc:.4f} ({dataset.name}, "
              f"{model.config['name']})")
    print(f"time: {elapsed:.1f} s wall clock (training {result.seconds:.1f} s)")
    print(f"checkpoint: {ckpt_path}")
    print(f"metrics:    {out / 'metrics.json'}")
    print("plots:      " + "\n            ".join(str(p) for p in plots.values()))
    return 0


def _linear_baseline(dataset) -> float | None:
    """Test AUROC of L2 logistic regression on raw normalised pixels (binary tasks only)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from cnnfast.metrics import auroc

    if dataset.task != "binary-class":
        return None
    norm = dataset.normalization
    x_train = norm(dataset.train.images).reshape(len(dataset.train), -1)
    x_test = norm(dataset.test.images).reshape(len(dataset.test), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=0.1, solver="liblinear").fit(x_train,
                                                                dataset.train.labels[:, 0])
    return auroc(dataset.test.labels[:, 0], clf.decision_function(x_test))


# --- resumable training (cnnfast.state) ------------------------------------------------------

def _run_lock(out: Path):
    """The lock on ``out`` (one training at a time); says so when it takes over a stale one."""
    from cnnfast.state import RunLock, remove_temporary_files

    lock = RunLock(out).acquire()
    if lock.stale_pid is not None:
        print(f"note: taking over the lock of pid {lock.stale_pid}, which is no longer running",
              file=sys.stderr)
    remove_temporary_files(out)  # a killed writer's leftovers; nobody else writes here now
    return lock


def _resume_state(args: argparse.Namespace, out: Path, announce: bool = True):
    """The training state to continue from (``--resume``), or ``None`` to start afresh.

    Without ``--resume`` an unfinished training in ``out`` is not overwritten: that would lose
    it. ``--resume`` with no state in ``out`` starts from the beginning (nothing was saved yet).
    """
    from cnnfast.state import STATE_NAME, TrainingStateError, read_state

    path = out / STATE_NAME
    if not path.exists():
        if getattr(args, "resume", False) and announce:
            print(f"note: no training state in {out} yet; starting from the beginning",
                  file=sys.stderr)
        return None
    try:
        state = read_state(path)
    except TrainingStateError as exc:
        if getattr(args, "resume", False):
            raise
        raise CLIError(f"{out} holds a training state that cannot be read ({exc}); delete {path} "
                       "to start a new training there, or choose another --out") from None
    if getattr(args, "resume", False):
        return state
    if not state.finished:
        raise CLIError(f"{out} holds an unfinished training ({state.epochs_done} epoch(s) done, "
                       f"step {state.global_step}); add --resume to continue it, or delete "
                       f"{path} to start over, or choose another --out")
    return None


# --- train --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    if args.workers is not None:
        return _launch_workers(args)
    _check_device(args.device)
    parallel = _data_parallel(args)
    if parallel is None:
        return _train(args, None)
    with contextlib.ExitStack() as stack:
        if not parallel.is_main:  # rank 0 alone prints
            stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))
        try:
            return _train(args, parallel)
        except BaseException as exc:  # noqa: BLE001 - any failure must end every rank
            if os.environ.get("CNNFAST_DEBUG", "") not in ("", "0"):
                import traceback

                traceback.print_exc()
            print(f"cnnfast train: error on rank {parallel.rank} of {parallel.size}: "
                  f"{type(exc).__name__}: {exc}; ending all ranks", file=sys.stderr)
            parallel.abort(1 if isinstance(exc, FloatingPointError) else EXIT_USAGE)
            raise


def _train(args: argparse.Namespace, parallel) -> int:
    from cnnfast.models import SmallCNN, resnet18
    from cnnfast.train import TrainConfig

    start = time.perf_counter()
    out = Path(args.out) if args.out else Path("runs") / f"{Path(str(args.data)).stem}-{args.model}"
    _check_writable(out)
    dataset = _load_data(args)
    if args.milestones is not None and any(m > args.epochs for m in args.milestones):
        raise CLIError(f"--milestones {args.milestones} lie beyond --epochs {args.epochs}")
    try:
        batch_size = args.batch_size or (128 if dataset.spatial_dims == 2 else 32)
        config = TrainConfig(epochs=args.epochs, batch_size=batch_size, lr=args.lr,
                             optimizer=args.optimizer, momentum=args.momentum,
                             weight_decay=args.weight_decay, schedule=args.schedule,
                             milestones=args.milestones, gamma=args.gamma, seed=args.seed,
                             device=args.device,
                             flip_axes=(dataset.spatial_dims - 1,) if args.flip else ())
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.model == "smallcnn":
        model = SmallCNN(dataset.in_channels, dataset.num_outputs, dataset.spatial_dims,
                         channels=args.channels, seed=args.seed)
    else:
        stem = args.stem or ("small" if min(dataset.image_shape) <= 64 else "imagenet")
        model = resnet18(dataset.in_channels, dataset.num_outputs, dataset.spatial_dims,
                         stem=stem, width=args.width, seed=args.seed)
    print(f"data:  {dataset.summary()}")
    print(f"model: {args.model} ({model.num_parameters():,} parameters); {config.optimizer} lr "
          f"{config.lr:g}, {config.schedule} schedule"
          + (f" {config.resolved_milestones()}" if config.schedule == "multistep" else "")
          + f", weight decay {config.weight_decay:g}, batch {config.batch_size}, "
            f"{config.epochs} epochs, seed {config.seed}, device {config.device}")
    if parallel is not None:
        print(f"data parallel: {parallel.size} ranks ({parallel.backend}), batch "
              f"{config.batch_size} split over them, "
              + ("SyncBatchNorm" if parallel.sync_batchnorm else "per-rank batch norm"))
    return _train_and_report(args, dataset, model, config, out, start, demo=False,
                             parallel=parallel)


# --- data-parallel training (cnnfast.distributed) ----------------------------------------------

def _data_parallel(args: argparse.Namespace):
    """The run's :class:`~cnnfast.distributed.DataParallel` under mpiexec/srun, else None."""
    from cnnfast import distributed

    try:
        return distributed.from_environment(args.device, sync_batchnorm=not args.no_sync_bn)
    except (distributed.DistributedError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _launch_workers(args: argparse.Namespace) -> int:
    """``cnnfast train --workers N``: run this command again under the mpich wheel's
    ``mpiexec -n N``."""
    from cnnfast import distributed

    if distributed.launcher_world_size() > 1:
        raise CLIError("--workers starts mpiexec itself; under mpiexec or srun leave it out")
    argv, skip = [], False
    for i, item in enumerate(args.argv):
        if skip:
            skip = False
        elif item == "--workers":
            skip = True
        elif not item.startswith("--workers="):
            argv.append(item)
    try:
        code = distributed.launch(argv, args.workers)
    except distributed.DistributedError as exc:
        raise CLIError(str(exc)) from None
    if code != 0:
        print(f"cnnfast train: error: the {args.workers}-rank job failed (mpiexec exit status "
              f"{code}); the lines above say which rank and why", file=sys.stderr)
    return code


# --- evaluate and plot --------------------------------------------------------------------------

def _checkpoint_and_data(args: argparse.Namespace):
    from cnnfast.checkpoint import load_checkpoint
    from cnnfast.train import check_fits, model_from_checkpoint

    _check_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    dataset = _load_data(args)
    check_fits(ckpt, dataset)
    model = model_from_checkpoint(ckpt, device=args.device)
    return ckpt, dataset, model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnfast.train import evaluate, normalization_of

    if args.json and Path(args.json).is_dir():
        raise CLIError(f"--json {args.json} is a directory")
    ckpt, dataset, model = _checkpoint_and_data(args)
    split = dataset.split(args.split)
    metrics, _ = evaluate(model, split, dataset.task, dataset.label_names,
                          normalization_of(ckpt, dataset), args.batch_size, args.device)
    name = ckpt.model_config.get("name", "?")
    print(f"{args.checkpoint} ({name}) on {dataset.name} {args.split} split "
          f"({len(split)} images, {dataset.task}):")
    print(metrics.table())
    print(f"\nAUROC {metrics.auc:.4f}, accuracy {metrics.acc:.4f}")
    if metrics.undefined:
        print(f"(no AUROC for {', '.join(metrics.undefined)}: only one class present)")
    if args.json:
        _write_json(Path(args.json), {"checkpoint": str(args.checkpoint), "data": dataset.name,
                                      "split": args.split, "metrics": metrics.to_dict()})
        print(f"metrics written to {args.json}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cnnfast import viz
    from cnnfast.train import evaluate, normalization_of

    out = Path(args.out)
    _check_writable(out)
    ckpt, dataset, model = _checkpoint_and_data(args)
    if args.index is not None and not 0 <= args.index < len(dataset.test):
        raise CLIError(f"--index {args.index} is outside the test split "
                       f"(0..{len(dataset.test) - 1})")
    norm = normalization_of(ckpt, dataset)
    _, scores = evaluate(model, dataset.test, dataset.task, dataset.label_names, norm,
                         args.batch_size, args.device)
    plots = viz.plot_all(model, dataset, scores, ckpt.header.get("history"), out,
                         normalization=norm, index=args.index)
    if args.gradcam:
        plots["gradcam"] = viz.plot_gradcam_split(model, dataset, scores, norm,
                                                  out / "gradcam.png", args.gradcam, args.device)
    print("plots: " + "\n       ".join(str(p) for p in plots.values()))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from cnnfast.data import download

    path = download(args.name, args.size, root=args.data_root, base_url=args.base_url,
                    progress=not args.no_progress)
    print(path)
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Forward ``argv`` to ``cnnfast.bench.main``, imported only now."""
    try:
        from cnnfast import bench
    except ModuleNotFoundError as exc:
        if exc.name not in ("cnnfast.bench",):
            raise
        raise CLIError("the benchmark runner (cnnfast.bench) is not installed in this copy of "
                       "cnnfast") from None
    result = bench.main(list(argv))
    return int(result or 0)


# --- export and predict (cnnfast.cli_predict) --------------------------------------------------

def _add_export_predict_parsers(sub) -> None:
    """``export`` and ``predict`` live in :mod:`cnnfast.cli_predict`; it is handed the shared
    steps it uses (so it does not import this module: no import cycle)."""
    from cnnfast import cli_predict

    cli_predict.add_parsers(sub, SimpleNamespace(
        error=CLIError, positive_int=_positive_int, add_device_arg=_add_device_arg,
        check_device=_check_device, check_writable=_check_writable, load_data=_load_data))


# --- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnfast",
        description="Train and evaluate small CNNs on medical images (MedMNIST .npz files or "
                    "built-in synthetic data), judged by AUROC.")
    parser.add_argument("--version", action="version", version=f"cnnfast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="train SmallCNN on synthetic nodule slices (about a minute)",
                       description="Train a SmallCNN on built-in SYNTHETIC CT-like slices with "
                                   "or without a lung nodule; print the test AUROC (and a "
                                   "logistic-regression baseline) and write a checkpoint and "
                                   "plots. Same seed, same numbers.")
    p.add_argument("--out", default="cnnfast-demo", metavar="DIR",
                   help="output directory (default ./cnnfast-demo)")
    p.add_argument("--seed", type=int, default=0, help="data and weight seed (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"epochs (default {DEMO['epochs']}; --quick: {DEMO_QUICK['epochs']})")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds on a tiny dataset, to check the installation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)
    _add_resume_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model on a dataset",
                       description="Train SmallCNN or ResNet-18 (2D or 3D, from the data) and "
                                   "keep the weights with the best validation AUROC. Defaults "
                                   "are the MedMNIST v2 recipe: Adam lr 0.001, batch 128 (3D: "
                                   "32), 100 epochs, lr x0.1 at epochs 50 and 75; cross-entropy, "
                                   "or BCE for multi-label tasks.")
    _add_data_args(p)
    p.add_argument("--model", choices=("smallcnn", "resnet18"), default="resnet18",
                   help="architecture (default resnet18)")
    p.add_argument("--epochs", type=_positive_int, default=100, help="epochs (default 100)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="default 128 for 2D and 32 for 3D data (MedMNIST's scripts)")
    p.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="initial learning rate (default 0.001)")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam",
                   help="default adam")
    p.add_argument("--momentum", type=_nonnegative_float, default=0.9,
                   help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.0,
                   help="L2 weight decay (AdamW: decoupled); default 0")
    p.add_argument("--schedule", choices=("multistep", "cosine", "none"), default="multistep",
                   help="learning-rate schedule, stepped once per epoch (default multistep)")
    p.add_argument("--milestones", type=_positive_int, nargs="+", default=None, metavar="EPOCH",
                   help="multistep epochs (default: 50%% and 75%% of --epochs)")
    p.add_argument("--gamma", type=_positive_float, default=0.1,
                   help="multistep lr factor (default 0.1)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, shuffling and augmentation (default 0)")
    p.add_argument("--flip", action="store_true", help="random left-right flips")
    p.add_argument("--width", type=_positive_int, default=64,
                   help="resnet18 base width (default 64)")
    p.add_argument("--stem", choices=("small", "imagenet"), default=None,
                   help="resnet18 stem (default: small up to 64 pixels, imagenet above)")
    p.add_argument("--channels", type=_positive_int, nargs="+", default=[8, 16, 32],
                   help="smallcnn filters per block (default 8 16 32)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default runs/<data>-<model>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)
    _add_parallel_args(p)
    _add_resume_args(p)
    p.set_defaults(func=cmd_train)

    for name, func, text in (("evaluate", cmd_evaluate, "AUROC and accuracy of a checkpoint"),
                             ("plot", cmd_plot, "filters, feature maps and ROC curves of a "
                                                "checkpoint")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + " on a "
                           "dataset (MedMNIST's evaluator: binary AUROC of the positive class, "
                           "multi-label mean of per-label AUROCs, multi-class one-vs-rest).")
        p.add_argument("--checkpoint", required=True, metavar="FILE",
                       help="a checkpoint written by cnnfast train or demo")
        _add_data_args(p)
        p.add_argument("--batch-size", type=_positive_int, default=256)
        p.add_argument("--no-progress", action="store_true", help="no download progress bar")
        _add_device_arg(p)
        if name == "evaluate":
            p.add_argument("--split", choices=("train", "val", "test"), default="test")
            p.add_argument("--json", default=None, metavar="FILE",
                           help="also write the metrics as JSON")
        else:
            p.add_argument("--out", default="plots", metavar="DIR",
                           help="output directory (default ./plots)")
            p.add_argument("--index", type=int, default=None,
                           help="test image for the feature maps (default: the first positive)")
            p.add_argument("--gradcam", type=_positive_int, nargs="?", const=16, default=None,
                           metavar="N", help="also plot Grad-CAM heatmaps over the first N "
                                             "test images (default 16) with their true and "
                                             "predicted labels")
        p.set_defaults(func=func)

    p = sub.add_parser("download", help="download a MedMNIST .npz file",
                       description="Download a MedMNIST file by name, check its MD5 and store "
                                   "it under --data-root; prints the path.")
    p.add_argument("name", help="e.g. pneumoniamnist, nodulemnist3d, chestmnist_64")
    p.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=None)
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--base-url", default=None, metavar="URL")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_download)

    _add_export_predict_parsers(sub)

    sub.add_parser("bench", help="kernel benchmarks (cnnfast.bench; see cnnfast bench --help)",
                   add_help=False)
    from cnnfast import doctor

    doctor.add_parser(sub)  # cnnfast doctor: its arguments and command live in cnnfast/doctor.py
    return parser


def _version() -> str:
    try:
        import cnnfast

        return cnnfast.__version__
    except (ImportError, AttributeError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cnnfast`` command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    debug = os.environ.get("CNNFAST_DEBUG", "") not in ("", "0")
    try:
        if command == "bench":  # everything after "bench", --help included, belongs to bench
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        args.argv = argv  # for cnnfast train --workers, which runs the command again
        return args.func(args)
    except KeyboardInterrupt:
        print("cnnfast: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if debug:
            raise
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"cnnfast {command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:
        if debug:
            raise
        print(f"cnnfast {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
