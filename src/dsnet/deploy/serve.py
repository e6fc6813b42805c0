"""``dsnet serve``: an HTTP model server (FastAPI) that groups concurrent requests into one model call.

Endpoints of :func:`create_app`:

``POST /predict``
    one image, as a multipart upload (field ``file``), as JSON ``{"image": "<base64>"}`` (a ``data:`` URL prefix is
    allowed), or as the raw bytes with an ``image/*`` or ``application/octet-stream`` content type. Query parameter
    ``top_k`` (default: the server's). Answer: ``{"labels": [...], "probs": [...], "indices": [...],
    "batch_size": n}``, most probable class first, the same preprocessing and values as ``dsnet predict --json``;
    ``batch_size`` is the size of the model call the request was part of.
``GET /health``
    status, model name, backend, number of classes, batching settings and counters.

Errors are JSON ``{"detail": "..."}`` naming the problem: 413 for a body over ``max_upload_bytes`` (checked from
``Content-Length`` before reading, and while reading), 400 for bad base64, empty bytes, non-image bytes, a truncated
or corrupt image or one over the pixel limit (:func:`dsnet.data.images.decode_image`), 415 for another content type,
422 for a bad ``top_k``. The server keeps serving after any of them.

Micro-batching (:class:`MicroBatcher`): decoded requests wait in an :class:`asyncio.Queue`; one background task
takes the first, then up to ``max_batch - 1`` more, waiting at most ``max_wait_ms`` after the first, stacks them and
runs the model once in a single-thread executor (under :func:`torch.inference_mode`), then resolves every request's
future with its row of probabilities. ``max_batch=1`` disables batching (no waiting).

Example:
    >>> from dsnet.deploy.runtime import load_for_inference
    >>> model, info = load_for_inference("runs/my-run")  # doctest: +SKIP
    >>> with running_server(create_app(model, info)) as url:  # doctest: +SKIP
    ...     print(url)  # e.g. http://127.0.0.1:38211; POST images to url + "/predict"
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``, ``Query``)
# at runtime, and those names are imported inside :func:`create_app` (fastapi is an optional dependency).

import asyncio
import base64
import binascii
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsnet.data.images import ImageLoadError
from dsnet.engine.inference import CheckpointInfo, Preprocessor, model_device, rank_classes
from dsnet.errors import DSNetError

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI, Request

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MicroBatcher",
    "ServerStats",
    "backend_name",
    "base_url",
    "bind_socket",
    "create_app",
    "running_server",
]

#: Largest request body :func:`create_app` accepts by default (10 MB, ``dsnet serve --max-upload-mb``).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024

_RAW_TYPES = ("image/", "application/octet-stream")


class RequestError(Exception):
    """A client error: becomes an HTTP answer with ``status`` and ``{"detail": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServerStats:
    """Counters of one server since it started (read by ``GET /health``)."""

    requests: int = 0  # POST /predict requests received
    errors: int = 0  # of them, answered with an error
    batches: int = 0  # model calls
    batched_images: int = 0  # images in those calls

    def as_dict(self) -> dict[str, Any]:
        """The counters and the mean batch size (0 before the first batch)."""
        mean = self.batched_images / self.batches if self.batches else 0.0
        return {
            "requests": self.requests,
            "errors": self.errors,
            "batches": self.batches,
            "batched_images": self.batched_images,
            "mean_batch_size": round(mean, 3),
        }


def backend_name(model: nn.Module) -> str:
    """``"onnxruntime"``, ``"openvino"`` or ``"torch"``: what runs ``model`` (see :mod:`dsnet.deploy.runtime`)."""
    from dsnet.deploy.runtime import OnnxRuntimeModel, OpenVINOModel

    if isinstance(model, OnnxRuntimeModel):
        return "onnxruntime"
    if isinstance(model, OpenVINOModel):
        return "openvino"
    return "torch"


class MicroBatcher:
    """Groups single-image requests into batches for one model call each.

    Args:
        model: maps a float batch ``(B, C, H, W)`` to logits ``(B, classes)``.
        max_batch: largest batch; 1 runs every request alone.
        max_wait_ms: how long the first request of a batch waits for others (not used when ``max_batch`` is 1).
        stats: counters to update (batches, batched images).
    """

    def __init__(self, model: nn.Module, *, max_batch: int = 8, max_wait_ms: float = 5.0, stats: ServerStats) -> None:
        if max_batch < 1:
            raise DSNetError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise DSNetError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = stats
        self.device = model_device(model)
        self._queue: asyncio.Queue[tuple[torch.Tensor, asyncio.Future[tuple[torch.Tensor, int]]] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether the batching task is up (between :meth:`start` and :meth:`stop`)."""
        return self._task is not None and not self._task.done()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (0 before :meth:`start`)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the batching task (in the running event loop) and the model thread."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsnet-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dsnet-micro-batcher")

    async def stop(self) -> None:
        """Finish the batch being run, fail the requests still queued, stop the model thread."""
        if self._queue is None or self._task is None:
            return
        self._queue.put_nowait(None)
        await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item[1].done():
                item[1].set_exception(RequestError(503, "the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._queue = self._task = self._executor = None

    async def submit(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Softmax probabilities ``(classes,)`` of the preprocessed image ``x`` and the size of its batch.

        Raises:
            RequestError: 503 when the batcher is not running; 500 when the model call failed.
        """
        if self._queue is None or not self.running:
            raise RequestError(503, "the model is not running (server starting or shutting down)")
        future: asyncio.Future[tuple[torch.Tensor, int]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((x, future))
        return await future

    async def _collect(self, first: tuple[torch.Tensor, asyncio.Future]) -> tuple[list, bool]:
        """The batch starting with ``first`` and whether the stop marker was met while collecting."""
        assert self._queue is not None
        batch = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:  # past the wait (or none): take only what is already queued
                    item = self._queue.get_nowait()
                else:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """One model call on the stacked ``inputs`` (in the model thread): probabilities on the CPU."""
        with torch.inference_mode():
            logits = self.model(torch.stack(inputs).to(self.device))
            return logits.float().softmax(-1).cpu()

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch, stopping = await self._collect(first)
            batch = [(x, f) for x, f in batch if not f.done()]  # a client that went away was cancelled
            if not batch:
                continue
            try:
                probs = await loop.run_in_executor(self._executor, self._forward, [x for x, _ in batch])
            except Exception as err:  # the model failed: every request of the batch learns why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(RequestError(500, f"the model failed on a batch of {len(batch)}: {err}"))
                continue
            self.stats.batches += 1
            self.stats.batched_images += len(batch)
            for row, (_, future) in zip(probs, batch):
                if not future.done():
                    future.set_result((row, len(batch)))


async def _read_body(request: "Request", limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {_size(limit)}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"request body is over the limit of {_size(limit)}")
        chunks.append(chunk)
    return b"".join(chunks)


def _size(limit: int) -> str:
    """``limit`` in bytes, and in MB (2**20 bytes, as ``--max-upload-mb``) when that is at least 1."""
    return f"{limit} bytes" + (f" ({limit / 2**20:g} MB)" if limit >= 2**20 else "")


def _decode_base64(text: Any) -> bytes:
    """The bytes of a base64 string, with or without a ``data:...;base64,`` prefix."""
    if not isinstance(text, str) or not text:
        raise RequestError(400, 'JSON body must be {"image": "<base64 of an image file>"}')
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"image: not valid base64 ({err})") from None


async def _image_bytes(request: "Request", limit: int) -> tuple[bytes, str]:
    """The uploaded image's bytes and a name for error messages, from any of the accepted body kinds."""
    from starlette.requests import Request as StarletteRequest

    body = await _read_body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=1, max_fields=10)
        except Exception as err:  # starlette raises its own HTTPException / MultiPartException subclasses
            raise RequestError(400, f"unreadable multipart body ({getattr(err, 'detail', err)})") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart body has no file field named 'file'")
        data = await upload.read()
        await form.close()
        return data, upload.filename or "file"
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"body is not valid JSON ({err})") from None
        if not isinstance(payload, dict) or "image" not in payload:
            raise RequestError(400, 'JSON body must be {"image": "<base64 of an image file>"}')
        return _decode_base64(payload["image"]), "image"
    if kind.startswith(_RAW_TYPES):
        return body, "body"
    raise RequestError(
        415,
        f"content type {kind or 'none'!r} not accepted: send multipart/form-data with a 'file' field, "
        'JSON {"image": "<base64>"} or the raw image bytes as image/* or application/octet-stream',
    )


def create_app(
    model: nn.Module,
    info: CheckpointInfo,
    *,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    top_k: int = 5,
    backend: str | None = None,
) -> "FastAPI":
    """A FastAPI app serving ``model`` (see the module docstring for the endpoints and errors).

    Args:
        model: eval-mode model or runtime of :func:`dsnet.deploy.runtime.load_for_inference`.
        info: its :class:`~dsnet.engine.inference.CheckpointInfo` (preprocessing, class names).
        max_batch: largest batch of one model call; 1 disables batching.
        max_wait_ms: how long the first request of a batch waits for more.
        max_upload_bytes: largest request body.
        top_k: labels per answer when the request does not say (capped at the number of classes).
        backend: name shown by ``/health`` (default: found from ``model``'s type).

    Raises:
        ImportError: FastAPI is not installed (``pip install 'dsnet[serve]'``).
        ValueError: a setting out of range.
    """
    from fastapi import FastAPI, Query, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    if max_upload_bytes < 1 or top_k < 1:
        raise DSNetError(f"max_upload_bytes and top_k must be positive, got {max_upload_bytes} and {top_k}")
    stats = ServerStats()
    batcher = MicroBatcher(model, max_batch=max_batch, max_wait_ms=max_wait_ms, stats=stats)
    preprocess = Preprocessor(info)
    backend = backend or backend_name(model)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title=f"dsnet serve: {info.model}", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.stats = stats

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
        if request.url.path == "/predict":
            stats.requests += 1
            stats.errors += 1
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
        return JSONResponse({"detail": problems}, status_code=422)

    @app.post("/predict")
    async def predict(request: Request, top_k_query: int | None = Query(None, alias="top_k", ge=1)) -> JSONResponse:
        stats.requests += 1
        try:
            data, name = await _image_bytes(request, max_upload_bytes)
            try:
                x = await run_in_threadpool(preprocess.from_bytes, data, name)
            except ImageLoadError as err:
                raise RequestError(400, str(err)) from None
            probs, size = await batcher.submit(x)
        except RequestError as err:
            stats.errors += 1
            return JSONResponse({"detail": err.message}, status_code=err.status)
        (best,) = rank_classes(probs[None], info.classes, top_k_query or top_k)
        return JSONResponse({"labels": best.labels, "probs": best.probs, "indices": best.indices, "batch_size": size})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if batcher.running else "stopped",
            "model": info.model,
            "backend": backend,
            "classes": info.num_classes,
            "input_size": info.input_size,
            "in_chans": info.in_chans,
            "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "max_upload_bytes": max_upload_bytes,
            "queued": batcher.queued,
            "counters": stats.as_dict(),
        }

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (port 0: a free one), IPv6 when ``host`` has a colon.

    Raises:
        OSError: the address is in use or not available (one line naming it).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def running_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning", start_timeout: float = 60.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread while the ``with`` block lasts; yields its base URL.

    The socket is bound before the thread starts (``port=0`` picks a free port, the URL says which), and the block
    starts only once the server accepts connections (lifespan startup done). On exit the server shuts down cleanly.

    Raises:
        RuntimeError: the server did not start within ``start_timeout`` seconds (or failed while starting).
        OSError: the address cannot be bound.
    """
    import uvicorn

    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dsnet-serve", daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started or not thread.is_alive(), start_timeout)
        if not server.started:
            raise RuntimeError(f"the server on {host}:{bound_port} did not start within {start_timeout:g} s")
        yield base_url(host, bound_port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(interval)
