"""Typed run configs: recipes, flat keys, overrides and error messages."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from dsnet.engine.config import DEFAULT_EMA_DECAY, RUN_RANGES, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["optim.lr=2e-3", "data.scale=[0.5, 1]", "train.channels_last=true", "model.kwargs.x=3"])
    assert cfg.optim.lr == 0.002 and isinstance(cfg.optim.lr, float)
    assert cfg.data.scale == (0.5, 1.0)
    assert cfg.train.channels_last is True
    assert cfg.model.kwargs == {"x": 3}
    assert load_config(None, ["optim.clip_grad=null"]).optim.clip_grad is None


def test_bad_keys_and_values_name_the_key():
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.lrr'.*Did you mean optim\.lr.*Valid keys: model"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ValueError, match=r"'train\.batch_size' expects an integer, got 'big'"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ValueError, match="expects an integer, got None"):
        load_config(None, ["train.batch_size=null"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.learning_rate' in .*bad\.yaml"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.5\n")
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  weight_decay: 0.01\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.5, 0.01)


def test_every_shipped_recipe_loads():
    recipes = sorted((CONFIGS / "imagenet").glob("*.yaml")) + sorted((CONFIGS / "fashion_mnist").glob("*.yaml"))
    assert any(p.name == "dsnet_tiny.yaml" for p in recipes)
    for path in recipes:
        cfg = load_config(path)
        assert cfg.model.name and cfg.sched.epochs > 0, path


def test_released_weight_recipe_matches_design():
    cfg = load_config(CONFIGS / "imagenet" / "dsnet_tiny.yaml")
    assert (cfg.optim.lr, cfg.optim.lr_base_batch, cfg.train.batch_size) == (1e-3, 1024, 1024)
    assert (cfg.optim.weight_decay, cfg.sched.warmup_epochs, cfg.sched.min_lr, cfg.sched.epochs) == (0.05, 5, 1e-5, 300)
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.label_smoothing, cfg.data.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.data.aa == "rand-m9-mstd0.5-inc1" and cfg.model.drop_path == 0.1
    flat = load_config(None, ["ema=true", "lr=0.5", "model=resnet18"])
    assert (flat.train.ema, flat.optim.lr, flat.model.name) == (DEFAULT_EMA_DECAY, 0.5, "resnet18")


# --- bad values: one line naming the key, the value and what is allowed ----------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  name: [dsnet_tiny\ntrain:\n  batch_size: 8\n")
    with pytest.raises(ValueError) as err:
        load_config(recipe)
    message = str(err.value)
    assert message.startswith(f"{recipe}:") and "YAML syntax error" in message
    assert "line 2, column 9" in message  # where the unclosed [ began
    assert "\n" not in message


def test_yaml_syntax_error_in_an_override():
    with pytest.raises(ValueError, match=r"--set optim\.lr:1:3: YAML syntax error"):
        load_config(None, ["optim.lr=[1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=-4", r"train\.batch_size=-4 is out of range; expected >= 1"),
        ("train.batch_size=0", r"train\.batch_size=0 is out of range"),
        ("sched.epochs=0", r"sched\.epochs=0 is out of range; expected >= 1"),
        ("optim.lr=0", r"optim\.lr=0\.0 is out of range; expected > 0"),
        ("optim.lr=-1e-3", r"optim\.lr=-0\.001 is out of range"),
        ("data.hflip=1.5", r"data\.hflip=1\.5 is out of range; expected in \[0, 1\]"),
        ("data.reprob=-0.1", r"data\.reprob=-0\.1 is out of range"),
        ("data.label_smoothing=1", r"data\.label_smoothing=1\.0 is out of range; expected in \[0, 1\)"),
        ("data.scale=[0.5, 1.5]", r"data\.scale=\(0\.5, 1\.5\) is out of range"),
        ("data.crop_pct=0", r"data\.crop_pct=0\.0 is out of range; expected in \(0, 1\]"),
        ("train.threads=0", r"train\.threads=0 is out of range; expected >= 1"),
        ("train.eval_interval=0", r"train\.eval_interval=0 is out of range"),
        ("train.log_interval=-1", r"train\.log_interval=-1 is out of range"),
        ("train.ckpt_interval=-5", r"train\.ckpt_interval=-5 is out of range; expected >= 0"),
        ("train.ema=1", r"train\.ema=1\.0 is out of range"),
        ("data.workers=-1", r"data\.workers=-1 is out of range"),
        ("optim.lr=nan", r"optim\.lr=nan is out of range"),
        ("train.accum_steps=3", r"train\.accum_steps=3 must divide train\.batch_size=1024"),
        ("data.scale=[0.9, 0.5]", r"data\.scale=\[0\.9, 0\.5\] must be \[low, high\]"),
        ("data.input_size=16", r"data\.input_size=16 is too small for dsnet_tiny; .* at least 32x32"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(None, [override])


def test_ranges_are_checked_after_the_recipe_and_all_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  batch_size: 6\n  accum_steps: 4\n")
    with pytest.raises(ValueError, match=rf"config {recipe}: train\.accum_steps=4 must divide"):
        load_config(recipe)
    cfg = load_config(recipe, ["train.batch_size=8"])  # fixed by the override: only the final values count
    assert (cfg.train.batch_size, cfg.train.accum_steps) == (8, 4)


def _numeric(annotation) -> bool:
    """int/float, or an Optional / tuple of them (bool is not a number here)."""
    if annotation in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(annotation) if a is not Ellipsis)


def test_every_numeric_field_has_a_range():
    """A new numeric field must get a range in RUN_RANGES (or be listed here as deliberately unbounded)."""
    unbounded = {"data.mean"}  # any normalisation mean is valid
    cfg = RunConfig()
    numeric = {
        f"{section.name}.{name}"
        for section in dataclasses.fields(cfg)
        for name, hint in typing.get_type_hints(type(getattr(cfg, section.name))).items()
        if _numeric(hint)
    }
    assert numeric - unbounded == set(RUN_RANGES)
