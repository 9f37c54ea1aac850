"""Command line: ``python -m flashinfer {prewarm,cache,demo,doctor}`` (also the ``flashinfer`` console script).

prewarm  expand a configuration matrix (one flag per axis, a preset, or a --config file), drop unsupported
         combinations, build the rest in parallel worker processes that share the JIT cache and its per-key
         locks (:func:`flashinfer.jit.prewarm`).
cache    list / verify / clear / prune / export / import entries of the JIT cache.
demo     build the bf16 d128 NHD decode module and, with a GPU, run and check it.
doctor   print the toolkit, arch flags, cache root and versions the JIT engine would use.

Modules: ``matrix`` (flags, presets, expansion, sharding), ``config`` (matrix files), ``prewarm``, ``cache``,
``doctor`` (demo and doctor), ``format`` (durations, sizes, progress). Families come from the one registry,
:mod:`flashinfer._families`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import cache, doctor, prewarm
from .errors import UsageError

__all__ = ["UsageError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="python -m flashinfer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    prewarm.add_parser(sub)
    cache.add_parser(sub)
    doctor.add_parsers(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (2: bad usage, 1: the command failed, 130: interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:
        # The engine's own errors (unwritable cache, no toolkit, lock timeout...) already say what is
        # wrong and how to fix it: print them without a traceback. Anything else is a bug: re-raise.
        if type(e).__module__.startswith("flashinfer.jit"):
            sys.stderr.write(f"{parser.prog}: error: {type(e).__name__}: {e}\n")
            return 1
        raise
