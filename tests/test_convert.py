"""Checkpoint conversion: the numpy-only unpickler, the DS-Net key map, ``dsnet convert`` and its error messages.

The reference-layout files here are synthesised from our model's shapes (the real PaddleClas model is exercised in
``test_paddle_parity.py``); which weights are Linear is read off our module types, not off the converter's list.
The peers' official files (MixFormer ``.pdparams``, TransXNet ``.pth.tar``) are written from a random model in the
official names of the key lists in ``fixtures/``, converted by ``dsnet convert`` and compared by logits.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from _official_checkpoints import (
    dsnet_reference_name,
    dsnet_reference_state,
    mixformer_b0_to_paddle,
    transxnet_t_official_state_dict,
    write_pdparams,
)
from dsnet.cli.main import main
from dsnet.convert.checkpoint import CheckpointMismatchError, verify_state_dict
from dsnet.convert.dsnet_reference import (
    PADDLE_LINEAR_MODULES,
    VARIANT_DEPTHS,
    infer_depths,
)
from dsnet.convert.pickle_safe import UnsafePickleError, load_pdparams

# --- reference-layout files made from our model's shapes -------------------------------------------------------------


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


_reference_name = dsnet_reference_name
_reference_state = dsnet_reference_state


@pytest.fixture(scope="module")
def tiny_paddle() -> dict[str, np.ndarray]:
    return _reference_state("dsnet_tiny", "paddle")


@pytest.fixture
def tiny_pdparams(tmp_path, tiny_paddle) -> Path:
    return write_pdparams(tmp_path / "DSNet_tiny_pretrained.pdparams", tiny_paddle)


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the numpy-only unpickler ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4])  # paddle.save accepts protocols 2-4
def test_load_pdparams_reads_paddle_save_output(tmp_path, protocol):
    state = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a._mean": np.zeros(4, np.float32)}
    path = write_pdparams(tmp_path / "x.pdparams", state, protocol)
    loaded = load_pdparams(path)
    assert loaded.keys() == state.keys()  # the metadata entry is dropped
    for key in state:
        np.testing.assert_array_equal(loaded[key], state[key])
        assert loaded[key].dtype == state[key].dtype


def test_load_pdparams_reads_numpy1_module_path(tmp_path):
    # files written with numpy < 2 name numpy.core.multiarray._reconstruct
    state = {"w": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)}
    data = pickle.dumps(state, protocol=2)
    assert b"numpy._core.multiarray\n" in data
    path = tmp_path / "old.pdparams"
    path.write_bytes(data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    np.testing.assert_array_equal(load_pdparams(path)["w"], state["w"])


class _Payload:
    """Unpickling calls ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, object]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').write('pwned')"),
        "nested in a state dict": {"w": np.zeros(2, np.float32), "x": _Payload(exec, f"open({str(marker)!r}, 'w')")},
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested in a state dict"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    data = pickle.dumps(_payloads(marker)[kind], protocol=4)
    pickle.loads(data)  # control: an ordinary unpickler does run the payload
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pdparams"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError) as info:
        load_pdparams(path)
    message = str(info.value)
    assert str(path) in message and "refusing to load global" in message
    assert re.search(r"'(posix|os)\.system'|'builtins\.(eval|exec)'", message), message
    assert not marker.exists()


def test_malicious_pickle_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps(_payloads(marker)["os.system"], protocol=2))
    code, _, err = _run(capsys, "paddle", path, tmp_path / "out.safetensors")
    assert code == 2 and "dsnet: error:" in err and "system" in err and str(path) in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_malicious_pth_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Payload(os.system, f"touch {marker}")}, path)
    code, _, err = _run(capsys, "torch", path, tmp_path / "out.safetensors")
    assert code == 2 and "refusing to load" in err and "system" in err and str(path) in err
    assert not marker.exists()


# --- happy paths -----------------------------------------------------------------------------------------------------


def test_convert_paddle_then_load_with_timm(tmp_path, tiny_pdparams, tiny_paddle, capsys):
    out = tmp_path / "dsnet_tiny.safetensors"
    code, stdout, _ = _run(capsys, "paddle", tiny_pdparams, out)  # no --model: inferred from blocks per stage
    assert code == 0, stdout
    reference_model = timm.create_model("dsnet_tiny").eval()
    params = sum(p.numel() for p in reference_model.parameters())
    assert "dsnet_tiny" in stdout and f"{params:,} parameters" in stdout and "[2, 2, 4, 1]" in stdout
    assert sorted(os.listdir(tmp_path)) == sorted([tiny_pdparams.name, out.name])  # no temporary file left

    converted = load_file(str(out))
    assert converted.keys() == reference_model.state_dict().keys()
    for key in ("stages.0.blocks.0.global_qkv.weight", "head.fc.weight"):  # Linear: [in, out] → [out, in]
        ref_key = _reference_name(key)
        np.testing.assert_array_equal(converted[key].numpy(), tiny_paddle[ref_key].T)
    np.testing.assert_array_equal(
        converted["stages.2.blocks.3.norm2.running_var"].numpy(), tiny_paddle["blocks3.3.norm2._variance"]
    )

    loaded = timm.create_model("dsnet_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    reference_model.load_state_dict(converted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference_model(x), rtol=0, atol=0)


def test_convert_torch_layout_training_checkpoint(tmp_path, tiny_paddle, capsys):
    torch_state = {f"module.{k}": torch.from_numpy(v) for k, v in _reference_state("dsnet_tiny", "torch").items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": torch_state, "epoch": 10, "args": argparse.Namespace(lr=5e-4)}, path)
    out = tmp_path / "out.safetensors"
    code, stdout, err = _run(capsys, "torch", path, out, "--model", "dsnet_tiny")
    assert code == 0, err
    assert "entry 'model'" in stdout and "torch layout" in stdout
    converted = load_file(str(out))
    # same random stream → the same values as the Paddle-layout fixture, now without transposes
    np.testing.assert_array_equal(converted["head.fc.weight"].numpy(), tiny_paddle["head.weight"].T)
    assert int(converted["norm.num_batches_tracked"]) == 5


def test_checkpoint_filter_fn_accepts_reference_pth(tmp_path):
    # timm's own loader reads the reference .pth; the model's checkpoint_filter_fn renames it through the converter
    raw = _reference_state("dsnet_tiny", "torch")
    path = tmp_path / "ref.pth"
    torch.save({k: torch.from_numpy(v) for k, v in raw.items()}, path)
    state = timm.create_model("dsnet_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).state_dict()
    for ours, ref in [
        ("stages.1.blocks.0.alignment.local_proj.weight", "blocks2.0.fuse_channel_conv.weight"),
        ("stages.3.blocks.0.alignment.local_qkv.weight", "blocks4.0.cross_channel_up_conv.weight"),
        ("stages.2.downsample.bias", "patch_embed3.proj.bias"),
        ("norm.running_var", "norm.running_var"),
    ]:
        np.testing.assert_array_equal(state[ours].numpy(), raw[ref])


def test_convert_keeps_the_files_number_of_classes(tmp_path, tiny_paddle, capsys):
    state = dict(tiny_paddle)
    state["head.weight"], state["head.bias"] = state["head.weight"][:, :10].copy(), state["head.bias"][:10].copy()
    out = tmp_path / "out.safetensors"
    code, stdout, err = _run(capsys, "paddle", write_pdparams(tmp_path / "ft.pdparams", state), out)
    assert code == 0, err
    assert "10 classes" in stdout
    model = timm.create_model("dsnet_tiny", num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert model.get_classifier().weight.shape == (10, 512)


def test_existing_output_is_replaced_whole_or_left_alone(tmp_path, tiny_paddle, capsys):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    broken = dict(tiny_paddle)
    del broken["blocks1.0.norm1.weight"]
    code, _, _ = _run(capsys, "paddle", write_pdparams(tmp_path / "b.pdparams", broken), out)
    assert code == 2 and out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["b.pdparams", "out.safetensors"]
    code, _, _ = _run(capsys, "paddle", write_pdparams(tmp_path / "g.pdparams", tiny_paddle), out)
    assert code == 0 and len(load_file(str(out))) > 400


# --- bad checkpoints: each says what is wrong ------------------------------------------------------------------------


def test_wrong_variant_is_named(tmp_path, capsys):
    small = write_pdparams(tmp_path / "DSNet_small.pdparams", _reference_state("dsnet_small"))
    code, _, err = _run(capsys, "paddle", small, tmp_path / "out.safetensors", "--model", "dsnet_tiny")
    assert code == 2
    assert "does not fit dsnet_tiny" in err and "unexpected keys" in err and "stages.0.blocks.2." in err
    assert "[3, 4, 8, 3] blocks per stage" in err and "looks like dsnet_small" in err
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_keys_are_listed(tmp_path, tiny_paddle, capsys):
    state = {k: v for k, v in tiny_paddle.items() if not k.startswith("blocks3.1.norm2.")}
    code, _, err = _run(capsys, "paddle", write_pdparams(tmp_path / "m.pdparams", state), tmp_path / "o.safetensors")
    assert code == 2 and "missing keys (5)" in err
    for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert f"stages.2.blocks.1.norm2.{suffix}" in err


def test_extra_keys_are_listed(tmp_path, tiny_paddle, capsys):
    state = dict(tiny_paddle)
    state["blocks4.1.norm2.weight"] = np.ones(512, np.float32)  # a second stage-4 block the model does not have
    path = write_pdparams(tmp_path / "x.pdparams", state)
    code, _, err = _run(capsys, "paddle", path, tmp_path / "o.safetensors", "--model", "dsnet_tiny")
    assert code == 2 and "unexpected keys (1)" in err and "stages.3.blocks.1.norm2.weight" in err
    assert "[2, 2, 4, 2] blocks per stage" in err and "matches no released DS-Net variant" in err
    code, _, err = _run(capsys, "paddle", path, tmp_path / "o.safetensors")  # and --model cannot be inferred
    assert code == 2 and "cannot infer the model" in err and "pass --model" in err


def test_names_outside_the_key_map_are_refused(tmp_path, tiny_paddle, capsys):
    state = dict(tiny_paddle)
    state["blocks1.0.attn.qkv.weight"] = np.ones((64, 192), np.float32)
    code, _, err = _run(capsys, "paddle", write_pdparams(tmp_path / "u.pdparams", state), tmp_path / "o.safetensors")
    assert code == 2 and "outside the key map" in err and "blocks1.0.attn.qkv.weight" in err


def test_shape_mismatch_shows_both_shapes(tmp_path, tiny_paddle, capsys):
    state = dict(tiny_paddle)
    state["blocks1.1.pos_embed.weight"] = np.ones((64, 1, 5, 5), np.float32)
    code, _, err = _run(capsys, "paddle", write_pdparams(tmp_path / "s.pdparams", state), tmp_path / "o.safetensors")
    assert code == 2 and "shape mismatches (1)" in err
    assert "stages.0.blocks.1.pos_embed.weight: checkpoint [64, 1, 5, 5] vs model [64, 1, 3, 3]" in err


def test_layout_must_match_the_format(tmp_path, capsys):
    torch_names = write_pdparams(tmp_path / "t.pdparams", _reference_state("dsnet_tiny", "torch"))
    code, _, err = _run(capsys, "paddle", torch_names, tmp_path / "o.safetensors")
    assert code == 2 and "torch layout" in err and "running_mean/running_var" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lambda good: b"", "the file is empty"),
        (lambda good: b"model weights\n", "not a pickle file"),
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: good[:200] + bytes(range(256)) * 4, "corrupt"),
        (lambda good: pickle.dumps({"w": "not an array"}), "not numeric arrays"),
        (lambda good: pickle.dumps({"w": np.array([None], dtype=object)}), "dtype object"),
        (lambda good: pickle.dumps([np.zeros(2)]), "expected a dict"),
    ],
    ids=["empty", "text", "truncated", "corrupt", "non-array", "object-array", "list"],
)
def test_unreadable_pdparams(tmp_path, tiny_pdparams, capsys, content, expected):
    path = tmp_path / "bad.pdparams"
    path.write_bytes(content(tiny_pdparams.read_bytes()))
    code, _, err = _run(capsys, "paddle", path, tmp_path / "o.safetensors")
    assert code == 2 and str(path) in err and expected in err, err


def test_format_confusions_are_explained(tmp_path, tiny_pdparams, capsys):
    pth = tmp_path / "model.pth"
    torch.save({"w": torch.zeros(2)}, pth)
    assert zipfile.is_zipfile(pth)
    code, _, err = _run(capsys, "paddle", pth, tmp_path / "o.safetensors")
    assert code == 2 and "zip archive" in err and "dsnet convert torch" in err
    code, _, err = _run(capsys, "torch", tiny_pdparams, tmp_path / "o.safetensors")
    assert code == 2 and "not a readable PyTorch checkpoint" in err and "dsnet convert paddle" in err
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(pth.read_bytes()[:100])
    code, _, err = _run(capsys, "torch", truncated, tmp_path / "o.safetensors")
    assert code == 2 and "truncated or corrupt" in err


def test_missing_files_and_folders(tmp_path, tiny_pdparams, capsys):
    code, _, err = _run(capsys, "paddle", tmp_path / "nope.pdparams", tmp_path / "o.safetensors")
    assert code == 2 and "nope.pdparams: no such file" in err
    code, _, err = _run(capsys, "torch", tmp_path / "nope.pth", tmp_path / "o.safetensors")
    assert code == 2 and "nope.pth: no such file" in err
    code, _, err = _run(capsys, "paddle", tiny_pdparams, tmp_path / "missing" / "o.safetensors")
    assert code == 2 and "output folder" in err and "does not exist" in err


def test_torch_checkpoint_without_state_dict(tmp_path, capsys):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    code, _, err = _run(capsys, "torch", path, tmp_path / "o.safetensors")
    assert code == 2 and "found no state dict" in err and "'epoch'" in err and "--entry" in err
    code, _, err = _run(capsys, "torch", path, tmp_path / "o.safetensors", "--entry", "ema")
    assert code == 2 and "no entry 'ema'" in err


def test_unknown_model_is_refused(tmp_path, tiny_pdparams, capsys):
    code, _, err = _run(capsys, "paddle", tiny_pdparams, tmp_path / "o.safetensors", "--model", "dsnet_huge")
    assert code == 2 and "unknown model 'dsnet_huge'" in err and "dsnet_tiny" in err


# --- the peers: official layouts mapped by each model's own checkpoint_filter_fn --------------------------------------


def _randomised(name: str, seed: int = 0) -> nn.Module:
    """``name`` with random weights and BN statistics (so that a swapped or dropped tensor changes the logits)."""
    model = timm.create_model(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen) * 0.1
                t.copy_(noise.abs() + 0.5 if key.endswith("running_var") else noise)
    return model.eval()


@pytest.fixture(scope="module")
def mixformer_b0_pdparams(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = _randomised("mixformer_b0")
    path = tmp_path_factory.mktemp("mixformer") / "MixFormer_B0_pretrained.pdparams"
    return model, write_pdparams(path, mixformer_b0_to_paddle(model))


@pytest.fixture(scope="module")
def transxnet_t_pth_tar(tmp_path_factory) -> tuple[nn.Module, Path]:
    model = _randomised("transxnet_t")
    path = tmp_path_factory.mktemp("transxnet") / "transx-t.pth.tar"
    torch.save({"state_dict": transxnet_t_official_state_dict(model), "epoch": 300}, path)  # as released
    return model, path


@pytest.mark.parametrize(
    ("name", "layout", "source", "entry"),
    [
        ("mixformer_b0", "paddle", "mixformer_b0_pdparams", ""),
        ("transxnet_t", "torch", "transxnet_t_pth_tar", "'state_dict'"),
    ],
)
def test_convert_official_peer_checkpoint_then_load_with_timm(tmp_path, capsys, request, name, layout, source, entry):
    model, path = request.getfixturevalue(source)
    out = tmp_path / f"{name}.safetensors"
    code, stdout, err = _run(capsys, layout, path, out, "--model", name)
    assert code == 0, err
    params = sum(p.numel() for p in model.parameters())
    assert f"{params:,} parameters" in stdout and f"by dsnet.models.{name.split('_')[0]}.checkpoint_filter_fn" in stdout
    assert f"{layout} layout" in stdout and (f"entry {entry}" in stdout) == bool(entry)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["converted_from"] == f"{layout}:{path.name}" and f.metadata()["dsnet_model"] == name
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no temporary file left

    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)


def test_peer_checkpoint_needs_model(tmp_path, capsys, mixformer_b0_pdparams):
    _, path = mixformer_b0_pdparams
    code, _, err = _run(capsys, "paddle", path, tmp_path / "o.safetensors")
    assert code == 2 and str(path) in err and "not a reference DS-Net checkpoint" in err and "pass --model" in err
    assert "zoo models:" in err and "mixformer_b1" in err and "transxnet_t" in err


def test_peer_checkpoint_for_the_wrong_model(tmp_path, capsys, mixformer_b0_pdparams, transxnet_t_pth_tar):
    out = tmp_path / "o.safetensors"
    _, path = mixformer_b0_pdparams
    code, _, err = _run(capsys, "paddle", path, out, "--model", "mixformer_b1")  # same names, other widths/depths
    assert code == 2 and f"{path} does not fit mixformer_b1" in err and "checkpoint_filter_fn" in err
    assert "shape mismatches" in err and "head.proj.weight: checkpoint [1280, 192] vs model [1280, 256]" in err
    _, pth = transxnet_t_pth_tar
    code, _, err = _run(capsys, "torch", pth, out, "--model", "mixformer_b0")  # other names altogether
    assert code == 2 and str(pth) in err and "do not map onto mixformer_b0" in err and "patch_embed.proj.conv" in err
    code, _, err = _run(capsys, "torch", pth, out, "--model", "resnet18")
    assert code == 2 and "resnet18" in err and "no checkpoint_filter_fn" in err
    code, _, err = _run(capsys, "torch", pth, out, "--model", "transxnet_huge")
    assert code == 2 and "unknown model 'transxnet_huge'" in err and "transxnet_t" in err
    assert not out.exists()


# --- the tables agree with the models --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANT_DEPTHS))
def test_variant_depths_match_the_models(name):
    assert infer_depths(_meta_model(name).state_dict()) == VARIANT_DEPTHS[name]


def test_paddle_linear_list_matches_our_linear_layers():
    model = _meta_model("dsnet_small")
    ours = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    reference = {_reference_name(f"{n}.weight").rsplit(".", 2)[-2] for n in ours}
    assert reference == set(PADDLE_LINEAR_MODULES)


def test_verify_state_dict_lists_everything():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    given = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "d": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as info:
        verify_state_dict(given, expected, source="f.pth", target="m", hint="Try harder.")
    message = str(info.value)
    assert "missing keys (1):\n    c" in message and "unexpected keys (1):\n    d" in message
    assert "a: checkpoint [3, 2] vs model [2, 3]" in message and message.endswith("Try harder.")
