"""What every ``cnnfast`` command shares: the one-line user error, argument types, the device,
data and output checks, and the argument groups more than one command takes.

A command module (``cnnfast/cli/<command>.py``) imports from here and from the workflow modules
(lazily, inside its functions, so ``cnnfast --help`` stays fast), never from another command.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- argument types -----------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --- shared steps -------------------------------------------------------------------------------

def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions :func:`cnnfast.cli.main` reports as one line with exit status 2."""
    from cnnfast.checkpoint import CheckpointError
    from cnnfast.data import DataError, DownloadError
    from cnnfast.state import TrainingStateError

    return (CLIError, DataError, DownloadError, CheckpointError, TrainingStateError, OSError)


def check_device(device: str) -> None:
    from cnnfast.train import check_device as check

    try:
        check(device)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc).split(". ")[0] + " (use --device cpu)") from None


def load_data(args: argparse.Namespace):
    from cnnfast.data import load_dataset

    return load_dataset(args.data, size=getattr(args, "size", None),
                        root=getattr(args, "data_root", None),
                        base_url=getattr(args, "base_url", None),
                        progress=not getattr(args, "no_progress", False),
                        seed=getattr(args, "data_seed", 0),
                        num_classes=getattr(args, "num_classes", None))


def check_writable(out: Path) -> None:
    """Refuse an output path that exists as a file, before anything is written."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")


def write_json(path: Path, obj) -> Path:
    from cnnfast._io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


# --- argument groups ----------------------------------------------------------------------------

def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
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
    p.add_argument("--num-classes", type=positive_int, default=None, metavar="K",
                   help="classes of a single-label .npz whose task is not known (labels "
                        "0..K-1, some possibly absent from train); otherwise every class must "
                        "occur in train")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where to run (default cpu); cuda needs a GPU with CuPy")
