"""Running a model for inference on one of three backends: PyTorch (fused), ONNX Runtime, OpenVINO.

Each backend is an :class:`torch.nn.Module` taking a float batch ``(B, C, H, W)`` and returning logits ``(B, classes)``,
so :func:`dsnet.engine.inference.predict_files`, :func:`dsnet.engine.evaluate.evaluate` and the server use any of them
unchanged. An exported artefact (``.onnx`` for ONNX Runtime, ``.xml`` OpenVINO IR; OpenVINO also reads ``.onnx``)
carries a sidecar ``<artefact>.json`` written by ``dsnet export``: the model name, classes and eval preprocessing.

Example:
    >>> model, info = load_for_inference("model.onnx")  # doctest: +SKIP
    >>> model(torch.randn(4, info.in_chans, info.input_size, info.input_size)).shape  # doctest: +SKIP
    torch.Size([4, 10])
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.engine.inference import CheckpointInfo
from dsnet.errors import DSNetError

__all__ = [
    "BACKENDS",
    "OnnxRuntimeModel",
    "OpenVINOModel",
    "guess_backend",
    "load_for_inference",
    "read_artefact_info",
    "write_artefact_info",
]

#: The backends :func:`load_for_inference` knows, in the order ``--backend`` lists them.
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
_ARTEFACT_SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}


def sidecar_path(artefact: str | os.PathLike[str]) -> Path:
    """Where the metadata of ``artefact`` lives: ``model.onnx`` → ``model.onnx.json``."""
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".json")


def write_artefact_info(artefact: str | os.PathLike[str], info: CheckpointInfo, **extra: Any) -> Path:
    """Write the sidecar JSON of ``artefact`` (``info`` plus ``extra`` fields such as the export settings)."""
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(info).items()}
    record.update(extra)
    path = sidecar_path(artefact)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_artefact_info(artefact: str | os.PathLike[str]) -> CheckpointInfo:
    """The :class:`CheckpointInfo` stored beside ``artefact``.

    Raises:
        FileNotFoundError: no sidecar (the artefact was not written by ``dsnet export``).
        DSNetError: a sidecar that is not the expected JSON.
    """
    path = sidecar_path(artefact)
    if not path.is_file():
        raise FileNotFoundError(
            f"{artefact} has no {path.name} beside it (model name, classes, preprocessing): export it with dsnet export"
        )
    try:
        record = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(CheckpointInfo)}
        values = {k: v for k, v in record.items() if k in fields}
        for key in ("classes", "mean", "std"):
            values[key] = tuple(values.get(key, ()))
        values["path"] = Path(artefact)
        values["run_dir"] = Path(values["run_dir"]) if values.get("run_dir") else None
        return CheckpointInfo(**values)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise DSNetError(f"{path}: not a dsnet artefact description ({err})") from None


def guess_backend(source: str | os.PathLike[str]) -> str:
    """The backend for ``source`` by its suffix: ``.onnx`` → onnxruntime, ``.xml`` → openvino, else torch."""
    return _ARTEFACT_SUFFIXES.get(Path(source).suffix.lower(), "torch")


class _ArtefactModel(nn.Module):
    """Common part of the runtime wrappers: numpy in and out, float32, contiguous."""

    def __init__(self, path: Path, num_threads: int | None) -> None:
        super().__init__()
        self.path = path
        self.num_threads = num_threads or torch.get_num_threads()

    def _run(self, x: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._run(array).copy())


class OnnxRuntimeModel(_ArtefactModel):
    """An ONNX file run by ONNX Runtime's CPU provider (fp32 or int8 QDQ, whatever the file holds)."""

    def __init__(self, path: str | os.PathLike[str], num_threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(Path(path), num_threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, x: Any) -> Any:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVINOModel(_ArtefactModel):
    """An OpenVINO IR (``.xml`` + ``.bin``) or ONNX file compiled for OpenVINO's CPU plugin.

    ``precision="f32"`` (default) keeps fp32 arithmetic: on CPUs with bf16 units OpenVINO otherwise computes in
    bf16 by default (logits then differ from PyTorch by ~1e-2). ``"bf16"`` asks for that faster mode explicitly.
    """

    def __init__(self, path: str | os.PathLike[str], num_threads: int | None = None, precision: str = "f32") -> None:
        import openvino as ov

        super().__init__(Path(path), num_threads)
        if precision not in ("f32", "bf16"):
            raise DSNetError(f"OpenVINO precision must be f32 or bf16, got {precision!r}")
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": self.num_threads}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def _run(self, x: Any) -> Any:
        return self.request.infer([x])[0]


def load_for_inference(
    source: str | os.PathLike[str],
    *,
    backend: str | None = None,
    fuse: bool = True,
    num_threads: int | None = None,
    **checkpoint_kwargs: Any,
) -> tuple[nn.Module, CheckpointInfo]:
    """A ready-to-run model (eval mode, CPU) and its :class:`CheckpointInfo`.

    Args:
        source: for ``torch``, a run folder or ``.safetensors`` (see :func:`~dsnet.engine.inference.load_checkpoint`);
            for ``onnxruntime`` / ``openvino``, an artefact of ``dsnet export``.
        backend: one of :data:`BACKENDS`; default from the suffix of ``source`` (:func:`guess_backend`).
        fuse: PyTorch only: return :func:`dsnet.deploy.fuse` of the model (same logits, fewer layers).
        num_threads: runtime threads (default: torch's current setting).
        checkpoint_kwargs: passed to ``load_checkpoint`` for the torch backend (``ema``, ``tag``, ``model_name``, ...).

    Raises:
        DSNetError: an unknown backend, or a checkpoint given to a runtime backend (and the reverse).
        FileNotFoundError: no such file, or an artefact without its sidecar.
    """
    backend = backend or guess_backend(source)
    if backend not in BACKENDS:
        raise DSNetError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(source).expanduser()
    if backend == "torch":
        if path.suffix.lower() in _ARTEFACT_SUFFIXES:
            raise DSNetError(f"{path} is an exported artefact: run it with --backend {guess_backend(path)}")
        from dsnet.deploy.fuse import fuse as fuse_model
        from dsnet.engine.inference import load_checkpoint

        model, info = load_checkpoint(path, **checkpoint_kwargs)
        return (fuse_model(model) if fuse else model), info
    if path.suffix.lower() not in _ARTEFACT_SUFFIXES:
        raise DSNetError(
            f"the {backend} backend runs an exported .onnx or .xml file, got {path}; "
            "make one with `dsnet export RUN OUT.onnx` (or OUT.xml), or use --backend torch"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    info = read_artefact_info(path)
    if backend == "onnxruntime":
        if path.suffix.lower() != ".onnx":
            raise DSNetError(f"onnxruntime runs .onnx files, got {path}; use --backend openvino for OpenVINO IR")
        return OnnxRuntimeModel(path, num_threads).eval(), info
    return OpenVINOModel(path, num_threads).eval(), info
