"""The DS-Net paper's ablations on any recipe: Table 2 (the α sweep) and Table 3 (removing parts of DS-Net-T*).

Paper: Mao et al., "Dual-stream Network for Visual Recognition", NeurIPS 2021, §4.1. Every variant is DS-Net-T
(depths 2-2-4-1) built from constructor options of :class:`dsnet.models.dsnet.DSNet`, defaults unchanged:

* Table 2, DS-Net-T (concatenation, no Inter-scale Alignment) with α = share of channels sent to the global stream:
  ``dsnet_tiny_concat`` with ``global_ratio`` 0, 0.25, 0.5, 0.75, 1 (0 = local stream only, 1 = global only).
* Table 3, DS-Net-T* (``dsnet_tiny``): full; w/o f_L (``local_stream=False``: the split local half goes straight to
  the alignment); w/o f_G (``global_stream=False``); w/o G→L (``global_to_local=False``); w/o L→G
  (``local_to_global=False``); w/o L↔G (``alignment=False``, i.e. DS-Net-T, the same model as Table 2's α = 0.5, so
  that row is trained once and shown in both tables).

Each (variant, seed) is one ``dsnet train`` run of the recipe (default: the main job's
``configs/fashion_mnist/dsnet_tiny.yaml``) in its own process, ``--jobs`` at a time with ``--threads`` torch
threads each, at the budget given by ``--train-samples`` / ``--epochs`` / ``--updates``. The table (markdown, also
printed) gives test top-1 mean ± std over the seeds beside the paper's ImageNet-1k top-1, and the parameters of the
variant as trained (the recipe's classes and input channels).

Proof that it runs (a minute or two)::

    python benchmarks/ablations.py --train-samples 256 --updates 2 --val-samples 64 --seeds 0 --tables 2

The README's table (2 seeds, two runs at a time, one thread each; see README "Ablations")::

    nice -n 19 python benchmarks/ablations.py --train-samples 6000 --epochs 5 --seeds 0 1 --jobs 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "fashion_mnist" / "dsnet_tiny.yaml"
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Variant:
    """One row of the paper's ablation tables."""

    key: str  # run-folder name
    label: str  # the paper's column name
    model: str  # registered timm name
    kwargs: dict[str, Any] = field(default_factory=dict)  # DSNet constructor options on top of the recipe's
    paper_top1: float | None = None  # ImageNet-1k top-1 of the paper (Table 2 / Table 3)


#: Table 2: DS-Net-T (no alignment), α = global share of the channels.
TABLE2 = (
    Variant("alpha0", "α = 0 (local only)", "dsnet_tiny_concat", {"global_ratio": 0.0}, 77.1),
    Variant("alpha0.25", "α = 0.25", "dsnet_tiny_concat", {"global_ratio": 0.25}, 78.0),
    Variant("alpha0.5", "α = 0.5 (DS-Net-T)", "dsnet_tiny_concat", {}, 78.1),
    Variant("alpha0.75", "α = 0.75", "dsnet_tiny_concat", {"global_ratio": 0.75}, 77.9),
    Variant("alpha1", "α = 1 (global only)", "dsnet_tiny_concat", {"global_ratio": 1.0}, 77.6),
)
#: Table 3: DS-Net-T* with one part removed; w/o L↔G is DS-Net-T, trained once for both tables.
TABLE3 = (
    Variant("full", "DS-Net-T*", "dsnet_tiny", {}, 79.0),
    Variant("no_fL", "w/o f_L", "dsnet_tiny", {"local_stream": False}, 76.7),
    Variant("no_fG", "w/o f_G", "dsnet_tiny", {"global_stream": False}, 76.6),
    Variant("no_G2L", "w/o G→L", "dsnet_tiny", {"global_to_local": False}, 76.5),
    Variant("no_L2G", "w/o L→G", "dsnet_tiny", {"local_to_global": False}, 76.4),
    Variant("alpha0.5", "w/o L↔G (DS-Net-T)", "dsnet_tiny_concat", {}, 78.1),
)
TABLES = {2: TABLE2, 3: TABLE3}


def _yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON literals are YAML: true/false, numbers


def run_overrides(variant: Variant, seed: int, args: argparse.Namespace, output_dir: Path) -> list[str]:
    """``--set`` overrides of one (variant, seed) run: model, its options, seed, budget, threads, folder."""
    sets = [
        f"model.name={variant.model}",
        f"train.seed={seed}",
        f"train.output_dir={output_dir}",
        f"train.name={variant.key}-s{seed}",
        f"train.threads={args.threads}",
        "train.log_interval=1000",
    ]
    sets += [f"model.kwargs.{name}={_yaml_value(value)}" for name, value in variant.kwargs.items()]
    if args.train_samples:
        sets.append(f"data.max_train_samples={args.train_samples}")
    if args.val_samples:
        sets.append(f"data.max_val_samples={args.val_samples}")
    if args.epochs is not None:
        sets.append(f"sched.epochs={args.epochs}")
    if args.updates is not None:
        sets.append(f"sched.updates={args.updates}")
    return [*sets, *args.set]


def train_one(variant: Variant, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (variant, seed) with ``dsnet train`` in a child process; its ``summary.json``."""
    output_dir = Path(args.output_dir) / f"{variant.key}-s{seed}"
    done = sorted(output_dir.glob("*/summary.json"))
    if done and not args.rerun:  # a finished run of the same variant and seed is reused (resumable sweep)
        return json.loads(done[-1].read_text())
    command = [sys.executable, "-m", "dsnet.cli.main", "train", "-c", str(args.recipe)]
    for item in run_overrides(variant, seed, args, output_dir):
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{variant.key} seed {seed} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(sorted(output_dir.glob("*/summary.json"))[-1].read_text())
    print(
        f"[ablations] {variant.key} seed {seed}: top-1 {summary['final']['top1']:.2f} % ({time.time() - start:.0f} s)",
        flush=True,
    )
    return summary


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _params(variant: Variant, args: argparse.Namespace) -> float:
    """Millions of parameters of the variant as the recipe builds it (its classes and input channels)."""
    import timm

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.engine.config import load_config

    cfg = load_config(args.recipe, [f"model.name={variant.model}"])
    kwargs = {**cfg.model.kwargs, **variant.kwargs}
    model = timm.create_model(variant.model, num_classes=args.num_classes, in_chans=cfg.model.in_chans, **kwargs)
    return sum(p.numel() for p in model.parameters()) / 1e6


def markdown(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    """The ablation tables as markdown: per variant, mean ± std of the seeds beside the paper's figure."""
    first = next(iter(results.values()))[0]
    budget = f"{first['epochs']:.3g} epochs of {args.train_samples or 'all'} training images"
    lines = [
        f"Recipe {Path(args.recipe).resolve().relative_to(ROOT)}, {budget} per run, seeds "
        f"{' '.join(map(str, args.seeds))}, {args.threads} thread(s) per run; test top-1 on "
        f"{first['final']['num_samples']} test images (mean ± std over seeds, then each seed).",
        "",
    ]
    for number in args.tables:
        reference = TABLES[number][2 if number == 2 else 0]
        lines += [
            f"Table {number} ({'α sweep, DS-Net-T' if number == 2 else 'removing parts of DS-Net-T*'})",
            "",
            f"| variant | paper ImageNet top-1 | params (M) | top-1 (%) | seeds | Δ vs {reference.label} |",
            "|---|---|---|---|---|---|",
        ]
        reference_runs = results.get(reference.key)
        for variant in TABLES[number]:
            if variant.key not in results:  # left out with --only
                continue
            top1 = [s["final"]["top1"] for s in results[variant.key]]
            delta = "—"
            if reference_runs and variant is not reference:
                delta = f"{statistics.mean(top1) - statistics.mean(s['final']['top1'] for s in reference_runs):+.2f}"
            lines.append(
                f"| {variant.label} | {variant.paper_top1:.1f} | {_params(variant, args):.2f} | {_mean_std(top1)} | "
                f"{', '.join(f'{v:.2f}' for v in top1)} | {delta} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="training recipe (default: the main job's)")
    parser.add_argument("--tables", type=int, nargs="+", choices=(2, 3), default=[2, 3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--train-samples", type=int, help="train on the first N training images")
    parser.add_argument("--val-samples", type=int, help="evaluate on the first N test images")
    parser.add_argument("--epochs", type=float, help="sched.epochs of every run")
    parser.add_argument("--updates", type=int, help="sched.updates of every run (instead of epochs)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the dataset, for the params column")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override KEY=VALUE (repeatable)")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "ablations"), help="run folders")
    parser.add_argument("--out", default=str(RESULTS / "ablations.md"), help="markdown table to write")
    parser.add_argument(
        "--only", nargs="+", help="train only these variants (keys: alpha0 ... alpha1, full, no_fL, ...)"
    )
    parser.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    args = parser.parse_args(argv)

    variants = {v.key: v for number in args.tables for v in TABLES[number]}  # shared rows trained once
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: not a variant of tables {args.tables} ({', '.join(variants)})")
        variants = {key: v for key, v in variants.items() if key in args.only}
    jobs = [(variant, seed) for variant in variants.values() for seed in args.seeds]
    print(f"[ablations] {len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on the child processes
        summaries = list(pool.map(lambda job: train_one(job[0], job[1], args), jobs))
    results: dict[str, list[dict[str, Any]]] = {}
    for (variant, _), summary in zip(jobs, summaries):
        results.setdefault(variant.key, []).append(summary)
    table = markdown(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
