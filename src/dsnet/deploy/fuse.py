"""The fused inference form of a model: every BatchNorm folded into an adjacent convolution or linear layer.

An eval-mode BatchNorm is a per-channel affine map ``y = s·x + t`` (``s = γ/√(σ²+ε)``, ``t = β − μ·s``). Folded

* into the layer **before** it (conv/linear → BN, with nothing in between): scale that layer's output rows, the
  textbook fold (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`);
* into the layer **after** it (BN → conv/linear): scale that layer's input columns and add ``W·t`` to its bias. This
  is exact only when the layer sees no padding (a padded border would see ``0`` where the BN gives ``t``), so it is
  applied to 1×1 convolutions without padding, linear layers, and through a global *average* pool (an affine map
  per channel commutes with averaging).

What cannot be folded exactly stays: a BN before a zero-padded k×k convolution (DS-Net's ``local_norm``, MixFormer's
downsample BN, which is padded to an even size after the norm), a BN behind a data-dependent gate (MixFormer's
``conv_out_norm``), GroupNorm/LayerNorm (statistics of the input itself). The per-family rules below list each fold
with the line of the forward pass that makes it exact.

The fused model computes the same logits (to float rounding; tests check ≤ 1e-4 for every zoo model). Intermediate
features may differ where a norm moved into the next layer (e.g. DS-Net's final BN into the classifier), so use the
unfused model for ``forward_features`` / ``forward_intermediates``.

Example:
    >>> import timm, torch, dsnet
    >>> model = timm.create_model("dsnet_tiny", num_classes=10).eval()
    >>> fused = dsnet.deploy.fuse(model)
    >>> x = torch.randn(2, 3, 64, 64)
    >>> bool((fused(x) - model(x)).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from timm.layers import ClassifierHead, ConvMlp, ConvNormAct
from timm.layers.norm_act import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dsnet.errors import DSNetError
from dsnet.models.dsnet import DSBlock, DSNet
from dsnet.models.transxnet import LayerScale, MultiScaleFFN, SqueezedTokenEnhancer, TransXNetBlock

__all__ = ["fold_affine_after", "fold_affine_before", "fuse"]

_Layer = nn.Conv2d | nn.Linear


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` of the eval-mode map ``s·x + t`` that ``bn`` computes from its running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _is_plain_bn(module: nn.Module | None) -> bool:
    """An eval-mode BatchNorm with running statistics, nothing attached (not timm's BatchNormAct2d)."""
    return (
        isinstance(module, nn.BatchNorm2d)
        and not isinstance(module, BatchNormAct2d)
        and module.track_running_stats
        and module.running_mean is not None
    )


def _unpadded(layer: nn.Module) -> bool:
    """A linear layer, or a dense (groups=1) convolution with no padding: an input-side fold is exact."""
    if isinstance(layer, nn.Linear):
        return True
    return (
        type(layer) is nn.Conv2d
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and all(p == 0 for p in layer.padding)  # type: ignore[union-attr]
    )


@torch.no_grad()
def fold_affine_before(scale: torch.Tensor, shift: torch.Tensor, layer: _Layer) -> None:
    """Make ``layer(x)`` compute what ``layer(scale·x + shift)`` did (per input channel), in place.

    Only exact for a layer without padding (:func:`_unpadded`); callers check.
    """
    weight = layer.weight  # (out, in) or (out, in, kh, kw)
    view = (1, -1) + (1,) * (weight.dim() - 2)
    added = (weight * shift.view(view)).flatten(1).sum(1)  # (out,) = W·t summed over inputs and taps
    if layer.bias is None:
        layer.bias = nn.Parameter(added.clone())
    else:
        layer.bias.add_(added)
    weight.mul_(scale.view(view))


@torch.no_grad()
def fold_affine_after(layer: _Layer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``layer(x)`` compute what ``scale·layer(x) + shift`` did (per output channel), in place."""
    weight = layer.weight
    weight.mul_(scale.view((-1,) + (1,) * (weight.dim() - 1)))
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.clone())
    else:
        layer.bias.mul_(scale).add_(shift)


def _fold_bn_before(parent: nn.Module, bn_name: str, layer: nn.Module) -> bool:
    """Fold ``parent.<bn_name>`` (a BN feeding ``layer``) into ``layer`` and drop it, when that is exact."""
    bn = getattr(parent, bn_name)
    if not _is_plain_bn(bn) or not _unpadded(layer):
        return False
    fold_affine_before(*_bn_affine(bn), layer)  # type: ignore[arg-type]
    setattr(parent, bn_name, nn.Identity())
    return True


def _fold_bn_after(parent: nn.Module, layer: nn.Module, bn_name: str) -> bool:
    """Fold ``parent.<bn_name>`` (a BN right after ``layer``) into ``layer`` and drop it."""
    bn = getattr(parent, bn_name)
    if not _is_plain_bn(bn) or not isinstance(layer, (nn.Conv2d, nn.Linear)):
        return False
    fold_affine_after(layer, *_bn_affine(bn))
    setattr(parent, bn_name, nn.Identity())
    return True


# --- per-module rules: each returns how many norms it folded --------------------------------------------------------


def _conv_norm_act(module: ConvNormAct) -> int:
    # timm: conv → bn (BatchNormAct2d: norm, drop, act) [→ aa]
    bn = module.bn
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or not isinstance(module.conv, nn.Conv2d):
        return 0
    module.conv = fuse_conv_bn_eval(module.conv.eval(), bn.eval())
    module.bn = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
    return 1


def _conv_mlp(module: ConvMlp) -> int:
    # timm: fc1 → norm → act → drop → fc2
    return int(_fold_bn_after(module, module.fc1, "norm"))


def _dsblock(module: DSBlock) -> int:
    # x = proj_in(norm1(x)) and mlp(norm2(x)), both 1×1 convolutions without padding
    folded = _fold_bn_before(module, "norm1", module.proj_in)
    if isinstance(module.mlp, ConvMlp):
        folded += _fold_bn_before(module, "norm2", module.mlp.fc1)
    return int(folded)


def _dsnet(module: DSNet) -> int:
    # head(norm(x)): an average pool, then the classifier; per-channel affine commutes with the average
    head = module.head
    if not (isinstance(head, ClassifierHead) and getattr(head.global_pool, "pool_type", "") == "avg"):
        return 0
    if not isinstance(head.fc, nn.Linear):
        return 0
    return int(_fold_bn_before(module, "norm", head.fc))


def _squeezed_token_enhancer(module: SqueezedTokenEnhancer) -> int:
    # norm1(act(local_conv(x))) → squeeze (1×1); norm2(act(squeeze(y))) → expand (1×1); norm3(expand(y))
    folded = _fold_bn_before(module, "norm1", module.squeeze)
    folded += _fold_bn_before(module, "norm2", module.expand)
    folded += _fold_bn_after(module, module.expand, "norm3")
    return int(folded)


def _multi_scale_ffn(module: MultiScaleFFN) -> int:
    # norm2(...) → drop (identity in eval) → fc2 (1×1) → norm3. norm1 feeds the padded multi-scale convs: kept.
    folded = _fold_bn_before(module, "norm2", module.fc2)
    folded += _fold_bn_after(module, module.fc2, "norm3")
    return int(folded)


@torch.no_grad()
def _transxnet_block(module: TransXNetBlock) -> int:
    # layer_scale2(ffn(x)) where ffn ends in fc2 (→ norm3, folded first) → drop: the scale is an affine map of fc2
    ffn, scale = module.ffn, module.layer_scale2
    if not isinstance(scale, LayerScale) or not isinstance(ffn.norm3, nn.Identity):
        return 0
    fold_affine_after(ffn.fc2, scale.weight.flatten(), scale.bias)
    module.layer_scale2 = nn.Identity()
    return 0  # a LayerScale, not a norm


# Children before parents (a post-order walk), so a parent rule sees its children already fused.
_RULES: dict[type[nn.Module], Callable[..., int]] = {
    ConvNormAct: _conv_norm_act,
    ConvMlp: _conv_mlp,
    DSBlock: _dsblock,
    DSNet: _dsnet,
    SqueezedTokenEnhancer: _squeezed_token_enhancer,
    MultiScaleFFN: _multi_scale_ffn,
    TransXNetBlock: _transxnet_block,
}


def _post_order(module: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for child in module.children():
        out.extend(_post_order(child))
    out.append(module)
    return out


@torch.no_grad()
def fuse(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The fused inference form of ``model`` (eval mode): BatchNorms folded where exact, see the module doc.

    Any timm model is accepted: timm's own ``reparameterize_model`` runs first (FastViT, RepVGG, MobileOne, ...),
    then the folds of the module doc for the layers found (timm's ``ConvNormAct`` and ``ConvMlp``, and the dsnet
    families' blocks). The fused model is meant for inference only: it cannot be trained back into the original.

    Args:
        model: the model; left untouched unless ``inplace``.
        inplace: fuse ``model`` itself instead of a copy.

    Returns:
        The fused model in eval mode, with ``model.fused_norms`` set to the number of BatchNorms folded.
    """
    from timm.utils.model import reparameterize_model

    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    try:
        model = reparameterize_model(model, inplace=True)
    except AttributeError as err:  # timm's reparameterisations delete their branches and cannot run twice
        raise DSNetError(
            f"fuse: timm's reparameterize_model failed on {type(model).__name__} ({err}); pass the model as built, "
            "not one already reparameterised (FastViT's blocks cannot be reparameterised twice)"
        ) from err
    folded = 0
    for module in _post_order(model):
        rule = next((r for t, r in _RULES.items() if isinstance(module, t)), None)
        if rule is not None:
            folded += rule(module)
    model.fused_norms = folded
    return model.eval()
