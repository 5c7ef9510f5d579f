"""The treeless parse (fpidsl/frontend/reductions.py) against the tree path it replaces: the same AST, spans
included, for every shipped spec, the hostile table's specs, tricky forms and random generated specs; and the same
error, position and all, for every spec either path refuses."""
from __future__ import annotations

import operator
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings

from fpidsl.errors import FpiError
from fpidsl.frontend.parser import Placement, ToAst, _parse, _parse_tree, _treeless
from fpidsl.limits import MAX_NESTING, run_deep
from tests.attack.generate import specs
from tests.attack.test_hostile import CASES

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPECS = sorted(ROOT.glob("specs/**/*.fpi")) + sorted(ROOT.glob("examples/**/*.fpi"))
H = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n"

FORMS = [
    "",
    "# only a comment\n",
    H + "  update x = (((a)))\n}\n",
    H + "  update x = -(a + x) * (x)[..., 0:1] + a[:, ::2][:, :1:]\n}\n",
    H + "  let h = f(a, dim=1,)\n  update x = (h)\n}\n",
    H + "  param w : tensor [3] = normal(0, 0.1)\n  param m : Linear(3, 3, bias=false)\n"
        "  update x = 0.5 * m(x) + w * (a > 0) + (x <= 1)\n  solve { tol = 1e-6, max_iter = 3, }\n}\n",
    "fn sq(v) = v * v\nfn two() = 2\n" + H + "  update x = 0.5 * sq(x) + two() * a\n  output x, (a)\n}\n",
    H + "  energy E = 0.5 * sum(x * x, dim=1)\n  descend x on E step (0.1)\n}\n",
    "layer R {\n  input a : [B, C * (H // 2), W - 1]\n  state x : [B, C * (H // 2), W - 1]\n"
    "  update x = 0.5 * reshape(x, [B, -1, (W - 1)]) + a\n}\n",
]


def both(text: str, start: str = "start", at: Placement = Placement("t.fpi")):
    """What ``_parse`` gives and what the tree path gives: each an AST, or an error as (kind, line, col, message).
    Where the tree path gives an AST, the treeless parser must give it itself (not by falling back)."""
    def outcome(run):
        try:
            return run_deep(run, text, start, at)
        except FpiError as e:
            return (e.kind, e.span.line, e.span.col, e.message)

    tree = outcome(_parse_tree)
    if not isinstance(tree, tuple):
        done = run_deep(_treeless().parse, text, start, ToAst(at))
        assert done.levels <= MAX_NESTING
        assert same(done.value, tree)
    return outcome(_parse), tree


def same(a, b) -> bool:
    """``a == b`` for ASTs of any depth (equality of nested dataclasses recurses)."""
    return run_deep(operator.eq, a, b)


def test_the_treeless_parser_is_installed_with_this_lark():
    assert _treeless() is not None
    assert _treeless()._table is not None  # lark's loop over the table with the callbacks in it (_TableState)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_specs_parse_the_same(path):
    fast, tree = both(path.read_text(encoding="utf-8"))
    assert same(fast, tree)


@pytest.mark.parametrize("text", FORMS)
def test_tricky_forms_parse_the_same(text):
    fast, tree = both(text)
    assert same(fast, tree)


# the long chains (100 KB and more) repeat forms the others have
@pytest.mark.parametrize("case", [c for c in CASES if c.path.endswith(".fpi") and len(c.text) < 50_000],
                         ids=lambda c: c.name)
def test_hostile_specs_parse_or_fail_the_same(case):
    fast, tree = both(case.text)
    assert same(fast, tree)


@pytest.mark.parametrize("start, text", [
    ("expr_only", "0.5 * (a + b)[:, 1] - f(c, dim=-1)"), ("shape_only", "[B, C // 2, 3,]"), ("dim_only", "(H - 1)"),
    ("param_type_only", "tensor [3, 3] = normal(0, 0.1)"), ("fn_head_only", "sq(v)"),
])
def test_fragments_placed_in_a_yaml_file_parse_the_same(start, text):
    fast, tree = both(text, start, Placement("t.yaml", 7, 12))
    assert same(fast, tree)


def test_errors_are_those_of_the_tree_path():
    nested = H + "  update x = " + "-" * (MAX_NESTING + 1) + "x\n}\n"
    bad_number = H + "  update x = 99999999999999999999 * a\n}\n"
    keyword = H + "  let layer = a\n  update x = a\n}\n"
    for text, kind in ((nested, "limit"), (bad_number, "type"), (keyword, "syntax"), (H + "  update x = (a\n}\n", "syntax")):
        fast, tree = both(text)
        assert same(fast, tree) and fast[0] == kind


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(specs())
def test_generated_specs_parse_the_same(spec):
    fast, tree = both(spec.fpi())
    assert same(fast, tree)
