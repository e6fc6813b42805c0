"""``dsnet serve``: answers equal ``predict_files``, requests really batch, errors are JSON and the server goes on."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dsnet  # noqa: F401  (registers the zoo)
from dsnet.cli.main import main
from dsnet.deploy.runtime import load_for_inference
from dsnet.deploy.serve import create_app, running_server
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.inference import predict_files

CLASSES = ("ant", "bee", "cat", "dog", "eel")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A dsnet_tiny (one block per stage, one grey channel, 32 px) with random weights, as ``dsnet train`` saves it."""
    torch.manual_seed(0)
    kwargs = {"depths": [1, 1, 1, 1], "global_strides": [2, 2, 1, 1]}
    model = timm.create_model("dsnet_tiny", num_classes=len(CLASSES), in_chans=1, **kwargs)
    with torch.no_grad():  # spread the logits: a freshly initialised head would tie them
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("run")
    meta = {
        "model": "dsnet_tiny",
        "num_classes": len(CLASSES),
        "in_chans": 1,
        "classes": list(CLASSES),
        "input_size": 32,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": [0.5],
        "std": [0.25],
        "model_kwargs": kwargs,
    }
    ckpt.save_checkpoint(folder, "best", model, metadata=meta)
    return folder / "best.safetensors"


@pytest.fixture(scope="module")
def loaded(weights):
    torch.set_num_threads(1)
    return load_for_inference(weights, backend="torch")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 PNG files of different sizes and modes (grey, RGB, RGBA) and their bytes."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        channels = ((), (3,), (4,))[i % 3]  # L, RGB, RGBA
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (20 + i, 28 + 2 * i, *channels), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class GatedModel(torch.nn.Module):
    """Wraps a model: records each batch size, and holds its first call until :attr:`release` is set."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(120), "the test never released the model"
        return self.model(x)


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    """Poll ``condition`` (not a timing assertion: only a guard against a hung test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def _post_file(url: str, path, **params) -> httpx.Response:
    with open(path, "rb") as handle:
        files = {"file": (path.name, handle, "image/png")}
        return httpx.post(f"{url}/predict", files=files, params=params, timeout=120)


def test_concurrent_requests_batch_and_match_predict_files(loaded, images):
    model, info = loaded
    expected = {p.path: p for p in predict_files(model, info, images, top_k=3)}
    gated = GatedModel(model)
    app = create_app(gated, info, max_batch=8, max_wait_ms=5, top_k=3)
    answers: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        answers[i] = _post_file(url, images[i])

    with running_server(app) as url:
        first = threading.Thread(target=ask, args=(0,))
        first.start()
        assert gated.entered.wait(120)  # request 0 is in the model, alone
        others = [threading.Thread(target=ask, args=(i,)) for i in range(1, 12)]
        for thread in others:
            thread.start()
        _wait_for(lambda: app.state.batcher.queued == 11, "11 queued requests")
        gated.release.set()
        for thread in [first, *others]:
            thread.join(120)
        health = httpx.get(f"{url}/health", timeout=60).json()
    assert gated.sizes == [1, 8, 3]  # the 11 waiting requests went through in two model calls
    assert sorted(a.json()["batch_size"] for a in answers.values()) == [1] + [3] * 3 + [8] * 8
    for i, answer in answers.items():
        assert answer.status_code == 200, answer.text
        body, want = answer.json(), expected[str(images[i])]
        assert body["indices"] == want.indices and body["labels"] == want.labels
        assert body["probs"] == pytest.approx(want.probs, abs=1e-5)
    assert health["counters"] == {
        "requests": 12,
        "errors": 0,
        "batches": 3,
        "batched_images": 12,
        "mean_batch_size": 4.0,
    }
    assert (health["model"], health["backend"], health["classes"], health["status"]) == ("dsnet_tiny", "torch", 5, "ok")


def test_max_batch_one_runs_requests_alone(loaded, images):
    model, info = loaded
    gated = GatedModel(model)
    app = create_app(gated, info, max_batch=1, max_wait_ms=1000)
    answers = []
    with running_server(app) as url:
        threads = [threading.Thread(target=lambda i=i: answers.append(_post_file(url, images[i]))) for i in range(4)]
        threads[0].start()
        assert gated.entered.wait(120)
        for thread in threads[1:]:
            thread.start()
        _wait_for(lambda: app.state.batcher.queued == 3, "3 queued requests")
        gated.release.set()
        for thread in threads:
            thread.join(120)
    assert gated.sizes == [1, 1, 1, 1]
    assert [a.json()["batch_size"] for a in answers] == [1, 1, 1, 1]


def test_errors_are_json_and_the_server_keeps_serving(loaded, images, monkeypatch):
    model, info = loaded
    good = images[1].read_bytes()
    (expected,) = predict_files(model, info, [images[1]], top_k=2)
    app = create_app(model, info, max_batch=4, max_wait_ms=1, max_upload_bytes=20_000)
    with running_server(app) as url:
        post = lambda **kw: httpx.post(f"{url}/predict", timeout=120, **kw)  # noqa: E731
        big = post(files={"file": ("big.png", b"\x89PNG" + b"0" * 30_000, "image/png")})
        assert big.status_code == 413 and "over the limit of 20000 bytes" in big.json()["detail"]
        text = post(files={"file": ("notes.png", b"just some text, no picture", "image/png")})
        assert text.status_code == 400 and text.json()["detail"] == "notes.png: not an image file PIL can read"
        for cut in (20, len(good) // 2):  # in the header chunk, in the pixel data
            half = post(files={"file": ("half.png", good[:cut], "image/png")})
            assert half.status_code == 400
            assert half.json()["detail"].startswith("half.png: corrupt or truncated image")
        bad64 = post(json={"image": "not base64 at all!"})
        assert bad64.status_code == 400 and bad64.json()["detail"].startswith("image: not valid base64")
        assert post(json={"picture": "x"}).status_code == 400
        wrong_type = post(content=b"hello", headers={"content-type": "text/plain"})
        assert wrong_type.status_code == 415 and "multipart/form-data" in wrong_type.json()["detail"]
        assert post(files={"file": ("a.png", good, "image/png")}, params={"top_k": 0}).status_code == 422
        monkeypatch.setenv("DSNET_MAX_IMAGE_PIXELS", "500")  # images[1] is 30x21 = 630 pixels
        bomb = post(files={"file": ("wide.png", good, "image/png")})
        assert bomb.status_code == 400 and "30x21 = 630 pixels, over the limit of 500" in bomb.json()["detail"]
        monkeypatch.delenv("DSNET_MAX_IMAGE_PIXELS")
        answers = [
            post(files={"file": ("a.png", good, "image/png")}, params={"top_k": 2}),
            post(json={"image": base64.b64encode(good).decode()}, params={"top_k": 2}),
            post(json={"image": "data:image/png;base64," + base64.b64encode(good).decode()}, params={"top_k": 2}),
            post(content=good, headers={"content-type": "image/png"}, params={"top_k": 2}),
        ]
        counters = httpx.get(f"{url}/health", timeout=60).json()["counters"]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["indices"] == expected.indices and len(answer.json()["probs"]) == 2
        assert answer.json()["probs"] == pytest.approx(expected.probs, abs=1e-5)
    assert counters["requests"] == 13 and counters["errors"] == 9 and counters["batched_images"] == 4


def test_streamed_body_over_the_limit_is_refused(loaded):
    model, info = loaded
    app = create_app(model, info, max_upload_bytes=1000)

    def chunks():  # no Content-Length: the limit is checked while reading
        for _ in range(4):
            yield b"x" * 400

    with running_server(app) as url:
        answer = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "image/png"}, timeout=60)
        assert answer.status_code == 413 and "over the limit of 1000 bytes" in answer.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=60).json()["counters"]["errors"] == 1


@pytest.mark.slow  # the ONNX export (torch.export) alone took minutes on the busy 2-core machine
def test_exported_backends_serve_the_same_answer(loaded, images, tmp_path):
    """The same small convnet as ONNX (served by ONNX Runtime) and as OpenVINO IR (served by OpenVINO)."""
    from dsnet.deploy.runtime import write_artefact_info
    from dsnet.export.onnx import export_onnx
    from dsnet.export.openvino import export_openvino

    info = loaded[1]
    torch.manual_seed(0)  # a small convnet: exporting dsnet_tiny takes minutes on a busy 2-core machine
    small = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(1),
        torch.nn.Linear(8, len(CLASSES)),
    ).eval()
    export_onnx(small, tmp_path / "m.onnx", image_size=(32, 32), in_chans=1)
    export_openvino(tmp_path / "m.onnx", tmp_path / "m.xml")
    (expected,) = predict_files(small, info, [images[2]], top_k=3)
    for artefact, backend in (("m.onnx", "onnxruntime"), ("m.xml", "openvino")):
        write_artefact_info(tmp_path / artefact, info)
        runtime, runtime_info = load_for_inference(tmp_path / artefact, num_threads=1)
        with running_server(create_app(runtime, runtime_info, top_k=3)) as url:
            answers = [_post_file(url, images[2]).json(), _post_file(url, images[5], top_k=1).json()]
            health = httpx.get(f"{url}/health", timeout=60).json()
        assert health["backend"] == backend and health["counters"]["requests"] == 2, health
        assert answers[0]["indices"] == expected.indices, backend
        assert answers[0]["probs"] == pytest.approx(expected.probs, abs=1e-5), backend
        (second,) = predict_files(small, info, [images[5]], top_k=1)
        assert answers[1]["indices"] == second.indices, backend


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["serve", str(tmp_path / "missing.safetensors"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dsnet: error: checkpoint {tmp_path / 'missing.safetensors'} does not exist"
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if the serve extra were not installed
    assert main(["serve", str(tmp_path / "missing.safetensors"), "--threads", "1"]) == 2
    assert capsys.readouterr().err.strip() == "dsnet: error: dsnet serve needs uvicorn: pip install 'dsnet[serve]'"


def test_image_bytes_decode_to_the_same_tensor_as_the_file(loaded, images):
    from dsnet.engine.inference import Preprocessor

    prep = Preprocessor(loaded[1])
    for path in images[:3]:
        assert torch.equal(prep.from_bytes(path.read_bytes(), path.name), prep.from_path(path))
    assert prep.from_path(images[0]).shape == (1, 32, 32)
