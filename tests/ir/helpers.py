"""Helpers for the IR tests: check a spec from text, collect its errors, locate an anchor."""
from __future__ import annotations

from fpidsl.errors import FpiError, FpiErrors, as_list
from fpidsl.frontend.parser import parse_fpi
from fpidsl.ir.graph import LayerGraph
from fpidsl.passes.pipeline import check_spec
from fpidsl.source import Source

PATH = "t.fpi"


def check(text: str) -> dict[str, LayerGraph]:
    """The checked graphs of a spec given as text."""
    return check_spec(parse_fpi(Source(PATH, text)))


def graph(text: str) -> LayerGraph:
    """The graph of a one-layer spec."""
    (g,) = check(text).values()
    return g


def errors(text: str) -> list[FpiError]:
    """The errors of a spec that must not check."""
    try:
        check(text)
    except (FpiError, FpiErrors) as exc:
        return as_list(exc)
    raise AssertionError("the spec checked clean")


def locate(text: str, anchor: str, nth: int = 1) -> tuple[int, int]:
    """1-based (line, col) of the ``nth`` occurrence of ``anchor`` in ``text``."""
    pos = -1
    for _ in range(nth):
        pos = text.index(anchor, pos + 1)
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def layer(body: str, head: str = "input a : [B, 10]\n  state x : [B, 10]") -> str:
    """A layer ``L`` with an input ``a`` and a state ``x`` (both [B, 10]) and ``body``."""
    return f"layer L {{\n  {head}\n  {body}\n}}\n"


def nodes(g: LayerGraph, op: str | None = None, prim: str | None = None) -> list[str]:
    """Node ids of a graph by op and/or primitive, in order."""
    out = []
    for nid in g.nodes():
        d = g.node(nid)
        if (op is None or d["op"] == op) and (prim is None or d.get("prim") == prim):
            out.append(nid)
    return out
