"""FPN vs DS-FPN under the same budget on the built-in Fashion-MNIST detection set, and the paper's Table 6 params.

For every neck (``--necks``, default plain FPN and DS-FPN "lateral_extra") and seed (``--seeds``) the same recipe
trains RetinaNet (``configs/detection/retinanet_dsnet_tiny_fashion.yaml``, backbone from scratch); an untrained model
of the same build is evaluated as the floor. Results go to ``benchmarks/results/detection.md`` (a markdown table,
also printed): one row per run, and the mean over seeds per neck when there are several.

Tiny proof that it runs (under a minute)::

    python benchmarks/detection.py --budget tiny

The budgets on an idle 2-core CPU: ``short`` trains about 5 minutes per neck and seed, ``full`` about 15::

    python benchmarks/detection.py --budget full --seeds 0 1

Only the parameter table of the paper's Table 6 (seconds)::

    python benchmarks/detection.py --table6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

#: name -> (train images, val images, canvas size, epochs, batch size)
BUDGETS = {
    "tiny": (48, 24, 64, 1, 8),
    "short": (1000, 200, 96, 8, 16),
    "full": (2000, 300, 96, 12, 16),
}
PAPER_TABLE6 = {None: 18.83, "last": 19.59, "lateral": 23.72, "lateral_rev": 21.36, "lateral_extra": 24.43}
RESULTS = Path(__file__).resolve().parent / "results"


def table6() -> str:
    """Markdown table: RetinaNet + dsnet_tiny_concat (80 classes) params per DS-Block position, ours vs paper."""
    from dsnet.detection.builders import retinanet

    lines = [
        "| DS-Block position | paper params (M) | ours (M) | ours, exact |",
        "|---|---|---|---|",
    ]
    for position, paper in PAPER_TABLE6.items():
        with torch.device("meta"):
            model = retinanet(
                "dsnet_tiny_concat",
                num_classes=80,
                neck="fpn" if position is None else "ds_fpn",
                position=position,  # type: ignore[arg-type]
                norm="eval",  # BN affine weights stay parameters, as mmdet counts them
            )
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"| {position or 'None (FPN)'} | {paper:.2f} | {int(n / 1e4) / 100:.2f} | {n:,} |")
    return "\n".join(lines)


def run_budget(
    budget: str, data_root: Path, out_dir: Path, necks: list[str], seeds: list[int], threads: int | None
) -> str:
    from dsnet.detection.data import CocoDetection, make_fashion_detection, split_paths
    from dsnet.detection.engine import build_model, evaluate, load_detection_config, train
    from dsnet.engine.report import MetricsLog

    n_train, n_val, size, epochs, batch = BUDGETS[budget]
    data_root = data_root / f"{n_train}-{n_val}-{size}px"  # named by its content: a budget never reuses another's set
    if not split_paths(data_root, "val")[1].is_file():
        make_fashion_detection(data_root, train=n_train, val=n_val, size=size)
    config = Path(__file__).resolve().parents[1] / "configs" / "detection" / "retinanet_dsnet_tiny_fashion.yaml"
    val_set = CocoDetection(*split_paths(data_root, "val"))
    rows = []
    for neck in necks:
        position = None if neck == "fpn" else neck
        for seed in seeds:
            overrides = [
                f"data.root={data_root}",
                f"model.min_size={size}",
                f"model.max_size={size}",
                f"model.neck={'fpn' if neck == 'fpn' else 'ds_fpn'}",
                f"model.position={position or 'null'}",
                f"sched.epochs={epochs}",
                f"train.batch_size={batch}",
                f"train.seed={seed}",
                f"train.output_dir={out_dir}",
                f"train.name={budget}-{neck}-seed{seed}",
                f"train.eval_interval={max(1, epochs // 4)}",
                "train.progress=false",
            ]
            if threads:
                overrides.append(f"train.threads={threads}")
            if budget == "tiny":
                overrides.append("optim.warmup_iters=2")
            cfg = load_detection_config(config, overrides)
            torch.manual_seed(cfg.train.seed)
            untrained = build_model(cfg.model, val_set.num_classes)
            floor = evaluate(untrained, val_set, batch_size=batch)["bbox_AP"]
            params = sum(p.numel() for p in untrained.parameters()) / 1e6
            start = time.perf_counter()
            run_dir = train(cfg)
            result = json.loads((run_dir / "summary.json").read_text())
            wall = (time.perf_counter() - start) / 60
            minutes = result["train_seconds"] / 60
            records = MetricsLog(run_dir / "metrics.jsonl").read()
            curve = [r["bbox_AP"] for r in records if r["kind"] == "epoch" and "bbox_AP" in r]
            rows.append((neck, seed, params, minutes, wall, floor, curve, result))
            print(
                f"[{neck}, seed {seed}] box AP {result['bbox_AP']:.3f} (untrained {floor:.3f}): {minutes:.1f} min "
                f"training, {wall:.1f} min with evaluations, {torch.get_num_threads()} threads",
                flush=True,
            )

    def pct(v: float) -> str:
        return "—" if v != v else f"{100 * v:.1f}"  # NaN: no object of that size in the val set

    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = [
        f"RetinaNet + dsnet_tiny (from scratch), budget `{budget}`: {n_train} train / {n_val} val images of "
        f"{size} px, {epochs} epochs, batch {batch}, {torch.get_num_threads()} CPU threads; COCO box AP in %. "
        "*train min*: the training loop alone; *wall min*: with the evaluations along the way.",
        "",
        "| neck | seed | params (M) | train min | wall min | AP untrained | AP curve | " + " | ".join(keys) + " |",
        "|---" * (7 + len(keys)) + "|",
    ]
    for neck, seed, params, minutes, wall, floor, curve, r in rows:
        aps = " | ".join(pct(r[f"bbox_{k}"]) for k in keys)
        trend = " → ".join(pct(v) for v in curve)
        lines.append(
            f"| {neck} | {seed} | {params:.2f} | {minutes:.1f} | {wall:.1f} | {pct(floor)} | {trend} | {aps} |"
        )
    if len(seeds) > 1:
        lines += ["", f"Mean over seeds {', '.join(map(str, seeds))} (min–max of AP):", ""]
        lines += ["| neck | AP | AP range | AP50 | AP75 |", "|---|---|---|---|---|"]
        for neck in necks:
            runs = [r for n, *_, r in rows if n == neck]
            mean = {k: sum(r[f"bbox_{k}"] for r in runs) / len(runs) for k in ("AP", "AP50", "AP75")}
            low, high = min(r["bbox_AP"] for r in runs), max(r["bbox_AP"] for r in runs)
            lines.append(
                f"| {neck} | {pct(mean['AP'])} | {pct(low)}–{pct(high)} | {pct(mean['AP50'])} | {pct(mean['AP75'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--necks", nargs="+", default=["fpn", "lateral_extra"], help="fpn and/or DS-Block positions")
    parser.add_argument("--data", default="data/fashion_det_bench", help="where the generated set is kept")
    parser.add_argument("--out", default="runs/bench_detection", help="run folders")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--table6", action="store_true", help="only print the Table 6 parameter comparison")
    args = parser.parse_args()
    import dsnet  # noqa: F401  (registers the zoo into timm)

    sections = ["## Table 6 (RetinaNet, DS-Net-T backbone, 80 classes): parameters\n\n" + table6()]
    if not args.table6:
        sections.append(
            "## FPN vs DS-FPN, same budget\n\n"
            + run_budget(args.budget, Path(args.data), Path(args.out), args.necks, args.seeds, args.threads)
        )
    text = "# Detection benchmark\n\n" + "\n\n".join(sections) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "detection_table6.md" if args.table6 else "detection.md"
    (RESULTS / name).write_text(text)
    print(text)
    print(f"written to {RESULTS / name}")


if __name__ == "__main__":
    main()
