"""``dsnet convert``: released weights of the zoo (``.pdparams``, ``.pth``, ``.pth.tar``) → our safetensors.

Examples::

    dsnet convert paddle DSNet_tiny_pretrained.pdparams dsnet_tiny.safetensors --model dsnet_tiny
    dsnet convert torch ds_net_tiny.pth dsnet_tiny.safetensors          # model inferred from the blocks per stage
    dsnet convert paddle MixFormer_B1_pretrained.pdparams mixformer_b1.safetensors --model mixformer_b1
    dsnet convert torch transx-t.pth.tar transxnet_t.safetensors --model transxnet_t
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from dsnet.convert.zoo import convert_checkpoint

    result = convert_checkpoint(
        args.input, args.output, layout=args.layout, model=args.model, entry=getattr(args, "entry", None)
    )
    print(result.summary())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert released weights (DS-Net, MixFormer .pdparams; DS-Net, TransXNet .pth) to safetensors",
        description="Convert a released checkpoint (reference DS-Net, official MixFormer or TransXNet, or any zoo "
        "model whose module has a checkpoint_filter_fn) to a safetensors file of our model, verifying every key "
        "and shape. No code inside the input file is executed.",
    )
    formats = p.add_subparsers(dest="layout", metavar="FORMAT", required=True)
    sources = {
        "paddle": ("a Paddle .pdparams file (e.g. DSNet_tiny_pretrained.pdparams)", ".pdparams"),
        "torch": ("a PyTorch checkpoint (SteveTsui/DS-Net .pth, TransXNet .pth.tar)", ".pth"),
    }
    for layout, (what, suffix) in sources.items():
        q = formats.add_parser(layout, help=f"read {what}")
        q.add_argument("input", metavar=f"IN{suffix}", help=what)
        q.add_argument("output", metavar="OUT.safetensors", help="file to write (replaced atomically if it exists)")
        q.add_argument(
            "--model",
            default=None,
            help="target model, e.g. dsnet_tiny or transxnet_t (required except for reference DS-Net files, "
            "whose variant is inferred from the blocks per stage)",
        )
        if layout == "torch":
            q.add_argument(
                "--entry",
                default=None,
                help="checkpoint entry holding the state dict (default: the file itself, or 'model'/'state_dict')",
            )
        q.set_defaults(func=run)
