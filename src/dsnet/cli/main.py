"""Entry point of the ``dsnet`` console script.

Every subcommand lives in its own module of :mod:`dsnet.cli` exposing ``register(subparsers)``,
which adds an ``argparse`` parser whose ``func`` default takes the parsed namespace and returns an exit code.
Modules import their heavy dependencies inside ``func`` so that ``dsnet --help`` stays fast.

Errors: a :class:`~dsnet.errors.DSNetError` (bad input) or an :class:`OSError` (missing, unreadable or unwritable
file) is printed as one line, ``dsnet: error: <message>``, with exit code 2. Anything else is a bug of dsnet and
keeps its traceback, so that it gets reported rather than mistaken for a user error.

Memory: CPU tensors of 2 MB and more get transparent huge pages (``DSNET_MALLOC=hugepages``, the default);
``DSNET_MALLOC=retain`` also keeps freed memory for reuse, ``DSNET_MALLOC=libc`` leaves the C library's defaults
(:func:`dsnet.engine.runtime.configure_memory`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dsnet.engine.runtime import configure_memory
from dsnet.errors import DSNetError

#: Subcommand modules, in the order ``dsnet --help`` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "info",
    "export",
    "convert",
    "train",
    "evaluate",
    "predict",
    "serve",
    "detect",
    "viz",
)


def positive_float(text: str) -> float:
    """argparse ``type`` of a number >= 0 (milliseconds, megabytes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value:g}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of counts that must be at least 1 (batch sizes, threads, top-k, image counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``dsnet`` argument parser with every subcommand registered."""
    from dsnet import __version__

    parser = argparse.ArgumentParser(
        prog="dsnet", description="Dual-stream vision backbones: train, evaluate, convert."
    )
    parser.add_argument("--version", action="version", version=f"dsnet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dsnet.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dsnet`` command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # before any tensor is made: torch reads its huge page switch at its first CPU allocation
        configure_memory(os.environ.get("DSNET_MALLOC", "hugepages"), key="DSNET_MALLOC")
        return int(args.func(args) or 0)
    except DSNetError as err:
        print(f"dsnet: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # missing file, unwritable output folder, full disk, permission denied...: the OS says which
        print(f"dsnet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
