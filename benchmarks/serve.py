"""Requests per second and latency of ``dsnet serve`` with and without micro-batching, in one run.

The server runs in this process (:func:`dsnet.deploy.serve.running_server` on 127.0.0.1, a free port) with the model
of ``--run`` (a run folder, ``.safetensors`` or exported artefact, as ``dsnet serve`` loads it) or, by default,
dsnet_tiny at the Fashion-MNIST main-job settings (``configs/fashion_mnist/dsnet_tiny.yaml``: 1 channel, 32 px,
global strides 2-2-1-1, 10 classes) with random weights, fused as ``dsnet serve`` runs it. The speed does not depend on
the weights.

For each ``--max-batch`` value (default 1 and 8), a fresh server gets ``--warmup`` untimed requests, then
``--clients`` threads (each with its own keep-alive ``http.client`` connection) send ``--requests`` multipart
uploads in all, of seeded random 28×28 grey PNGs (a Fashion-MNIST image's size). Reported: requests/s (requests over
the wall time of the timed part), p50 / p99 latency of a request as the client sees it, and the server's mean batch
size (from ``/health``). Clients and server share the machine's cores: the figures are of the whole system. The
1-minute load average is printed before and after: above ~0.5 on an idle machine, something else ran.

Results: the markdown table is printed; ``--out`` (default ``benchmarks/results/serve.json``) gets settings, every
latency and the table::

    python benchmarks/serve.py                                   # dsnet_tiny main-job settings, random weights
    python benchmarks/serve.py --requests 100 --clients 4 --max-batch 1 4 8
    python benchmarks/serve.py --run runs/demo-... --threads 1
    python benchmarks/serve.py --run model.onnx --backend onnxruntime
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAIN_JOB_CONFIG = ROOT / "configs" / "fashion_mnist" / "dsnet_tiny.yaml"


@dataclass
class Row:
    """One server setting's measurement."""

    max_batch: int
    requests: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    mean_batch_size: float = 0.0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


def main_job_model() -> tuple[torch.nn.Module, object]:
    """dsnet_tiny built (random weights) and described exactly as the main job trains it, fused."""
    import timm

    import dsnet  # noqa: F401  (registers the zoo)
    from dsnet.data.build import normalization
    from dsnet.data.fashion_mnist import FASHION_MNIST_CLASSES
    from dsnet.deploy import fuse
    from dsnet.engine.config import load_config
    from dsnet.engine.inference import CheckpointInfo

    cfg = load_config(MAIN_JOB_CONFIG)
    d, m = cfg.data, cfg.model
    mean, std = normalization(d, m.in_chans)
    torch.manual_seed(0)
    model = timm.create_model(m.name, num_classes=len(FASHION_MNIST_CLASSES), in_chans=m.in_chans, **m.kwargs)
    info = CheckpointInfo(
        path=MAIN_JOB_CONFIG,
        model=m.name,
        num_classes=len(FASHION_MNIST_CLASSES),
        in_chans=m.in_chans,
        classes=tuple(FASHION_MNIST_CLASSES),
        input_size=d.input_size,
        crop_pct=d.crop_pct,
        interpolation=d.interpolation,
        mean=tuple(mean),
        std=tuple(std),
        model_kwargs=dict(m.kwargs),
    )
    return fuse(model.eval()), info


def png_images(count: int, seed: int = 0) -> list[bytes]:
    """``count`` seeded random 28×28 grey PNG files."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def multipart_body(data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``data`` as the ``file`` field, and its content type."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _client(url: str, bodies: list[tuple[bytes, str]], latencies: list[float], errors: list[str]) -> None:
    """Send ``bodies`` one after the other on one keep-alive connection, appending each latency (ms)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        for body, kind in bodies:
            start = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers={"Content-Type": kind})
            response = connection.getresponse()
            payload = response.read()
            latencies.append((time.perf_counter() - start) * 1000.0)
            if response.status != 200:
                errors.append(f"{response.status}: {payload[:200]!r}")
    finally:
        connection.close()


def _get_json(url: str, path: str) -> dict:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def measure(model: torch.nn.Module, info: object, max_batch: int, args: argparse.Namespace, images: list[bytes]) -> Row:
    """Start a server with ``max_batch``, warm it up, time ``args.requests`` requests from ``args.clients`` threads."""
    from dsnet.deploy.serve import create_app, running_server

    app = create_app(model, info, max_batch=max_batch, max_wait_ms=args.max_wait_ms, top_k=5)
    bodies = [multipart_body(images[i % len(images)]) for i in range(args.requests)]
    shares = [bodies[c :: args.clients] for c in range(args.clients)]
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    errors: list[str] = []
    with running_server(app) as url:
        _client(url, [multipart_body(images[0])] * args.warmup, [], errors)
        before = _get_json(url, "/health")["counters"]
        threads = [
            threading.Thread(target=_client, args=(url, share, latencies[c], errors)) for c, share in enumerate(shares)
        ]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
        after = _get_json(url, "/health")["counters"]
    batches = after["batches"] - before["batches"]
    images_run = after["batched_images"] - before["batched_images"]
    row = Row(max_batch, args.requests, seconds, [x for group in latencies for x in group], errors=len(errors))
    row.mean_batch_size = images_run / batches if batches else 0.0
    if errors:
        print(f"[serve] max_batch={max_batch}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return row


def format_table(rows: list[Row], title: str) -> str:
    lines = [
        title,
        "",
        "| max batch | requests/s | p50 latency (ms) | p99 latency (ms) | mean batch | errors |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.max_batch} | {r.rate:.1f} | {r.percentile(50):.1f} | {r.percentile(99):.1f} "
            f"| {r.mean_batch_size:.2f} | {r.errors} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run folder, .safetensors, .onnx or .xml (default: random main-job model)")
    parser.add_argument("--backend", choices=("torch", "onnxruntime", "openvino"), help="with --run (default: suffix)")
    parser.add_argument("--max-batch", nargs="+", type=int, default=[1, 8], help="server settings (%(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="server batching wait (%(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (%(default)s)")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per setting (%(default)s)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per setting (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch / runtime threads of the model (%(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve.json", help="JSON results (%(default)s)")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, min(args.max_batch)) < 1 or args.warmup < 0:
        parser.error("--clients, --requests and --max-batch must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    if args.run:
        from dsnet.deploy.runtime import load_for_inference

        model, info = load_for_inference(args.run, backend=args.backend, num_threads=args.threads)
        source = args.run
    else:
        model, info = main_job_model()
        source = f"{info.model} main-job settings (random weights)"
    images = png_images(64)
    load_before = os.getloadavg()[0]
    print(f"[serve] load average before: {load_before:.2f}", file=sys.stderr)
    rows = []
    for max_batch in args.max_batch:
        print(f"[serve] max_batch={max_batch}: {args.requests} requests from {args.clients} clients", file=sys.stderr)
        rows.append(measure(model, info, max_batch, args, images))
    load_after = os.getloadavg()[0]
    print(f"[serve] load average after: {load_after:.2f}", file=sys.stderr)
    title = (
        f"dsnet serve, {source}, {info.input_size} px, {args.threads} model thread(s), {args.clients} clients, "
        f"{args.requests} requests, max wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs "
        f"(load {load_before:.2f} before, {load_after:.2f} after)"
    )
    table = format_table(rows, title)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": source,
        "load": [load_before, load_after],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": [
            asdict(r) | {"requests_per_s": r.rate, "p50_ms": r.percentile(50), "p99_ms": r.percentile(99)} for r in rows
        ],
        "table": table,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[serve] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
