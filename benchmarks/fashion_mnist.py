"""DS-Net against timm peers on Fashion-MNIST: the same recipe and the same training wall time for every model.

Every model trains with ``configs/fashion_mnist/dsnet_tiny.yaml`` (only ``model.name`` changes; the recipe's
``model.kwargs`` — DS-Net's small-input global strides — go to DS-Net models only) for ``--minutes`` of training on
this machine. The budget is exact, not rounded to epochs: each run sets ``sched.minutes`` and measures its own speed
as it trains (``dsnet.engine.budget``: after a few warm-up updates, the number of updates that fill the budget is
re-estimated every ten updates and the cosine's length set to it), so every run stops, its schedule finished, when its
time is up, whatever the model's speed or the machine's load. The table reports the minutes each run really trained,
and the spread between models.

Results: ``benchmarks/results/fashion_mnist.md`` (markdown table, also printed): test top-1 on the 10,000 test images
(mean ± std over ``--seeds`` for the models in ``--seed-models``), parameters, MACs at the input size
(``dsnet.bench.complexity.count_macs``), training images/s, minutes and epochs trained.

Proof that it runs (a couple of minutes)::

    python benchmarks/fashion_mnist.py --minutes 0.2 --models dsnet_tiny resnet18 --val-samples 500 --seeds 0

The real comparison (the main job's training budget per run on an idle 2-core CPU, 11 runs)::

    python benchmarks/fashion_mnist.py --minutes 10 --threads 2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "fashion_mnist" / "dsnet_tiny.yaml"
RESULTS = ROOT / "benchmarks" / "results"
#: models run with every seed of --seeds (the others with the first seed only)
SEED_MODELS = ("dsnet_tiny", "dsnet_tiny_concat", "resnet18")
DEFAULT_MODELS = (
    "dsnet_tiny",
    "dsnet_tiny_concat",
    "resnet18",
    "deit_tiny_patch16_224",
    "pvt_v2_b0",
    "convnext_atto",
    "transxnet_t",
    "mixformer_b0",
    "mobile_former_26m",
    "mobile_former_294m",
)
TRAIN_IMAGES = 60_000


def model_overrides(name: str, cfg) -> list[str]:
    """``--set`` overrides that adapt the recipe to ``name``: DS-Net keeps the recipe's ``model.kwargs`` (its
    small-input grid), other models get none of them; ViTs fix their position embedding to the input size."""
    if name.startswith("dsnet_"):
        return []
    overrides = ["model.kwargs={}"]
    if name.startswith(("deit_", "vit_")):
        overrides.append(f"model.kwargs.img_size={cfg.data.input_size}")
    return overrides


def _top1(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"


def write_table(rows: list[tuple[str, ...]], minutes_trained: list[float], args, size: int, chans: int) -> str:
    """The markdown table of the runs so far, written to ``args.out`` (after every model: an interrupted comparison
    keeps what it measured)."""
    spread = (max(minutes_trained) / min(minutes_trained) - 1) * 100 if minutes_trained else 0.0
    header = (
        f"Fashion-MNIST, recipe {RECIPE.relative_to(ROOT)}, {size} px, {chans} channel(s), {args.minutes:g} min "
        f"of training per run, {torch.get_num_threads()} CPU thread(s); test top-1 on {args.val_samples or 10000} "
        f"test images. Minutes trained: {min(minutes_trained, default=0):.2f} to {max(minutes_trained, default=0):.2f} "
        f"(longest/shortest - 1 = {spread:.1f} %)."
    )
    lines = [
        header,
        "",
        "| model | test top-1 (%) | params (M) | MMACs | train img/s | minutes trained | epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--size", type=int, default=None, help="input size (default: the recipe's, 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores not busy)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the --seed-models (default 0)")
    parser.add_argument("--seed-models", nargs="+", default=list(SEED_MODELS), help="models run with every seed")
    parser.add_argument("--val-samples", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "bench-fashion-mnist"), help="run folders")
    parser.add_argument("--out", default=str(RESULTS / "fashion_mnist.md"), help="markdown table to write")
    args = parser.parse_args()

    import timm

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.bench.complexity import count_macs, count_params
    from dsnet.engine.config import load_config
    from dsnet.engine.runtime import auto_threads
    from dsnet.engine.trainer import build_model, train

    threads = args.threads or auto_threads()  # fixed for the whole comparison
    torch.set_num_threads(threads)
    base = [f"train.output_dir={args.output_dir}", "train.log_interval=1000"]
    if args.size:
        base.append(f"data.input_size={args.size}")
    base.append(f"train.threads={threads}")
    if args.val_samples:
        base.append(f"data.max_val_samples={args.val_samples}")
    rows, minutes_trained = [], []
    for name in args.models:
        if not timm.is_model(name):
            rows.append((name, "not registered", "", "", "", "", ""))
            continue
        overrides = [*base, f"model.name={name}", f"train.name=bench-{name}"]
        overrides += model_overrides(name, load_config(RECIPE, base))
        cfg = load_config(RECIPE, overrides)
        size, chans, batch = cfg.data.input_size, cfg.model.in_chans, cfg.train.batch_size
        seeds = args.seeds if name in args.seed_models else args.seeds[:1]
        print(f"[bench] {name}: sched.minutes={args.minutes}, seeds {seeds}", flush=True)
        top1, seconds, speeds, epochs = [], [], [], []
        try:
            for seed in seeds:
                extra = [f"sched.minutes={args.minutes}", f"train.seed={seed}", f"train.name=bench-{name}-s{seed}"]
                run_dir = train(load_config(RECIPE, overrides + extra))
                summary = json.loads((run_dir / "summary.json").read_text())
                top1.append(summary["final"]["top1"])
                seconds.append(summary["train_seconds"])
                speeds.append(summary["train_img_per_s"])
                epochs.append(summary["updates"] * batch / TRAIN_IMAGES)
        except Exception as err:  # a model that cannot run at this size is reported, not fatal
            rows.append((name, f"fails at {size} px: {type(err).__name__}: {err}"[:120], "", "", "", "", ""))
            continue
        minutes_trained.extend(sec / 60 for sec in seconds)
        model = build_model(cfg, 10)
        rows.append(
            (
                name,
                _top1(top1),
                f"{count_params(model) / 1e6:.2f}",
                f"{count_macs(model, (chans, size, size)) / 1e6:.1f}",
                f"{statistics.mean(speeds):.0f}",
                " / ".join(f"{sec / 60:.2f}" for sec in seconds),
                " / ".join(f"{e:.3g}" for e in epochs),
            )
        )
        write_table(rows, minutes_trained, args, size, chans)
    print(write_table(rows, minutes_trained, args, size, chans))


if __name__ == "__main__":
    main()
