"""Typed run configs: recipes, flat keys, overrides and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnet.engine.config import DEFAULT_EMA_DECAY, load_config

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
