"""``fpidsl explain SPEC --layer L``: what the compiler understood of one layer, in a short report.

Inputs and states with their shapes (symbolic dims), parameters and their count, the static Lipschitz bound of g
in each state at the initial weights (:mod:`fpidsl.passes.lipschitz`), which values of g are computed once per
solve instead of every iteration (:mod:`fpidsl.passes.hoist`), whether samples are independent (the
emitted ``SAMPLEWISE``), and the size of the derived backward map. Every figure is computed by the same passes the
code generator runs, not re-derived here.
"""
from __future__ import annotations

import math

from ..errors import printable
from ..ir.extern import externs
from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES, REQUIRED, format_attr
from ..ir.shapes import fmt_shape

MAX_DEPTH = 4


def _node_text(graph: LayerGraph, nid: str, depth: int = 0) -> str:
    """A state-free value as a short expression over inputs and params."""
    data = graph.node(nid)
    op = data["op"]
    if op in ("input", "state", "param"):
        return data["name"]
    if op == "const":
        return str(data["value"])
    if op != "call":
        return nid
    if depth >= MAX_DEPTH:
        return "…"
    args = [_node_text(graph, a, depth + 1) for a in graph.args(nid)]
    attrs = data.get("attrs") or {}
    if data["prim"] == "index":
        items = attrs.get("index", ())
        return f"{args[0]}[{', '.join(_index_item(i) for i in items)}]"
    if data["prim"] == "extern":  # f(x, ...), after the module's handle and parameters
        return f"{attrs['name']}({', '.join(args[2:])})"
    if data["prim"] == "einsum":
        return f"einsum({', '.join([chr(34) + attrs['equation'] + chr(34), *args])})"
    return f"{data['prim']}({', '.join(args + _static(data['prim'], attrs))})"


def _static(prim: str, attrs: dict) -> list[str]:
    """A call's static arguments that are not their defaults (``exponent=2`` of ``x ** 2``, ``keepdim=true``), as the
    text form writes them: without them ``pow(a)`` could be any power."""
    known = PRIMITIVES.get(prim)
    defaults = {a.name: a.default for a in known.attrs} if known is not None else {}
    return [f"{k}={format_attr(v)}" for k, v in attrs.items() if not _is_default(v, defaults.get(k, REQUIRED))]


def _is_default(value, default) -> bool:
    return default is not REQUIRED and isinstance(value, bool) == isinstance(default, bool) and value == default


def _index_item(item) -> str:
    if item is Ellipsis:
        return "..."
    if hasattr(item, "start"):
        text = f"{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}"
        return text + (f":{item.step}" if getattr(item, "step", None) not in (None, 1) else "")
    return str(item)


def _number(value) -> str:
    """A number in few digits (``0``, ``0.5``), all of them where fewer would show another number (``0.123456789``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _params(graph: LayerGraph) -> tuple[list[str], int]:
    """One line per module (its tensors and their count) or raw tensor; the total count. A param's shape is
    concrete (the checker refuses symbolic dimensions there)."""
    groups: dict[str, list[str]] = {}
    for name, nid in graph.params.items():
        if graph.node(nid).get("role") in ("module", "parameters", "seeds"):
            continue  # an extern's handle and parameters, dropout's seeds: not tensors of the spec (listed below)
        module = graph.node(nid).get("module")
        groups.setdefault(module if module in graph.modules else name, []).append(nid)
    lines, total = [], 0
    for key, nids in groups.items():
        size = sum(math.prod(graph.shape(n)) for n in nids)
        total += size
        if key in graph.modules:
            tensors = ", ".join(f"{graph.node(n)['name'].split('.', 1)[1]} {fmt_shape(graph.shape(n))}" for n in nids)
            lines.append(f"    {key} = {graph.modules[key].format()}: {tensors}  ({size:,})")
        else:
            lines.append(f"    {key} : tensor {fmt_shape(graph.shape(nids[0]))}  ({size:,})")
    for spec in externs(graph).values():
        lines.append(f"    {spec.name} : {spec.format()}  (an nn.Module given at construction)")
    return lines, total


def _lipschitz(checked, name: str) -> list[str]:
    from ..lipschitz_report import layer_bounds
    from ..passes.lipschitz import INF

    lines = []
    for bound in layer_bounds(checked, name):
        if bound.value == INF:
            lines.append(f"    {bound.state}: unknown" + (f" ({bound.reason})" if bound.reason else ""))
        else:
            verdict = "a contraction" if bound.value < 1 else "not shown to contract"
            lines.append(f"    {bound.state}: {bound.value:.3g}  ({verdict})")
    return lines


def _hoisted(lowered) -> list[str]:
    parts = lowered.forward
    if parts is None:
        return ["    nothing: every operation of g depends on a state"]
    g = parts.graph
    return [f"    {_node_text(g, nid)} : {fmt_shape(g.shape(nid))}  ({g.node(nid)['span']})"
            for nid in parts.hoisted if g.node(nid)["op"] == "call"]


def _calls(graph: LayerGraph, among=None) -> int:
    return sum(1 for n in (graph.nodes() if among is None else among) if graph.node(n)["op"] == "call")


def explain_layer(checked, name: str) -> str:
    """The report for layer ``name`` of a :class:`~fpidsl.compiler.CheckedSpec`, from the same lowering the code
    generator prints (:func:`fpidsl.passes.lower.lower`)."""
    from ..passes.lower import lower

    graph = checked.graphs[name]
    lowered = lower(graph)
    out = [f"layer {name}  ({graph.span})"]
    out.append("  inputs:" if graph.inputs else "  inputs: none")
    out += [f"    {n} : {'' if graph.dtype(nid) == 'float' else graph.dtype(nid) + ' '}{fmt_shape(graph.shape(nid))}"
            for n, nid in graph.inputs.items()]
    out.append("  states:")
    for state, info in graph.states.items():
        init = graph.node(info.init) if info.init else None
        start = ""
        if init is not None:
            fill = init.get("fill")
            start = f" = {_number(fill)}" if fill is not None else " = (an expression of the inputs)"
        out.append(f"    {state} : {fmt_shape(info.shape)}{start}")
    param_lines, total = _params(graph)
    out.append(f"  parameters: {total:,}" + ("" if param_lines else " (none)"))
    out += param_lines
    if graph.assumptions:
        out.append("  assumes: " + ", ".join(str(a) for a in graph.assumptions))
    out.append("  Lipschitz bound of g in each state (initial weights, seed 0):")
    out += _lipschitz(checked, name)
    out.append("  computed once per solve, not every iteration:")
    out += _hoisted(lowered)
    if lowered.samplewise:
        out.append("  samples: independent (finished samples leave the solve)")
    else:
        out.append("  samples: mixed (g reads across the batch; solved as one problem, judged over the whole batch)")
    step, backward = lowered.step, lowered.backward
    out.append(f"  map g: {len(step)} nodes, {_calls(step)} operations")
    per_iteration = _calls(backward, backward.downstream(lowered.adjoint.cotangents))
    out.append(f"  backward map: {len(backward)} nodes, {_calls(backward)} operations, {per_iteration} of them "
               "each iteration (linear in the cotangent), the rest once at the fixed point")
    out += _settings(graph)
    # a file name (in the header's and the hoisted values' spans) may hold terminal escapes or bidi controls:
    # shown escaped, as check and graph show it
    return "\n".join(printable(line) for line in out) + "\n"


def _settings(graph: LayerGraph) -> list[str]:
    lines = []
    for which, table in (("solve", graph.solve), ("backward", graph.backward)):
        text = ", ".join(f"{k}={format_attr(v)}" for k, v in table.items()) if table else "defaults"
        lines.append(f"  {which}: {text}")
    if graph.eval_solve:
        text = ", ".join(f"{k}={format_attr(v)}" for k, v in graph.eval_solve.items())
        lines.append(f"  eval: {text} (over solve, in eval mode)")
    return lines

