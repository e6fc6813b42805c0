"""``dsnet train``: train any timm / dsnet model from a YAML recipe with ``--set key=value`` overrides.

Multi-process: ``torchrun --nproc-per-node 2 -m dsnet.cli.main train --config ...`` (DDP; gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse

from dsnet.cli._run_config import add_config_arguments, config_from_args, print_config


def run(args: argparse.Namespace) -> int:
    from dsnet.engine.config import load_config
    from dsnet.engine.trainer import train

    cfg = config_from_args(args, load_config)
    if cfg is None:
        train(resume=args.resume)
    elif args.print_config:
        print_config(cfg)
    else:
        train(cfg)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (YAML recipe + --set overrides; torchrun for several processes)",
        description="Train a model. The recipe is a YAML file (configs/...); every field can be overridden with "
        "--set section.key=value (YAML value syntax). The resolved config is saved in the run folder.",
    )
    add_config_arguments(
        p,
        example_recipe="configs/fashion_mnist/dsnet_tiny.yaml",
        example_set="optim.lr=0.002 --set train.batch_size=256",
    )
    p.set_defaults(func=run)
