"""The command line's own error: bad input, printed without a traceback, exit status 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad command-line input (a flag, a value, a config file): printed and exit status 2."""
