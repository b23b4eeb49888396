"""The ``cnnfast`` command line: ``prepare``, ``demo``, ``train``, ``evaluate``, ``plot``,
``download``, ``export``, ``predict``, ``bench`` and ``doctor``.

Every command checks its inputs (data file, checkpoint, device) before it writes anything; a bad
input ends with one line ``cnnfast <command>: error: ...`` on stderr and exit status 2.
Set ``CNNFAST_DEBUG=1`` to get the full traceback instead.

One module per command (or per family of commands), each with two functions:

- ``add_parser(sub)`` adds its subcommand(s) to the ``argparse`` subparsers ``sub`` and sets
  ``func=run`` as their default;
- ``run(args) -> int`` does the work and returns the exit status; a user error is raised as
  :class:`cnnfast.cli._common.CLIError` (one line, exit status 2).

Shared argument types, checks and argument groups live in :mod:`cnnfast.cli._common`; a command
module imports from there, never from another command. To add a command, write
``cnnfast/cli/<name>.py`` with those two functions and list it in :data:`COMMANDS`. Workflow
modules are imported inside ``run`` so that ``cnnfast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cnnfast import config
from cnnfast.cli import bench, doctor, evaluate, predict, prepare, train
from cnnfast.cli._common import EXIT_USAGE, user_errors

# The command modules, in the order ``cnnfast --help`` lists their commands.
COMMANDS = (prepare, train, evaluate, predict, bench, doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnfast",
        description="Train and evaluate small CNNs on medical images (MedMNIST .npz files or "
                    "built-in synthetic data), judged by AUROC.")
    parser.add_argument("--version", action="version", version=f"cnnfast {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
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
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "forwards_arguments", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.argv = argv  # bench forwards argv[1:]; train --workers runs the command again
        return args.func(args)
    except KeyboardInterrupt:
        print("cnnfast: interrupted", file=sys.stderr)
        return 130
    except user_errors() as exc:
        if config.debug():
            raise
        message = str(exc)
        if isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"cnnfast {command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:
        if config.debug():
            raise
        print(f"cnnfast {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
