"""``cnnfast doctor``: the environment report and ``--compile`` (their work is done by
:mod:`cnnfast.doctor`); this module holds the parser and the command function.
"""

from __future__ import annotations

import argparse

from cnnfast import doctor
from cnnfast.cli._common import positive_int


def _arch_list(text: str) -> tuple[str, ...]:
    arches = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in arches if a not in doctor.ARCHES]
    if not arches or bad:
        raise argparse.ArgumentTypeError(f"architectures must be among {','.join(doctor.ARCHES)}, "
                                         f"got {text!r}")
    return arches


def add_parser(sub) -> None:
    """Add ``doctor`` to the ``cnnfast`` subparsers ``sub``."""
    p = sub.add_parser("doctor", help="check this machine: versions, GPU and driver, CPU path; "
                                      "--compile builds every CUDA kernel for real",
                       description="Report versions, the GPU and driver CUDA version, the CPU "
                                   "path and threads, Numba's cache, with advice per problem. "
                                   "--compile compiles every CUDA kernel variant with NVVM and "
                                   "ptxas (no GPU needed) and prints registers, spills, shared "
                                   "memory and occupancy; exit status 1 on an error or a spill.")
    p.add_argument("--compile", action="store_true", help="compile every kernel variant")
    p.add_argument("--arch", type=_arch_list, default=None, metavar="LIST",
                   help="with --compile: target architectures (default sm_80,sm_90)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="with --compile: also write the table as JSON")
    p.add_argument("--jobs", type=positive_int, default=None,
                   help="with --compile: compiler processes (default: the CPU count, at most 8)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.compile:
        return doctor.run_compile(args.json, args.arch or doctor.ARCHES, args.jobs)
    if args.json or args.arch or args.jobs:
        raise SystemExit("cnnfast doctor: --arch, --json and --jobs go with --compile")
    return doctor.print_environment()
