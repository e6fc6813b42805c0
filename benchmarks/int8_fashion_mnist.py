"""int8 vs fp32 top-1 of a trained Fashion-MNIST run on the 10,000-image test set, through ``dsnet`` commands only.

Steps (each a ``dsnet`` CLI call, so a user can repeat any of them by hand):

1. write ``--calib-images`` images drawn from the Fashion-MNIST *training* set (seeded) as PNG files: the folder the
   int8 calibration reads (the test set is never seen before evaluation);
2. ``dsnet export RUN fp32.onnx``, ``dsnet export RUN int8.onnx --int8 --calib DIR`` (and the same to ``.xml`` for
   OpenVINO with ``--openvino``);
3. ``dsnet eval`` of each artefact (the run's own config.yaml gives the test split: Fashion-MNIST's ``val``).

Prints a markdown table (top-1 of each artefact and the int8 − fp32 change) and writes it to ``--output``.

Usage::

    python benchmarks/int8_fashion_mnist.py runs/demo-... --work /tmp/int8 [--openvino] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dsnet.cli.main import main as dsnet
from dsnet.data.fashion_mnist import load_fashion_mnist


def write_calibration_images(folder: Path, count: int, seed: int) -> Path:
    """``count`` seeded training images of Fashion-MNIST as ``folder/<index>.png``."""
    images, _ = load_fashion_mnist("train")
    folder.mkdir(parents=True, exist_ok=True)
    for index in np.random.default_rng(seed).choice(len(images), count, replace=False):
        Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    return folder


def _run(argv: list[str]) -> None:
    print("$ dsnet " + " ".join(argv), flush=True)
    code = dsnet(argv)
    if code != 0:
        raise SystemExit(f"dsnet {argv[0]} failed with exit code {code}")


def _eval_top1(artefact: Path, threads: int, batch_size: int, max_samples: int | None) -> tuple[float, int]:
    argv = ["eval", str(artefact), "--json", "--batch-size", str(batch_size), "--set", f"train.threads={threads}"]
    if max_samples:
        argv += ["--set", f"data.max_val_samples={max_samples}"]
    print("$ dsnet " + " ".join(argv), flush=True)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        code = dsnet(argv)
    if code != 0:
        raise SystemExit(f"dsnet eval {artefact} failed with exit code {code}")
    record = json.loads(sink.getvalue())
    return float(record["top1"]), int(record["num_samples"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a dsnet train run folder on Fashion-MNIST")
    parser.add_argument("--work", type=Path, required=True, help="folder for the images, artefacts and evaluations")
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--openvino", action="store_true", help="also OpenVINO IR, fp32 and int8")
    parser.add_argument("--max-samples", type=int, help="evaluate on the first N test images only (smoke tests)")
    parser.add_argument("--output", type=Path, help="markdown table (default WORK/int8.md)")
    args = parser.parse_args(argv)

    calib = write_calibration_images(args.work / "calib", args.calib_images, args.seed)
    threads = ["--threads", str(args.threads)]
    suffixes = [".onnx", ".xml"] if args.openvino else [".onnx"]
    rows = []
    for suffix in suffixes:
        fp32, int8 = args.work / f"fp32{suffix}", args.work / f"int8{suffix}"
        _run(["export", args.run, str(fp32), *threads])
        calib_args = ["--calib", str(calib), "--calib-method", args.calib_method]
        _run(["export", args.run, str(int8), "--int8", *calib_args, *threads])
        runtime = "OpenVINO" if suffix == ".xml" else "ONNX Runtime"
        top1_fp32, n = _eval_top1(fp32, args.threads, args.batch_size, args.max_samples)
        top1_int8, _ = _eval_top1(int8, args.threads, args.batch_size, args.max_samples)
        rows.append((runtime, top1_fp32, top1_int8, n))
    lines = [
        f"int8 (static QDQ, {args.calib_method}, {args.calib_images} training images) vs fp32, {Path(args.run).name}",
        "",
        "| runtime | test images | fp32 top-1 | int8 top-1 | change (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r} | {n} | {a:.2f} % | {b:.2f} % | {b - a:+.2f} |" for r, a, b, n in rows]
    table = "\n".join(lines) + "\n"
    output = args.output or args.work / "int8.md"
    output.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
