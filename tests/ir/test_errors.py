"""Malformed layer specs: each gives the expected error kind, at the expected line and column, with the
expected words. The place is given by an anchor in the text (its first occurrence, or its ``nth``); a
``|`` in the anchor marks the exact column."""
from __future__ import annotations

import pytest

from fpidsl.errors import NameErr, SettingsErr, ShapeErr, StructureErr, TypeErr

from .helpers import errors, layer

L = layer
IMG = "input z : [B, 1, H, W]\n  state x : [B, 1, H, W]"

CASES = [
    # --- names
    ("unknown-name", L("update x = y"), NameErr, "y\n", "unknown name y"),
    ("unknown-name-hint", L("update x = aa"), NameErr, "aa", "unknown name aa"),
    ("unknown-function", L("update x = relux(x)"), NameErr, "relux", "unknown function relux"),
    ("unknown-module", L("param fc : Dense(10, 10)\n  update x = a"), NameErr, "Dense", "unknown module Dense"),
    ("declared-twice", L("let a = x\n  update x = a"), NameErr, "let |a", "a is already declared at line 2 (an input)"),
    ("shadows-builtin", L("let relu = x\n  update x = a"), NameErr, "let |relu", "shadows the built-in function relu"),
    ("shadows-fn", "fn f(u) = u\n" + L("let f = x\n  update x = a"), NameErr, "let |f", "f shadows the fn f"),
    ("fn-shadows-builtin", "fn tanh(u) = u\n" + L("update x = a"), NameErr, "tanh", "fn tanh shadows the built-in"),
    ("fn-unknown-name", "fn f(u) = u + v\n" + L("update x = f(a)"), NameErr, "v\n", "unknown name v in an fn body"),
    ("fn-param-twice", "fn f(u, u) = u\n" + L("update x = a"), NameErr, "u, |u", "has two parameters named u"),
    ("output-unknown", L("update x = a\n  output x, nothing"), NameErr, "nothing", "unknown name nothing"),
    ("update-unknown-state", L("update x = a\n  update z = a"), NameErr, "update |z", "update of an unknown state z"),
    ("reserved-word-as-value", L("update x = normal"), NameErr, "normal", "normal is not a value here"),
    ("constructor-as-value", L("update x = zeros"), TypeErr, "zeros", "zeros is a function, not a value"),
    ("duplicate-layer", L("update x = a") + L("update x = a"), NameErr, ("layer |L", 2), "layer L is already defined"),
    # --- types and arguments
    ("builtin-arity", L("update x = relu(x, a)"), TypeErr, "a)", "relu takes 1 argument, but 2 were given"),
    ("unknown-keyword", L("update x = x + sum(x, dims=1)"), TypeErr, "dims", "sum has no argument dims"),
    ("duplicate-keyword", L("update x = leaky_relu(x, 0.1, slope=0.2)"), TypeErr, "slope=", "got slope twice"),
    ("missing-argument", L("update x = clamp(x, -1)"), TypeErr, "clamp(", "clamp needs hi"),
    ("tensor-for-number", L("update x = x + sum(x, dim=a)"), TypeErr, "a)",
     "dim of sum must be a dimension index or a list of them, but a is an input"),
    ("bool-argument", L("update x = x + sum(x, dim=1, keepdim=1)"), TypeErr, "1)", "keepdim of sum must be true or false"),
    ("float-for-int", L("update x = softmax(x, dim=1.0)"), TypeErr, "1.0", "dim of softmax must be a dimension index"),
    ("tensor-exponent-base", L("update x = 0 ** a"), TypeErr, "0 **",
     "the base of ** with a tensor exponent must be positive, found 0"),
    ("string-as-tensor", L('update x = x * "ij"'), TypeErr, '"ij"', "a string is not a tensor"),
    ("einsum-bad-letter", L('update x = einsum("bi,i1->b", x, a)'), TypeErr, '1->',
     "unexpected character '1' in the einsum equation"),
    ("einsum-output-letter", L('update x = einsum("bi,bi->bk", x, a)'), TypeErr, 'k"',
     "the output letter k is not a letter of any operand"),
    ("einsum-operand-count", L('update x = einsum("bi->b", x, a)'), TypeErr, "a)",
     'the equation "bi->b" names 1 operand, but einsum was given 2'),
    ("einsum-sizes", L('param W : tensor [3, 10] = zeros\n  update x = einsum("bi,ij->bj", x, W)'), ShapeErr, "W)",
     "einsum's letter i is 10 in operand 0 but 3 in operand 1"),
    ("einsum-no-equation", L("update x = einsum(x, a)"), TypeErr, "x, a",
     "the first argument of einsum is its equation"),
    ("einsum-diagonal", L('update x = einsum("bii->b", x)'), TypeErr, 'i->', "the letter i appears twice in operand 0"),
    ("einsum-ellipsis", L('update x = einsum("...i->i", x)'), TypeErr, '->i"', "an operand has `...` but the output does not"),
    ("solve-shape", L("update x = solve(a, x)"), ShapeErr, "a, x", "solve needs a square matrix A"),
    ("list-as-tensor", L("update x = [x, a]"), TypeErr, "[x, a]", "a list is not a tensor"),
    ("module-as-value", L("param fc : Linear(10, 10)\n  update x = fc"), TypeErr, "= |fc",
     "fc is a param module (Linear(10, 10)), not a value"),
    ("call-a-non-module", L("update x = a(x)"), TypeErr, "a(x)", "a is an input, not a function"),
    ("module-two-args", L("param fc : Linear(10, 10)\n  update x = fc(x, a)"), TypeErr, "fc(x",
     "it takes one argument, but 2 were given"),
    ("module-keyword-arg", L("param fc : Linear(10, 10)\n  update x = fc(x=x)"), TypeErr, "fc(x=",
     "fc is a Linear(10, 10) module: it takes its one argument by position, not by keyword"),
    ("fn-arity", "fn f(u) = u\n" + L("update x = f(a, x)"), TypeErr, "x)\n", "fn f takes 1 argument, but 2 were given"),
    ("grad-of-non-energy", L("let h = sum(x, dim=-1)\n  update x = x - grad(h, x)"), TypeErr, "h, x",
     "grad needs an energy, but the let h is not one"),
    ("grad-wrt-non-state", L("energy E = sum(x, dim=-1)\n  update x = x - grad(E, a)"), TypeErr, "a)\n",
     "grad differentiates with respect to a state, but the input a is not one"),
    ("descend-on-non-energy", L("let h = sum(x, dim=-1)\n  descend x on h step 0.1"), TypeErr, "on |h",
     "descend needs an energy, but the let h is not one"),
    ("const-not-number", L("const c = a\n  update x = a"), TypeErr, "= |a\n", "const c must be a number"),
    ("bad-linear-size", L("param fc : Linear(0, 10)\n  update x = a"), TypeErr, "0, 10", "in must be a positive integer"),
    ("output-padding", IMG.join(["layer L {\n  ", "\n  param up : ConvTranspose2d(1, 1, 3, stride=2, output_padding=2)"
                                 "\n  update x = z\n}\n"]), TypeErr, "output_padding=|2",
     "output_padding must be smaller than the stride"),
    ("unknown-norm", L("param fc : Linear(10, 10, norm=spectal)\n  update x = a"), TypeErr, "spectal", "unknown norm"),
    ("bad-tensor-init", L("param w : tensor [10] = gaussian(0, 1)\n  update x = a"), TypeErr, "gaussian",
     "a tensor param starts as zeros, ones, a number, normal(mean, std) or uniform(lo, hi)"),
    ("slice-bound-tensor", L("update x = a[:, 0:x]"), TypeErr, "0:|x", "an index must be an integer"),
    # --- shapes
    ("update-shape", L("update x = sum(x, dim=-1)"), ShapeErr, "sum(",
     "update x has shape [B], but the state x has shape [B, 10]"),
    ("linear-features", L("param fc : Linear(20, 10)\n  update x = fc(x)"), ShapeErr, "fc(x)",
     "Linear(20, 10) expects 20 input features, but its argument has shape [B, 10]"),
    ("conv-channels", IMG.join(["layer L {\n  ", "\n  param c1 : Conv2d(2, 32, 3, padding=1)\n"
                                "  param c2 : Conv2d(32, 1, 3, padding=1)\n"
                                "  update x = c2(relu(c1(cat([x, z, z], dim=1))))\n}\n"]), ShapeErr, "c1(cat",
     "Conv2d(2, 32, 3) expects 2 input channels, but its argument has shape [B, 3, H, W]"),
    ("conv-rank", L("param c : Conv2d(10, 10, 1)\n  update x = c(x)"), ShapeErr, "c(x)", "expects a 4-D input"),
    ("symbol-conflict", L("update x = x + b", head="input a : [B, 10]\n  input b : [C, 10]\n  state x : [B, 10]"),
     ShapeErr, "x + b", "B vs C"),
    ("broadcast", L("update x = x + a[:, 0:3]"), ShapeErr, "x + a", "do not broadcast: 10 vs 3 in dimension -1"),
    ("cat-shapes", L("let c = cat([x, a[:, 0:5]], dim=0)\n  update x = a"), ShapeErr, "a[:, 0:5]",
     "cat along dim 0 needs the other dimensions to agree"),
    ("slice-range", L("update x = a[:, 0:12]"), ShapeErr, "0:12", "slice 0:12 out of range for dimension of size 10"),
    ("index-range", L("let p = a[:, 10]\n  update x = a"), ShapeErr, ":, |10]", "index 10 out of range"),
    ("reduce-dim-range", L("update x = x + sum(x, dim=2)"), ShapeErr, "dim=|2", "dim=2 is out of range"),
    ("reshape-count", L("let r = reshape(a, [B, 3, 3])\n  update x = a"), ShapeErr, "[B, 3, 3]",
     "reshape cannot turn [B, 10] (10*B elements) into [B, 3, 3] (9*B elements)"),
    ("matmul", L("param w : tensor [5, 10]\n  update x = x @ w"), ShapeErr, "x @ w", "(10 vs 5)"),
    ("energy-not-scalar", L("energy E = square(x)\n  descend x on E step 0.1"), ShapeErr, "square(",
     "energy E must be one value per sample (shape [] or [B]), but it has shape [B, 10]"),
    ("energy-other-batch", L("energy E = sum(c, dim=-1)\n  descend x on E step 0.1",
                             head="input a : [B, 10]\n  input c : [C, 10]\n  state x : [B, 10]\n"
                                  "  state w : [C, 10]\n  update w = c"), ShapeErr, "descend",
     "grad: the energy has one value per sample ([C])"),
    ("tensor-symbolic", L("param w : tensor [B, 10]\n  update x = a"), ShapeErr, "tensor [|B",
     "has a fixed size, but its dimension B is symbolic"),
    ("unbound-dim", L("state y : [B, K] = zeros\n  update x = a\n  update y = y"), ShapeErr, "K]",
     "the dimension K of state y is not a dimension of any input"),
    ("init-shape", L("state y : [B, 10] = a[:, 0:2]\n  update x = a\n  update y = y"), ShapeErr, "= |a[",
     "the initial value of state y has shape [B, 2]"),
    # --- structure
    ("no-update", L("let h = x"), StructureErr, "state |x", "state x has no update"),
    ("two-updates", L("update x = a\n  update x = x"), StructureErr, ("update |x", 2), "state x is already updated at line 4"),
    ("update-and-descend", L("energy E = sum(x)\n  update x = a\n  descend x on E step 1"), StructureErr,
     "descend |x", "state x is already updated"),
    ("update-non-state", L("let h = a\n  update h = a\n  update x = a"), StructureErr, "update |h",
     "h is a let, not a state"),
    ("init-uses-state", L("state y : [B, 10] = x\n  update x = a\n  update y = y"), StructureErr, "= |x\n",
     "the initial value of state y cannot use the state x"),
    ("init-uses-let-of-state", L("let h = relu(x)\n  state y : [B, 10] = h\n  update x = a\n  update y = y"),
     StructureErr, "= |h\n", "cannot use the let h: it depends on the state x"),
    ("cyclic-lets", L("let h = k + 1\n  let k = h * 2\n  update x = h"), StructureErr, "h * 2",
     "let h is defined in terms of itself (h → k → h)"),
    ("recursive-fn", "fn f(u) = g(u)\nfn g(u) = f(u) + 1\n" + L("update x = f(a)"), StructureErr, "f(u) +",
     "fn f calls itself (f → g → f)"),
    ("no-state", "layer L {\n  input a : [B, 10]\n}\n", StructureErr, "L {", "layer L has no state"),
    ("two-outputs", L("update x = a\n  output x\n  output a"), StructureErr, "output a",
     "already has an output declaration"),
    # --- settings
    ("unknown-setting", L("update x = a\n  solve { tolerance = 1e-6 }"), SettingsErr, "tolerance",
     "unknown solve setting tolerance"),
    ("bad-criterion", L("update x = a\n  backward { criterion = rel }"), SettingsErr, "rel ",
     "criterion must be relative or absolute, found rel"),
    ("anderson-m", L("update x = a\n  solve { method = anderson(m=0) }"), SettingsErr, "0)", "m must be an integer >= 1"),
    ("unknown-method", L("update x = a\n  solve { method = newton }"), SettingsErr, "newton", "unknown method newton"),
    ("max-iter-float", L("update x = a\n  solve { max_iter = 10.5 }"), SettingsErr, "10.5", "max_iter must be an integer"),
    ("min-over-max", L("update x = a\n  solve { max_iter = 10, min_iter = 20 }"), SettingsErr, "min_iter",
     "min_iter = 20 is larger than max_iter = 10"),
    ("m-with-picard", L("update x = a\n  solve { method = picard, m = 3 }"), SettingsErr, "m = 3",
     "m applies to method = anderson"),
    ("setting-twice", L("update x = a\n  solve { tol = 1e-3, tol = 1e-4 }"), SettingsErr, "tol = 1e-4", "tol is set twice"),
    ("two-solve-blocks", L("update x = a\n  solve { tol = 1e-3 }\n  solve { tol = 1e-4 }"), SettingsErr,
     ("solve {", 2), "already has a solve block"),
]


def _where(text, anchor):
    anchor, nth = anchor if isinstance(anchor, tuple) else (anchor, 1)
    offset = anchor.index("|") if "|" in anchor else 0
    plain = anchor.replace("|", "")
    pos = -1
    for _ in range(nth):
        pos = text.index(plain, pos + 1)
    pos += offset
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


@pytest.mark.parametrize("text, kind, anchor, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed(text, kind, anchor, fragment):
    found = errors(text)
    line, col = _where(text, anchor)
    matching = [e for e in found if fragment in e.message]
    assert matching, f"no error says {fragment!r}: {[str(e) for e in found]}"
    err = matching[0]
    assert type(err) is kind, str(err)
    assert (err.span.line, err.span.col) == (line, col), str(err)


def test_enough_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("text, hint", [
    (L("update x = aa"), "did you mean `a`?"),
    (L("update x = relux(x)"), "did you mean `relu`?"),
    (L("update x = x + sum(x, dims=1)"), "did you mean `dim`?"),
    (L("update x = a\n  solve { max_iters = 3 }"), "did you mean `max_iter`?"),
    (L("update x = a\n  solve { method = andersen }"), "did you mean `anderson`?"),
    (L("param fc : Linear(10, 10, norm=spectal)\n  update x = a"), "did you mean `spectral`?"),
    (IMG.join(["layer L {\n  ", "\n  param c1 : Conv2d(2, 32, 3, padding=1)\n  update x = c1(cat([x, z, z], dim=1))\n}\n"]),
     "the cat joins the state x (1) + the input z (1) + the input z (1) = 3 along dim 1"),
    ("fn f(u) = u * 2 + q\n" + L("update x = f(a)"), "an fn sees only its parameters (u)"),
])
def test_hints(text, hint):
    assert any(e.hint and hint in e.hint for e in errors(text)), [(str(e), e.hint) for e in errors(text)]


def test_every_error_of_a_file_is_reported_in_order():
    text = L("let p = y\n  let q = relu(x, x)\n  update x = a\n  solve { tol = 0 }")
    found = errors(text)
    assert [type(e) for e in found] == [NameErr, TypeErr, SettingsErr]
    assert [e.span.line for e in found] == [4, 5, 7]


@pytest.mark.parametrize("body", [
    "param fc : Linear(20, 10)\n  update x = relu(fc(x)) + 1",   # the update's shape is unknown, not wrong
    "update x = relu(y) * 2 + y",                                 # one unknown name, twice: two errors, no more
    "let h = fc(x)\n  param fc : Linear(3, 10)\n  update x = h",   # a let that failed is not re-reported
])
def test_no_cascades(body):
    found = errors(L(body))
    assert len({(e.span.line, e.span.col) for e in found}) == len(found)
    assert all(type(e) in (ShapeErr, NameErr) for e in found)
    assert not any("update x has shape" in e.message for e in found)
    assert len(found) <= 2


@pytest.mark.slow
def test_exponential_inlining_is_stopped():
    fns = "fn f0(u) = u * 2\n" + "".join(f"fn f{i}(u) = f{i - 1}(u) + f{i - 1}(u)\n" for i in range(1, 40))
    found = errors(fns + L("update x = f39(a)"))
    assert any("fn calls to inline" in e.message for e in found)
