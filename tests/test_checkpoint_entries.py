"""Which weights of a training checkpoint are loaded: one rule for every family and for ``dsnet convert``.

A timm-style training checkpoint holds ``state_dict`` and ``state_dict_ema``; the official code of every zoo family
evaluates ``state_dict``. timm's own loader would take the EMA entry of a ``pretrained_cfg_overlay=dict(file=...)``
file; ours takes ``state_dict``, says so, and takes the EMA entry only when asked (``entry="state_dict_ema"``).
"""

from __future__ import annotations

import pytest
import timm
import torch

import dsnet  # noqa: F401  (registers the zoo)
from dsnet.convert.checkpoint import load_torch_checkpoint
from dsnet.convert.zoo import convert_checkpoint


def _seeded(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # weights that differ from any fresh initialisation
    return model


@pytest.fixture(scope="module")
def transxnet_checkpoint(tmp_path_factory):
    trained, ema = _seeded("transxnet_t", 1), _seeded("transxnet_t", 2)
    path = tmp_path_factory.mktemp("ckpt") / "transx-t.pth.tar"
    torch.save({"epoch": 300, "state_dict": trained.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    return path, trained, ema


def test_overlay_file_loads_state_dict_not_ema_and_says_so(transxnet_checkpoint, capsys):
    path, trained, ema = transxnet_checkpoint
    x = torch.randn(1, 3, 64, 64)
    model = timm.create_model("transxnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    err = capsys.readouterr().err
    assert f"{path}: using the weights of entry 'state_dict'" in err and "'state_dict_ema'" in err
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)
        assert (model(x) - ema(x)).abs().max() > 1e-3

    model = timm.create_model(
        "transxnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), entry="state_dict_ema")
    ).eval()
    assert "entry 'state_dict_ema'" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(model(x), ema(x), rtol=0, atol=0)
    assert model.pretrained_cfg["file"] == str(path)


def test_dsnet_convert_uses_the_same_rule(transxnet_checkpoint, tmp_path):
    from safetensors.torch import load_file

    path, trained, _ = transxnet_checkpoint
    result = convert_checkpoint(path, tmp_path / "t.safetensors", layout="torch", model="transxnet_t")
    assert result.entry == "state_dict"
    converted = load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(converted[k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize(
    ("name", "entries"),
    [
        ("dsnet_tiny", ("model", "model_ema")),  # DeiT-style, the reference DS-Net's scripts
        ("mixformer_b0", ("state_dict", "state_dict_ema")),
        ("mobile_former_26m", ("state_dict", "state_dict_ema")),
    ],
)
def test_every_family_takes_the_trained_weights_by_default(name, entries, tmp_path, capsys):
    trained, ema = _seeded(name, 1), _seeded(name, 2)
    path = tmp_path / "ckpt.pth"
    torch.save({entries[1]: ema.state_dict(), entries[0]: trained.state_dict()}, path)  # EMA first in the file
    for entry, expected in ((None, trained), (entries[1], ema)):
        overlay = {"file": str(path)} | ({"entry": entry} if entry else {})
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        assert f"entry {entry or entries[0]!r}" in capsys.readouterr().err
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items()), (name, entry)


def test_entry_errors_are_clear(transxnet_checkpoint, tmp_path):
    path, _, _ = transxnet_checkpoint
    with pytest.raises(ValueError, match=r"no entry 'ema' in the checkpoint \(entries: \['epoch', 'state_dict'"):
        timm.create_model("transxnet_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), entry="ema"))
    with pytest.raises(ValueError, match="needs file="):
        timm.create_model("transxnet_t", pretrained_cfg_overlay=dict(entry="state_dict_ema"))
    only_ema = tmp_path / "ema_only.pth"
    torch.save({"state_dict_ema": {"w": torch.zeros(1)}}, only_ema)
    assert load_torch_checkpoint(only_ema)[1] == "state_dict_ema"  # no other weights: the EMA, and said so


@pytest.mark.parametrize("name", ["dsnet_tiny", "transxnet_t", "mixformer_b0", "mobile_former_26m"])
def test_every_filter_unwraps_a_ddp_training_checkpoint_by_the_one_rule(name):
    """``checkpoint_filter_fn`` of each family: the trained entry (not the EMA), ``module.`` removed, our names kept."""
    import importlib

    from dsnet.models._checkpoint import state_dict_of

    model = timm.create_model(name).eval()
    ours = model.state_dict()
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in ours.items()},
        "state_dict_ema": {f"module.{k}": torch.zeros_like(v) for k, v in ours.items()},
    }
    assert state_dict_of(wrapped).keys() == ours.keys()
    filter_fn = importlib.import_module(type(model).__module__).checkpoint_filter_fn
    out = filter_fn(wrapped, model)
    assert out.keys() == ours.keys()
    assert all(torch.equal(out[k].reshape(ours[k].shape), ours[k]) for k in ours)
