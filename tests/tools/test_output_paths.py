"""Every `-o` of the command line follows the rules of `fpidsl/outfile.py` (docs/LIMITS.md, "The command line"):
never through a symbolic link, never over a spec or the command's input, never onto a FIFO, a device or a folder
(a name ending in a slash included), always atomically; a refusal is a usage error (exit 2) that names the path.
And the file names `fmt` prints are escaped like those of `check`."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fpidsl.cli import main

ROOT = Path(__file__).resolve().parents[2]
BOX = ROOT / "specs" / "box_projection.fpi"
DENOISE = ROOT / "specs" / "denoise.fpi"
SMALL = "layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + a\n}\n"
MODEL = textwrap.dedent("""
    import torch

    def damped(x):
        return 0.5 * torch.tanh(x)

    def cumulative(x):
        return 0.1 * torch.cumsum(x, dim=1)
""")
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "ok.fpi"
    path.write_text(SMALL)
    return path


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def _usage_error(capsys, message: str) -> None:
    """The one line of a usage error (exit 2 was asserted by the caller): `fpidsl: error: MESSAGE`."""
    captured = capsys.readouterr()
    assert captured.err == f"fpidsl: error: {message}\n"
    assert "Traceback" not in captured.err


def _commands(spec: Path, model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "fmt --to yaml": ["fmt", "--to", "yaml", str(spec), "-o", str(out)],
        "trace": ["trace", f"{model}:damped", "--shape", "x=2,3", "-o", str(out)],
    }


# --------------------------------------------------------------------------- fmt --to and trace: the spec rules


@pytest.mark.parametrize("command", ["fmt --to yaml", "trace"])
def test_a_spec_output_is_not_written_through_a_symbolic_link(tmp_path, spec, model, capsys, command):
    victim = tmp_path / "box_projection.fpi"
    victim.write_text(BOX.read_text())
    link = tmp_path / "out.yaml"
    link.symlink_to(victim.name)  # the repro: out.yaml -> box_projection.fpi
    assert main(_commands(spec, model, link)[command]) == 2
    _usage_error(capsys, f"{link} is a symbolic link; not writing through it (remove it or write elsewhere)")
    assert link.is_symlink() and victim.read_text() == BOX.read_text()


@pytest.mark.parametrize("command", ["fmt --to yaml", "trace"])
@pytest.mark.parametrize("name", ["victim.fpi", "victim.yaml", "victim.YML"])
def test_a_spec_output_never_replaces_an_existing_spec(tmp_path, spec, model, capsys, command, name):
    victim = tmp_path / name
    victim.write_text(BOX.read_text())
    assert main(_commands(spec, model, victim)[command]) == 2
    _usage_error(capsys, f"{victim} is an existing spec; not overwriting it (remove it first, or write to a new file)")
    assert victim.read_text() == BOX.read_text()


def test_a_spec_output_may_be_a_new_spec_or_replace_an_output_that_is_not_one(tmp_path, spec, model, capsys):
    new = tmp_path / "new.yaml"
    assert main(["fmt", "--to", "yaml", str(spec), "-o", str(new)]) == 0
    assert new.read_text().startswith("fpi: 1\n")
    old = tmp_path / "converted.txt"  # like compile -o's OUT.py: an existing file that is not a spec is replaced
    old.write_text("old")
    assert main(["fmt", "--to", "yaml", str(spec), "-o", str(old)]) == 0
    assert old.read_text() == new.read_text()
    assert main(["trace", f"{model}:damped", "--shape", "x=2,3", "-o", str(tmp_path / "traced.fpi")]) == 0
    assert main(["check", str(tmp_path / "traced.fpi")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.txt", "model.py", "new.yaml", "ok.fpi",
                                                          "traced.fpi"]  # no temporary left behind
    written = (tmp_path / "traced.fpi").read_text()
    assert main(["trace", f"{model}:cumulative", "--shape", "x=2,3", "-o", str(tmp_path / "traced.fpi")]) == 2
    _usage_error(capsys, f"{tmp_path / 'traced.fpi'} is an existing spec; not overwriting it (remove it first, or "
                         "write to a new file)")
    assert (tmp_path / "traced.fpi").read_text() == written


def test_a_spec_output_is_not_the_input_even_through_a_hard_link(tmp_path, spec, model, capsys):
    hard = tmp_path / "same.txt"
    os.link(spec, hard)
    assert main(["fmt", "--to", "yaml", str(spec), "-o", str(hard)]) == 2
    _usage_error(capsys, f"{hard} is the input being converted; not overwriting it")
    assert spec.read_text() == SMALL
    assert main(["trace", f"{model}:damped", "--shape", "x=2,3", "-o", str(model)]) == 2
    _usage_error(capsys, f"{model} is the input being converted; not overwriting it")
    assert model.read_text() == MODEL


# --------------------------------------------------------------------------- FIFOs and device nodes


@needs_fifo
@pytest.mark.parametrize("command", ["compile", "fmt --to yaml", "trace", "graph"])
def test_a_fifo_output_is_refused_not_replaced_nor_waited_on(tmp_path, spec, model, command):
    fifo = tmp_path / "pipe.dot"
    os.mkfifo(fifo)
    argv = {**_commands(spec, model, fifo), "compile": ["compile", str(spec), "-o", str(fifo)],
            "graph": ["graph", str(spec), "-o", str(fifo)]}[command]
    # in a child process: before the fix, graph opened the FIFO and waited for a reader forever
    result = subprocess.run([sys.executable, "-m", "fpidsl", *argv], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == f"fpidsl: error: {fifo} is a FIFO (named pipe), not a regular file; not writing to it\n"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def _device(tmp_path: Path) -> Path:
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a null device of our own, inside tmp_path
    except (PermissionError, AttributeError, OSError):
        pytest.skip("cannot make a device node here (not root)")
    return node


@pytest.mark.parametrize("command", ["compile", "fmt --to yaml", "trace", "graph"])
def test_a_device_output_is_refused_not_replaced(tmp_path, spec, model, capsys, command):
    node = _device(tmp_path)
    if command == "graph":
        node = node.rename(tmp_path / "null.dot")
    argv = {**_commands(spec, model, node), "compile": ["compile", str(spec), "-o", str(node)],
            "graph": ["graph", str(spec), "-o", str(node)]}[command]
    assert main(argv) == 2
    _usage_error(capsys, f"{node} is a character device, not a regular file; not writing to it")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


# --------------------------------------------------------------------------- a name that ends in a slash


@pytest.mark.parametrize("command", ["compile", "fmt --to yaml", "trace"])
def test_a_trailing_slash_names_a_folder(tmp_path, spec, model, capsys, command):
    out = str(tmp_path / "newdir") + "/"
    argv = {**_commands(spec, model, Path("x")), "compile": ["compile", str(spec), "-o", out]}[command]
    argv[-1] = out
    assert main(argv) == 2
    _usage_error(capsys, f"{out} names a folder (it ends in /); give the path of a file")
    assert not (tmp_path / "newdir").exists()


# --------------------------------------------------------------------------- graph: usage errors, exit 2


def test_graph_output_path_problems_are_usage_errors(tmp_path, spec, capsys):
    missing = tmp_path / "nodir" / "x.dot"
    assert main(["graph", str(spec), "-o", str(missing)]) == 2
    _usage_error(capsys, f"cannot write {missing}: the folder {missing.parent} does not exist")
    for name in ("x.txt", "dot", "x.dot.bak"):
        assert main(["graph", str(spec), "-o", str(tmp_path / name)]) == 2
        _usage_error(capsys, f"cannot draw to {tmp_path / name}: the file name must end in .dot, .svg or .png")
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    link = tmp_path / "g.dot"
    link.symlink_to(target)
    assert main(["graph", str(spec), "-o", str(link)]) == 2
    _usage_error(capsys, f"{link} is a symbolic link; not writing through it (remove it or write elsewhere)")
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.dot", "ok.fpi", "precious.txt"]


def test_graph_output_problems_come_before_the_spec_is_read(tmp_path, capsys):
    bad = tmp_path / "bad.fpi"
    bad.write_text("layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = q\n}\n")
    assert main(["graph", str(bad), "-o", str(tmp_path / "g.txt")]) == 2
    _usage_error(capsys, f"cannot draw to {tmp_path / 'g.txt'}: the file name must end in .dot, .svg or .png")
    assert main(["graph", str(bad), "-o", str(tmp_path / "g.dot")]) == 1  # a good output: the spec's error
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:4:14: error: unknown name q")


def test_graph_to_a_file_named_dot(tmp_path, spec, capsys):
    out = tmp_path / ".dot"  # it does end in .dot
    assert main(["graph", str(spec), "-o", str(out)]) == 0
    assert out.read_text().startswith('digraph "L" {')
    upper = tmp_path / "G.DOT"
    assert main(["graph", str(spec), "-o", str(upper)]) == 0
    assert upper.read_text() == out.read_text()


def test_graph_writes_graphviz_output_atomically(tmp_path, spec, capsys, monkeypatch):
    """`dot` prints the picture and fpidsl writes it like any output (not `dot -o PATH` straight onto the path)."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in -o*) echo 'dot was given -o' >&2; exit 9;; esac; done\n"
                    "printf '<svg>'; cat\n")
    fake.chmod(0o755)
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: str(fake) if name == "dot" else None)
    out = tmp_path / "g.svg"
    out.write_text("old")
    assert main(["graph", str(spec), "-o", str(out)]) == 0
    assert out.read_text().startswith('<svg>digraph "L" {')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "g.svg", "ok.fpi"]


# --------------------------------------------------------------------------- fmt prints file names escaped


EVIL = "\x1b[31mevil\u202e.fpi"
SHOWN = "\\x1b[31mevil\\u202e.fpi"
MESSY = "layer   L {\n input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5*x + a\n}\n"


def _fpidsl(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fpidsl", *argv], capture_output=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_fmt_escapes_the_file_names_it_prints(tmp_path):
    (tmp_path / EVIL).write_text(MESSY)
    check = _fpidsl(tmp_path, "fmt", "--check", EVIL)
    assert (check.returncode, check.stdout, check.stderr) == (1, b"", f"would reformat {SHOWN}\n".encode())
    diff = _fpidsl(tmp_path, "fmt", "--diff", EVIL)
    assert diff.returncode == 0 and b"\x1b" not in diff.stdout and "\u202e".encode() not in diff.stdout
    assert diff.stdout.startswith(f"--- {SHOWN}\n+++ {SHOWN} (formatted)\n".encode())
    rewrite = _fpidsl(tmp_path, "fmt", EVIL)
    assert (rewrite.returncode, rewrite.stderr) == (0, f"reformatted {SHOWN}\n".encode())
    assert (tmp_path / EVIL).read_text() == "layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + a\n}\n"
