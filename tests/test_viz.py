"""``dsnet.viz`` / ``dsnet viz``: the attention maps are the model's own softmax weights, and every figure is written.

The hand computations below read q and k from the block's own projection (a forward hook) and apply
softmax(q kᵀ / √d) by hand, as the DS-Net paper's Eq. for the global self-attention writes it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import dsnet  # noqa: F401  (registers the zoo)
from dsnet.cli.main import main
from dsnet.viz import AttentionCapture, ModuleOutputs, attention_panels, explicit_attention, run_with_capture

SIZE = 32  # tiny DS-Net input: with global strides (2, 2, 1, 1), stage 1 has a 8×8 local map and a 4×4 global grid


@pytest.fixture(scope="module")
def tiny_dsnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("dsnet_tiny", depths=(1, 1, 1, 1), num_classes=10, global_strides=(2, 2, 1, 1))
    with torch.no_grad():  # non-trivial norms and peaked attention (the init's std 0.02 leaves it near uniform)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(25.0)
    return model.eval()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images") / "img.png"
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)
    return str(path)


def _input() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _hand_self_attention(model: torch.nn.Module, x: torch.Tensor, query: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) of global token ``query`` in block 1.1, per head, from the block's own qkv Linear."""
    block = model.stages[0].blocks[0]
    with torch.no_grad(), ModuleOutputs(model, ["stages.0.blocks.0.global_qkv"]) as kept:
        model(x)
    qkv = kept.outputs["stages.0.blocks.0.global_qkv"][0]  # (N, 3g), laid out (q|k|v, head, head_dim)
    g, heads = block.global_dim, block.num_heads
    q = qkv[:, :g].reshape(-1, heads, g // heads)  # (N, heads, d)
    k = qkv[:, g : 2 * g].reshape(-1, heads, g // heads)
    logits = torch.einsum("hd,nhd->hn", q[query], k) / math.sqrt(g // heads)  # (heads, N)
    return logits.softmax(-1)


def test_global_attention_of_a_point_is_the_hand_softmax_and_sums_to_one(tiny_dsnet):
    x = _input()
    _, capture = run_with_capture(tiny_dsnet, x)
    # point (x, y) = (0.6, 0.3) of the image → global token row 1, column 2 of the 4×4 grid → index 6
    panel = attention_panels(tiny_dsnet, capture, "1.1", (0.6, 0.3), (SIZE, SIZE))[0]
    assert panel.key_grid == (4, 4)
    got = panel.per_head.flatten(1)  # (heads, 16)
    torch.testing.assert_close(got, _hand_self_attention(tiny_dsnet, x, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[0]), atol=1e-5, rtol=0)
    assert "(1, 2) of 4×4" in panel.title


def test_co_attention_maps_sum_to_one_over_their_keys(tiny_dsnet):
    _, capture = run_with_capture(tiny_dsnet, _input())
    _, g2l, l2g = attention_panels(tiny_dsnet, capture, "1.1", (0.2, 0.7), (SIZE, SIZE))
    assert g2l.key_grid == (4, 4) and l2g.key_grid == (8, 8)  # local pixel → global tokens; token → local pixels
    for panel in (g2l, l2g):
        torch.testing.assert_close(panel.per_head.flatten(1).sum(-1), torch.ones(panel.per_head.shape[0]))


def test_moving_the_point_to_another_global_token_changes_the_map(tiny_dsnet):
    _, capture = run_with_capture(tiny_dsnet, _input())
    first = attention_panels(tiny_dsnet, capture, "1.1", (0.1, 0.1), (SIZE, SIZE))[0]
    same_token = attention_panels(tiny_dsnet, capture, "1.1", (0.2, 0.2), (SIZE, SIZE))[0]  # still token (0, 0)
    other = attention_panels(tiny_dsnet, capture, "1.1", (0.9, 0.9), (SIZE, SIZE))[0]  # token (3, 3)
    torch.testing.assert_close(first.heatmap, same_token.heatmap)
    assert (first.heatmap - other.heatmap).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["dsnet_tiny", "transxnet_t", "mixformer_b0"])
def test_visualising_path_gives_the_normal_logits(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    logits, capture = run_with_capture(model, x)
    assert capture.records, "no attention was captured"
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_explicit_attention_equals_sdpa_with_a_float_mask():
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    mask = torch.randn(4, 9, 9)
    out, weights = explicit_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 9))


def test_capture_refuses_a_training_model(tiny_dsnet):
    tiny_dsnet.train()
    try:
        with pytest.raises(ValueError, match="eval"), AttentionCapture(tiny_dsnet):
            pass
    finally:
        tiny_dsnet.eval()


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.parametrize("name", ["dsnet_tiny", "transxnet_t", "mixformer_b0"])
@pytest.mark.parametrize("kind", ["attention", "features", "cam", "streams"])
def test_each_subcommand_writes_a_png(name, kind, image_path, tmp_path, capsys):
    out = tmp_path / f"{kind}.png"
    images = [image_path, image_path] if kind == "streams" else [image_path]
    code = main(["viz", kind, name, *images, "--out", str(out), "--input-size", "64", "--point", "5,20"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out)
    width, height = _png(out)
    assert width > 100 and height > 100


def test_converted_weights_and_a_vit_baseline(tiny_dsnet, image_path, tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    save_file(tiny_dsnet.state_dict(), str(weights))
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    vit_weights = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(vit_weights))
    out = tmp_path / "a.png"
    args = ["viz", "attention", "dsnet_tiny", image_path, "--weights", str(weights), "--out", str(out)]
    args += ["--input-size", "64", "--block", "1.1"]
    args += ["--baseline", "vit_tiny_patch16_224", "--baseline-weights", str(vit_weights)]
    # depths (1,1,1,1) do not fit dsnet_tiny's depths: the loader must say so, naming the file
    assert main(args) == 2
    assert str(weights) in capsys.readouterr().err
    full = timm.create_model("dsnet_tiny", num_classes=10)
    save_file(full.state_dict(), str(weights))
    assert main(args) == 0, capsys.readouterr().err
    _png(out)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--point", "40,3"], ["--point 40,3", "img.png", "28×28"]),  # outside the 28×28 image
        (["--point", "a,b"], ["--point 'a,b'", "X,Y"]),
        (["--block", "9.1"], ["--block '9.1'", "STAGE.BLOCK"]),
    ],
)
def test_bad_point_or_block_is_a_clear_error(args, names, image_path, tmp_path, capsys):
    code = main(["viz", "attention", "dsnet_tiny", image_path, "--out", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dsnet: error:") and "Traceback" not in err
    assert all(n in err for n in names), err
    assert not (tmp_path / "x.png").exists()


def test_missing_image_unreadable_image_and_unreadable_weights_name_the_file(image_path, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["viz", "features", "dsnet_tiny", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    assert main(["viz", "cam", "dsnet_tiny", str(broken), "--out", str(tmp_path / "x.png")]) == 2
    assert str(broken) in capsys.readouterr().err
    bad_weights = tmp_path / "bad.safetensors"
    bad_weights.write_bytes(b"garbage")
    args = ["viz", "attention", "dsnet_tiny", image_path, "--weights", str(bad_weights), "--out", "x.png"]
    assert main(args) == 2
    assert str(bad_weights) in capsys.readouterr().err


def test_a_model_without_a_map_says_so(image_path, tmp_path, capsys):
    assert main(["viz", "attention", "resnet18", image_path, "--out", str(tmp_path / "x.png")]) == 2
    assert "no attention maps" in capsys.readouterr().err
    assert main(["viz", "features", "resnet18", image_path, "--out", str(tmp_path / "x.png")]) == 2
    assert "no local/global streams" in capsys.readouterr().err
    cam = tmp_path / "cam.png"  # Grad-CAM works for any timm model, a class given by index
    assert main(["viz", "cam", "resnet18", image_path, "--out", str(cam), "--input-size", "64", "--class", "3"]) == 0
    _png(cam)
    # a DS-Net block without co-attention: the panels say so, the figure is still drawn from the self-attention
    out = tmp_path / "concat.png"
    assert main(["viz", "attention", "dsnet_tiny_concat", image_path, "--out", str(out), "--input-size", "64"]) == 0
    _png(out)
