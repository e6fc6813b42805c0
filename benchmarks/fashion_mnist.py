"""DS-Net against timm peers on Fashion-MNIST: the same recipe and the same wall-clock budget for every model.

Every model trains with ``configs/fashion_mnist/dsnet_tiny.yaml`` (only ``model.name`` changes) for about
``--minutes`` of training on this machine: its training speed is measured first (``--probe-updates`` updates on
random data, after one warm-up update), then the number of epochs — or, below one epoch, the number of training
images — is chosen to fill the budget. Each model is then evaluated on the 10,000 test images.

Results: ``benchmarks/results/fashion_mnist.md`` (markdown table, also printed): test top-1, parameters, MACs at the
input size (``dsnet.bench.complexity.count_macs``), measured training images/s.

Proof that it runs (a couple of minutes)::

    python benchmarks/fashion_mnist.py --minutes 0.2 --models dsnet_tiny resnet18 --val-samples 500

The real comparison (about 10 minutes per model on an idle 2-core CPU; 6 to 8 models)::

    python benchmarks/fashion_mnist.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "fashion_mnist" / "dsnet_tiny.yaml"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MODELS = (
    "dsnet_tiny",
    "dsnet_tiny_concat",
    "resnet18",
    "deit_tiny_patch16_224",
    "pvt_v2_b0",
    "convnext_atto",
    "transxnet_t",
    "mixformer_b0",
)
TRAIN_IMAGES = 60_000


def model_kwargs(name: str, size: int) -> dict:
    """Constructor arguments a model needs at ``size`` px (ViTs fix their position embedding to the input)."""
    return {"img_size": size} if name.startswith(("deit_", "vit_")) else {}


def probe_throughput(name: str, cfg, updates: int) -> float:
    """Training images/s of ``name`` with the recipe's batch, input size, precision and memory format."""
    import timm

    from dsnet.engine.trainer import resolve_amp

    size, chans, batch = cfg.data.input_size, cfg.model.in_chans, cfg.train.batch_size
    model = timm.create_model(name, num_classes=10, in_chans=chans, **model_kwargs(name, size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = resolve_amp(cfg.train.amp, torch.device("cpu"))
    x, y = torch.randn(batch, chans, size, size), torch.randint(0, 10, (batch,))
    if cfg.train.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    start = 0.0
    for step in range(updates + 1):  # update 0 is the warm-up
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return updates * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model (default 10)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--size", type=int, default=None, help="input size (default: the recipe's, 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores not busy)")
    parser.add_argument("--probe-updates", type=int, default=3)
    parser.add_argument("--val-samples", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "bench-fashion-mnist"))
    args = parser.parse_args()

    import timm

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.bench.complexity import count_macs, count_params
    from dsnet.engine.config import load_config
    from dsnet.engine.trainer import auto_threads, train

    threads = args.threads or auto_threads()  # fixed for the whole comparison: probes and runs alike
    torch.set_num_threads(threads)
    base = [f"train.output_dir={args.output_dir}", "train.log_interval=1000"]
    if args.size:
        base.append(f"data.input_size={args.size}")
    base.append(f"train.threads={threads}")
    if args.val_samples:
        base.append(f"data.max_val_samples={args.val_samples}")
    rows = []
    for name in args.models:
        if not timm.is_model(name):
            rows.append((name, "not registered", "", "", "", ""))
            continue
        overrides = [*base, f"model.name={name}", f"train.name=bench-{name}"]
        overrides += [
            f"model.kwargs.{k}={v}" for k, v in model_kwargs(name, load_config(RECIPE, base).data.input_size).items()
        ]
        cfg = load_config(RECIPE, overrides)
        size, chans = cfg.data.input_size, cfg.model.in_chans
        try:
            rate = probe_throughput(name, cfg, args.probe_updates)
        except Exception as err:  # a model that cannot run at this size is reported, not fatal
            rows.append((name, f"fails at {size} px: {type(err).__name__}", "", "", "", ""))
            continue
        images = rate * args.minutes * 60
        epochs = max(1, int(images // TRAIN_IMAGES))
        extra = [f"sched.epochs={epochs}"]
        if images < TRAIN_IMAGES:  # less than one epoch fits: train one epoch over a subset
            batch = cfg.train.batch_size
            extra.append(f"data.max_train_samples={max(batch, int(images // batch) * batch)}")
            extra.append("sched.warmup_epochs=0.1")
        print(f"[bench] {name}: probe {rate:.1f} img/s -> {extra}", flush=True)
        run_dir = train(load_config(RECIPE, overrides + extra))
        summary = json.loads((run_dir / "summary.json").read_text())
        trained = summary["updates"] * summary["global_batch"] / TRAIN_IMAGES
        model = timm.create_model(name, num_classes=10, in_chans=chans, **model_kwargs(name, size))
        macs = count_macs(model, (chans, size, size))
        rows.append(
            (
                name,
                f"{summary['final']['top1']:.2f}",
                f"{count_params(model) / 1e6:.2f}",
                f"{macs / 1e6:.1f}",
                f"{summary['train_img_per_s']:.0f}",
                f"{summary['train_seconds'] / 60:.1f} min, {trained:.2g} epochs",
            )
        )
    header = (
        f"Fashion-MNIST, recipe {RECIPE.relative_to(ROOT)}, {size} px, {chans} channel(s), about {args.minutes:g} min "
        f"of training per model, {torch.get_num_threads()} CPU thread(s); "
        f"test top-1 on {args.val_samples or 10000} test images."
    )
    lines = [
        header,
        "",
        "| model | test top-1 (%) | params (M) | MMACs | train img/s | trained |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fashion_mnist.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
