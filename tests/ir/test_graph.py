"""LayerGraph: building, reading, the text form, and lint() catching broken invariants."""
from __future__ import annotations

import pytest

from fpidsl.ir.graph import GraphLintError, LayerGraph, StateInfo
from fpidsl.source import Span

from .helpers import graph, layer

S = Span("t.fpi", 1, 1, 1, 2)


def tiny() -> LayerGraph:
    """x' = x * x + a, by hand."""
    g = LayerGraph("L", S)
    a = g.add_node("input", span=S, shape=("B",), name="a")
    x = g.add_node("state", span=S, shape=("B",), name="x")
    g.inputs["a"] = a
    g.states["x"] = StateInfo("x", x, ("B",), S)
    g.states["x"].init = g.add_node("init", span=S, shape=("B",), state="x", fill=0)
    sq = g.add_node("call", span=S, shape=("B",), prim="mul", attrs={}, args=[x, x])
    y = g.add_node("call", span=S, shape=("B",), prim="add", attrs={}, args=[sq, a])
    g.states["x"].update = g.add_node("update", span=S, shape=("B",), state="x", args=[y])
    g.output = g.add_node("output", span=S, shape=(), args=[x])
    return g


def test_build_and_read():
    g = tiny()
    g.lint()
    assert g.nodes() == [f"n{i}" for i in range(7)]
    assert g.args("n3") == ["n1", "n1"]  # one value twice: a multigraph
    assert g.users("n1") == [("n3", 0), ("n3", 1), ("n6", 0)]
    assert g.label("n1") == "the state x" and g.label("n3") == "this expression"


def _corrupt(kind):
    g = tiny()
    if kind == "op":
        g.node("n3")["op"] = "lambda"
    elif kind == "prim":
        g.node("n3")["prim"] = "frobnicate"
    elif kind == "arity":
        g.g.remove_edge("n1", "n3", key=1)
    elif kind == "positions":
        g.g.remove_edge("n1", "n3", key=0)
    elif kind == "order":
        g.g.add_edge("n4", "n3", key=2, pos=2, span=S)
    elif kind == "shape":
        g.node("n4")["shape"] = None
    elif kind == "span":
        g.node("n4")["span"] = None
    elif kind == "update":
        g.add_node("update", span=S, shape=("B",), state="x", args=["n1"])
    elif kind == "no-init":
        g.g.remove_node("n2")
    elif kind == "attrs":
        g.node("n3")["attrs"] = {"dim": 1}
    elif kind == "output":
        g.output = None
    return g


@pytest.mark.parametrize("kind, fragment", [
    ("op", "closed op set"), ("prim", "unknown primitive"), ("arity", "takes 2..2"),
    ("positions", "not 0..n-1"), ("order", "not topological"), ("shape", "no shape"), ("span", "no span"),
    ("update", "update nodes"), ("no-init", "node id"), ("attrs", "unknown attrs"), ("output", "output nodes"),
])
def test_lint_catches(kind, fragment):
    with pytest.raises(GraphLintError, match=fragment.replace(".", r"\.")):
        _corrupt(kind).lint()


def test_lint_before_inference_skips_shapes():
    g = _corrupt("shape")
    g.lint(shapes=False)


def test_text_form():
    g = graph(layer("param fc : Linear(20, 10, init_scale=0.1)\n"
                    "  let h = cat([x, a], dim=-1)\n"
                    "  update x = tanh(fc(h) + 0.5)\n"
                    "  solve { method = anderson(m=3), tol = 1e-6 }"))
    assert g.format() == """\
layer L  # t.fpi:1:1
  inputs a
  states x
  module fc = Linear(20, 10, init_scale=0.1)
  solve method=anderson, m=3, tol=1e-06
  n0 = input a : [B, 10]                    # t.fpi:2:3
  n1 = state x : [B, 10]                    # t.fpi:3:3
  n2 = param fc.weight : [10, 20]           # t.fpi:4:3
  n3 = param fc.bias : [10]                 # t.fpi:4:3
  n4 = init x = 0 : [B, 10]                 # t.fpi:3:3
  n5 = call cat(n1, n0) {dim=-1} : [B, 20]  # let h @ t.fpi:5:11
  n6 = call linear(n5, n2, n3) : [B, 10]    # t.fpi:6:19
  n7 = const 0.5 : []                       # t.fpi:6:27
  n8 = call add(n6, n7) : [B, 10]           # t.fpi:6:19
  n9 = call tanh(n8) : [B, 10]              # t.fpi:6:14
  n10 = update x(n9) : [B, 10]              # t.fpi:6:3
  n11 = output(n1)                          # t.fpi:1:1
"""
