"""``dsnet train``: train any timm / dsnet model from a YAML recipe with ``--set key=value`` overrides.

Multi-process: ``torchrun --nproc-per-node 2 -m dsnet.cli.main train --config ...`` (DDP; gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from dsnet.engine.config import load_config
    from dsnet.engine.trainer import train

    if args.resume:
        if args.config or args.set:
            raise ValueError("--resume continues a run with its saved config; do not combine it with --config/--set")
        train(resume=args.resume)
        return 0
    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.root={args.data_dir}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    train(cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (YAML recipe + --set overrides; torchrun for several processes)",
        description="Train a model. The recipe is a YAML file (configs/...); every field can be overridden with "
        "--set section.key=value (YAML value syntax). The resolved config is saved in the run folder.",
    )
    p.add_argument("--config", "-c", help="YAML recipe, e.g. configs/fashion_mnist/dsnet_tiny.yaml")
    p.add_argument(
        "--set",
        "-s",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=0.002 --set train.batch_size=256 (repeatable)",
    )
    p.add_argument("--data-dir", help="dataset folder (same as --set data.root=DIR)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)
