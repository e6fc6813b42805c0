"""The arguments every training subcommand shares (``dsnet train``, ``dsnet detect train``): a YAML recipe,
``--set section.key=value`` overrides, ``--data-dir``, ``--resume`` and ``--print-config``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dsnet.errors import DSNetError

ConfigT = TypeVar("ConfigT")


def add_config_arguments(parser: argparse.ArgumentParser, *, example_recipe: str, example_set: str) -> None:
    """Add ``--config``, ``--set``, ``--data-dir``, ``--resume`` and ``--print-config`` to ``parser``."""
    parser.add_argument("--config", "-c", help=f"YAML recipe, e.g. {example_recipe}")
    parser.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field (YAML value syntax), e.g. --set {example_set} (repeatable)",
    )
    parser.add_argument("--data-dir", help="dataset folder (same as --set data.root=DIR)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def config_from_args(
    args: argparse.Namespace, load: Callable[[str | Path | None, Sequence[str]], ConfigT]
) -> ConfigT | None:
    """The run config the arguments describe, through ``load(recipe, overrides)``; ``None`` for ``--resume``
    (a resumed run uses the config saved in its folder, so recipe and overrides are refused with it)."""
    if args.resume:
        if args.config or args.set or args.data_dir:
            raise DSNetError("--resume continues a run with its saved config; do not combine it with --config/--set")
        return None
    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    return load(args.config, overrides)


def print_config(cfg: Any) -> None:
    """The resolved config as YAML on stdout (``--print-config``)."""
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
