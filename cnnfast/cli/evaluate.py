"""``cnnfast evaluate``, ``cnnfast plot`` and ``cnnfast download``: a checkpoint scored or
drawn on a dataset, and a MedMNIST file fetched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnfast.cli._common import (
    CLIError,
    add_data_args,
    add_device_arg,
    check_device,
    check_writable,
    load_data,
    positive_int,
    write_json,
)


def _checkpoint_and_data(args: argparse.Namespace):
    from cnnfast.checkpoint import load_checkpoint
    from cnnfast.train import check_fits, model_from_checkpoint

    check_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    dataset = load_data(args)
    check_fits(ckpt, dataset)
    model = model_from_checkpoint(ckpt, device=args.device)
    return ckpt, dataset, model


def run_evaluate(args: argparse.Namespace) -> int:
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
        write_json(Path(args.json), {"checkpoint": str(args.checkpoint), "data": dataset.name,
                                      "split": args.split, "metrics": metrics.to_dict()})
        print(f"metrics written to {args.json}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from cnnfast import viz
    from cnnfast.train import evaluate, normalization_of

    out = Path(args.out)
    check_writable(out)
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


def run_download(args: argparse.Namespace) -> int:
    from cnnfast.data import download

    path = download(args.name, args.size, root=args.data_root, base_url=args.base_url,
                    progress=not args.no_progress)
    print(path)
    return 0


def add_parser(sub) -> None:
    """Add ``evaluate``, ``plot`` and ``download`` to the ``cnnfast`` subparsers ``sub``."""
    for name, text in (("evaluate", "AUROC and accuracy of a checkpoint"),
                       ("plot", "filters, feature maps and ROC curves of a checkpoint")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + " on a "
                           "dataset (MedMNIST's evaluator: binary AUROC of the positive class, "
                           "multi-label mean of per-label AUROCs, multi-class one-vs-rest).")
        p.add_argument("--checkpoint", required=True, metavar="FILE",
                       help="a checkpoint written by cnnfast train or demo")
        add_data_args(p)
        p.add_argument("--batch-size", type=positive_int, default=256)
        p.add_argument("--no-progress", action="store_true", help="no download progress bar")
        add_device_arg(p)
        if name == "evaluate":
            p.add_argument("--split", choices=("train", "val", "test"), default="test")
            p.add_argument("--json", default=None, metavar="FILE",
                           help="also write the metrics as JSON")
        else:
            p.add_argument("--out", default="plots", metavar="DIR",
                           help="output directory (default ./plots)")
            p.add_argument("--index", type=int, default=None,
                           help="test image for the feature maps (default: the first positive)")
            p.add_argument("--gradcam", type=positive_int, nargs="?", const=16, default=None,
                           metavar="N", help="also plot Grad-CAM heatmaps over the first N "
                                             "test images (default 16) with their true and "
                                             "predicted labels")
        p.set_defaults(func=run)

    p = sub.add_parser("download", help="download a MedMNIST .npz file",
                       description="Download a MedMNIST file by name, check its MD5 and store "
                                   "it under --data-root; prints the path.")
    p.add_argument("name", help="e.g. pneumoniamnist, nodulemnist3d, chestmnist_64")
    p.add_argument("--size", type=int, choices=(28, 64, 128, 224), default=None)
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--base-url", default=None, metavar="URL")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"evaluate": run_evaluate, "plot": run_plot, "download": run_download}[
        args.command](args)
