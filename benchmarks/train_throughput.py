"""Training throughput at the main job's size (32 px, one channel, batch 256), as ratios to resnet18 in the same run.

Rows, each a full training step (forward, backward, AdamW) with the main job's recipe settings (channels_last):

* ``synthetic``: random batches already in memory (the model alone);
* ``pil``: real Fashion-MNIST batches through the per-image timm/PIL pipeline in one DataLoader worker (the data
  path of the main job before ``data.pipeline=tensor``);
* ``tensor``: real batches from :class:`dsnet.data.tensor_batches.TensorBatches` (the main job's data path now).

Models: ``dsnet_tiny`` with the reference global strides (8, 4, 2, 2) — the main job's model before — and with the
small-input strides (2, 2, 1, 1) — the main job's model now —, resnet18 and convnext_atto. Each measurement is the
median of ``--repeats`` interleaved repeats (every row once per round), so a change of machine load touches all rows
alike; the ratio to resnet18 on synthetic batches is the figure to compare across machines.

    python benchmarks/train_throughput.py --threads 2          # writes benchmarks/results/train_throughput.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "fashion_mnist" / "dsnet_tiny.yaml"
RESULTS = ROOT / "benchmarks" / "results"

#: (label, timm name, constructor kwargs)
MODELS = (
    ("dsnet_tiny, strides (8, 4, 2, 2)", "dsnet_tiny", {"global_strides": (8, 4, 2, 2)}),
    ("dsnet_tiny, strides (2, 2, 1, 1)", "dsnet_tiny", {"global_strides": (2, 2, 1, 1)}),
    ("resnet18", "resnet18", {}),
    ("convnext_atto", "convnext_atto", {}),
)
BASELINE = "resnet18"


def batches(kind: str, batch: int, seed: int = 0) -> Callable[[], Iterator]:
    """A factory of endless ``(images, targets)`` iterators for ``kind`` (synthetic, pil, tensor)."""
    from torch.utils.data import DataLoader

    from dsnet.data.build import build_dataset, build_tensor_batches, build_transform
    from dsnet.data.datasets import ShardedEpochSampler, TransformedDataset, collate_with_bad_files
    from dsnet.engine.config import load_config

    cfg = load_config(RECIPE)
    d, chans = cfg.data, cfg.model.in_chans
    if kind == "synthetic":
        x, y = torch.randn(batch, chans, d.input_size, d.input_size), torch.randint(0, 10, (batch,))

        def synthetic() -> Iterator:
            while True:
                yield x, y

        return synthetic
    dataset = build_dataset(d, "train", chans)
    sampler = ShardedEpochSampler(len(dataset), batch, seed=seed)

    def real() -> Iterator:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            if kind == "tensor":
                loader = build_tensor_batches(d, dataset, sampler, batch, chans, seed)
            else:
                data = TransformedDataset(dataset, build_transform(d, chans, True), seed)
                loader = DataLoader(
                    data, batch_size=batch, sampler=sampler, num_workers=1, collate_fn=collate_with_bad_files
                )
            for images, targets, _ in loader:
                yield images, targets
            epoch += 1

    return real


def measure(model: torch.nn.Module, data: Iterator, steps: int) -> float:
    """Images/s of ``steps`` training steps after two warm-up steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    start, count = 0.0, 0
    for step in range(steps + 2):
        if step == 2:
            start, count = time.perf_counter(), 0
        images, targets = next(data)
        images = images.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["synthetic", "pil", "tensor"])
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.md"))
    args = parser.parse_args()

    import timm

    import dsnet  # noqa: F401  (registers the zoo)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        label: timm.create_model(name, num_classes=10, in_chans=1, **kwargs).to(memory_format=torch.channels_last)
        for label, name, kwargs in MODELS
    }
    streams = {kind: batches(kind, args.batch)() for kind in args.kinds}
    rates: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for kind in args.kinds:
            for label, model in models.items():
                rate = measure(model, streams[kind], args.steps)
                rates.setdefault((kind, label), []).append(rate)
                print(f"[{repeat + 1}/{args.repeats}] {kind:<9} {label:<34} {rate:7.1f} img/s", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"Training step img/s, 32 px, 1 channel, batch {args.batch}, {args.threads} thread(s), channels_last, fp32; "
        f"median of {args.repeats} interleaved repeats of {args.steps} steps; "
        f"1-min load average at the end {load:.2f}.",
        "",
        "| data | model | img/s | / resnet18 |",
        "|---|---|---:|---:|",
    ]
    for kind in args.kinds:
        base = statistics.median(rates[(kind, BASELINE)])
        for label in models:
            rate = statistics.median(rates[(kind, label)])
            lines.append(f"| {kind} | {label} | {rate:.1f} | {rate / base:.2f}× |")
    table = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
