"""``dsnet train`` → ``dsnet eval`` → ``dsnet predict`` through the console entry point, and their error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from _engine_helpers import CLASSES, fast_overrides, make_image, make_imagefolder
from dsnet.cli.main import main


def _set(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *_set(fast_overrides(root, out, **{"sched.epochs": 4}))]) == 0
    (run_dir,) = list(out.iterdir())
    return run_dir, root


def test_print_config_and_bad_key(capsys, tmp_path):
    assert main(["train", "--set", "optim.lr=0.5", "--set", "model.name=resnet18", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["model"]["name"] == "resnet18"
    assert main(["train", "--set", "optim.learning_rate=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsnet: error: unknown config key 'optim.learning_rate'") and "optim.lr" in err
    assert main(["train", "--set", "model.name=no_such_net", "--set", f"data.root={tmp_path}"]) == 2
    assert "unknown model 'no_such_net'" in capsys.readouterr().err


def test_eval_reports_accuracy_and_writes_confusion(cli_run, capsys, tmp_path):
    run_dir, _ = cli_run
    assert main(["eval", str(run_dir), "--tag", "last", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["num_samples"] == 12 and result["top1"] == pytest.approx(summary["final"]["top1"])
    assert result["top1"] > 100 / 3  # better than chance on the three patterns
    assert set(result["per_class"]) == set(CLASSES)
    assert (run_dir / "eval-val" / "confusion.png").is_file() and (run_dir / "eval-val" / "eval.json").is_file()
    weights = str(run_dir / "checkpoints" / "best.safetensors")
    assert main(["eval", weights, "--set", f"data.root={cli_run[1]}", "--output", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("top-1 ") and "circle" in out and (tmp_path / "ev" / "confusion.png").is_file()

    # converted/foreign weights (no metadata): model name from --model, preprocessing from the recipe
    save_file(load_file(weights), str(tmp_path / "foreign.safetensors"))
    overrides = [
        "--set",
        f"data.root={cli_run[1]}",
        "--set",
        "data.input_size=32",
        "--set",
        "data.interpolation=bilinear",
    ]
    args = ["eval", str(tmp_path / "foreign.safetensors"), *overrides, "--output", str(tmp_path / "ev2"), "--json"]
    assert main(args) == 2 and "pass the model name" in capsys.readouterr().err
    assert main([*args, "--model", "test_convnext"]) == 0
    foreign = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert foreign["top1"] == json.loads(capsys.readouterr().out)["top1"]


def test_eval_rejects_a_checkpoint_with_other_classes(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    assert main(["eval", str(run_dir), "--set", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "predicts 3 classes" in err and "has 2" in err
    state = load_file(run_dir / "checkpoints" / "best.safetensors")
    state = {k: (v[:2] if k.startswith("head.fc") else v) for k, v in state.items()}
    save_file(state, str(tmp_path / "two.safetensors"))  # foreign weights: no metadata
    assert main(["predict", str(tmp_path / "two.safetensors"), str(tmp_path)]) == 2
    assert "does not say which model" in capsys.readouterr().err
    args = ["predict", str(tmp_path / "two.safetensors"), str(tmp_path), "--model", "test_convnext"]
    assert main([*args, "--classes", str(_classes_file(tmp_path, 3))]) == 2
    assert "the checkpoint has 2 classes but 3 are expected" in capsys.readouterr().err


def _classes_file(folder, n):
    path = folder / "classes.txt"
    path.write_text("\n".join(CLASSES[:n]) + "\n")
    return path


def test_predict_table_json_and_bad_files(cli_run, tmp_path, capsys):
    run_dir, _ = cli_run
    rng = np.random.default_rng(1)
    make_image(0, rng).save(tmp_path / "rgb.png")
    grey = make_image(2, rng).convert("L")
    grey.save(tmp_path / "grey.png")
    make_image(1, rng).convert("RGBA").save(tmp_path / "rgba.png")
    make_image(1, rng).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(tmp_path / "grey16.png")  # same picture, 16 bits
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image, ignored when scanning the folder")

    assert main(["predict", str(run_dir), str(tmp_path), "-k", "2", "--json"]) == 1  # one unreadable file
    captured = capsys.readouterr()
    records = {r["path"].split("/")[-1]: r for r in json.loads(captured.out)}
    assert set(records) == {"rgb.png", "grey.png", "rgba.png", "cmyk.jpg", "grey16.png", "zero.png"}
    assert "zero.png: empty file" in records["zero.png"]["error"] and "zero.png" in captured.err
    for name in ("rgb.png", "grey.png", "rgba.png", "cmyk.jpg", "grey16.png"):
        r = records[name]
        assert r["error"] is None and len(r["labels"]) == 2 and r["labels"][0] in CLASSES
        assert r["probs"][0] >= r["probs"][1] and sum(r["probs"]) <= 1 + 1e-6
    # 16-bit grey is rescaled (not clipped to white), so it predicts exactly like its 8-bit twin
    assert records["grey16.png"]["probs"] == pytest.approx(records["grey.png"]["probs"], abs=1e-6)
    assert main(["predict", str(run_dir), str(tmp_path / "rgb.png")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(tmp_path / "rgb.png")) and "%" in line
    assert main(["predict", str(run_dir), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err


def test_predicted_probabilities_match_the_model(cli_run, tmp_path, capsys):
    """The CLI's top-1 probability equals softmax of the model on the eval transform of the image."""
    from dsnet.engine.inference import load_checkpoint

    run_dir, root = cli_run
    image = sorted((root / "val" / "stripes").iterdir())[0]
    assert main(["predict", str(run_dir), str(image), "--json", "-k", "1"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    model, info = load_checkpoint(run_dir)
    x = info.transform()(Image.open(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert record["indices"][0] == int(probs.argmax())
    assert record["probs"][0] == pytest.approx(float(probs.max()), abs=1e-6)
