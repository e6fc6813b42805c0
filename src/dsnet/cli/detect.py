"""``dsnet detect``: RetinaNet / Mask R-CNN with FPN or DS-FPN: ``make-data``, ``train``, ``eval``, ``predict``.

Examples::

    dsnet detect make-data data/fashion_det --train 2000 --val 300 --size 128
    dsnet detect train --config configs/detection/retinanet_dsnet_tiny_fashion.yaml --set sched.epochs=4
    dsnet detect eval runs/retinanet-dsnet_tiny-ds_fpn-... --split val
    dsnet detect predict runs/retinanet-... data/fashion_det/val/000001.png --out pred.png

Several processes (DDP; gloo on CPU, nccl on CUDA; ``train.batch_size`` is the global batch)::

    torchrun --nproc-per-node 2 -m dsnet.cli.main detect train -c configs/detection/retinanet_dsnet_tiny_fashion.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dsnet.cli._run_config import add_config_arguments, config_from_args, print_config
from dsnet.cli.main import positive_int


def _make_data(args: argparse.Namespace) -> int:
    from dsnet.detection.data import make_fashion_detection

    out = make_fashion_detection(
        args.out, train=args.train, val=args.val, size=args.size, max_objects=args.max_objects, seed=args.seed,
        fashion_mnist_root=args.fashion_mnist,
    )  # fmt: skip
    print(f"wrote {args.train} train and {args.val} val images (COCO format) to {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from dsnet._io import strict_json
    from dsnet.detection.engine import load_detection_config, train

    cfg = config_from_args(args, load_detection_config)
    if cfg is not None and args.print_config:
        print_config(cfg)
        return 0
    run_dir = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(strict_json(json.loads((run_dir / "summary.json").read_text()), indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dsnet._io import strict_json
    from dsnet.detection.data import CocoDetection, split_paths
    from dsnet.detection.engine import evaluate, load_model

    model, cfg, _ = load_model(args.run, args.tag)
    root = args.data or cfg.data.root
    dataset = CocoDetection(*split_paths(root, args.split), masks=cfg.model.arch == "maskrcnn")
    metrics = evaluate(model, dataset, batch_size=cfg.train.batch_size, limit=args.limit, progress=True)
    print(strict_json(metrics, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dsnet.detection.engine import predict_files
    from dsnet.engine.inference import collect_images

    images = collect_images(args.images)
    results = predict_files(args.run, images, args.out, tag=args.tag, score_thresh=args.score_thresh)
    for r in results:
        if r.error:  # a per-file error, like `dsnet predict`
            print(f"dsnet: warning: {r.error}", file=sys.stderr)
        else:
            print(f"{r.path}: {r.objects} objects with score >= {args.score_thresh} -> {r.output}")
    return 1 if any(r.error for r in results) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="object detection / instance segmentation with FPN or DS-FPN")
    sub = p.add_subparsers(dest="detect_command", metavar="ACTION", required=True)

    m = sub.add_parser("make-data", help="write the built-in Fashion-MNIST detection set (COCO format)")
    m.add_argument("out", help="output folder")
    m.add_argument("--train", type=positive_int, default=2000, help="training images (default 2000)")
    m.add_argument("--val", type=positive_int, default=500, help="validation images (default 500)")
    m.add_argument("--size", type=positive_int, default=128, help="canvas side in pixels (default 128)")
    m.add_argument("--max-objects", type=positive_int, default=4, help="objects per image at most (default 4)")
    m.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    m.add_argument("--fashion-mnist", default=None, help="folder with the Fashion-MNIST IDX files")
    m.set_defaults(func=_make_data)

    t = sub.add_parser("train", help="train a detector (YAML config + overrides)")
    add_config_arguments(
        t, example_recipe="configs/detection/retinanet_dsnet_tiny_fashion.yaml", example_set="optim.lr=1e-3"
    )
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="COCO metrics of a trained run")
    e.add_argument("run", help="run folder")
    e.add_argument("--tag", default="best", help="checkpoint tag (best or last)")
    e.add_argument("--data", default=None, help="dataset root (default: the run's)")
    e.add_argument("--split", default="val", help="split to evaluate (default val)")
    e.add_argument("--limit", type=positive_int, default=None, help="first N images only")
    e.set_defaults(func=_eval)

    q = sub.add_parser("predict", help="draw boxes, labels and masks of a trained run onto images (PNG)")
    q.add_argument("run", help="run folder")
    q.add_argument("images", nargs="+", help="image files or folders")
    q.add_argument("--out", default="prediction.png", help="output PNG (a folder when several images are given)")
    q.add_argument("--tag", default="best", help="checkpoint tag (best or last)")
    q.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    q.set_defaults(func=_predict)
