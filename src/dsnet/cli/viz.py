"""``dsnet viz {attention,features,cam,streams}``: the DS-Net paper's Figure 1 for any image (see :mod:`dsnet.viz`)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    import torch

    from dsnet.engine.distributed import resolve_device
    from dsnet.viz import figures

    if args.threads:
        torch.set_num_threads(args.threads)
    vm = figures.load_viz_model(
        args.model, args.weights, args.input_size, str(resolve_device(args.device, key="--device"))
    )
    if args.kind == "attention":
        baseline = figures.load_baseline(args.baseline, args.baseline_weights) if args.baseline else None
        out = figures.attention_figure(vm, args.images[0], args.out, args.point, args.block, baseline)
    elif args.kind == "features":
        out = figures.features_figure(vm, args.images[0], args.out, args.block, args.reduce)
    elif args.kind == "cam":
        out = figures.cam_figure(vm, args.images[0], args.out, args.block, args.target)
    else:
        out = figures.streams_figure(vm, args.images, args.out, args.point, args.block, args.reduce)
    print(out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "viz", help="attention / stream features / Grad-CAM of an image as a PNG (the DS-Net paper's Figure 1)"
    )
    p.add_argument(
        "kind",
        choices=("attention", "features", "cam", "streams"),
        help="attention: maps of a query point; features: local/global/fused maps; cam: Grad-CAM; "
        "streams: attention and features of several images in one grid",
    )
    p.add_argument("model", help="run folder, .safetensors from dsnet train, or a model name (with --weights)")
    p.add_argument("images", nargs="+", help="image file(s); attention/features/cam use the first")
    p.add_argument("--out", "-o", required=True, help="PNG to write")
    p.add_argument("--point", help="query point X,Y in pixels of the image (default: its centre)")
    p.add_argument("--block", help="STAGE.BLOCK, 1-based (default: the last block whose attention has >1 key)")
    p.add_argument("--weights", help="weights file for a model name (safetensors or converted .pth)")
    p.add_argument("--reduce", choices=("mean", "pca"), default="mean", help="feature maps: channel mean or 1st PCA")
    p.add_argument("--class", dest="target", help="cam: class index or name (default: the predicted class)")
    p.add_argument("--baseline", help="attention: a timm ViT shown beside, e.g. deit_small_patch16_224")
    p.add_argument("--baseline-weights", help="weights file of --baseline (nothing is downloaded)")
    p.add_argument("--input-size", type=int, help="input side in pixels (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=run)
