"""The `mri` entry point turns usage errors into click's usage message and exit code 2, never a traceback.

typer 0.29 raises its own bundled click's exceptions, which the standalone `click.ClickException` does not
match; these tests go through the real entry point (`mri.cli.app`, the function the console script calls).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mri.cli import app


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["zoo", "plant"], "Missing option '--base'"),
        (["zoo", "plant", "--base", "mri-base", "--out", "x"], "Missing option '--spec'"),
        (["zoo", "train", "--out", "x"], "Missing option '--corpus'"),
        (["zoo", "nosuch"], "No such command 'nosuch'"),
        (["zoo", "train", "--corpus", "t", "--out", "x", "--layers", "two"], "Invalid value for '--layers'"),
    ],
)
def test_usage_errors_print_usage_and_exit_2(argv, message, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["mri", *argv])
    with pytest.raises(SystemExit) as exit_info:
        app()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Usage: mri zoo" in err
    assert "Traceback" not in err


def test_help_exits_0(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["mri", "zoo", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        app()
    assert exit_info.value.code == 0
    assert "plant" in capsys.readouterr().out


def test_mri_error_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        sys, "argv", ["mri", "zoo", "train", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit) as exit_info:
        app()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, however long (not wrapped at the terminal's width)
    assert "is not a tokens folder" in err and "mri zoo pretokenize" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_console_script_reports_a_missing_option_without_a_traceback() -> None:
    """The installed `mri` script (a separate process, as a user runs it)."""
    script = Path(sys.executable).parent / "mri"
    if not script.exists():
        pytest.skip("the mri console script is not installed next to this Python")
    done = subprocess.run([str(script), "zoo", "plant"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Missing option '--base'" in done.stderr and "Traceback" not in done.stderr
