"""Loading a trained or converted checkpoint for evaluation and prediction.

A checkpoint is a run folder (its ``config.yaml`` and ``checkpoints/best.safetensors``), or a ``.safetensors`` file
written by ``dsnet train`` (its metadata names the model, classes and preprocessing), or converted weights (then
``model_name`` and the classes must be given).

Example:
    >>> model, info = load_checkpoint("runs/dsnet_tiny-fashion_mnist-20260101-000000")  # doctest: +SKIP
    >>> predict_files(model, info, ["shoe.png"], top_k=3)  # doctest: +SKIP
    [Prediction(path='shoe.png', labels=['Ankle boot', 'Sneaker', 'Sandal'], probs=[0.97, 0.02, 0.01])]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnet.data.images import IMAGE_EXTENSIONS, ImageLoadError, decode_image, load_image
from dsnet.engine import checkpoint as ckpt
from dsnet.errors import DSNetError

__all__ = [
    "CheckpointInfo",
    "Prediction",
    "Preprocessor",
    "TopK",
    "collect_images",
    "load_checkpoint",
    "model_device",
    "predict_files",
    "rank_classes",
]


@dataclass
class CheckpointInfo:
    """What is needed to use a checkpoint: the model name, classes and eval preprocessing."""

    path: Path  # the weights file
    model: str
    num_classes: int
    in_chans: int = 3
    classes: tuple[str, ...] = ()
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    has_preprocessing: bool = False  # True when the file's metadata gave input size, crop and normalisation

    def transform(self):
        """timm's eval transform (resize to input_size / crop_pct, center crop, normalise)."""
        from timm.data import create_transform

        interpolation = "bicubic" if self.interpolation == "random" else self.interpolation
        return create_transform(
            input_size=(self.in_chans, self.input_size, self.input_size),
            is_training=False,
            interpolation=interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
        )


def _head_classes(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[str, int, int] | None:
    """``(key, checkpoint classes, model classes)`` for the first classifier tensor whose shape differs."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            return key, int(value.shape[0]), int(own[key].shape[0])
    return None


def _classifier_size(name: str, state: dict[str, torch.Tensor], in_chans: int) -> int:
    import timm

    with torch.device("meta"):
        probe = timm.create_model(name, in_chans=in_chans)
    head = probe.get_classifier()
    weight = getattr(head, "weight", None)
    key = next((k for k, p in probe.named_parameters() if weight is not None and p is weight), None)
    if key is None or key not in state:
        raise DSNetError(f"cannot tell the number of classes of these {name} weights; pass the class names (--classes)")
    return int(state[key].shape[0])


def load_checkpoint(
    path: str | Path,
    *,
    ema: bool = False,
    tag: str = "best",
    model_name: str | None = None,
    num_classes: int | None = None,
    classes: tuple[str, ...] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, CheckpointInfo]:
    """The model (eval mode, on ``device``) and its :class:`CheckpointInfo`.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        DSNetError: unknown model, no model name for foreign weights, or weights that do not fit the model — in
            particular a classifier for another number of classes (the message gives both numbers).
    """
    import timm

    weights_path = ckpt.resolve_checkpoint(path, tag=tag, ema=ema)
    state, meta = ckpt.load_weights(weights_path)
    run_dir = Path(path) if Path(path).is_dir() else None
    name = model_name or meta.get("model")
    if not name:
        raise DSNetError(f"{weights_path} does not say which model it holds; pass the model name (--model NAME)")
    if not timm.is_model(name):
        raise DSNetError(f"unknown model {name!r} (from {'--model' if model_name else weights_path})")
    meta_classes = tuple(meta.get("classes") or ())
    n = num_classes or (len(classes) if classes else None) or meta.get("num_classes") or len(meta_classes) or None
    if n is None:  # foreign weights: the classifier's output size, found through timm's get_classifier()
        n = _classifier_size(name, state, int(meta.get("in_chans", 3)))
    info = CheckpointInfo(
        path=weights_path,
        model=name,
        num_classes=int(n),
        in_chans=int(meta.get("in_chans", 3)),
        classes=tuple(classes or meta_classes or [str(i) for i in range(int(n))]),
        input_size=int(meta.get("input_size", 224)),
        crop_pct=float(meta.get("crop_pct", 0.875)),
        interpolation=str(meta.get("interpolation", "bicubic")),
        mean=tuple(meta.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(meta.get("std", (0.229, 0.224, 0.225))),
        model_kwargs=dict(meta.get("model_kwargs") or {}),
        run_dir=run_dir,
        has_preprocessing="input_size" in meta and "mean" in meta,
    )
    if len(info.classes) != info.num_classes:
        raise DSNetError(f"{len(info.classes)} class names given for a {info.num_classes}-class model")
    model = timm.create_model(name, num_classes=info.num_classes, in_chans=info.in_chans, **info.model_kwargs)
    mismatch = _head_classes(state, model)
    if mismatch is not None:
        key, have, want = mismatch
        raise DSNetError(
            f"{weights_path}: {key} has shape {tuple(state[key].shape)}, the {name} model expects "
            f"{tuple(model.state_dict()[key].shape)}"
            + (f" — the checkpoint has {have} classes but {want} are expected" if have != want else "")
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DSNetError(
            f"{weights_path} does not fit {name}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    return model.to(device).eval(), info


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files of ``inputs`` (files kept as given; folders searched recursively, sorted).

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no image.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


@dataclass
class Prediction:
    """Top-k labels of one image (``error`` set instead when the file could not be read)."""

    path: str
    labels: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str | None = None


class Preprocessor:
    """The eval preprocessing of a checkpoint: an image file or its bytes → a ``(C, H, W)`` float tensor.

    One object for ``dsnet predict`` and ``dsnet serve``, so both feed the model the same tensor for the same image:
    decoding by :func:`~dsnet.data.images.load_image` / :func:`~dsnet.data.images.decode_image` (same checks and
    pixel limit) to ``L`` or ``RGB`` by ``info.in_chans``, then :meth:`CheckpointInfo.transform`.

    Example:
        >>> prep = Preprocessor(info)  # doctest: +SKIP
        >>> prep.from_path("shoe.png").shape  # doctest: +SKIP
        torch.Size([1, 32, 32])
    """

    def __init__(self, info: CheckpointInfo) -> None:
        self.info = info
        self.mode = "L" if info.in_chans == 1 else "RGB"
        self.transform = info.transform()

    def from_path(self, path: str | Path) -> torch.Tensor:
        """The model input for the image file ``path``.

        Raises:
            ImageLoadError: the file cannot be decoded (the message names it and the reason).
        """
        return self.transform(load_image(path, self.mode))

    def from_bytes(self, data: bytes, name: str = "image") -> torch.Tensor:
        """The model input for an image file's bytes (``name`` starts error messages).

        Raises:
            ImageLoadError: the bytes are empty, no image, a damaged image or over the pixel limit.
        """
        return self.transform(decode_image(data, self.mode, name=name))


@dataclass
class TopK:
    """The ``k`` most probable classes of one image, most probable first."""

    labels: list[str]
    indices: list[int]
    probs: list[float]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a runtime backend, which has none)."""
    return next(model.parameters(), torch.empty(0)).device


def rank_classes(probs: torch.Tensor, classes: tuple[str, ...], k: int) -> list[TopK]:
    """:class:`TopK` of each row of softmax probabilities ``probs`` ``(B, classes)``; ``k`` is capped at the classes."""
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [TopK([classes[j] for j in i], i, v) for v, i in zip(values.tolist(), indices.tolist())]


@torch.no_grad()
def predict_files(
    model: nn.Module, info: CheckpointInfo, files: list[Path], *, top_k: int = 5, batch_size: int = 32
) -> list[Prediction]:
    """Top-``top_k`` classes with softmax probabilities for each file; unreadable files get ``error``.

    ``model`` is any module mapping a batch to logits: PyTorch, or a runtime of :mod:`dsnet.deploy.runtime`.
    """
    preprocess = Preprocessor(info)
    device = model_device(model)
    results: list[Prediction] = []
    batch: list[tuple[Prediction, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        probs = model(torch.stack([x for _, x in batch]).to(device)).float().softmax(-1)  # (B, classes)
        for (pred, _), best in zip(batch, rank_classes(probs.cpu(), info.classes, top_k)):
            pred.indices, pred.probs, pred.labels = best.indices, best.probs, best.labels
        batch.clear()

    for path in files:
        pred = Prediction(path=str(path))
        results.append(pred)
        try:
            batch.append((pred, preprocess.from_path(path)))
        except ImageLoadError as err:
            pred.error = str(err)
        if len(batch) >= batch_size:
            flush()
    flush()
    return results
