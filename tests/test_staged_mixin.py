"""StagedBackboneMixin: the timm API shared by DS-Net, TransXNet and MixFormer, beyond test_model_contract.py.

The contract test checks each method alone; these check what only shows when they are combined (pruning, then
a new classifier; a new classifier on a model in another dtype) and the parameter groups stage by stage.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models import group_parameters

import dsnet  # noqa: F401  (registers the models)
from dsnet.models._stages import StagedBackboneMixin

FAMILIES = ["dsnet_tiny", "mixformer_b0", "transxnet_t"]  # the smallest model of each family


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_uses_the_mixin(name):
    model = timm.create_model(name, device="meta")
    assert isinstance(model, StagedBackboneMixin)
    with pytest.raises(ValueError, match=rf"{type(model).__name__} features are NCHW.*'NHWC'"):
        model.forward_intermediates(torch.zeros(1, 3, 64, 64, device="meta"), output_fmt="NHWC")


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_backbone_takes_a_new_classifier_of_the_new_width(name):
    """After pruning to stage 1, a new classifier is sized for stage 1's channels (the head's input follows)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    model.prune_intermediate_layers(indices=[0, 1])
    width = model.feature_info[1]["num_chs"]
    assert model.num_features == model.head_hidden_size == width
    model.reset_classifier(10, global_pool="avg")
    assert model.get_classifier().in_features == width
    with torch.no_grad():
        features = model.forward_features(_input())
        assert features.shape[1] == width
        assert model.forward_head(features).shape == (2, 10)
        assert model.forward_head(features, pre_logits=True).shape == (2, width)


@pytest.mark.parametrize("name", FAMILIES)
def test_new_classifier_follows_the_model_dtype(name):
    """Also after the classifier was removed (then the head has no parameter to take the dtype from)."""
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    model.reset_classifier(0)
    model.reset_classifier(9)
    fc = model.get_classifier()
    assert (fc.out_features, fc.weight.dtype, fc.weight.device.type) == (9, torch.bfloat16, "meta")


@pytest.mark.parametrize("name", FAMILIES)
def test_fine_groups_put_each_stage_entry_with_its_first_block(name):
    """Layer-wise decay groups: stem; per stage its entry (downsample, ...) with block 0; norm with the last block."""
    model = timm.create_model(name, device="meta")
    groups = list(group_parameters(model, model.group_matcher(coarse=False)).values())
    group_of = {param: i for i, names in enumerate(groups) for param in names}
    for i in range(1, len(model.stages)):
        entry = [n for n in group_of if n.startswith(f"stages.{i}.") and ".blocks." not in n]
        assert entry, f"stage {i} has no parameters outside its blocks"
        first_block = {group_of[n] for n in group_of if n.startswith(f"stages.{i}.blocks.0.")}
        assert {group_of[n] for n in entry} == first_block
        previous_block = {group_of[n] for n in group_of if n.startswith(f"stages.{i - 1}.blocks.")}
        assert max(previous_block) < min(first_block)
    last_block = f"stages.{len(model.stages) - 1}.blocks.{len(model.stages[-1].blocks) - 1}."
    norm = {group_of[n] for n in group_of if n.startswith("norm.")}
    assert norm == {group_of[n] for n in group_of if n.startswith(last_block)}  # (99999,): timm's "previous group"
    assert set(groups[-1]) == {n for n in group_of if n.startswith("head.")}  # unmatched: timm's last group
