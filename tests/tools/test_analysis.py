"""The language server's knowledge of a document, position by position (the protocol is in test_lsp.py)."""
from __future__ import annotations

from fpidsl.tools.analysis import analyze, completions, definition, hover

TWO_LAYERS = """\
fn sq(v) = v * v
layer A {
  input a : [B, 4]
  state x : [B, 4]
  const k = 0.5
  update x = k * sq(x) + a
}
layer C {
  input a : [B, 8]
  state x : [B, 8]
  energy E = sum(sq(x - a), dim=-1)
  descend x on E step 0.1
}
"""


def at(text: str, needle: str, offset: int = 0, nth: int = 0) -> tuple[int, int]:
    """1-based (line, col) of the nth occurrence of needle, plus offset columns."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1 + offset


def test_an_fn_body_has_one_shape_per_calling_layer():
    result = analyze("f.fpi", TWO_LAYERS)
    assert result.errors == []
    shapes = hover(result, at(TWO_LAYERS, "v * v", 2)).markdown
    assert shapes == "expression `v * v`\n\n- in A: `[B, 4]`\n- in C: `[B, 8]`"
    assert hover(result, at(TWO_LAYERS, "sq(v)")).markdown == "fn **sq**(v), inlined at each call"
    assert "fn **sq**(v) = `v * v`" in hover(result, at(TWO_LAYERS, "sq(x)")).markdown
    assert hover(result, at(TWO_LAYERS, "k = 0.5")).markdown == "const **k** = `0.5`"
    assert hover(result, at(TWO_LAYERS, "E = sum")).markdown == "energy **E** : `[B]`"


def test_definitions():
    result = analyze("f.fpi", TWO_LAYERS)
    assert definition(result, at(TWO_LAYERS, "v * v")) == result.spec.fns[0].params[0].span
    assert (definition(result, at(TWO_LAYERS, "sq(x)")).line, definition(result, at(TWO_LAYERS, "sq(x)")).col) == (1, 4)
    k_use = definition(result, at(TWO_LAYERS, "k * sq"))
    assert (k_use.line, k_use.col) == at(TWO_LAYERS, "k = 0.5")
    on_e = definition(result, at(TWO_LAYERS, "E step"))
    assert (on_e.line, on_e.col) == at(TWO_LAYERS, "E = sum")
    # `a` in layer C is C's input, not A's
    a_in_c = definition(result, at(TWO_LAYERS, "a)", nth=0))
    assert (a_in_c.line, a_in_c.col) == at(TWO_LAYERS, "a : [B, 8]")
    # a cursor right after a name
    after = definition(result, at(TWO_LAYERS, "k * sq", 1))
    assert (after.line, after.col) == at(TWO_LAYERS, "k = 0.5")


def test_a_file_with_errors_keeps_what_it_knows():
    text = TWO_LAYERS.replace("sum(sq(x - a), dim=-1)", "sum(sq(x - a), dim=-1) + missing")
    result = analyze("f.fpi", text)
    assert [(e.kind, e.span.line) for e in result.errors] == [("name", 11)]
    assert hover(result, at(text, "sq(x) + a", 6)).markdown == "expression `k * sq(x) + a` : `[B, 4]`"
    broken = analyze("f.fpi", "layer L {\n  let h = \n}\n")
    assert [e.kind for e in broken.errors] == ["syntax"] and broken.spec is None
    assert hover(broken, (2, 7)) is None and definition(broken, (2, 7)) is None


def test_completions_while_typing():
    text = TWO_LAYERS.replace("  descend x on E step 0.1\n", "  param fc : Co\n  solve { method = an")
    names = {c.label for c in completions(text, at(text, "energy"))}
    assert {"a", "x", "sq", "relu", "zeros", "let"} <= names and "k" not in names  # k is A's
    modules = {c.label for c in completions(text, at(text, "Co", 2))}
    assert modules == {"Linear", "Conv2d", "ConvTranspose2d", "GroupNorm", "LayerNorm", "Embedding",
                       "Conv1d", "MultiheadAttention", "tensor", "extern"}
    settings = {c.label for c in completions(text, at(text, "= an", 4))}
    assert {"method", "tol", "anderson", "picard"} <= settings and "sq" not in settings


def test_hover_on_dimensions_and_settings():
    text = ("layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * x + a\n"
            "  solve { method = anderson(m=5), tolx = 1e-6 }\n}\n")
    result = analyze("t.fpi", text)
    assert hover(result, at(text, "B, 4]")).markdown.startswith("symbolic dimension **B**: one size")
    halved = "layer L {\n  input a : [B, H]\n  state x : [B, H / 2]\n  update x = 0.5 * x\n}\n"
    assert hover(analyze("t.fpi", halved), at(halved, "H / 2")).markdown.startswith("symbolic dimension **H**")
    method = hover(result, at(text, "method")).markdown
    assert method.startswith("`solve` setting **method**: one of `picard`, `anderson`")
    assert [e.kind for e in result.errors] == ["settings"]
    assert "not a setting" in hover(result, at(text, "tolx")).markdown


def test_a_compiler_bug_is_a_diagnostic_not_silence(monkeypatch):
    import fpidsl.compiler

    def broken(source):
        raise RuntimeError("boom")

    monkeypatch.setattr(fpidsl.compiler, "check_source", broken)
    result = analyze("t.fpi", TWO_LAYERS)
    assert [(e.kind, e.span.line, e.span.col) for e in result.errors] == [("error", 1, 1)]
    assert result.errors[0].message.startswith("internal error: RuntimeError: boom (a bug in fpidsl")


def test_lsp_without_pygls_says_what_to_install(monkeypatch, capsys):
    import sys

    from fpidsl.cli import main

    monkeypatch.setitem(sys.modules, "fpidsl.tools.lsp", None)  # as if pygls were not installed
    assert main(["lsp"]) == 2
    assert "pip install 'fpidsl[lsp]'" in capsys.readouterr().err
