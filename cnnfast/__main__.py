"""``python -m cnnfast``: the same command line as the ``cnnfast`` script."""

import sys

from cnnfast.cli import main

sys.exit(main())
