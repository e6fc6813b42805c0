"""dsnet.deploy.fuse: BatchNorms folded where exact, the same logits for every zoo model."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import dsnet  # noqa: F401
from dsnet.deploy import fuse
from dsnet.deploy.fuse import fold_affine_after, fold_affine_before
from dsnet.errors import DSNetError
from dsnet.models import list_zoo


def _trained_like_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, as training would (fresh ones are x → x)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            if module.weight is not None:
                module.weight.data.copy_(1 + torch.randn(n, generator=generator) * 0.1)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", list_zoo())
@torch.no_grad()
def test_fused_logits_match_every_zoo_model(name):
    torch.manual_seed(0)  # the weights, not only the norms, must not depend on the tests that ran before
    generator = torch.Generator().manual_seed(0)
    model = _trained_like_norms(timm.create_model(name, num_classes=10), generator)
    before = _batch_norms(model)
    fused = fuse(model)
    x = torch.randn(2, 3, 64, 64, generator=generator)
    reference = model(x)
    # float32 rounding of a fold grows with the logits' size (~70 for dsnet_base here): 1e-4 relative to the largest
    assert (fused(x) - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
    assert _batch_norms(model) == before, "fuse() must not change its argument"
    # the folds happened: most norms are gone, and the counter says how many
    assert _batch_norms(fused) < before / 2 + 1
    assert fused.fused_norms > 0 and not fused.training


@torch.no_grad()
def test_fused_at_another_input_size():
    generator = torch.Generator().manual_seed(1)
    model = _trained_like_norms(timm.create_model("transxnet_t", num_classes=5, depths=(1, 1, 1, 1)), generator)
    fused = fuse(model)
    for shape in [(1, 3, 96, 80), (3, 3, 64, 64)]:
        x = torch.randn(shape, generator=generator)
        assert (fused(x) - model(x)).abs().max() <= 1e-4


@torch.no_grad()
def test_fold_before_and_after_are_exact_affine_maps():
    generator = torch.Generator().manual_seed(2)
    scale, shift = torch.rand(4, generator=generator) + 0.5, torch.randn(4, generator=generator)
    conv = nn.Conv2d(4, 3, 1)
    x = torch.randn(2, 4, 5, 5, generator=generator)
    want = conv(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    fold_affine_before(scale, shift, conv)
    torch.testing.assert_close(conv(x), want)

    linear = nn.Linear(4, 3, bias=False)
    out_scale, out_shift = torch.rand(3, generator=generator) + 0.5, torch.randn(3, generator=generator)
    y = torch.randn(6, 4, generator=generator)
    want = linear(y) * out_scale + out_shift
    fold_affine_after(linear, out_scale, out_shift)
    torch.testing.assert_close(linear(y), want)


@torch.no_grad()
def test_a_bn_before_a_padded_conv_is_kept():
    """Folding through zero padding would be wrong at the border: such a BN must stay."""

    class PaddedAfterNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.norm(x))

    from dsnet.deploy.fuse import _fold_bn_before

    module = _trained_like_norms(PaddedAfterNorm(), torch.Generator().manual_seed(3))
    assert not _fold_bn_before(module, "norm", module.conv)
    assert isinstance(module.norm, nn.BatchNorm2d)


def test_timm_peer_is_reparameterised():
    model = timm.create_model("fastvit_t8", num_classes=4).eval()
    fused = fuse(model)
    assert not any(type(m).__name__ == "MobileOneBlock" and m.reparam_conv is None for m in fused.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() <= 1e-4


def test_an_already_reparameterised_peer_is_a_clear_error():
    """timm's FastViT blocks delete their branches when reparameterised and fail on a second pass."""
    from timm.utils.model import reparameterize_model

    model = reparameterize_model(timm.create_model("fastvit_t8", num_classes=4).eval())
    with pytest.raises(DSNetError, match="pass the model as built"):
        fuse(model)
