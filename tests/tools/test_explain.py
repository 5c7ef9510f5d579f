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


def test_hoisted_values_show_their_static_arguments_and_starts_all_their_digits():
    """`a ** 2` and `a ** 3` are not both `pow(a)`, nor a keepdim sum a plain one; a start of 0.123456789 is not
    printed as 0.123457."""
    text = ("layer L {\n  input a : [B, 4]\n  input b : [B, 4]\n  state x : [B, 4] = 0.123456789\n"
            "  state y : [B, 4] = 0.5\n  update x = 0.5 * tanh(x) + a ** 2 - a ** 3 + clamp(b, -0.5, 0.5)\n"
            "  update y = 0.5 * y + sum(b, dim=1, keepdim=true) + sum(a, dim=1)[:, None]\n}\n")
    lines = explain_layer(check_source(Source("t.fpi", text)), "L").splitlines()
    assert "    x : [B, 4] = 0.123456789" in lines and "    y : [B, 4] = 0.5" in lines
    hoisted = "\n".join(lines)
    assert "pow(a, exponent=2)" in hoisted and "pow(a, exponent=3)" in hoisted
    assert "clamp(b, lo=-0.5, hi=0.5)" in hoisted
    assert "sum(b, dim=1, keepdim=true)" in hoisted and "sum(a, dim=1)[:, None]" in hoisted


def test_the_command_reads_standard_input(capsys, monkeypatch):
    """`explain -` needs --format, as check and compile do; the error for a missing one names the flag it has."""
    import io
    import sys

    text = "layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n}\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert main(["explain", "-", "--format", "fpi"]) == 0
    assert capsys.readouterr().out.startswith("layer L  (<stdin>:1:1)\n")
    assert main(["explain", "-"]) == 2
    assert capsys.readouterr().err == "fpidsl: error: a spec read from standard input (`-`) needs --format fpi or " \
                                      "--format yaml\n"


def test_a_file_name_with_terminal_escapes_is_shown_escaped(tmp_path, capsys):
    """The header (and a hoisted value's span) name the file as check and graph do: escaped, not raw."""
    spec = tmp_path / "\x1b[31mevil\u202e.fpi"
    spec.write_text("layer L {\n  input a : [B, 3]\n  param w : tensor [3]\n  state x : [B, 3]\n"
                    "  update x = 0.5 * x + exp(w) * a\n}\n")
    assert main(["explain", str(spec)]) == 0
    out = capsys.readouterr().out
    shown = f"{tmp_path}/\\x1b[31mevil\\u202e.fpi"
    assert out.startswith(f"layer L  ({shown}:1:1)\n")
    assert f"({shown}:5:" in out  # the hoisted exp(w) * a
    assert "\x1b" not in out and "\u202e" not in out


BIG = "layer L {\n  input a : [B, 8193]\n  state x : [B, 8193]\n  param fc : Linear(8193, 8193, bias=false)\n" \
      "  update x = fc(x) + a\n}\n"


def test_weights_too_large_to_bound_are_an_unknown_bound_with_the_reason(tmp_path, capsys):
    """8193 x 8193 numbers, past MAX_BOUND_NUMBERS: the bound is unknown with the reason, in explain and in check
    --lipschitz, without making the weights (40000 x 40000 ended as exit 3, "can't allocate memory")."""
    spec = tmp_path / "big.fpi"
    spec.write_text(BIG)
    reason = (f"the initial weights are {8193 * 8193:,} numbers, more than the static bound is computed for "
              "(67,108,864)")
    assert main(["explain", str(spec)]) == 0
    assert f"    x: unknown ({reason})\n" in capsys.readouterr().out
    assert main(["check", "--lipschitz", str(spec)]) == 0
    out = capsys.readouterr().out
    assert (f"{spec}:3:3: warning: layer L: the Lipschitz bound of g in x is unknown at the initial weights; "
            f"the fixed-point iterations may not converge\n  because: {reason}\n") in out


TWO = "layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  state y : [B, 3]\n  param fc : Linear(3, 3)\n" \
      "  update x = 0.5 * fc(x) + a\n  update y = 0.5 * y + x\n}\n"


def test_weights_that_do_not_fit_in_the_memory_are_an_unknown_bound(tmp_path, capsys, monkeypatch):
    """torch's allocator refusing the initial weights is an unknown bound for each state and for all together;
    any other error of making them stays an internal error (a bug)."""
    import fpidsl.lipschitz_report as report

    def no_memory(checked, layer):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 6400000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(report, "initial_weights", no_memory)
    spec = tmp_path / "two.fpi"
    spec.write_text(TWO)
    reason = "the initial weights (12 numbers) and their singular values do not fit in the memory"
    assert main(["explain", str(spec)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"    x: unknown ({reason})" in out and f"    y: unknown ({reason})" in out
    assert f"    x, y together: unknown ({reason})" in out
    assert main(["check", "--lipschitz", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"  because: {reason}\n") == 3 and "in its states x, y together is unknown" in out

    def a_bug(checked, layer):
        raise RuntimeError("something else")

    monkeypatch.setattr(report, "initial_weights", a_bug)
    assert main(["explain", str(spec)]) == 3
    assert "fpidsl: internal error: RuntimeError: something else" in capsys.readouterr().err


def test_the_command_names_standard_input_as_stdin(capsys, monkeypatch):
    """`explain -` said "- has 2 layers"; the input is <stdin>, as check names it."""
    import io

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO((ROOT / "specs/bibtex.fpi").read_bytes())))
    assert main(["explain", "-", "--format", "fpi"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "<stdin> has 2 layers; choose one with --layer (BibtexNN, BibtexGD)")
