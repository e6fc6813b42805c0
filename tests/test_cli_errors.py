"""User errors on the command line: one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from dsnet.cli.main import main


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "run", "x.png", "--top-k", "0"],
        ["eval", "run", "--batch-size=-3"],
        ["export", "dsnet_tiny", "m.int8.onnx", "--int8", "--calib", "images", "--calib-images", "0"],
    ],
)
def test_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_unwritable_output_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["detect", "make-data", str(blocker / "data"), "--train", "2", "--val", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dsnet: error: ") and str(blocker) in err and err.count("\n") == 1


def test_config_error_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")  # a misspelt key (train.epochs does not exist either: sched.epochs)
    code = main(["train", "--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dsnet: error: ") and "epoch" in err and err.count("\n") == 1


def test_dsnet_error_is_a_value_error():
    from dsnet.engine.config import load_config
    from dsnet.errors import DSNetError

    assert issubclass(DSNetError, ValueError)
    with pytest.raises(DSNetError, match="unknown config key"):
        load_config(None, ["train.nonsense=1"])


def test_internal_value_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A ValueError that is not a DSNetError is a bug of dsnet: it must escape main(), not become exit code 2."""
    import dsnet.cli.info as info

    def broken(args):
        raise ValueError("an internal invariant broke")

    real_register = info.register

    def register(subparsers):
        real_register(subparsers)
        subparsers.choices["info"].set_defaults(func=broken)

    monkeypatch.setattr(info, "register", register)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["info"])


def test_runtime_loader_raises_the_user_error_type(tmp_path, capsys):
    """Bad input to the deploy readers is a DSNetError of their own (no wrapper in the CLI turns ValueErrors into
    user errors), so ``dsnet predict`` prints one line and exits 2."""
    from dsnet.deploy.runtime import load_for_inference, read_artefact_info
    from dsnet.errors import DSNetError

    with pytest.raises(DSNetError, match="unknown backend 'tensorrt'"):
        load_for_inference(tmp_path / "m.onnx", backend="tensorrt")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not onnx")
    (tmp_path / "m.onnx.json").write_text("{not json")
    with pytest.raises(DSNetError, match="not a dsnet artefact description"):
        read_artefact_info(model)
    assert main(["predict", str(model), str(model), "--backend", "torch"]) == 2
    assert "is an exported artefact: run it with --backend onnxruntime" in capsys.readouterr().err


def test_quantize_onnx_needs_at_least_one_image(tmp_path):
    from dsnet.errors import DSNetError
    from dsnet.export.quantize import quantize_onnx

    with pytest.raises(DSNetError, match="max_images=0"):
        quantize_onnx(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", [tmp_path / "a.png"], None, max_images=0)
