"""`fpidsl fmt`: the canonical layout, every comment kept, idempotent, and never a change of meaning: every
shipped spec (specs/, any zoo under it, benchmarks/specs, tests/specs) and every ```fpi block of the docs
formats to a file with the same graph and the same emitted code."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fpidsl.cli import main
from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors, SyntaxErr, as_list
from fpidsl.frontend.parser import parse_fpi
from fpidsl.frontend.read import read_source
from fpidsl.source import Source
from fpidsl.tools.fmt import format_source
from fpidsl.tools.tokens import tokens

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIRS = [ROOT / "specs", ROOT / "benchmarks" / "specs", ROOT / "tests" / "specs", ROOT / "zoo"]
# every .fpi file of the repository (a zoo wherever it lands), outside hidden folders and node_modules
FPI_SPECS = sorted(p for p in ROOT.rglob("*.fpi")
                   if not any(part.startswith(".") or part == "node_modules" for part in p.relative_to(ROOT).parts))
YAML_SPECS = sorted(p for d in SPEC_DIRS if d.exists() for ext in ("*.yaml", "*.yml") for p in d.rglob(ext))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def graph_text(checked) -> str:
    """The graphs' text form without the `# file:line:col` trailers (formatting moves lines)."""
    text = "\n\n".join(g.format() for g in checked.graphs.values())
    return "\n".join(line.split("#")[0].rstrip() for line in text.splitlines())


def code_text(checked) -> str:
    """The emitted module without what depends on the file's name and positions: the source hash, `# file:line:col`
    comments, `(line N)` in docstrings and positions quoted in messages."""
    from fpidsl.codegen.emit import emit_module

    out = []
    name = Path(checked.source.path).name
    for line in emit_module(checked).replace(name, "SPEC").splitlines():
        if line.startswith("# spec sha256:"):
            continue
        line = re.sub(r"  # SPEC:\d+:\d+$", "", line)
        line = re.sub(r"\(line \d+\)", "(line N)", line)
        out.append(re.sub(r"SPEC:\d+:\d+", "SPAN", line))
    return "\n".join(out)


def comments(text: str, path: str = "x.fpi") -> list[str]:
    return [t.text.rstrip() for t in tokens(Source(path, text)) if t.is_comment]


@pytest.mark.parametrize("spec", FPI_SPECS, ids=rel)
def test_formatting_a_shipped_spec_keeps_graph_code_and_comments(spec, monkeypatch):
    monkeypatch.chdir(ROOT)
    source = read_source(rel(spec))
    try:
        parse_fpi(source)
    except SyntaxErr as expected:  # a fixture kept for its syntax error: refused with the parser's own error
        with pytest.raises(SyntaxErr) as info:
            format_source(source)
        assert (info.value.message, info.value.span) == (expected.message, expected.span)
        return
    text = format_source(source)
    assert format_source(Source(source.path, text)) == text, "not idempotent"
    assert comments(text) == comments(source.text)
    try:
        before = check_source(source)
    except (FpiError, FpiErrors) as exc:  # a spec kept for its errors: the formatted one has the same errors
        with pytest.raises(type(exc)) as again:
            check_source(Source(source.path, text))
        assert [e.message for e in as_list(again.value)] == [e.message for e in as_list(exc)]
        return
    after = check_source(Source(source.path, text))
    assert graph_text(after) == graph_text(before)
    assert code_text(after) == code_text(before)


def _doc_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```fpi":
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                blocks.append((f"{doc.name}:{i + 1}", "\n".join(lines[i + 1:j]) + "\n"))
                i = j
            i += 1
    return blocks


DOC_BLOCKS = _doc_blocks()


@pytest.mark.parametrize("where,text", DOC_BLOCKS, ids=[w for w, _ in DOC_BLOCKS])
def test_formatting_doc_blocks(where, text):
    """Every ```fpi block of the docs (bad ones included): the formatter refuses what does not parse with the
    parser's own error, and formats the rest idempotently with the same AST (format_source checks it)."""
    source = Source("doc.fpi", text)
    try:
        parse_fpi(source)
    except SyntaxErr as expected:
        with pytest.raises(SyntaxErr) as info:
            format_source(source)
        assert (info.value.message, info.value.span) == (expected.message, expected.span)
        return
    formatted = format_source(source)
    assert format_source(Source("doc.fpi", formatted)) == formatted
    assert comments(formatted) == comments(text)
    try:
        before = check_source(source)
    except (FpiError, FpiErrors):
        return
    assert graph_text(check_source(Source("doc.fpi", formatted))) == graph_text(before)


MESSY = """\
# header

# second header
fn sq(v)=v*v   # square
layer   L{   # the layer
  input a:[B,10]
  state x :[B, 10,] = -0.5   # init
  param fc: Linear(20,10,init_scale=0.1,)


  # lets
  let h = relu(fc(cat([x,a],dim=-1)))   +  sq(x[:, 0:10])   # long
  let k = h *
     2 +  # two
          # own comment
     x ** 2
  update x = h
  solve{tol=1e-6,max_iter=30,}
  backward {}
  output x
  # end
}
layer M { input a : [B] state x : [B] update x = a
          descend x on E step 1e-2  energy E = sum(square(x- -a) , dim = -1) }
# trailing
"""

CANONICAL = """\
# header

# second header
fn sq(v) = v * v  # square

layer L {  # the layer
  input a : [B, 10]
  state x : [B, 10] = -0.5  # init
  param fc : Linear(20, 10, init_scale=0.1)

  # lets
  let h = relu(fc(cat([x, a], dim=-1))) + sq(x[:, 0:10])  # long
  let k = h *
      2 +  # two
      # own comment
      x ** 2
  update x = h
  solve { tol = 1e-6, max_iter = 30 }
  backward {}
  output x
  # end
}

layer M {
  input a : [B]
  state x : [B]
  update x = a
  descend x on E step 1e-2
  energy E = sum(square(x - -a), dim=-1)
}

# trailing
"""


def test_the_canonical_layout():
    assert format_source(Source("messy.fpi", MESSY)) == CANONICAL
    assert format_source(Source("messy.fpi", CANONICAL)) == CANONICAL


def test_trailing_comments_of_consecutive_lines_are_aligned():
    text = "layer L {\n  input a : [B, 10] # the data\n  state x : [B, 10] = zeros # the estimate\n" \
           "  update x = a\n}\n"
    assert format_source(Source("a.fpi", text)).splitlines()[1:3] == [
        "  input a : [B, 10]          # the data",
        "  state x : [B, 10] = zeros  # the estimate",
    ]


def test_multiline_brackets_indent_by_their_opening_line():
    text = "layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  solve {\ntol = 1e-6,   # tight\n" \
           "max_iter = 10,\n      }\n  update x = 0.5 * tanh(cat([x,\n   a], dim=-1)[:, 0:4]\n  )\n}\n"
    assert format_source(Source("b.fpi", text)) == (
        "layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  solve {\n    tol = 1e-6,  # tight\n"
        "    max_iter = 10,\n  }\n  update x = 0.5 * tanh(cat([x,\n    a], dim=-1)[:, 0:4]\n  )\n}\n")


def test_a_layer_header_is_one_line():
    assert format_source(Source("h.fpi", "layer L\n{\n  input a : [B]\n  state x : [B]\n  update x = a }\n")) == \
        "layer L {\n  input a : [B]\n  state x : [B]\n  update x = a\n}\n"
    assert format_source(Source("h.fpi", "layer L  # why\n{ input a : [B] state x : [B] update x = a }\n")) == \
        "layer L  # why\n{\n  input a : [B]\n  state x : [B]\n  update x = a\n}\n"


def test_operators_keep_their_meaning():
    """Spacing never merges tokens or moves a unary minus: these parse to the same AST (format_source checks
    it and raises FormatBug otherwise) and read canonically."""
    text = "layer L{input a:[B,4] state x:[B,4] let p = -x**2- -a*-2 let q=x[...,1:]@x[:,::2] update x=p}\n"
    out = format_source(Source("c.fpi", text))
    assert "  let p = -x ** 2 - -a * -2\n" in out
    assert "  let q = x[..., 1:] @ x[:, ::2]\n" in out


def test_a_double_negation_keeps_its_space():
    """``- - x`` read as ``--x`` before (the same AST, but not how anyone writes it); both printers keep a space."""
    from fpidsl.frontend import ast
    from fpidsl.source import Span
    from fpidsl.tools.unparse import expr

    text = "layer L{input a:[B,4] state x:[B,4] update x = - - x + -(-a) - - -1}\n"
    assert "  update x = - -x + -(-a) - - -1\n" in format_source(Source("n.fpi", text))
    at = Span("n.fpi", 1, 1, 1, 2)
    assert expr(ast.Neg(ast.Neg(ast.Name("x", at), at), at)) == "- -x"


def test_a_syntax_error_is_the_parsers():
    with pytest.raises(SyntaxErr) as info:
        format_source(Source("bad.fpi", "layer L {\n  let h = \n}\n"))
    assert (info.value.span.line, info.value.span.col) == (3, 1)


# --------------------------------------------------------------------------- the command


def test_check_diff_and_rewrite(tmp_path, capsys):
    messy = tmp_path / "messy.fpi"
    messy.write_text(MESSY)
    assert main(["fmt", "--check", str(messy)]) == 1
    assert f"would reformat {messy}" in capsys.readouterr().err
    assert main(["fmt", "--diff", str(messy)]) == 0
    diff = capsys.readouterr().out
    assert diff.startswith(f"--- {messy}\n+++ {messy} (formatted)\n")
    assert "\n-fn sq(v)=v*v   # square\n" in diff and "\n+fn sq(v) = v * v  # square\n" in diff
    assert messy.read_text() == MESSY, "--check and --diff change nothing"
    assert main(["fmt", str(messy)]) == 0
    assert messy.read_text() == CANONICAL
    assert main(["fmt", "--check", str(messy)]) == 0
    assert capsys.readouterr().err == f"reformatted {messy}\n"


def test_bad_input_and_wrong_use(tmp_path, capsys):
    bad = tmp_path / "bad.fpi"
    bad.write_text("layer L {\n  input a [B]\n}\n")
    good = tmp_path / "good.fpi"
    good.write_text(CANONICAL)
    assert main(["fmt", "--check", str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{bad}:2:11: error: expected ':'")
    assert bad.read_text() == "layer L {\n  input a [B]\n}\n"
    assert main(["fmt", str(ROOT / "specs" / "box_projection.yaml")]) == 2
    assert "convert YAML with --to fpi" in capsys.readouterr().err
    assert main(["fmt", "--to", "yaml", str(good), str(good)]) == 2
    assert main(["fmt", "-o", str(tmp_path / "x"), str(good)]) == 2


def test_the_installed_command(tmp_path):
    spec = tmp_path / "s.fpi"
    spec.write_text(MESSY)
    done = subprocess.run([sys.executable, "-m", "fpidsl", "fmt", "--check", str(spec)], capture_output=True,
                          text=True, cwd=ROOT)
    assert (done.returncode, done.stderr) == (1, f"would reformat {spec}\n")


# --------------------------------------------------------------------------- property: any text that parses


def _layout_mutations():
    """Shipped specs with their layout scrambled: spaces, tabs, line breaks, blank lines and comments between
    any two tokens. Each still parses (whitespace and comments only separate tokens)."""
    from hypothesis import strategies as st

    texts = {rel(p): p.read_text() for p in FPI_SPECS}
    token = re.compile(r'#[^\n]*|\s+|"[^"\n]*"|[A-Za-z_][A-Za-z0-9_]*|\d[\d_.eE+-]*|\*\*|//|[<>=!]=|\.\.\.|\S')

    @st.composite
    def build(draw):
        name = draw(st.sampled_from(sorted(texts)))
        pieces = [p for p in token.findall(texts[name]) if not p.isspace()]
        out = []
        for piece in pieces:
            out.append(piece)
            if piece.startswith("#"):
                out.append("\n")
                continue
            out.append(draw(st.sampled_from([" ", " ", " ", "  ", "\t", "\n", "\n\n\n", " # note\n"])))
        return name, "".join(out)

    return build()


def test_scrambled_layouts_format_idempotently():
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_layout_mutations())
    def check(case):
        name, text = case
        source = Source(name, text)
        parse_fpi(source)  # still a valid spec
        once = format_source(source)  # raises FormatBug if the AST or a comment changed
        assert format_source(Source(name, once)) == once
        assert comments(once) == comments(text)

    check()


def test_standard_input(tmp_path):
    def fmt(*argv, text):
        return subprocess.run([sys.executable, "-m", "fpidsl", "fmt", *argv], input=text, capture_output=True,
                              text=True, cwd=ROOT)

    done = fmt("-", text=MESSY)
    assert (done.returncode, done.stdout, done.stderr) == (0, CANONICAL, "")
    done = fmt("--check", "-", text=MESSY)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "would reformat <stdin>\n")
    done = fmt("-", text="layer L {\n  input a [B]\n}\n")
    assert done.returncode == 1 and done.stderr.startswith("<stdin>:2:11: error: expected ':'")
    assert "    2 |   input a [B]" in done.stderr
    done = fmt("--to", "yaml", "-", text=CANONICAL)
    assert done.returncode == 0 and "  M:\n    inputs:\n      a: \"[B]\"\n" in done.stdout
