"""``cnnfast export`` and ``cnnfast predict``: models leaving cnnfast.

Their work is done by :mod:`cnnfast.predict` (``export_checkpoint``, ``predict_checkpoint``);
this module holds their parsers and the command functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnnfast.cli._common import (
    CLIError,
    add_device_arg,
    check_device,
    check_writable,
    load_data,
    positive_int,
)


def run_export(args: argparse.Namespace) -> int:
    from cnnfast.export import ExportError
    from cnnfast.predict import export_checkpoint

    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a directory; give a file name such as model.onnx")
    try:
        path = export_checkpoint(args.checkpoint, args.out, opset=args.opset)
    except (ImportError, ExportError) as exc:
        raise CLIError(f"cannot export {args.checkpoint}: {exc}") from None
    print(f"ONNX model written to {path} (opset {args.opset}; input: raw images N x C x ..., "
          f"float32; output: class probabilities)")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import warnings

    from cnnfast.predict import predict_checkpoint

    check_device(args.device)
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a directory; give a file name such as preds.csv")
    if args.gradcam:
        check_writable(Path(args.gradcam))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = predict_checkpoint(args.checkpoint, args.data, args.out, split=args.split,
                                        batch_size=args.batch_size, device=args.device,
                                        gradcam=args.gradcam, gradcam_max=args.gradcam_max,
                                        progress=not args.no_progress,
                                        load_dataset=lambda _: load_data(args))
        except ImportError as exc:  # DICOM / NIfTI input without cnnfast[medical]
            raise CLIError(str(exc)) from None
    for w in caught:
        print(f"cnnfast predict: warning: {w.message}", file=sys.stderr)
    print(f"{result.count} predictions written to {args.out} ({', '.join(result.labels)})")
    if args.gradcam:
        print(f"{len(result.heatmaps)} Grad-CAM heatmaps written to {args.gradcam}"
              + (f" (the first {args.gradcam_max}; see --gradcam-max)"
                 if len(result.heatmaps) < result.count else ""))
    return 0


def add_parser(sub) -> None:
    """Add ``export`` and ``predict`` to the ``cnnfast`` subparsers ``sub``."""
    p = sub.add_parser("export", help="export a checkpoint as an ONNX model",
                       description="Write a checkpoint as an ONNX model that takes raw images "
                                   "(N x C x spatial, float32, as the .npz stores them), applies "
                                   "the checkpoint's normalisation and returns class "
                                   "probabilities (softmax; sigmoid for multi-label tasks). "
                                   "Needs pip install 'cnnfast[onnx]'.")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a checkpoint written by cnnfast train or demo")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (>= 17; default 17)")
    p.set_defaults(func=run)

    p = sub.add_parser("predict", help="class probabilities of a checkpoint on new images",
                       description="Write a CSV of class probabilities (softmax; sigmoid for "
                                   "multi-label tasks), one row per image: `index` (or the file "
                                   "name) and one column per label name. --data is a .npz (or a "
                                   "dataset name; --split picks the split), a folder of "
                                   "PNG/JPEG images (2D; converted and resized to what the "
                                   "checkpoint expects, with a warning), a folder of .npy "
                                   "volumes (3D), or scans: a .nii/.nii.gz or DICOM file, a "
                                   "DICOM series folder or a folder of them, preprocessed by the "
                                   "recipe the checkpoint records (trained on a `cnnfast "
                                   "prepare` .npz).")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a checkpoint written by cnnfast train or demo")
    p.add_argument("--data", required=True, metavar="FILE.npz|FOLDER|NAME",
                   help="a .npz, a dataset name, a folder of PNG/JPEG images or .npy volumes, "
                        "or DICOM / NIfTI scans")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="split of a .npz or dataset (default test)")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="the CSV to write")
    p.add_argument("--gradcam", default=None, metavar="DIR",
                   help="also write a Grad-CAM heatmap PNG per image into DIR")
    p.add_argument("--gradcam-max", type=positive_int, default=64, metavar="N",
                   help="heatmaps for at most the first N images (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=None,
                   help="image size of a MedMNIST name (default 28)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where MedMNIST files are looked for and downloaded")
    p.add_argument("--base-url", default=None, metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--data-seed", type=int, default=0, metavar="N",
                   help="seed of a synthetic dataset (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_export(args) if args.command == "export" else run_predict(args)
