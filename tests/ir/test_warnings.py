"""Specs likely not meant: compiler warnings where legal (reported with a position, never raised), one error where a name means two things."""
from __future__ import annotations

import subprocess
import sys

from fpidsl.compiler import check_source
from fpidsl.errors import FpiWarning, render
from fpidsl.source import Source

from .helpers import graph, locate

TRAP = """layer L {
  input a : [B, 4]
  state x : [B, 4]
  update x = 0.5 * sign(x) * max(abs(x) - 0.1, 0) + a
}
"""


def test_max_with_a_number_by_position_warns_at_the_number():
    (warning,) = graph(TRAP).warnings
    assert isinstance(warning, FpiWarning) and warning.kind == "warning"
    assert warning.message.startswith("max(..., 0) reduces over dimension 0 (of a [B, ...] value: over the samples")
    assert (warning.span.line, warning.span.col) == locate(TRAP, "0) + a")
    assert "write maximum(..., 0)" in warning.hint and "max(..., dim=0)" in warning.hint
    text = render(warning, Source("t.fpi", TRAP))
    assert text.startswith("t.fpi:4:48: warning: max(..., 0)")


def test_the_keyword_form_and_maximum_do_not_warn():
    for body in ("max(abs(x), dim=0)", "maximum(abs(x) - 0.1, 0)", "min(x, dim=1, keepdim=true)"):
        text = TRAP.replace("max(abs(x) - 0.1, 0)", body)
        assert graph(text).warnings == [], body


def test_min_with_another_dimension_warns_without_the_batch_note():
    text = TRAP.replace("max(abs(x) - 0.1, 0)", "min(x, 1, keepdim=true)")
    (warning,) = graph(text).warnings
    assert warning.message == "min(..., 1) reduces over dimension 1"


def test_a_warning_in_a_function_used_twice_is_reported_once():
    text = "fn f(v) = max(v, 0)\n" + TRAP.replace("max(abs(x) - 0.1, 0)", "f(x) + f(a)")
    checked = check_source(Source("t.fpi", text))
    assert [(w.span.line, w.span.col) for w in checked.warnings] == [(1, 18)]


def test_check_prints_the_warning_on_stderr_and_succeeds(tmp_path):
    spec = tmp_path / "t.fpi"
    spec.write_text(TRAP)
    done = subprocess.run([sys.executable, "-m", "fpidsl", "check", str(spec)], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout == f"{spec}: ok (1 layer: L)\n"
    assert done.stderr.startswith(f"{spec}:4:48: warning: max(..., 0) reduces over dimension 0")
    assert "hint: for the elementwise maximum with 0, write maximum(..., 0)" in done.stderr


def test_the_editor_shows_warnings_with_the_warning_severity():
    from lsprotocol import types as lsp

    from fpidsl.tools.analysis import analyze
    from fpidsl.tools.lsp import Positions, diagnostic

    result = analyze("t.fpi", TRAP)
    assert result.errors == [] and len(result.warnings) == 1
    shown = diagnostic(Positions.of(TRAP, result.source), result.warnings[0])
    assert shown.severity == lsp.DiagnosticSeverity.Warning
    assert (shown.range.start.line, shown.range.start.character) == (3, 47)  # line 4, column 48 (1-based)


def test_a_size_named_like_a_declared_value_is_one_error_at_its_first_use():
    from fpidsl.errors import ShapeErr

    from .helpers import errors

    text = "layer L {\n  input a : [B, 4]\n  param B : tensor[4, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x @ B) + a\n}\n"
    (error,) = errors(text)
    assert isinstance(error, ShapeErr)
    assert error.message == ("the dimension B of input a has the name of a param (line 3); a size is a number, "
                             "a const or a symbolic dimension")
    assert (error.span.line, error.span.col) == locate(text, "B, 4]")
