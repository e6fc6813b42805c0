"""Figures of ``dsnet viz``: attention of a query point, stream features, Grad-CAM, and the Figure-1 grid.

Every function loads nothing itself: it takes a :class:`VizModel` (see :func:`load_viz_model`) and image paths, and
writes one PNG whose title names the model, the block and the point.

Preprocessing: the image is resized to the model's input size as a whole (square, no crop), so that every pixel of
the image is shown and a point ``(x, y)`` in image pixels maps linearly onto the feature maps; normalisation and
channels are the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dsnet.data.images import load_image
from dsnet.engine.checkpoint import load_weights
from dsnet.engine.inference import CheckpointInfo, _classifier_size, load_checkpoint
from dsnet.errors import DSNetError
from dsnet.viz.capture import ModuleOutputs
from dsnet.viz.maps import (
    Panel,
    attention_panels,
    block_names,
    default_block,
    feature_panels,
    model_family,
    parse_block,
    run_with_capture,
)

__all__ = [
    "VizModel",
    "attention_figure",
    "cam_figure",
    "features_figure",
    "load_baseline",
    "load_viz_model",
    "parse_point",
    "streams_figure",
]


@dataclass
class VizModel:
    """A model in eval mode with what is needed to feed it one image."""

    model: nn.Module
    name: str
    info: CheckpointInfo
    weights: str  # where the weights came from ("untrained" for a bare zoo name)

    def load(self, path: str | Path) -> tuple[torch.Tensor, np.ndarray, tuple[int, int]]:
        """``(input (1, C, S, S), display image (S, S[, 3]) in [0, 1], original (width, height))`` of ``path``."""
        image = load_image(path, "L" if self.info.in_chans == 1 else "RGB")
        original = image.size
        size = self.info.input_size
        resized = image.resize((size, size), _resample(self.info.interpolation))
        array = np.asarray(resized, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, S, S)
        if tensor.shape[0] != self.info.in_chans:
            tensor = tensor.expand(self.info.in_chans, -1, -1)
        mean = torch.tensor(self.info.mean[: self.info.in_chans]).view(-1, 1, 1)
        std = torch.tensor(self.info.std[: self.info.in_chans]).view(-1, 1, 1)
        device = next(self.model.parameters()).device
        return ((tensor - mean) / std)[None].to(device), array, original


def _resample(interpolation: str):
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(interpolation, Image.BICUBIC)


def load_viz_model(
    source: str, weights: str | None = None, input_size: int | None = None, device: str = "cpu"
) -> VizModel:
    """A run folder or a weights file written by ``dsnet train``, or a registered model name (with ``weights``: a
    converted / safetensors file for it; without: untrained weights, useful for shapes only)."""
    import timm

    if Path(source).exists():
        if weights:
            raise DSNetError(f"{source} is a checkpoint already; --weights goes with a model name")
        model, info = load_checkpoint(source, device=device)
        origin = f"{Path(source).name}/{info.path.name}" if Path(source).is_dir() else info.path.name
    elif timm.is_model(source):
        if weights:
            model, info = load_checkpoint(weights, model_name=source, device=device)
            origin = str(weights)
        else:
            model = timm.create_model(source).to(device).eval()
            cfg = model.pretrained_cfg
            info = CheckpointInfo(
                path=Path(source),
                model=source,
                num_classes=model.num_classes,
                in_chans=model.in_chans if hasattr(model, "in_chans") else 3,
                input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            )
            origin = "untrained"
    else:
        raise FileNotFoundError(f"{source}: not a run folder, not a weights file, not a registered model name")
    if input_size:
        info.input_size = input_size
    return VizModel(model, info.model, info, origin)


def load_baseline(name: str, weights: str | None) -> VizModel:
    """A timm ViT (the paper's DeiT baseline of Fig. 1a) with the user's weights; nothing is downloaded."""
    import timm

    if not timm.is_model(name):
        raise DSNetError(f"--baseline {name!r}: not a registered timm model")
    if not weights:
        raise DSNetError(f"--baseline {name} needs --baseline-weights FILE (weights are never downloaded)")

    state, _ = load_weights(weights)
    model = timm.create_model(name, pretrained=False, num_classes=_classifier_size(name, state, 3))
    if model_family(model) != "vit":
        raise DSNetError(f"--baseline {name}: not a ViT (no blocks[].attn to read the attention of)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DSNetError(f"{weights} does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    cfg = model.pretrained_cfg
    info = CheckpointInfo(
        path=Path(weights),
        model=name,
        num_classes=model.num_classes,
        input_size=int(model.patch_embed.img_size[0]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )
    return VizModel(model.eval(), name, info, str(weights))


def parse_point(text: str | None, original: tuple[int, int], path: str | Path) -> tuple[float, float]:
    """``"X,Y"`` in pixels of the original image (default: its centre) → fractions of width and height."""
    width, height = original
    if text is None:
        return 0.5, 0.5
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise DSNetError(f"--point {text!r}: expected X,Y in image pixels, e.g. --point 14,10") from None
    if not (0 <= x < width and 0 <= y < height):
        raise DSNetError(
            f"--point {text}: outside the image {path} ({width}×{height} px; 0 <= X < {width}, 0 <= Y < {height})"
        )
    return x / width, y / height


def _label(vm: VizModel, logits: torch.Tensor) -> str:
    probs = logits.softmax(-1)[0]
    index = int(probs.argmax())
    name = vm.info.classes[index] if index < len(vm.info.classes) else str(index)
    return f"predicted {name} ({probs[index] * 100:.0f} %)"


def _draw(ax, image: np.ndarray, panel: Panel | None, point: tuple[float, float] | None, overlay: bool = True):
    size = image.shape[0]
    ax.set_xticks([])
    ax.set_yticks([])
    if panel is None:  # the image itself
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    elif panel.heatmap is None:
        ax.imshow(np.ones_like(image) * 0.92, cmap="gray", vmin=0, vmax=1)
        ax.text(
            0.5, 0.5, "no map:\n" + panel.note, ha="center", va="center", fontsize=7, wrap=True, transform=ax.transAxes
        )
    elif overlay:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
        ax.imshow(
            panel.heatmap.cpu().numpy(),
            cmap="jet",
            alpha=0.5,
            extent=(-0.5, size - 0.5, size - 0.5, -0.5),
            interpolation="nearest",
        )
    else:
        ax.imshow(panel.heatmap.cpu().numpy(), cmap="viridis", interpolation="nearest")
    if panel is not None:
        ax.set_title(panel.title, fontsize=7)
    if point is not None and (panel is None or panel.heatmap is not None) and overlay:
        ax.plot(point[0] * size - 0.5, point[1] * size - 0.5, "o", ms=5, mfc="deepskyblue", mec="white", mew=1)


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def _figure(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows + 0.5), squeeze=False)
    return fig, axes


def _require_family(vm: VizModel, kind: str) -> None:
    """A clear error before any work when ``vm`` has no map of this kind (``cam`` works for any model)."""
    family = model_family(vm.model)
    if kind == "attention" and family is None:
        raise DSNetError(
            f"{vm.name} ({type(vm.model).__name__}): no attention maps to show (DS-Net, TransXNet, MixFormer or a "
            "timm ViT); `dsnet viz cam` works for any model"
        )
    if kind == "features" and family not in ("dsnet", "transxnet", "mixformer"):
        raise DSNetError(
            f"{vm.name} ({type(vm.model).__name__}): no local/global streams to show (features need DS-Net, "
            "TransXNet or MixFormer); `dsnet viz cam` works for any model"
        )


def _pick_block(vm: VizModel, capture, block: str | None) -> str:
    if block is None:
        return default_block(vm.model, capture)
    parse_block(vm.model, block)
    return block


def attention_figure(
    vm: VizModel,
    image: str | Path,
    out: str | Path,
    point: str | None = None,
    block: str | None = None,
    baseline: VizModel | None = None,
) -> Path:
    """The attention maps of the query ``point`` (``"X,Y"`` in image pixels) in ``block`` over the image, with an
    optional ViT baseline panel (paper Fig. 1 a/b)."""
    _require_family(vm, "attention")
    x, display, original = vm.load(image)
    where = parse_point(point, original, image)
    logits, capture = run_with_capture(vm.model, x)
    block = _pick_block(vm, capture, block)
    panels = attention_panels(vm.model, capture, block, where, display.shape[:2])
    shown: list[tuple[np.ndarray, Panel | None]] = [(display, None)]
    if baseline is not None:
        bx, bdisplay, _ = baseline.load(image)
        _, bcapture = run_with_capture(baseline.model, bx)
        bpanel = attention_panels(
            baseline.model, bcapture, list(block_names(baseline.model))[-1], where, bdisplay.shape[:2]
        )[0]
        bpanel.title = f"{baseline.name}, last block\n{bpanel.title}"
        shown.append((bdisplay, bpanel))
    shown += [(display, p) for p in panels]
    if all(p is not None and p.heatmap is None for _, p in shown[1:]):
        raise DSNetError(f"{vm.name}: block {block} has no attention map ({'; '.join(p.note for _, p in shown[1:])})")
    fig, axes = _figure(1, len(shown))
    for ax, (img, panel) in zip(axes[0], shown):
        _draw(ax, img, panel, where)
    px = point or f"{original[0] // 2},{original[1] // 2} (centre)"
    fig.suptitle(
        f"{vm.name} ({vm.weights}) block {block}: attention of point {px}, mean over heads — {_label(vm, logits)}",
        fontsize=8,
    )
    return _save(fig, out)


def features_figure(
    vm: VizModel, image: str | Path, out: str | Path, block: str | None = None, reduce: str = "mean"
) -> Path:
    """Local-stream, global-stream and fused maps of ``block`` (paper Fig. 1 c–e), reduced over channels."""
    _require_family(vm, "features")
    x, display, _ = vm.load(image)
    logits, capture = run_with_capture(vm.model, x)
    block = _pick_block(vm, capture, block)
    panels = feature_panels(vm.model, x, block, reduce)
    fig, axes = _figure(1, 1 + len(panels))
    _draw(axes[0][0], display, None, None)
    for ax, panel in zip(axes[0][1:], panels):
        _draw(ax, display, panel, None, overlay=False)
    how = "channel mean" if reduce == "mean" else "first PCA component"
    fig.suptitle(f"{vm.name} ({vm.weights}) block {block}: stream features ({how}) — {_label(vm, logits)}", fontsize=8)
    return _save(fig, out)


def _cam_layer(vm: VizModel, x: torch.Tensor, block: str | None) -> tuple[str, nn.Module]:
    """The Grad-CAM target: ``block`` of a staged model, else the last feature module (timm ``feature_info``) whose
    map has more than one position."""
    modules = dict(vm.model.named_modules())
    if block is not None:
        name = parse_block(vm.model, block)
        return name, modules[name]
    candidates = [f["module"] for f in getattr(vm.model, "feature_info", []) if f.get("module") in modules]
    if not candidates:
        raise DSNetError(f"{vm.name}: no feature modules to take a Grad-CAM from; name one with --block")

    with torch.no_grad(), ModuleOutputs(vm.model, candidates) as kept:
        vm.model(x)
    sizes = {n: _positions(vm.model, kept.outputs[n]) for n in candidates}
    chosen = [n for n in candidates if sizes[n] > 1] or candidates
    return chosen[-1], modules[chosen[-1]]


def _positions(model: nn.Module, output: torch.Tensor) -> int:
    if output.ndim == 4:
        return (
            output.shape[1] * output.shape[2]
            if model_family(model) == "mixformer"
            else output.shape[-2] * output.shape[-1]
        )
    return output.shape[1] - getattr(model, "num_prefix_tokens", 0)


def _reshape_transform(model: nn.Module, name: str):
    """Grad-CAM wants (B, C, H, W): ViT tokens lose their prefix and become a grid; MixFormer blocks are
    channels-last."""
    family = model_family(model)
    if family == "vit":
        grid = tuple(model.patch_embed.grid_size)
        prefix = getattr(model, "num_prefix_tokens", 0)
        return lambda t: t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)
    if family == "mixformer" and ".blocks." in name:
        return lambda t: t.permute(0, 3, 1, 2)
    return None


def cam_figure(
    vm: VizModel, image: str | Path, out: str | Path, block: str | None = None, target: str | None = None
) -> Path:
    """Grad-CAM (the ``grad-cam`` package) of the predicted class, or of ``target`` (index or class name)."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise DSNetError("dsnet viz cam needs the grad-cam package: pip install 'dsnet[viz]'") from None
    x, display, _ = vm.load(image)
    with torch.no_grad():
        logits = vm.model(x)
    if target is None:
        index = int(logits.argmax(-1))
    elif target in vm.info.classes:
        index = vm.info.classes.index(target)
    else:
        try:
            index = int(target)
        except ValueError:
            raise DSNetError(
                f"--class {target!r}: not a class of {vm.name} ({', '.join(vm.info.classes[:10])}...)"
            ) from None
        if not 0 <= index < vm.info.num_classes:
            raise DSNetError(f"--class {index}: outside 0..{vm.info.num_classes - 1}")
    name, layer = _cam_layer(vm, x, block)
    with GradCAM(model=vm.model, target_layers=[layer], reshape_transform=_reshape_transform(vm.model, name)) as cam:
        heatmap = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0]  # (S, S) in [0, 1]
    label = vm.info.classes[index] if index < len(vm.info.classes) else str(index)
    panel = Panel(f"Grad-CAM of '{label}'\nlayer {name}", torch.from_numpy(heatmap))
    fig, axes = _figure(1, 2)
    _draw(axes[0][0], display, None, None)
    _draw(axes[0][1], display, panel, None)
    fig.suptitle(f"{vm.name} ({vm.weights}): Grad-CAM at {name} — {_label(vm, logits)}", fontsize=8)
    return _save(fig, out)


def streams_figure(
    vm: VizModel,
    images: list[str | Path],
    out: str | Path,
    point: str | None = None,
    block: str | None = None,
    reduce: str = "mean",
) -> Path:
    """The paper's Figure 1 for several images, one row each: image | attention maps of the point (global
    self-attention, G→L, L→G for DS-Net) | local, global and fused features of the block."""
    if not images:
        raise DSNetError("streams needs at least one image")
    _require_family(vm, "features")
    rows = []
    for image in images:
        x, display, original = vm.load(image)
        where = parse_point(point, original, image)
        logits, capture = run_with_capture(vm.model, x)
        chosen = _pick_block(vm, capture, block)
        panels = attention_panels(vm.model, capture, chosen, where, display.shape[:2])
        panels += feature_panels(vm.model, x, chosen, reduce)
        rows.append((Path(image).name, display, where, panels, _label(vm, logits), chosen))
    fig, axes = _figure(len(rows), 1 + len(rows[0][3]))
    for axes_row, (name, display, where, panels, label, _) in zip(axes, rows):
        _draw(axes_row[0], display, None, where)
        axes_row[0].set_title(f"{name}\n{label}", fontsize=7)
        attention_count = len(panels) - 3
        for k, (ax, panel) in enumerate(zip(axes_row[1:], panels)):
            _draw(ax, display, panel, where, overlay=k < attention_count)
    blocks = sorted({r[5] for r in rows})
    how = "channel mean" if reduce == "mean" else "first PCA component"
    fig.suptitle(
        f"{vm.name} ({vm.weights}) block {', '.join(blocks)}: attention of the marked point (mean over heads) and "
        f"stream features ({how})",
        fontsize=8,
    )
    return _save(fig, out)
