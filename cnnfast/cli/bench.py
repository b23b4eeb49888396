"""``cnnfast bench``: the benchmark runner, :mod:`cnnfast.bench`, which parses its own arguments.

Everything after ``bench`` (``--help`` included) goes to ``cnnfast.bench.main(argv)``, imported
only then; this parser declares no argument of its own.
"""

from __future__ import annotations

import argparse

from cnnfast.cli._common import CLIError


def add_parser(sub) -> None:
    """Add ``bench`` to the ``cnnfast`` subparsers ``sub``."""
    p = sub.add_parser("bench", help="kernel benchmarks (cnnfast.bench; see cnnfast bench --help)",
                       add_help=False)
    p.set_defaults(func=run, forwards_arguments=True)  # main() lets its arguments through


def run(args: argparse.Namespace) -> int:
    """Forward the arguments after ``bench`` to ``cnnfast.bench.main``, imported only now."""
    try:
        from cnnfast import bench
    except ModuleNotFoundError as exc:
        if exc.name not in ("cnnfast.bench",):
            raise
        raise CLIError("the benchmark runner (cnnfast.bench) is not installed in this copy of "
                       "cnnfast") from None
    result = bench.main(list(args.argv[1:]))
    return int(result or 0)
