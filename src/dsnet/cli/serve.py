"""``dsnet serve``: an HTTP server answering top-k predictions, concurrent requests batched into one model call."""

from __future__ import annotations

import argparse
import importlib
import sys

from dsnet.cli.main import positive_float, positive_int
from dsnet.errors import DSNetError

#: What ``dsnet serve`` imports (any of the module names) and the distribution that provides it.
_SERVE_MODULES = (
    (("fastapi",), "fastapi"),
    (("uvicorn",), "uvicorn"),
    (("python_multipart", "multipart"), "python-multipart"),
)


def _importable(names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def _check_serve_extra() -> None:
    """Raise a one-line :class:`~dsnet.errors.DSNetError` when a package of the ``serve`` extra is missing."""
    missing = [dist for modules, dist in _SERVE_MODULES if not _importable(modules)]
    if missing:
        raise DSNetError(f"dsnet serve needs {', '.join(missing)}: pip install 'dsnet[serve]'")


def run(args: argparse.Namespace) -> int:
    _check_serve_extra()
    import torch
    import uvicorn

    from dsnet.deploy.runtime import guess_backend, load_for_inference
    from dsnet.deploy.serve import backend_name, base_url, bind_socket, create_app
    from dsnet.engine.distributed import resolve_device
    from dsnet.engine.runtime import auto_threads

    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    if args.max_upload_mb <= 0:
        raise DSNetError(f"--max-upload-mb must be positive, got {args.max_upload_mb:g}")
    backend = args.backend or guess_backend(args.source)
    kwargs = {"device": resolve_device(args.device)} if backend == "torch" else {}
    model, info = load_for_inference(args.source, backend=backend, num_threads=threads, **kwargs)
    app = create_app(
        model,
        info,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        top_k=args.top_k,
    )
    sock = bind_socket(args.host, args.port)  # a busy port is a one-line error before uvicorn starts
    url = base_url(args.host, sock.getsockname()[1])
    plural = "s" if threads > 1 else ""
    print(
        f"dsnet serve: {info.model} ({backend_name(model)}, {info.num_classes} classes, {threads} thread{plural}) "
        f"on {url}  "
        f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; POST an image to {url}/predict",
        file=sys.stderr,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="HTTP server: POST /predict an image, get top-k labels (requests batched); GET /health",
        description="Serve a model over HTTP. POST /predict takes a multipart upload (field 'file'), JSON "
        '{"image": "<base64>"} or raw image bytes and answers {"labels", "probs", "indices", "batch_size"}; '
        "GET /health gives the model, backend and counters. Needs the serve extra: pip install 'dsnet[serve]'.",
    )
    p.add_argument("source", metavar="RUN_OR_ARTEFACT", help="run folder, .safetensors, or a dsnet export .onnx/.xml")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "openvino"),
        help="what runs the model (default: torch for checkpoints, by suffix for .onnx / .xml artefacts)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 picks a free one)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="largest batch per model call; 1: no batching")
    p.add_argument(
        "--max-wait-ms", type=positive_float, default=5.0, help="how long a batch waits for more requests (default 5)"
    )
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0, help="largest request body (default 10 MB)")
    p.add_argument("--threads", type=positive_int, help="torch / runtime CPU threads")
    p.add_argument("--top-k", "-k", type=positive_int, default=5, help="labels per answer unless ?top_k= (default 5)")
    p.add_argument("--device", default="auto", help="torch backend: auto, cpu, cuda, ...")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
