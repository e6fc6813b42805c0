"""The timm model contract, checked for every model of the zoo.

Cheap checks (construction on the ``meta`` device, configs, metadata) run for every registered model; checks
that run real forward/backward passes use the smallest model of each family (one per model file) on 64×64 inputs.
"""

from __future__ import annotations

import functools
import re
import socket

import pytest
import timm
import torch
from timm.models import create_feature_extractor, group_parameters
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor as tv_create_feature_extractor

import dsnet
from dsnet.models import PAPER_FIGURES, list_zoo

ALL_MODELS = list_zoo()
INPUT = (2, 3, 64, 64)


def _family(name: str) -> str:
    """The model file a registered model comes from (``dsnet.models.dsnet`` …)."""
    return timm.models.model_entrypoint(name).__module__


@functools.cache
def _num_params(name: str) -> int:
    return sum(p.numel() for p in timm.create_model(name, device="meta").parameters())


def smallest_per_family() -> list[str]:
    """The model with the fewest parameters of every family: the representative for expensive checks."""
    best: dict[str, str] = {}
    for name in ALL_MODELS:
        family = _family(name)
        if family not in best or _num_params(name) < _num_params(best[family]):
            best[family] = name
    return sorted(best.values())


SMALL_MODELS = smallest_per_family()


@functools.cache
def _eval_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name).eval()


def _input(seed: int = 0) -> torch.Tensor:
    return torch.randn(*INPUT, generator=torch.Generator().manual_seed(seed))


def test_zoo_is_registered_on_import():
    assert dsnet.models.list_zoo("dsnet_*") == [
        "dsnet_base",
        "dsnet_base_concat",
        "dsnet_small",
        "dsnet_small_concat",
        "dsnet_tiny",
        "dsnet_tiny_concat",
    ]
    assert set(timm.list_models()) >= set(ALL_MODELS)


# --- every model: construction and metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_builds_on_meta_with_metadata(name):
    model = timm.create_model(name, device="meta")
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert model.in_chans == 3
    assert model.num_classes == 1000
    assert isinstance(model.num_features, int) and isinstance(model.head_hidden_size, int)
    info = model.feature_info
    assert len(info) >= 3
    reductions = [f["reduction"] for f in info]
    assert reductions == sorted(reductions) and len(set(reductions)) == len(reductions)
    modules = dict(model.named_modules())
    for f in info:
        assert f["module"] in modules, f"feature_info names a module that does not exist: {f['module']}"
    assert info[-1]["num_chs"] == model.num_features or model.head_hidden_size != model.num_features


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_cfg(name):
    model = timm.create_model(name, device="meta")
    cfg = model.pretrained_cfg
    modules = dict(model.named_modules())
    assert cfg["num_classes"] == 1000
    assert cfg["input_size"][0] == 3
    assert 0.0 < cfg["crop_pct"] <= 1.0
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["first_conv"] in modules
    assert isinstance(modules[cfg["first_conv"]], nn.Conv2d)
    assert modules[cfg["first_conv"]].in_channels == 3
    assert cfg["classifier"] in modules
    assert modules[cfg["classifier"]] is model.get_classifier()
    assert cfg.get("paper_ids")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_paper_figures_registered(name):
    figures = PAPER_FIGURES[name]
    assert figures.params_m > 0 and figures.source


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unknown_kwarg_raises_type_error(name):
    with pytest.raises(TypeError, match="not_an_option"):
        timm.create_model(name, device="meta", not_an_option=1)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pretrained_without_weights_explains_instead_of_random_init(name, tmp_path, monkeypatch):
    cfg = timm.models.get_pretrained_cfg(name)
    assert not (cfg.file or cfg.hf_hub_id)
    if cfg.url:  # a public release (tests/test_pretrained_download.py): here, with no server to fetch it from
        assert cfg.url.split("#")[0] == cfg.origin_url
        with socket.socket() as sock:  # a local port that refuses connections: no real download in the tests
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("DSNET_WEIGHTS_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a clear error (the manual route: `dsnet convert` and the file to pass), never a silent random init
    with pytest.raises((ValueError, RuntimeError, OSError), match="dsnet convert"):
        timm.create_model(name, pretrained=True, device="meta")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_no_weight_decay_and_group_matcher_name_real_parameters(name):
    model = timm.create_model(name, device="meta")
    param_names = {n for n, _ in model.named_parameters()}
    for entry in model.no_weight_decay():
        assert entry in param_names or any(n.startswith(entry + ".") for n in param_names), entry
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [n for names in groups.values() for n in names]
        assert sorted(grouped) == sorted(param_names)  # every parameter in exactly one group
        assert len(groups) >= 3  # stem, some stages/blocks, and whatever follows
        stem = model.group_matcher(coarse=coarse)["stem"]
        first_conv = model.pretrained_cfg["first_conv"]
        assert re.match(stem, first_conv + ".weight")
        assert first_conv + ".weight" in groups[0]  # the stem is the first group


@pytest.mark.parametrize("name", ALL_MODELS)
def test_device_dtype_arguments(name):
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("training", [False, True])
def test_new_heads_keep_device_dtype_and_mode(name, training):
    """reset_classifier / prune_intermediate_layers build new modules: they must match the model they join.

    The check timm's own ``tests/test_models.py`` makes (``_assert_reset_classifier_preserves_parent_device_dtype``),
    on the meta device in float64; also in train mode, and after pruning.
    """
    model = timm.create_model(name, device="meta").train(training)
    model.to(dtype=torch.float64)
    for num_classes, pool in ((0, None), (2, None), (3, "avg")):
        model.reset_classifier(num_classes, global_pool=pool)
        params = list(model.get_classifier().parameters())
        assert bool(params) == (num_classes > 0)
        assert {(p.device.type, p.dtype) for p in params} <= {("meta", torch.float64)}
        assert [n for n, m in model.named_modules() if m.training != training] == []
    model.prune_intermediate_layers(indices=[0, 1])
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float64)}
    assert [n for n, m in model.named_modules() if m.training != training] == []


# --- smallest model of each family: real passes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_forward_and_split_forward_agree(name):
    model = _eval_model(name)
    x = _input()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits_split = model.forward_head(features)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    assert pooled.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(logits_split, logits)
    assert features.shape[1] == model.num_features  # the last stage's channels, or more (Mobile-Former: + token 0)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_forward_intermediates(name):
    model = _eval_model(name)
    x = _input()
    info = model.feature_info
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert len(feats) == len(info)
        for f, i in zip(feats, info):
            assert f.shape == (2, i["num_chs"], 64 // i["reduction"], 64 // i["reduction"])
        torch.testing.assert_close(final, model.forward_features(x))

        only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert len(only) == 2
        torch.testing.assert_close(only[0], feats[0])
        torch.testing.assert_close(only[1], feats[2])

        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last_two[-1], feats[-1])

        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], feats[1])

        normed = model.forward_intermediates(x, indices=[len(info) - 1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_features_only(name):
    full = _eval_model(name)
    torch.manual_seed(0)  # same initialisation as the full model
    model = timm.create_model(name, features_only=True).eval()
    x = _input()
    with torch.no_grad():
        feats = model(x)
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert model.feature_info.channels() == [f["num_chs"] for f in full.feature_info]
    assert model.feature_info.reduction() == [f["reduction"] for f in full.feature_info]
    assert len(feats) == len(expected)
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e)

    subset = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    assert subset.feature_info.channels() == [full.feature_info[1]["num_chs"], full.feature_info[2]["num_chs"]]
    with torch.no_grad():
        assert [f.shape[1] for f in subset(x)] == subset.feature_info.channels()


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_prune_intermediate_layers(name):
    model = timm.create_model(name).eval()
    x = _input()
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    kept = model.prune_intermediate_layers(indices=[0, 1], prune_norm=True)
    assert list(kept) == [0, 1]
    assert model.num_classes == 0
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        features = model.forward_features(x)  # now ends at stage 1, without the final norm
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(features, expected[-1])


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_reset_classifier(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        features = model.forward_features(_input())
        model.reset_classifier(7)
        assert model.num_classes == 7
        assert model.forward_head(features).shape == (2, 7)
        model.reset_classifier(0)
        assert model.forward_head(features).shape == (2, model.head_hidden_size)
        model.reset_classifier(5, global_pool="avg")
        assert model.forward_head(features).shape == (2, 5)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_in_chans_and_num_classes_kwargs(name):
    model = timm.create_model(name, in_chans=1, num_classes=10).eval()
    assert model.in_chans == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_grad_checkpointing_recomputes_and_keeps_gradients(name):
    """Also: every parameter gets a gradient."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    model.train()
    x = _input()
    # count forward calls of every leaf conv/linear: a checkpointed model runs them again during backward
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            m.register_forward_hook(count)

    def grads(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor]]:
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)  # same dropout / drop-path masks in both runs
        calls["n"] = 0
        model(x).sum().backward()
        return calls["n"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()  # BN statistics must not drift between the two runs; dropout off
    plain_calls, plain = grads(False)
    # every parameter takes part in the loss (DDP without find_unused_parameters needs this)
    assert sorted(plain) == sorted(n for n, _ in model.named_parameters())
    ckpt_calls, ckpt = grads(True)
    assert ckpt_calls > plain_calls  # activations were recomputed in the backward pass
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_torch_fx_feature_extraction(name):
    model = _eval_model(name)
    x = _input()
    stages = [f["module"] for f in model.feature_info]
    timm_extractor = create_feature_extractor(model, return_nodes=stages)
    tv_extractor = tv_create_feature_extractor(model, return_nodes=stages)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        timm_fx, tv_fx = timm_extractor(x), tv_extractor(x)
        for node, e in zip(stages, expected):
            torch.testing.assert_close(timm_fx[node], e)
            torch.testing.assert_close(tv_fx[node], e)
        # the traced graph is not specialised to the tracing input size
        other = torch.randn(1, 3, 96, 64)
        torch.testing.assert_close(
            timm_extractor(other)[stages[-1]], model.forward_intermediates(other, intermediates_only=True)[-1]
        )
