"""The command line: exit codes, the compiler-style error format, no tracebacks for spec mistakes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fpidsl.cli import main
from tests.conftest import shipped_specs


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fpidsl", *args], capture_output=True, text=True, cwd=cwd)


def test_check_every_shipped_spec(capsys):
    specs = [str(p) for p in shipped_specs()]
    assert main(["check", *specs]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == len(specs)


def test_spec_error_format_and_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.fpi"
    bad.write_text("layer L {\n  input a : [B, 10]\n  update x = relu(a\n}\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:4:1: error: expected ')'")
    assert lines[1] == "    4 | }"
    assert lines[2] == "      | ^"
    assert lines[3].startswith("hint: ")
    assert "Traceback" not in err


def test_all_errors_of_a_file_are_reported(tmp_path, capsys):
    bad = tmp_path / "many.fpi"
    bad.write_text(
        "layer L {\n  input a : [B, 10]\n  state x : [B, 10]\n"
        "  let p = relux(a)\n  let q = tanhh(a)\n  update x = x\n}\n"
    )
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4:11: error:" in err and f"{bad}:5:11: error:" in err
    assert "2 errors" in err


def test_usage_errors_exit_2(tmp_path):
    assert run_cli().returncode == 2
    assert run_cli("frobnicate").returncode == 2
    spec = str(shipped_specs()[0])
    result = run_cli("compile", spec, "--emit", "graph", "--layer", "NoSuchLayer")
    assert result.returncode == 2 and "has no layer named 'NoSuchLayer'" in result.stderr


def test_missing_file_is_a_spec_error_without_traceback(tmp_path):
    result = run_cli("check", str(tmp_path / "nope.fpi"))
    assert result.returncode == 1
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_internal_errors_print_one_line_unless_debug(monkeypatch, capsys):
    import fpidsl.compiler

    def boom(source):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(fpidsl.compiler, "check_source", boom)
    spec = str(shipped_specs()[0])
    assert main(["check", spec]) == 3
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "Traceback" not in err
    assert main(["--debug", "check", spec]) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("layer", ["BoxProjectionNN", "BoxProjectionGD"])
def test_emit_graph(layer, capsys):
    assert main(["compile", "specs/box_projection.fpi", "--emit", "graph", "--layer", layer]) == 0
    out = capsys.readouterr().out
    assert layer in out and "update" in out


def test_emit_graph_to_file(tmp_path):
    out = tmp_path / "g.txt"
    assert main(["compile", "specs/denoise.fpi", "--emit", "graph", "-o", str(out)]) == 0
    assert "conv2d" in out.read_text()
