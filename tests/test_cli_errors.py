"""User errors on the command line: one line on stderr, exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from dsnet.cli.main import main


@pytest.mark.parametrize("argv", [["predict", "run", "x.png", "--top-k", "0"], ["eval", "run", "--batch-size=-3"]])
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
