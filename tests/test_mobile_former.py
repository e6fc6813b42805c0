"""Mobile-Former: parity with the public release (AAboys/MobileFormer), sizes, conversion, export, batch-1 training.

The parity fixtures in ``fixtures/mobile_former_*_release.json`` were recorded from the release's own code by
``fixtures/record_mobile_former.py`` (key list with shapes + logits for weights drawn from generators seeded by
each key's name); here the same weights are rebuilt from the key list, converted with our ``checkpoint_filter_fn``
(or ``dsnet convert``) and run through our model.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import dsnet  # noqa: F401
from dsnet.bench.complexity import count_macs, count_params
from dsnet.cli.main import main
from dsnet.models import PAPER_FIGURES, list_zoo
from dsnet.models.mobile_former import DynamicReLU, checkpoint_filter_fn, release_key_to_ours

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("record_mobile_former", FIXTURES / "record_mobile_former.py")
record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record)

RECORDED = ["26m", "96m", "294m"]
ALL_SIZES = ["26m", "52m", "96m", "151m", "214m", "294m", "508m"]
# Parameters of the release's models (its state dicts, without BN buffers), in millions, rounded as printed.
RELEASE_PARAMS_M = {
    "26m": 3.233,
    "52m": 3.469,
    "96m": 4.585,
    "151m": 7.596,
    "214m": 9.426,
    "294m": 11.423,
    "508m": 13.977,
}


def _fixture(size: str) -> dict:
    return json.loads((FIXTURES / f"mobile_former_{size}_release.json").read_text())


def _release_state(size: str) -> dict[str, torch.Tensor]:
    """The release's state dict as recorded: every tensor rebuilt from its key's seeded generator."""
    state = {}
    for key, shape in _fixture(size)["keys"].items():
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        state[key] = record.seeded_tensor(key, tuple(shape), dtype)
    return state


def test_zoo_has_the_seven_models():
    assert list_zoo("mobile_former_*") == sorted(f"mobile_former_{s}" for s in ALL_SIZES)


@pytest.mark.parametrize("size", RECORDED)
def test_logits_match_the_public_release(size):
    model = timm.create_model(f"mobile_former_{size}").eval()
    model.load_state_dict(checkpoint_filter_fn(_release_state(size), model))
    with torch.no_grad():
        logits = model(record.seeded_input())
    expected = torch.tensor(_fixture(size)["logits"])
    diff = (logits - expected).abs().max().item()
    print(
        f"mobile_former_{size}: max |logit diff| vs AAboys/MobileFormer = {diff:.2e} (logits std {expected.std():.2f})"
    )
    assert diff <= 1e-4


@pytest.mark.parametrize("size", ALL_SIZES)
def test_params_match_the_release_and_paper(size):
    name = f"mobile_former_{size}"
    params = count_params(timm.create_model(name, device="meta")) / 1e6
    assert params == pytest.approx(RELEASE_PARAMS_M[size], abs=5e-4)
    assert round(params, 1) == PAPER_FIGURES[name].params_m  # the paper prints one decimal


@pytest.mark.parametrize("size", RECORDED)
def test_release_key_list_maps_onto_our_model_one_to_one(size):
    model = timm.create_model(f"mobile_former_{size}", device="meta")
    release_keys = _fixture(size)["keys"]
    block_paths = [
        (f"stages.{s}.blocks.{b}", type(block.mobile).__name__.startswith("Downsample"))
        for s, stage in enumerate(model.stages)
        for b, block in enumerate(stage.blocks)
    ]
    ours = {release_key_to_ours(k, block_paths): tuple(v) for k, v in release_keys.items()}
    assert len(ours) == len(release_keys)
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_filter_refuses_a_checkpoint_of_another_size():
    model = timm.create_model("mobile_former_96m", device="meta")
    with pytest.raises(ValueError, match="AAboys/MobileFormer"):
        checkpoint_filter_fn(_release_state("294m"), model)


def _extra_macs(model: nn.Module, size: int = 224) -> int:
    """Element-wise products that FlopCounterMode does not see: the two slopes of every dynamic ReLU
    (2 per element) and the inference-time BatchNorm scale (1 per element)."""
    extra = 0

    def dyrelu(_m, args, _out):
        nonlocal extra
        extra += 2 * args[0].numel()

    def batchnorm(_m, args, _out):
        nonlocal extra
        extra += args[0].numel()

    for m in model.modules():
        if isinstance(m, DynamicReLU):
            m.register_forward_hook(dyrelu)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_hook(batchnorm)
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size, device="meta"))
    return extra


@pytest.mark.parametrize("size", ALL_SIZES)
def test_madds_match_the_paper(size):
    """Matmul/conv MACs within 10 % of the paper's MAdds; with the element-wise products added, within 2 %."""
    name = f"mobile_former_{size}"
    paper = PAPER_FIGURES[name].gmacs * 1e9
    model = timm.create_model(name, device="meta")
    macs = count_macs(model)
    assert macs == pytest.approx(paper, rel=0.10)
    assert macs + _extra_macs(model) == pytest.approx(paper, rel=0.02)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 96, 160), (2, 3, 75, 41)])
def test_any_input_size(shape):
    model = timm.create_model("mobile_former_26m", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (shape[0], 5)
        feats = model.forward_intermediates(torch.randn(shape), intermediates_only=True)
    assert [f.shape[1] for f in feats] == [12, 24, 64, 96]


def test_trains_at_batch_one():
    torch.manual_seed(0)
    model = timm.create_model("mobile_former_26m", num_classes=3).train()
    before = model.head.hidden_norm.running_mean.clone()
    loss = model(torch.randn(1, 3, 64, 64)).logsumexp(1).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.global_tokens.grad is not None and model.global_tokens.grad.abs().sum() > 0
    torch.testing.assert_close(model.head.hidden_norm.running_mean, before)  # one sample: statistics untouched
    model(torch.randn(2, 3, 64, 64))  # a real batch updates them
    assert not torch.equal(model.head.hidden_norm.running_mean, before)


def test_features_only_strides():
    model = timm.create_model("mobile_former_294m", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [24, 48, 128, 192]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 32, 24), (48, 16, 12), (128, 8, 6), (192, 4, 3)]


def test_dsnet_convert_torch(tmp_path, capsys):
    release = tmp_path / "mobile-former-294m.pth.tar"
    torch.save({"epoch": 449, "state_dict": _release_state("294m")}, release)
    out = tmp_path / "mobile_former_294m.safetensors"
    assert main(["convert", "torch", str(release), str(out), "--model", "mobile_former_294m"]) == 0
    capsys.readouterr()
    model = timm.create_model("mobile_former_294m", pretrained=True, pretrained_cfg_overlay={"file": str(out)}).eval()
    with torch.no_grad():
        logits = model(record.seeded_input())
    assert (logits - torch.tensor(_fixture("294m")["logits"])).abs().max() <= 1e-4


def test_pretrained_without_file_names_the_release_and_the_command():
    with pytest.raises(ValueError, match=r"drive\.google\.com.*dsnet convert torch .* --model mobile_former_52m"):
        timm.create_model("mobile_former_52m", pretrained=True)


@pytest.mark.slow
def test_onnx_dynamic_batch_and_size(tmp_path):
    from dsnet.export.onnx import check_onnx, export_onnx

    torch.manual_seed(0)
    model = timm.create_model("mobile_former_26m", num_classes=7)
    report = export_onnx(model, tmp_path / "mf.onnx", image_size=(128, 128), dynamic_size=True)
    assert report.max_abs_diff <= 1e-4, report.checks
    for check in check_onnx(model, report.path, [(1, 3, 96, 160), (3, 3, 64, 64)]):
        assert check.max_abs_diff <= 1e-4, check


@pytest.mark.parametrize("size", ALL_SIZES)
def test_recipe_is_the_release_training_command(size):
    from dsnet.engine.config import load_config

    cfg = load_config(FIXTURES.parent.parent / "configs" / "imagenet" / f"mobile_former_{size}.yaml")
    assert cfg.model.name == f"mobile_former_{size}"
    assert (cfg.sched.epochs, cfg.train.batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (450, 1024, 1e-3, 0.2)
    assert (cfg.model.drop_rate, cfg.model.drop_path, cfg.data.mixup, cfg.data.cutmix) == (0.3, 0.0, 0.2, 0.0)
    assert (cfg.data.aa, cfg.data.reprob, cfg.data.color_jitter) == ("rand-m9-mstd0.5", 0.2, 0.0)
