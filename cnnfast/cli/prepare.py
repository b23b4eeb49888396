"""``cnnfast prepare``: a folder of DICOM series / NIfTI files / DICOM images plus ``labels.csv``
-> a MedMNIST-layout ``.npz`` that ``train``, ``evaluate``, ``plot``, ``predict`` and ``export``
take as it is (:func:`cnnfast.prepare.prepare` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnfast.cli._common import CLIError, nonnegative_float

PRESETS = ("lung", "mediastinum", "bone", "brain")  # cnnfast.transforms.WINDOWS, not imported


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def size_arg(text: str) -> tuple[int, ...]:
    """``64x64x64`` (D x H x W) or ``224x224`` (H x W)."""
    values = _numbers(text, "a size such as 64x64x64 or 224x224")
    if len(values) not in (2, 3) or any(v < 1 or v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected HxW or DxHxW positive integers, got {text!r}")
    return tuple(int(v) for v in values)


def spacing_arg(text: str) -> tuple[float, ...]:
    values = _numbers(text, "a spacing in mm such as 1.5 or 2.5,1,1")
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing must be positive, got {text!r}")
    return values


def window_arg(text: str):
    if text in PRESETS:
        return text
    values = _numbers(text, f"a preset ({', '.join(PRESETS)}) or CENTER,WIDTH")
    if len(values) != 2 or values[1] <= 0:
        raise argparse.ArgumentTypeError(f"expected a preset ({', '.join(PRESETS)}) or "
                                         f"CENTER,WIDTH with WIDTH > 0, got {text!r}")
    return values


def roi_arg(text: str):
    """``body`` or ``z0:z1,y0:y1,x0:x1`` (voxels of the resampled grid)."""
    if text == "body":
        return text
    try:
        box = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(","))
    except ValueError:
        box = ()
    if len(box) not in (2, 3) or any(len(p) != 2 for p in box):
        raise argparse.ArgumentTypeError(f"expected 'body' or START:STOP per axis "
                                         f"(e.g. 0:40,10:90,10:90), got {text!r}")
    return box


def run(args: argparse.Namespace) -> int:
    from cnnfast.prepare import prepare
    from cnnfast.transforms import Preprocessing

    size = args.size
    spacing = args.spacing
    if spacing is not None and len(spacing) == 1:
        spacing = spacing * len(size)
    try:
        recipe = Preprocessing(size=size, spacing=spacing, roi=args.roi,
                               intensity=args.intensity, window=args.window,
                               percentiles=args.percentiles, body_threshold=args.body_threshold,
                               margin=args.margin, fit=args.fit)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a directory; give a file name such as scans.npz")
    if out.suffix != ".npz":
        raise CLIError(f"--out must name a .npz file, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = args.label_columns.split(",") if args.label_columns else None
    try:
        result = prepare(args.scans, out, recipe, labels=args.labels, task=args.task,
                         id_column=args.id_column, patient_column=args.patient_column,
                         label_columns=columns, val=args.val, test=args.test, seed=args.seed,
                         progress=not args.no_progress)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    ds = result.dataset
    print(ds.summary())
    print(f"written {result.npz} and its manifest {result.manifest}; next: cnnfast train "
          f"--data {result.npz}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare", help="DICOM / NIfTI scans + labels.csv -> a .npz to train on",
        description="Read a folder of scans (DICOM series folders, .nii/.nii.gz files or DICOM "
                    "images) listed in labels.csv (id, optional patient and split columns, "
                    "label columns), preprocess each (resample to --spacing, crop --roi, "
                    "--intensity window / z-score / percentiles, pad or resize to --size), split "
                    "by patient and write a MedMNIST-layout .npz plus a JSON manifest beside it. "
                    "The recipe travels in the .npz: train records it in its checkpoint and "
                    "predict repeats it on new scans. Needs pip install 'cnnfast[medical]'.")
    p.add_argument("--scans", required=True, metavar="DIR", help="the folder of scans")
    p.add_argument("--labels", default=None, metavar="FILE.csv",
                   help="the labels (default DIR/labels.csv)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="the .npz to write")
    p.add_argument("--size", type=size_arg, required=True, metavar="DxHxW|HxW",
                   help="the model's input size, e.g. 64x64x64 (volumes) or 224x224 (images)")
    p.add_argument("--spacing", type=spacing_arg, default=None, metavar="MM",
                   help="resample to this voxel spacing in mm first: one number (isotropic) or "
                        "one per axis D,H,W (default: keep each scan's)")
    p.add_argument("--roi", type=roi_arg, default=None, metavar="body|BOX",
                   help="crop to the body (largest region above --body-threshold) or to a box "
                        "START:STOP per axis in voxels after resampling (default: no crop)")
    p.add_argument("--body-threshold", type=float, default=-500.0, metavar="HU",
                   help="the --roi body threshold (default -500 HU)")
    p.add_argument("--margin", type=int, default=0, metavar="VOXELS",
                   help="voxels kept around the --roi body box (default 0)")
    p.add_argument("--intensity", choices=("window", "zscore", "percentile", "none"),
                   default="window", help="intensity normalisation (default window)")
    p.add_argument("--window", type=window_arg, default="lung", metavar="PRESET|C,W",
                   help=f"CT window: {', '.join(PRESETS)} or CENTER,WIDTH in HU (a negative "
                        "center as --window=-600,1500; default lung)")
    p.add_argument("--percentiles", type=lambda t: _numbers(t, "LOW,HIGH"), default=(0.5, 99.5),
                   metavar="LOW,HIGH", help="for --intensity percentile (default 0.5,99.5)")
    p.add_argument("--fit", choices=("pad", "resize"), default="pad",
                   help="reach --size by centred padding/cropping (spacing kept; default) or by "
                        "linear resizing")
    p.add_argument("--task", choices=("binary", "multiclass", "multilabel"), default=None,
                   help="the task (default: from the labels)")
    p.add_argument("--id-column", default=None, metavar="NAME",
                   help="the column naming each scan (default id, file, series, scan or path)")
    p.add_argument("--patient-column", default=None, metavar="NAME",
                   help="rows of one patient share a split (default: a column patient, "
                        "patient_id or subject, if there is one)")
    p.add_argument("--label-columns", default=None, metavar="A,B,...",
                   help="the label columns (default: all the others)")
    p.add_argument("--val", type=nonnegative_float, default=0.15,
                   help="fraction of patients for validation (default 0.15)")
    p.add_argument("--test", type=nonnegative_float, default=0.15,
                   help="fraction of patients for testing (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
