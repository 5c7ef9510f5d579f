"""Shape inference: every node's ``shape`` from its arguments' shapes and the primitive's shape rule.

A failed rule is a :class:`~fpidsl.errors.ShapeErr` at the offending argument's use site (or the call
itself); the node's shape becomes None and its users are skipped without further errors. The
divisibility assumptions the rules make are recorded in ``graph.assumptions``.
"""
from __future__ import annotations

from ..errors import ErrorSink, ShapeErr
from ..ir.graph import Assumption, LayerGraph
from ..ir.primitives import PRIMITIVES
from ..ir.shapes import ShapeCtx, ShapeRuleError, dim_add, fmt_dim, normalize_dim

OPERATOR_TEXT = {"add": "+", "sub": "-", "mul": "*", "div": "/", "matmul": "@", "pow": "**", "neg": "unary -"}


def callee(graph: LayerGraph, nid: str) -> str:
    """How messages name what a call node applies: ``Conv2d(2, 32, 3)``, ``+``, ``cat``."""
    data = graph.node(nid)
    module = data.get("module")
    if module is not None and module in graph.modules:
        return graph.modules[module].describe()
    return OPERATOR_TEXT.get(data["prim"], data["prim"])


def infer_shapes(graph: LayerGraph, sink: ErrorSink) -> None:
    nodes = graph.g._node  # the attribute dicts, as graph.node(nid) gives them
    for nid in graph.nodes():
        data = nodes[nid]
        if data["op"] != "call":
            continue  # declared (input, state, param), () for const and output, the state's for sinks
        args = graph.args(nid)
        shapes = [nodes[a]["shape"] for a in args]
        if None in shapes or data.get("rejected"):  # rejected: an earlier pass reported it
            data["shape"] = None
            continue
        ctx = ShapeCtx(callee=callee(graph, nid))
        prim = PRIMITIVES[data["prim"]]
        try:
            data["shape"] = tuple(prim.shape(shapes, prim.with_defaults(data["attrs"]), ctx))
        except ShapeRuleError as e:
            data["shape"] = None
            span = data["span"]
            if e.item is not None and data.get("item_spans"):
                span = data["item_spans"][e.item]
            elif e.attr is not None and e.attr in (data.get("attr_spans") or {}):
                span = data["attr_spans"][e.attr]
            elif e.arg is not None and not e.at_call:
                span = graph.arg_spans(nid)[e.arg]
            hint = e.hint or _cat_hint(graph, args[e.arg], e.dim) if e.arg is not None else e.hint
            sink.add(ShapeErr(e.message, span, hint=hint))
            continue
        for expr, divisor in ctx.assumptions:
            if not any(a.expr == expr and a.divisor == divisor for a in graph.assumptions):
                graph.assumptions.append(Assumption(expr, divisor, data["span"]))


def _cat_hint(graph: LayerGraph, nid: str, dim: int | None) -> str | None:
    """When the wrong-sized argument is a ``cat``, say what it joins along the dimension at fault."""
    data = graph.node(nid)
    if dim is None or data["op"] != "call" or data["prim"] != "cat":
        return None
    parts = graph.args(nid)
    shapes = [graph.shape(p) for p in parts]
    if normalize_dim(data["attrs"]["dim"], len(shapes[0])) != dim:
        return None
    total = 0
    for s in shapes:
        total = dim_add(total, s[dim])
    pieces = " + ".join(f"{graph.label(p).replace('this expression', 'an expression')} ({fmt_dim(s[dim])})"
                        for p, s in zip(parts, shapes))
    return f"the cat joins {pieces} = {fmt_dim(total)} along dim {data['attrs']['dim']}"
