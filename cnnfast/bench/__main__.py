"""``python -m cnnfast.bench``: see :mod:`cnnfast.bench`."""

import sys

from cnnfast.bench.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:          # output piped into head
        sys.exit(0)
