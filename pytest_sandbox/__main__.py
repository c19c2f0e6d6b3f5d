"""``python -m pytest_sandbox``: the command-line tool (see :mod:`pytest_sandbox.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
