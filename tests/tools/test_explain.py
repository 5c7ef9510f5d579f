"""`fpidsl explain`: the report's figures against closed forms (parameter counts, a Lipschitz constant) and
against what the layer does (a map that mixes samples, a hoisted product)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fpidsl.cli import main
from fpidsl.compiler import check_file, check_source
from fpidsl.source import Source
from fpidsl.tools.explain import explain_layer

ROOT = Path(__file__).resolve().parents[2]


def test_bibtex_nn(monkeypatch):
    monkeypatch.chdir(ROOT)
    report = explain_layer(check_file("specs/bibtex.fpi"), "BibtexNN")
    lines = report.splitlines()
    assert lines[0] == "layer BibtexNN  (specs/bibtex.fpi:5:1)"
    assert "    x : [B, 1836]" in lines and "    y : [B, 159] = 0" in lines
    # Linear(1995, 512) + Linear(512, 159): weights and biases
    assert f"  parameters: {1995 * 512 + 512 + 512 * 159 + 159:,}" in lines
    assert f"    fc1 = Linear(1995, 512): weight [512, 1995], bias [512]  ({1995 * 512 + 512:,})" in lines
    # fc1(cat([y, x])): the x columns of fc1 and the bias are applied once per solve
    assert "    linear(x, fc1.weight[:, 159:1995], fc1.bias) : [B, 512]  (specs/bibtex.fpi:11:31)" in lines
    assert "  samples: independent (finished samples leave the solve)" in lines
    assert any(line.startswith("  backward map: ") for line in lines)
    assert "  solve: tol=1e-08" in lines and "  backward: defaults" in lines


def test_closed_form_lipschitz_and_mixed_samples():
    text = ("layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  param w : tensor [4, 4]\n"
            "  update x = 0.5 * tanh(x) + 0.25 * (x - mean(x, dim=0)) + a\n}\n"
            "layer K {\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n}\n")
    checked = check_source(Source("t.fpi", text))
    mixed = explain_layer(checked, "L").splitlines()
    assert "  parameters: 16" in mixed and "    w : tensor [4, 4]  (16)" in mixed
    assert "  samples: mixed (g reads across the batch; solved as one problem, judged over the whole batch)" in mixed
    alone = explain_layer(checked, "K").splitlines()
    assert "    x: 0.5  (a contraction)" in alone  # tanh is 1-Lipschitz, times 0.5
    assert "    nothing: every operation of g depends on a state" in alone
    assert "  parameters: 0 (none)" in alone


def test_the_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["explain", "specs/bibtex.fpi"]) == 2
    assert "choose one with --layer (BibtexNN, BibtexGD)" in capsys.readouterr().err
    assert main(["explain", "specs/bibtex.fpi", "--layer", "Nope"]) == 2
    assert "has no layer named 'Nope'; it has: BibtexNN, BibtexGD" in capsys.readouterr().err
    bad = tmp_path / "bad.fpi"
    bad.write_text("layer L {\n  input a : [B]\n  state x : [B]\n  update x = y\n}\n")
    assert main(["explain", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"{bad}:4:14: error: unknown name")


@pytest.mark.parametrize("spec", ["specs/denoise.fpi"])
def test_a_convolutional_layer(spec, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["explain", spec]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "    conv1 = Conv2d(2, 32, 3, padding=1, init_scale=0.1): weight [32, 2, 3, 3], bias [32]  " \
           f"({32 * 2 * 9 + 32})" in out
    assert "    z : [B, 1, H, W]" in out
