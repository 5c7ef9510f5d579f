"""`fpidsl graph`: DOT from the networkx graph; SVG and PNG rendered by Graphviz's `dot` for real."""
from __future__ import annotations

import shutil

import pytest

from fpidsl.cli import main


def test_dot_has_every_node_and_the_update_edge(tmp_path):
    out = tmp_path / "g.dot"
    assert main(["graph", "specs/denoise.fpi", "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith('digraph "DenoiseNN" {')
    assert 'label="state x\\n[B, 1, H, W]"' in text and "conv2d" in text
    assert 'style=dashed, constraint=false, label="next x"' in text


def test_several_layers_need_a_choice(tmp_path, capsys):
    assert main(["graph", "specs/box_projection.fpi", "-o", str(tmp_path / "g.dot")]) == 2
    assert "choose one with --layer" in capsys.readouterr().err
    assert main(["graph", "specs/box_projection.fpi", "--layer", "BoxProjectionGD",
                 "-o", str(tmp_path / "g.dot")]) == 0


def test_unknown_format_is_an_error(tmp_path, capsys):
    assert main(["graph", "specs/denoise.fpi", "-o", str(tmp_path / "g.pdf")]) == 2  # a usage error (LIMITS.md)
    assert "must end in .dot, .svg or .png" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed (apt-get install graphviz)")
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<svg"), (".png", b"\x89PNG")])
def test_render_with_graphviz(tmp_path, suffix, magic):
    out = tmp_path / f"g{suffix}"
    assert main(["graph", "specs/optical_flow.fpi", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert magic in data[:1000]


def test_missing_graphviz_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["graph", "specs/denoise.fpi", "-o", str(tmp_path / "g.svg")]) == 1
    err = capsys.readouterr().err
    assert "needs Graphviz's `dot` program" in err and "graphviz" in err


def test_missing_output_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["graph", "specs/denoise.fpi", "-o", str(tmp_path / "no" / "g.dot")]) == 2
    assert "does not exist" in capsys.readouterr().err
