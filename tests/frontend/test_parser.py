"""The .fpi grammar and transformer: what parses to what, and every syntax error's kind, place and words."""
from __future__ import annotations

import pytest

from fpidsl.errors import InputError, SyntaxErr
from fpidsl.frontend import ast
from fpidsl.frontend.parser import parse_fpi
from fpidsl.frontend.read import decode_source
from fpidsl.source import Source


def parse(text: str) -> ast.SpecFile:
    return parse_fpi(Source("t.fpi", text))


def expr_of(text: str) -> ast.Expr:
    spec = parse(f"layer L {{\n  let v = {text}\n}}\n")
    return spec.layers[0].decls[0].value


def show(e) -> str:
    """A compact prefix form of an expression, to compare precedence."""
    if isinstance(e, ast.Num):
        return e.text
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.BinOp):
        return f"({e.op} {show(e.left)} {show(e.right)})"
    if isinstance(e, ast.Neg):
        return f"(- {show(e.operand)})"
    if isinstance(e, ast.Call):
        parts = [show(a) for a in e.args] + [f"{k.name}={show(k.value)}" for k in e.kwargs]
        return f"{e.func.id}({', '.join(parts)})"
    if isinstance(e, ast.ListExpr):
        return "[" + ", ".join(show(i) for i in e.items) + "]"
    if isinstance(e, ast.Index):
        return f"{show(e.value)}[{', '.join(show(i) for i in e.items)}]"
    if isinstance(e, ast.Slice):
        parts = [show(p) if p is not None else "" for p in (e.lo, e.hi, e.step)]
        return ":".join(parts if e.step is not None else parts[:2])
    if isinstance(e, ast.EllipsisIndex):
        return "..."
    raise AssertionError(e)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a + b * c", "(+ a (* b c))"),
        ("a - b - c", "(- (- a b) c)"),
        ("a / b / c", "(/ (/ a b) c)"),
        ("a @ b + c", "(+ (@ a b) c)"),
        ("-a ** 2", "(- (** a 2))"),
        ("a ** -1", "(** a (- 1))"),
        ("a ** 2 ** 3", "(** a (** 2 3))"),
        ("(a + b) * c", "(* (+ a b) c)"),
        ("- - a", "(- (- a))"),
        ("f(a, b, dim=-1, keepdim=true)", "f(a, b, dim=(- 1), keepdim=true)"),
        ("cat([x, a,], dim=1)", "cat([x, a], dim=1)"),
        ("x[:, 0:3]", "x[:, 0:3]"),
        ("x[..., -1]", "x[..., (- 1)]"),
        ("x[::2, 1:]", "x[::2, 1:]"),
        ("x[0][1]", "x[0][1]"),
        ("f()", "f()"),
        ("[]", "[]"),
    ],
)
def test_precedence_and_forms(text, expected):
    assert show(expr_of(text)) == expected


@pytest.mark.parametrize(
    "text, value",
    [("1", 1), ("0.5", 0.5), (".5", 0.5), ("1.", 1.0), ("1e-6", 1e-6), ("1E6", 1e6),
     ("2.5e+3", 2500.0), ("1_000", 1000), ("007", 7)],
)
def test_numbers_in_every_usual_form(text, value):
    num = expr_of(text)
    assert isinstance(num, ast.Num) and num.value == value and type(num.value) is type(value)
    assert num.text == text


def test_spans_are_exact():
    spec = parse("layer L {\n  input a : [B, 10]\n  let h = relu(fc1(a))  # comment\n}\n")
    layer = spec.layers[0]
    assert (layer.name_span.line, layer.name_span.col) == (1, 7)
    let = layer.decls[1]
    assert (let.name_span.line, let.name_span.col, let.name_span.end_col) == (3, 7, 8)
    call = let.value
    assert (call.span.line, call.span.col, call.span.end_col) == (3, 11, 23)
    inner = call.args[0]
    assert (inner.span.col, inner.span.end_col) == (16, 22)
    shape = layer.decls[0].shape
    assert [d.id if isinstance(d, ast.Name) else d.value for d in shape.dims] == ["B", 10]


def test_every_declaration_form():
    spec = parse(
        """
fn sq(v) = v * v
fn two() = 2
layer L {
  input a : [B, 10]
  state x : [B, 10] = a
  state y : [B, 10]
  param fc : Linear(10, 10, bias=false, init_scale=0.1, norm=spectral)
  param w : tensor [10] = normal(0, 0.01)
  param v : tensor [2, 3]
  const k = 0.5
  let h = sq(x)
  energy E = sum(h, dim=-1)
  update x = fc(h) * k
  descend y on E step 0.01
  output x, y + 1
  solve { method = anderson(m=5, beta=0.5), tol = 1e-6, }
  backward { max_iter = 20 }
}
"""
    )
    kinds = [type(d).__name__ for d in spec.layers[0].decls]
    assert kinds == ["InputDecl", "StateDecl", "StateDecl", "ModuleParamDecl", "TensorParamDecl",
                     "TensorParamDecl", "ConstDecl", "LetDecl", "EnergyDecl", "UpdateDecl", "DescendDecl",
                     "OutputDecl", "SettingsDecl", "SettingsDecl"]
    decls = spec.layers[0].decls
    assert decls[2].init is None and decls[5].init is None
    assert [f.name for f in spec.fns] == ["sq", "two"] and spec.fns[1].params == ()
    assert decls[10].energy.id == "E" and show(decls[10].step) == "0.01"
    assert [s.key for s in decls[12].settings] == ["method", "tol"] and decls[12].which == "solve"
    assert decls[13].which == "backward"


# (text, line, col, message fragment, hint fragment or None)
SYNTAX_ERRORS = [
    ("layer L {\n  input a : [B, 10]\n  update x = relu(a\n}\n", 4, 1, "expected ')'", "`(` is not closed"),
    ("layer L {\n  let y = 'os'\n}\n", 2, 11, "string literals in single quotes (or spanning lines) are not part of "
     "the language", "spec is data"),
    ("layer L {\n  let y = __import__('os')\n}\n", 2, 22, "string literals", None),
    ('layer L {\n  let y = einsum("ij\n->i", x)\n}\n', 2, 18, "string literals", "the equation of einsum"),
    ("layer L {\n  let y = a +\n}\n", 3, 1, "expected an expression, found '}'", None),
    ("layer L {\n  input a : [B, 10\n", 2, 19, "unexpected end of input: expected ',' or ']'", "`[` is not"),
    ("layer L {\n  let y = f(x=1, 2)\n}\n", 2, 18, "positional argument follows a keyword", "move it"),
    ("layer L {\n  let y = (a)(b)\n}\n", 2, 14, "found '('", "can be called, by name"),
    ("layer {\n}\n", 1, 7, "expected a name, found '{'", None),
    ("layer L {\n  let y = a $ b\n}\n", 2, 13, "unexpected character '$'", None),
    ("layer L {\n  solve { tol = 1e-6 criterion = relative }\n}\n", 2, 22, "found name 'criterion'", "','"),
    ("layer L {\n  input a : [B, 1.5]\n}\n", 2, 18, "found number .5", None),
    ("layer L {\n  let input = 3\n}\n", 2, 7, "'input' is a keyword", "rename it"),
    ("layer L {\n  input step : [B]\n}\n", 2, 9, "'step' is a keyword", None),
    ("fn on(a) = a\n", 1, 4, "'on' is a keyword", None),
    ("layer L {\n  let y = 1\n", 2, 12, "unexpected end of input", "`{` is not closed"),
    ("layer L {\n  foo y = 1\n}\n", 2, 3, "expected '}' or a declaration, found name 'foo'", None),
    ("layer L {\n  let y = x[]\n}\n", 2, 13, "found ']'", None),
    ("layer L {\n  let y = a ** \n}\n", 3, 1, "expected an expression", None),
    ("layer L {\n  state x : B = zeros\n}\n", 2, 13, "expected '['", None),
    ("layer L {\n  param p : tensor = ones\n}\n", 2, 20, "expected '['", None),
    ("layer L {\n  descend x on E 0.1\n}\n", 2, 18, "expected 'step'", None),
    ("fn f(a, b) a + b\n", 1, 12, "expected '='", None),
    ("let y = 1\n", 1, 1, "expected 'fn', 'layer' or the end of the file", None),
    ("layer L {\n  let y = 1 +* 2\n}\n", 2, 14, "found '*'", None),
    ("layer L {\n  output\n}\n", 3, 1, "expected an expression", None),
    ("layer L {\n  let y = a.b\n}\n", 2, 12, "attribute access ('.b') is not part of the language",
     "functions are called by name"),
    ("layer L {\n  let y = W.T @ x\n}\n", 2, 12, "attribute access ('.T')", "use transpose(W, 0, 1)"),
    ("layer L {\n  let y = (W).T\n}\n", 2, 14, "attribute access ('.T')", "use transpose(x, 0, 1)"),
    ("layer L {\n  let y = sum(x).shape\n}\n", 2, 17, "attribute access ('.shape')", "declared"),
    ("layer L {\n  let y = a < b < c\n}\n", 2, 17, "comparisons do not chain: found a second '<'",
     "(a < b) * (b < c)"),
    ("layer L {\n  let y = f(a < b, c) > d > e\n}\n", 2, 27, "comparisons do not chain: found a second '>'", None),
    ("layer L {\n  input a : [B, C > 2]\n}\n", 2, 19, "a comparison is not allowed here", "declared shape"),
    ("layer L {\n  let y = a = b\n}\n", 2, 13, "found '='", None),
    ("layer L {\n  let y = a =< b\n}\n", 2, 13, "found '='", None),
    ("layer L {\n  let y = 1e\n}\n", 2, 12, "found name 'e'", None),
]


@pytest.mark.parametrize("text, line, col, message, hint", SYNTAX_ERRORS)
def test_syntax_errors(text, line, col, message, hint):
    with pytest.raises(SyntaxErr) as info:
        parse(text)
    error = info.value
    assert error.kind == "syntax"
    assert (error.span.path, error.span.line, error.span.col) == ("t.fpi", line, col), error.message
    assert message in error.message
    if hint is not None:
        assert error.hint is not None and hint in error.hint


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty"),
        (b"   \n# only a comment\n", "is empty"),
        (b"layer L {\n  let y = \xff\n}\n", "is not UTF-8"),
        (b"#" * 1_000_001, "larger than"),
    ],
)
def test_bad_files(data, message):
    with pytest.raises(InputError) as info:
        decode_source("bad.fpi", data)
    assert message in info.value.message
    assert info.value.kind == "input"


def test_not_utf8_points_at_the_byte():
    with pytest.raises(InputError) as info:
        decode_source("bad.fpi", b"layer L {\n  let y = \xff\n}\n")
    assert (info.value.span.line, info.value.span.col) == (2, 11)


def test_comparisons_bind_looser_than_arithmetic_and_floordiv_like_division():
    from fpidsl.frontend.parser import Placement, parse_expr

    e = parse_expr("x + 1 > 2 * y // 3", Placement("t.fpi"))
    assert isinstance(e, ast.BinOp) and e.op == ">"
    assert (e.left.op, e.right.op, e.right.left.op) == ("+", "//", "*")
    for op in ("<", "<=", ">", ">=", "==", "!="):
        assert parse_expr(f"a {op} b", Placement("t.fpi")).op == op
    assert parse_expr("where(a>=0, a, 0)", Placement("t.fpi")).args[0].op == ">="


def test_index_items_none_are_names_and_declared_dims_take_arithmetic():
    from fpidsl.frontend.parser import Placement, parse_dim, parse_shape

    shape = parse_shape("[B, H / 2, (C + 1) // 2, T*D - 1]", Placement("t.fpi"))
    b, half, ceil, flat = shape.dims
    assert isinstance(b, ast.Name) and (half.op, ceil.op, flat.op, flat.left.op) == ("/", "//", "-", "*")
    assert (ceil.span.col, ceil.span.end_col) == (12, 24)  # from the `(`
    assert parse_dim("C // 2", Placement("t.yaml", 3, 10)).span.col == 10
    layer = parse("layer L {\n  let y = x[:, None]\n}\n").layers[0]
    assert layer.decls[0].value.items[1] == ast.Name("None", layer.decls[0].value.items[1].span)
