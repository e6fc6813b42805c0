"""Checkpoints that survive a kill, a damaged file, a full disk and an unwritable folder; files with the run
folder's permissions; and the other bad inputs a user can give ``dsnet train`` / ``eval`` (one line, exit 2)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from PIL import Image

from _engine_helpers import fast_overrides, make_imagefolder
from dsnet import _io
from dsnet.cli.main import main
from dsnet.engine import checkpoint as ckpt
from dsnet.engine.checkpoint import load_training_state, read_metadata
from dsnet.engine.config import load_config
from dsnet.engine.trainer import train


def _set(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _tiny(root, out, **extra):
    """2 epochs of 1 update each (6 training images, batch 6): checkpoints `last` (epoch 2) and `last.prev` (1)."""
    return fast_overrides(root, out, **extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = make_imagefolder(tmp_path_factory.mktemp("data"), per_class_train=2, per_class_val=1)
    out = tmp_path_factory.mktemp("runs")
    run_dir = train(load_config(None, _tiny(root, out)), log=lambda s: None)
    return run_dir, root


def _copy(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _state_file(folder, name):
    return folder / f"last-{read_metadata(folder / f'{name}.safetensors')['token']}.state.pt"


def _one_line_error(capsys) -> str:
    """The error line of a failed command (progress lines of the work done before it may precede it)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err and lines and lines[-1].startswith("dsnet: error: "), err
    assert sum(line.startswith("dsnet: error: ") for line in lines) == 1 and "[Errno" not in err, err
    return lines[-1]


@pytest.mark.parametrize("damaged", ["weights", "state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(finished_run, tmp_path, damaged):
    run_dir = _copy(finished_run[0], tmp_path)
    folder = run_dir / "checkpoints"
    assert read_metadata(folder / "last.prev.safetensors")["epoch"] == 1  # kept when epoch 2 was saved
    bad = folder / "last.safetensors" if damaged == "weights" else _state_file(folder, "last")
    _truncate(bad)
    lines: list[str] = []
    train(resume=run_dir, log=lines.append)
    (note,) = [line for line in lines if "not usable" in line]
    assert str(bad) in note and "last.prev.safetensors" in note
    assert any("resuming" in line and "epoch 1, update 1 (from last.prev.safetensors)" in line for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 2  # epoch 2 was trained again
    state, weights_path = load_training_state(folder)
    assert weights_path.name == "last.safetensors" and state["update"] == 2


def test_every_checkpoint_damaged_is_one_line_naming_the_files(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run[0], tmp_path)
    folder = run_dir / "checkpoints"
    _truncate(folder / "last.safetensors")
    _state_file(folder, "last.prev").write_bytes(b"PK\x03\x04 not a zip")
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = _one_line_error(capsys)
    prev_state = _state_file(folder, "last.prev")
    assert "no intact checkpoint" in err and "last.safetensors" in err and prev_state.name in err


def test_eval_predict_export_refuse_a_damaged_checkpoint_in_one_line(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run[0], tmp_path)
    best = run_dir / "checkpoints" / "best.safetensors"
    _truncate(best)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    for argv in (
        ["eval", str(run_dir)],
        ["predict", str(run_dir), str(image)],
        ["export", str(run_dir), str(tmp_path / "m.onnx")],
        ["viz", "features", str(run_dir), str(image), "--out", str(tmp_path / "viz.png")],
    ):
        assert main(argv) == 2, argv
        err = _one_line_error(capsys)
        assert str(best) in err and "truncated or corrupt" in err, argv


def test_kill_inside_a_checkpoint_write_then_resume_finishes(tmp_path):
    """A real ``dsnet train`` SIGKILLs itself halfway through writing a checkpoint file; ``--resume`` finishes it.

    12 images, batch 3: 4 updates in one epoch, a mid-epoch checkpoint at update 2 (writes 1: state, 2: weights),
    then at the end of the epoch `best` (write 3) and `last` (4: state, 5: weights), killed inside write 5.
    """
    root = make_imagefolder(tmp_path / "data", per_class_train=4, per_class_val=1)
    extra = {"train.batch_size": 3, "train.ckpt_interval": 2, "sched.epochs": 1}
    args = [sys.executable, "-m", "dsnet.cli.main", "train", *_set(fast_overrides(root, tmp_path / "runs", **extra))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", ckpt._KILL_ENV: "5"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    (run_dir,) = list((tmp_path / "runs").iterdir())
    folder = run_dir / "checkpoints"
    assert list(folder.glob(f".*{_io.TMP_MARK}*")), "the killed write left its half-written temporary file"
    assert read_metadata(folder / "last.safetensors")["update"] == 2  # untouched by the killed write
    resumed = subprocess.run(
        [sys.executable, "-m", "dsnet.cli.main", "train", "--resume", str(run_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "at epoch 0, update 2 (from last.safetensors)" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["updates"] == 4
    assert not list(folder.glob(f".*{_io.TMP_MARK}*"))  # removed on resume
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in steps if r["kind"] == "step"] == [1, 2, 3, 4]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(None, _tiny(root, tmp_path, **{"sched.epochs": 1}))
    (run_dir / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict()))
    lines: list[str] = []
    train(resume=run_dir, log=lines.append)
    assert any("no checkpoint yet" in line for line in lines)
    assert read_metadata(run_dir / "checkpoints" / "last.safetensors")["update"] == 1


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path, capsys, monkeypatch):
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    real, calls = ckpt._write_bytes, []

    def writer(path, data):
        calls.append(path.name)
        if len(calls) == 4:  # epoch 1 wrote best, last state, last weights; the disk fills up in epoch 2
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", writer)
    assert main(["train", *_set(_tiny(root, tmp_path / "runs"))]) == 2
    err = _one_line_error(capsys)
    assert "cannot write" in err and "No space left on device" in err and str(tmp_path / "runs") in err
    (run_dir,) = list((tmp_path / "runs").iterdir())
    folder = run_dir / "checkpoints"
    state, _ = load_training_state(folder)  # the previous checkpoint is intact
    assert state["update"] == 1 and not list(folder.glob(f".*{_io.TMP_MARK}*"))


def test_unwritable_output_dir_is_one_line_before_any_work(tmp_path, capsys):
    """Under a regular file (refused for root too); as a non-root user also a read-only folder."""
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    targets = [blocker / "runs"]
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
        targets.append(read_only / "runs")
    for target in targets:
        assert main(["train", *_set(_tiny(root, target))]) == 2
        err = _one_line_error(capsys)
        assert f"train.output_dir={target}" in err


def test_export_to_an_unwritable_place_is_one_line(finished_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["export", str(finished_run[0]), str(blocker / "m.onnx")]) == 2
    err = _one_line_error(capsys)
    assert f"output {blocker / 'm.onnx'}: cannot create the folder" in err and f"{blocker} is a file" in err


def test_checkpoints_and_written_files_get_the_folders_permissions(tmp_path):
    from safetensors.torch import load_file

    from dsnet._io import atomic_write_safetensors

    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    old = os.umask(0o027)
    try:
        run_dir = train(load_config(None, _tiny(root, tmp_path / "runs", **{"train.ema": 0.9})), log=lambda s: None)
        converted = tmp_path / "converted.safetensors"  # what `dsnet convert` writes with
        atomic_write_safetensors(converted, load_file(run_dir / "checkpoints" / "best.safetensors"))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        _io.atomic_write_text(tmp_path / "atomic.txt", "x")
    finally:
        os.umask(old)
    expected = stat.S_IMODE((run_dir / "config.yaml").stat().st_mode)
    assert expected == 0o640 == stat.S_IMODE(plain.stat().st_mode)
    files = [*(run_dir / "checkpoints").iterdir(), run_dir / "summary.json", tmp_path / "atomic.txt", converted]
    assert any(p.suffix == ".pt" for p in files) and any(p.name == "last_ema.safetensors" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_resume_errors_name_the_folder(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "is not a run folder" in _one_line_error(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["train", "--resume", str(tmp_path / "file")]) == 2
    assert "is a file" in _one_line_error(capsys)


def test_resume_refuses_a_dataset_whose_classes_changed(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run[0], tmp_path)
    data = shutil.copytree(finished_run[1], tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "stripes").rename(data / split / "zigzag")  # same count, another name
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(str(finished_run[1]), str(data)))
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = _one_line_error(capsys)
    assert "cannot resume" in err and "'stripes'" in err and "'zigzag'" in err


def test_eval_refuses_other_class_names_with_the_same_count(finished_run, tmp_path, capsys):
    run_dir = finished_run[0]
    data = shutil.copytree(finished_run[1], tmp_path / "data")
    (data / "val" / "stripes").rename(data / "val" / "zigzag")
    assert main(["eval", str(run_dir), "--set", f"data.root={data}"]) == 2
    err = _one_line_error(capsys)
    assert "zigzag" in err and "differ" in err


def test_empty_training_class_folder_and_empty_splits(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    (root / "train" / "triangle").mkdir()
    assert main(["train", *_set(_tiny(root, tmp_path / "runs"))]) == 2
    assert "['triangle'] hold no image files" in _one_line_error(capsys)
    shutil.rmtree(root / "train" / "triangle")
    for split in ("train", "val"):
        empty = tmp_path / f"empty-{split}"
        shutil.copytree(root, empty)
        for image in (empty / split).rglob("*.png"):
            image.unlink()
        assert main(["train", *_set(_tiny(empty, tmp_path / "runs"))]) == 2
        assert f"{empty / split} has class folders but no image files" in _one_line_error(capsys)
    not_a_folder = tmp_path / "root-file"
    not_a_folder.write_text("x")
    assert main(["train", *_set(_tiny(not_a_folder, tmp_path / "runs"))]) == 2
    assert f"{not_a_folder / 'train'} does not exist" in _one_line_error(capsys)


def test_model_channels_other_than_grey_or_rgb_are_refused(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "data", per_class_train=2, per_class_val=1)
    assert main(["train", *_set(_tiny(root, tmp_path / "runs", **{"model.in_chans": 4}))]) == 2
    assert "model.in_chans=4" in _one_line_error(capsys)
