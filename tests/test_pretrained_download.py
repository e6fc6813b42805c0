"""``timm.create_model(name, pretrained=True)`` for the zoo's public releases, against a local HTTP server.

No real download: an :mod:`http.server` on 127.0.0.1 (with ``Range`` support written here, and switches to cut a
transfer short or to ignore ``Range``) serves GENERATED release files: a random-weight DS-Net-T ``.pdparams`` in the
PaddleClas layout and a random-weight TransXNet-T ``.pth.tar`` training checkpoint in the official names. The
models' release URLs point at it through ``DSNET_WEIGHTS_BASE_URL``; the cache lives under ``TORCH_HOME=tmp_path``.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch

from _official_checkpoints import dsnet_reference_state, transxnet_t_official_state_dict, write_pdparams
from dsnet.cli.main import main
from dsnet.models._pretrained import BASE_URL_ENV, WeightsDownloadError, weights_dir

DSNET_FILE = "DSNet_tiny_pretrained.pdparams"
TRANSXNET_FILE = "transx-t.pth.tar"
INPUT = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class ReleaseServer:
    """Serves ``files`` (name → bytes) at ``url/<name>``; records (path, Range header) of every request.

    ``cuts`` responses in a row send only ``cut_after`` bytes of their body and close the connection;
    ``honour_range=False`` answers every request with the whole file (a server without range support).
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.cuts = 0
        self.cut_after = 0
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.honour_range:
                    start = int(match[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.cuts > 0:
                    server.cuts -= 1
                    body = body[: server.cut_after]
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture(scope="module")
def dsnet_release(tmp_path_factory) -> bytes:
    state = dsnet_reference_state("dsnet_tiny", "paddle", seed=3)
    return write_pdparams(tmp_path_factory.mktemp("release") / DSNET_FILE, state).read_bytes()


@pytest.fixture(scope="module")
def transxnet_release() -> bytes:
    torch.manual_seed(4)
    model = timm.create_model("transxnet_t")
    with torch.no_grad():
        for buffer in model.buffers():  # non-trivial BN statistics
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    official = transxnet_t_official_state_dict(model)
    ema = {key: torch.zeros_like(value) for key, value in list(official.items())[:2]}  # must not be the entry used
    buffer = io.BytesIO()
    torch.save({"epoch": 299, "state_dict": official, "state_dict_ema": ema}, buffer)
    return buffer.getvalue()


@pytest.fixture
def server(monkeypatch, tmp_path, dsnet_release, transxnet_release) -> Iterator[ReleaseServer]:
    srv = ReleaseServer({DSNET_FILE: dsnet_release, TRANSXNET_FILE: transxnet_release})
    monkeypatch.setenv(BASE_URL_ENV, srv.url)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield srv
    srv.stop()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT)


def _by_hand(tmp_path: Path, layout: str, data: bytes, name: str, model: str) -> torch.Tensor:
    """The manual route: ``dsnet convert`` the release file, load it with ``pretrained_cfg_overlay``; its logits."""
    source, out = tmp_path / name, tmp_path / f"{model}.by_hand.safetensors"
    source.write_bytes(data)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["convert", layout, str(source), str(out), "--model", model]) == 0
    return _logits(timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))))


def _cache_files() -> list[str]:
    folder = weights_dir()
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.is_dir() else []


@pytest.mark.parametrize(
    ("model", "name", "layout"), [("dsnet_tiny", DSNET_FILE, "paddle"), ("transxnet_t", TRANSXNET_FILE, "torch")]
)
def test_download_convert_load_equals_converting_by_hand_and_then_works_offline(server, tmp_path, model, name, layout):
    auto = timm.create_model(model, pretrained=True)
    assert server.requests == [(name, None)]
    stem = name.split(".")[0]
    assert _cache_files() == sorted([name, f"{stem}.{model}.safetensors"])  # the release and its conversion
    assert (weights_dir() / name).read_bytes() == server.files[name]
    assert weights_dir().is_relative_to(tmp_path / "torch")  # TORCH_HOME is respected
    expected = _by_hand(tmp_path, layout, server.files[name], name, model)
    assert torch.equal(_logits(auto), expected)

    server.stop()  # a second call must not touch the network
    again = timm.create_model(model, pretrained=True)
    assert torch.equal(_logits(again), expected)
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_a_range_request(server):
    size = len(server.files[DSNET_FILE])
    server.cuts, server.cut_after = 3, size // 10  # every connection of the first call is cut short
    with pytest.raises(WeightsDownloadError, match=r"was cut 3 times .*\.partial.*call again to resume"):
        timm.create_model("dsnet_tiny", pretrained=True)
    partial = weights_dir() / f"{DSNET_FILE}.partial"
    assert partial.stat().st_size == 3 * (size // 10)  # each connection went on where the previous one stopped
    assert _cache_files() == [partial.name]  # nothing cached as complete

    model = timm.create_model("dsnet_tiny", pretrained=True)  # the second call finishes the same file
    ranges = [header for _, header in server.requests]
    assert ranges == [None, *(f"bytes={k * (size // 10)}-" for k in (1, 2, 3))]
    assert (weights_dir() / DSNET_FILE).read_bytes() == server.files[DSNET_FILE]
    assert not partial.exists()
    assert model.stages[0].downsample.weight.abs().sum() > 0


def test_server_without_range_support_restarts_the_download(server):
    server.honour_range = False
    server.cuts, server.cut_after = 3, 1000
    with pytest.raises(WeightsDownloadError, match="was cut"):
        timm.create_model("dsnet_tiny", pretrained=True)
    assert (weights_dir() / f"{DSNET_FILE}.partial").stat().st_size == 1000  # rewritten, not appended
    timm.create_model("dsnet_tiny", pretrained=True)
    assert server.requests[-1][1] == "bytes=1000-"  # asked to resume, got the whole file, started over
    assert (weights_dir() / DSNET_FILE).read_bytes() == server.files[DSNET_FILE]


def test_wrong_hash_is_refused_and_not_cached(server):
    url = f"https://example.invalid/{DSNET_FILE}#sha256={'0' * 64}"  # the folder is replaced by the server's
    with pytest.raises(ValueError, match=rf"{DSNET_FILE} has sha256 [0-9a-f]{{64}}, the release's is 0{{64}}"):
        timm.create_model("dsnet_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=url))
    assert _cache_files() == []


def test_a_file_that_is_no_checkpoint_is_named_and_not_cached(server, dsnet_release):
    server.files[DSNET_FILE] = b"<html>rate limit exceeded</html>" * 100
    with pytest.raises(ValueError, match=rf"dsnet_tiny: .*{re.escape(DSNET_FILE)} .*could not be converted"):
        timm.create_model("dsnet_tiny", pretrained=True)
    assert _cache_files() == []  # neither the bad file nor a conversion is kept
    server.files[DSNET_FILE] = dsnet_release  # the next call downloads it anew
    timm.create_model("dsnet_tiny", pretrained=True)
    assert len(server.requests) == 2


def test_http_404_names_the_url_and_the_manual_route(server):
    del server.files[TRANSXNET_FILE]
    url = f"{server.url}/{TRANSXNET_FILE}"
    with pytest.raises(WeightsDownloadError) as info:
        timm.create_model("transxnet_t", pretrained=True)
    message = str(info.value)
    assert f"could not download {url} (HTTP 404" in message
    assert f"put it at {weights_dir() / TRANSXNET_FILE}" in message
    assert f"dsnet convert torch {TRANSXNET_FILE} transxnet_t.safetensors --model transxnet_t" in message
    assert "\n" not in message


def test_without_network_the_file_fetched_by_hand_is_used(server, tmp_path):
    server.stop()
    with pytest.raises(WeightsDownloadError, match=r"no network\?.*fetch .* by hand and put it at .*dsnet convert"):
        timm.create_model("dsnet_tiny", pretrained=True)
    (weights_dir() / DSNET_FILE).write_bytes(server.files[DSNET_FILE])  # what the message says to do
    model = timm.create_model("dsnet_tiny", pretrained=True)
    assert torch.equal(_logits(model), _by_hand(tmp_path, "paddle", server.files[DSNET_FILE], DSNET_FILE, "dsnet_tiny"))


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("mobile_former_294m", r"Google Drive page.*drive\.google\.com/file/d/1JBSM7NJ60fN9TgT5sMnbhmbZwrzcBd0r.*"
         r"dsnet convert torch <file> mobile_former_294m\.safetensors --model mobile_former_294m.*"
         r"pretrained_cfg_overlay=dict\(file="),
        ("mixformer_b1", r"PaddleClas published no MixFormer weights.*dsnet convert paddle <file> mixformer_b1"),
        ("mixformer_b0", r"published no MixFormer weights"),
    ],
)  # fmt: skip
def test_models_without_a_direct_release_explain_the_manual_route(server, model, expected):
    with pytest.raises(ValueError, match=expected):
        timm.create_model(model, pretrained=True)
    assert server.requests == []  # nothing is attempted


def test_a_whole_partial_file_is_completed_by_the_416_answer(server):
    weights_dir().mkdir(parents=True)
    (weights_dir() / f"{DSNET_FILE}.partial").write_bytes(server.files[DSNET_FILE])  # e.g. killed before the rename
    timm.create_model("dsnet_tiny", pretrained=True)
    assert server.requests == [(DSNET_FILE, f"bytes={len(server.files[DSNET_FILE])}-")]  # answered 416: nothing left
    assert (weights_dir() / DSNET_FILE).read_bytes() == server.files[DSNET_FILE]


def test_another_entry_of_the_release_is_converted_on_request_and_a_failure_keeps_the_download(server):
    # the official checkpoint's "state_dict" is the default (test above); this one's "state_dict_ema" is incomplete
    with pytest.raises(ValueError, match=r"could not be converted \(kept in the cache: .*'state_dict_ema'"):
        timm.create_model("transxnet_t", pretrained=True, pretrained_cfg_overlay=dict(entry="state_dict_ema"))
    assert _cache_files() == [TRANSXNET_FILE]  # the download stays: the entry, not the file, was wrong
