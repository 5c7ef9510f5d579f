"""The command line under hostile paths and inputs (issue 16, point 11): FIFOs, standard input, outputs that
are specs, symbolic links or unwritable, and file names the terminal cannot print."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpidsl.cli import main

SPEC = Path("specs/box_projection.fpi").read_text()
BAD = "layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = q\n}\n"


def fpidsl(*args: str, stdin: str | None = None, env: dict | None = None, timeout: float = 60):
    return subprocess.run([sys.executable, "-m", "fpidsl", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "spec.fpi"
    os.mkfifo(fifo)
    assert main(["check", str(fifo)]) == 1  # would block forever if it waited for a writer
    err = capsys.readouterr().err
    assert err.startswith(f"{fifo}:1:1: error: {fifo} is not a regular file")


def test_standard_input_with_a_format():
    ok = fpidsl("check", "-", "--format", "fpi", stdin=SPEC)
    assert ok.returncode == 0 and ok.stdout.startswith("<stdin>: ok (2 layers")
    bad = fpidsl("check", "--format", "fpi", "-", stdin=BAD)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[:3] == ["<stdin>:4:14: error: unknown name q", "    4 |   update x = q",
                                           "      |              ^"]
    yaml = fpidsl("compile", "-", "--format", "yaml", stdin=Path("specs/denoise.yaml").read_text())
    assert yaml.returncode == 0 and "class DenoiseNN" in yaml.stdout


def test_standard_input_needs_a_format(capsys):
    assert main(["check", "-"]) == 2
    assert "needs --format fpi or --format yaml" in capsys.readouterr().err
    assert main(["check", "-", "-", "--format", "fpi"]) == 2


def test_compile_never_overwrites_a_spec(tmp_path, capsys):
    spec = tmp_path / "layer.fpi"
    spec.write_text(SPEC)
    assert main(["compile", str(spec), "-o", str(spec)]) == 2
    assert "is the spec being compiled" in capsys.readouterr().err
    assert spec.read_text() == SPEC
    other = tmp_path / "other.yaml"
    other.write_text("keep")
    assert main(["compile", str(spec), "-o", str(other)]) == 2
    assert other.read_text() == "keep"
    hard = tmp_path / "hard.py"
    os.link(spec, hard)  # the same file under an innocent name
    assert main(["compile", str(spec), "-o", str(hard)]) == 2
    assert spec.read_text() == SPEC


def test_compile_does_not_write_through_a_symbolic_link(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    link = tmp_path / "out.py"
    link.symlink_to(target)
    assert main(["compile", "specs/box_projection.fpi", "-o", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert target.read_text() == "precious" and link.is_symlink()


def test_compile_writes_atomically(tmp_path, capsys):
    out = tmp_path / "layer.py"
    out.write_text("old")
    assert main(["compile", "specs/box_projection.fpi", "-o", str(out)]) == 0
    assert "class BoxProjectionNN" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.py"]  # no temporary left behind
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_unwritable_outputs_are_usage_errors(tmp_path, capsys):
    assert main(["compile", "specs/denoise.fpi", "-o", str(tmp_path / "missing" / "g.py")]) == 2
    assert main(["compile", "specs/denoise.fpi", "-o", str(tmp_path)]) == 2
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["graph", "specs/denoise.fpi", "-o", str(locked / "g.dot")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("fpidsl: error:") >= 2


def test_graph_to_a_file_it_cannot_create_exits_2(capsys):
    assert main(["graph", "specs/denoise.fpi", "-o", "/proc/version.dot"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_unprintable_file_names(tmp_path):
    odd = os.fsdecode(b"bad\xff\x1b[31m.fpi")
    (tmp_path / odd).write_text(SPEC)
    result = subprocess.run([sys.executable, "-m", "fpidsl", "check", odd], cwd=tmp_path, capture_output=True,
                            timeout=60, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in result.stdout and result.stdout.startswith(b"bad\\udcff\\x1b[31m.fpi: ok")
    accent = "caf\u00e9.fpi"
    (tmp_path / accent).write_text(BAD)
    result = subprocess.run([sys.executable, "-m", "fpidsl", "check", accent], cwd=tmp_path, capture_output=True,
                            timeout=60, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 1 and result.stderr.startswith(b"caf\\xe9.fpi:4:14: error: unknown name q")
