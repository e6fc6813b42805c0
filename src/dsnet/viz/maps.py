"""Attention and feature maps of one block, per model family, as heatmaps over the model's input.

* DS-Net (paper Fig. 1): the global self-attention of the global token containing the query point (a map over the
  global grid), the G→L co-attention of the local pixel at the point (over the global grid) and the L→G
  co-attention of the global token containing the point (over the local map); features: the local stream, the
  global stream (bilinearly upsampled, as the block fuses it) and the fused map (the block's 1×1 fusion output).
* TransXNet: the OSRA attention of the pixel at the point (over the spatially reduced key grid); features: IDConv
  (local half), OSRA (global half), D-Mixer output (fused).
* MixFormer: the window attention of the pixel at the point (over its 7×7 window); features: the convolution
  branch (local), the window-attention branch (global), the mixing output (fused).
* timm ViTs (the DeiT baseline of Fig. 1a): the self-attention of the patch containing the point over the patches.

Blocks are named ``S.B`` (stage, block; both 1-based). The default is the last block whose attention has more than
one key (the last block of the network at 224 px; with small inputs the last stages have a 1×1 grid, where every
attention is trivially 1). Attention maps are the mean over heads (``per_head`` keeps each head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.errors import DSNetError
from dsnet.models.dsnet import DSNet, global_grid_shape
from dsnet.models.mixformer import MixFormer
from dsnet.models.transxnet import TransXNet, _reduced_size
from dsnet.viz.capture import AttentionCapture, ModuleOutputs

__all__ = [
    "Panel",
    "attention_panels",
    "block_names",
    "feature_panels",
    "model_family",
    "parse_block",
]

Point = tuple[float, float]  # (x, y) as fractions of the input width and height, in [0, 1)


@dataclass
class Panel:
    """One map of a figure: ``heatmap`` (H, W) over the model input, or ``None`` with the reason in ``note``."""

    title: str
    heatmap: torch.Tensor | None = None
    note: str = ""
    per_head: torch.Tensor | None = None  # (heads, h, w) attention over the key grid
    key_grid: tuple[int, int] | None = None


def model_family(model: nn.Module) -> str | None:
    """``"dsnet"``, ``"transxnet"``, ``"mixformer"``, ``"vit"`` (timm ViT-like), or ``None``."""
    if isinstance(model, DSNet):
        return "dsnet"
    if isinstance(model, TransXNet):
        return "transxnet"
    if isinstance(model, MixFormer):
        return "mixformer"
    if hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.blocks[-1], "attn"):
        return "vit"
    return None


def block_names(model: nn.Module) -> dict[str, str]:
    """``{"S.B": module name}`` of every block (stages and blocks 1-based); ViTs: ``"1.B"``."""
    if model_family(model) == "vit":
        return {f"1.{j + 1}": f"blocks.{j}" for j in range(len(model.blocks))}
    stages = getattr(model, "stages", None)
    if stages is None:
        raise DSNetError(f"{type(model).__name__} has no stages of blocks to visualise")
    return {
        f"{i + 1}.{j + 1}": f"stages.{i}.blocks.{j}" for i, stage in enumerate(stages) for j in range(len(stage.blocks))
    }


def parse_block(model: nn.Module, spec: str) -> str:
    """The module name of block ``spec`` (``"S.B"``, 1-based); ``DSNetError`` naming the valid range otherwise."""
    names = block_names(model)
    if spec not in names:
        last = list(names)[-1]
        raise DSNetError(
            f"--block {spec!r}: expected STAGE.BLOCK between 1.1 and {last} (1-based), one of {list(names)}"
        )
    return names[spec]


def _index(fraction: float, size: int) -> int:
    return min(int(fraction * size), size - 1)


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) → (H, W) by nearest neighbour: every token keeps its own square."""
    return F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0]


def _attention_panel(title: str, weights: torch.Tensor, query: int, grid: tuple[int, int], size: tuple[int, int]):
    per_head = weights[0, :, query].reshape(-1, *grid)  # (heads, h, w)
    return Panel(title, _upsample(per_head.mean(0), size), per_head=per_head, key_grid=grid)


def _blocks_with_keys(model: nn.Module, capture: AttentionCapture) -> list[str]:
    """Blocks (``S.B``) whose attention recorded in ``capture`` has more than one key."""
    names = block_names(model)
    keep = []
    for spec, name in names.items():
        weights = [r.weights for r in capture.records if r.module == name or r.module.startswith(name + ".")]
        if weights and max(w.shape[-1] for w in weights) > 1:
            keep.append(spec)
    return keep


def default_block(model: nn.Module, capture: AttentionCapture) -> str:
    """The last block whose attention has more than one key, else the last block."""
    keep = _blocks_with_keys(model, capture)
    return keep[-1] if keep else list(block_names(model))[-1]


def run_with_capture(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, AttentionCapture]:
    """Logits of ``x`` (1, C, H, W) and the :class:`AttentionCapture` of that very forward pass."""
    if x.shape[0] != 1:
        raise DSNetError(f"visualisation takes one image at a time, got a batch of {x.shape[0]}")
    with torch.no_grad(), AttentionCapture(model) as capture:
        logits = model(x)
    return logits, capture


def attention_panels(
    model: nn.Module, capture: AttentionCapture, block: str, point: Point, size: tuple[int, int]
) -> list[Panel]:
    """The attention maps of the query ``point`` in ``block`` (``S.B``), from a finished ``capture``, as heatmaps
    of ``size`` (the model input's H, W). Panels a model does not have come back empty with a note."""
    family = model_family(model)
    name = parse_block(model, block)
    px, py = point
    if family == "dsnet":
        module = dict(model.named_modules())[name]
        _, _, height, width = capture.input_shapes[name]
        grid = global_grid_shape(height, width, module.global_stride, module.global_grid_size)
        local_query = _index(py, height) * width + _index(px, width)
        global_query = _index(py, grid[0]) * grid[1] + _index(px, grid[1])
        where = f"global token ({_index(py, grid[0])}, {_index(px, grid[1])}) of {grid[0]}×{grid[1]}"
        panels = []
        own = capture.by_module(name)
        if own:
            panels.append(_attention_panel(f"global self-attention\nquery: {where}", own[0], global_query, grid, size))
        else:
            panels.append(Panel("global self-attention", note=f"block {block} has no global self-attention"))
        cross = capture.by_module(f"{name}.alignment")
        alignment = module.alignment
        calls = iter(cross)
        if alignment is not None and alignment.global_to_local:
            title = (
                f"G→L co-attention\nquery: local pixel ({_index(py, height)}, {_index(px, width)}) of {height}×{width}"
            )
            panels.append(_attention_panel(title, next(calls), local_query, grid, size))
        else:
            panels.append(Panel("G→L co-attention", note=f"block {block} has no G→L co-attention"))
        if alignment is not None and alignment.local_to_global:
            title = f"L→G co-attention\nquery: {where}"
            panels.append(_attention_panel(title, next(calls), global_query, (height, width), size))
        else:
            panels.append(Panel("L→G co-attention", note=f"block {block} has no L→G co-attention"))
        return panels
    if family == "transxnet":
        _, _, height, width = capture.input_shapes[name]
        stage = model.stages[int(block.split(".")[0]) - 1]
        grid = (_reduced_size(height, stage.sr_ratio), _reduced_size(width, stage.sr_ratio))
        query = _index(py, height) * width + _index(px, width)
        title = f"OSRA attention\nquery: pixel ({_index(py, height)}, {_index(px, width)}) of {height}×{width}"
        return [_attention_panel(title, capture.by_module(f"{name}.mixer.osra")[0], query, grid, size)]
    if family == "mixformer":
        module = dict(model.named_modules())[name]
        _, height, width, _ = capture.input_shapes[name]  # channels-last (B, H, W, C)
        ws = module.window_size
        padded_h, padded_w = -(-height // ws) * ws, -(-width // ws) * ws
        row, col = _index(py, height), _index(px, width)
        window = (row // ws) * (padded_w // ws) + col // ws
        weights = capture.by_module(f"{name}.mixing")[0]  # (B·nW, heads, ws², ws²)
        per_head = weights[window, :, (row % ws) * ws + col % ws].reshape(-1, ws, ws)
        full = torch.zeros(per_head.shape[0], padded_h, padded_w)
        top, left = (row // ws) * ws, (col // ws) * ws
        full[:, top : top + ws, left : left + ws] = per_head
        full = full[:, :height, :width]
        title = f"window attention ({ws}×{ws})\nquery: pixel ({row}, {col}) of {height}×{width}"
        return [Panel(title, _upsample(full.mean(0), size), per_head=full, key_grid=(height, width))]
    if family == "vit":
        grid = tuple(model.patch_embed.grid_size)
        prefix = getattr(model, "num_prefix_tokens", 0)
        weights = capture.by_module(f"{name}.attn")[0][:, :, :, prefix:]  # keys: patches only
        query = prefix + _index(py, grid[0]) * grid[1] + _index(px, grid[1])
        title = f"self-attention\nquery: patch ({_index(py, grid[0])}, {_index(px, grid[1])}) of {grid[0]}×{grid[1]}"
        return [_attention_panel(title, weights, query, grid, size)]
    raise DSNetError(f"{type(model).__name__}: no attention maps to show (DS-Net, TransXNet, MixFormer or a timm ViT)")


def reduce_channels(x: torch.Tensor, method: str) -> torch.Tensor:
    """(C, H, W) → (H, W): the channel mean, or the first principal component over channels (``"pca"``; its sign
    chosen so that it correlates positively with the channel mean)."""
    if method == "mean":
        return x.mean(0)
    if method != "pca":
        raise DSNetError(f"reduce must be 'mean' or 'pca', got {method!r}")
    channels, height, width = x.shape
    samples = x.reshape(channels, -1).T.double()  # (H·W, C)
    centred = samples - samples.mean(0)
    if height * width < 2:
        return x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    component = (centred @ v[0]).reshape(height, width)
    if torch.dot(component.flatten(), x.mean(0).flatten().double() - x.mean()) < 0:
        component = -component
    return component.float()


def _feature_modules(model: nn.Module, name: str) -> list[str]:
    family = model_family(model)
    if family == "dsnet":
        return [f"{name}.proj_out"]
    if family == "transxnet":
        return [f"{name}.mixer.idconv", f"{name}.mixer.osra", f"{name}.mixer"]
    if family == "mixformer":
        return [f"{name}.mixing.conv_out_norm", f"{name}.mixing.attn_out_norm", f"{name}.mixing.proj", name]
    raise DSNetError(
        f"{type(model).__name__}: no local/global streams to show (features need DS-Net, TransXNet or MixFormer)"
    )


def feature_panels(model: nn.Module, x: torch.Tensor, block: str, reduce: str = "mean") -> list[Panel]:
    """Local-stream, global-stream and fused maps of ``block`` for the input ``x`` (1, C, H, W), each reduced over
    channels by ``reduce`` (``"mean"`` or ``"pca"``) and left at its own resolution."""
    name = parse_block(model, block)
    family = model_family(model)
    modules = _feature_modules(model, name)
    with torch.no_grad(), ModuleOutputs(model, modules) as kept:
        model(x)
    how = "channel mean" if reduce == "mean" else "1st PCA component"
    if family == "dsnet":
        module = dict(model.named_modules())[name]
        fused_in = kept.inputs[modules[0]][0]  # (d, H, W) = cat[local, upsampled global]
        local_dim = module.local_dim
        maps = [
            ("local stream", fused_in[:local_dim] if local_dim else None),
            ("global stream (bilinear upsampled)", fused_in[local_dim:] if module.global_dim else None),
            ("fused (1×1 conv of both)", kept.outputs[modules[0]][0]),
        ]
    elif family == "transxnet":
        maps = [
            ("local: IDConv half", kept.outputs[modules[0]][0]),
            ("global: OSRA half", kept.outputs[modules[1]][0]),
            ("fused: D-Mixer output", kept.outputs[modules[2]][0]),
        ]
    else:  # mixformer, padded (B, H', W', C) maps cropped to the block's input size
        height, width = kept.inputs[name].shape[1:3]  # the block's own (unpadded) channels-last input
        attn = kept.outputs[modules[1]][0].permute(2, 0, 1)  # (C/2, H', W')
        fused = kept.outputs[modules[2]][0].permute(2, 0, 1)  # (C, H', W')
        maps = [
            ("local: convolution branch", kept.outputs[modules[0]][0]),
            ("global: window-attention branch", attn),
            ("fused: mixing output", fused),
        ]
        maps = [(title, value[:, :height, :width]) for title, value in maps]
    panels = []
    for title, value in maps:
        if value is None:
            panels.append(Panel(title, note=f"block {block} has no {title.split(' (')[0]}"))
        else:
            h, w = value.shape[-2:]
            panels.append(Panel(f"{title}\n{how}, {h}×{w}", reduce_channels(value.float(), reduce)))
    return panels
