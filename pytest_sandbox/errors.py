"""The error tree at the address it had before the re-layout (``pytest_sandbox.errors``).

The errors live in :mod:`pytest_sandbox.core.errors` (pure, usable in the launcher); the public
ones are also on ``pytest_sandbox`` itself.  This module keeps ``from pytest_sandbox.errors import
SandboxError`` working for code written against the flat layout.
"""

from .core.errors import *  # noqa: F403 -- exactly core.errors.__all__
from .core.errors import __all__ as __all__  # noqa: PLC0414 -- re-exported: the star import's list
