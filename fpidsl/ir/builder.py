"""Building and copying layer graphs: the :class:`GraphBuilder` that passes add nodes with (shapes from the
primitives' shape rules, identical nodes made once), node and metadata copying, and compaction (a renumbered copy
of what some roots need). Every graph these functions return passes :meth:`~fpidsl.ir.graph.LayerGraph.lint`."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from .graph import Assumption, LayerGraph
from .primitives import PRIMITIVES
from .shapes import ShapeCtx, broadcast


class GraphBuilder:
    """Adds nodes to a :class:`LayerGraph` for the differentiation pass.

    Shapes come from the primitives' shape rules; spans (and ``inlined``) from the primal node being
    differentiated (:meth:`deriving`); a ``call`` or ``const`` that already exists with the same
    arguments and attributes is returned instead of made again."""

    def __init__(self, graph: LayerGraph):
        self.graph = graph
        self._memo: dict[Any, str] = {}
        self._origin: dict[str, Any] | None = None
        for nid in graph.nodes():
            self.remember(nid)

    # ------------------------------------------------------------------ reading
    def args(self, nid: str) -> list[str]:
        return self.graph.args(nid)

    def attrs(self, nid: str) -> dict[str, Any]:
        return self.graph.node(nid)["attrs"]

    def shape(self, nid: str) -> tuple:
        return self.graph.shape(nid)

    def rank(self, nid: str) -> int:
        return len(self.graph.shape(nid))

    # ------------------------------------------------------------------ adding
    @contextmanager
    def deriving(self, nid: str, graph: LayerGraph | None = None) -> Iterator[None]:
        """Nodes added inside come from the primal node ``nid`` (of ``graph``, by default the one being
        extended): they take its span and ``inlined``."""
        data = (graph or self.graph).node(nid)
        saved, self._origin = self._origin, {"span": data["span"], "inlined": data.get("inlined")}
        try:
            yield
        finally:
            self._origin = saved

    def remember(self, nid: str) -> None:
        """Make an existing node available for reuse."""
        key = _key(self.graph, nid)
        if key is not None:
            self._memo.setdefault(key, nid)

    def existing(self, prim: str, args: Sequence[str], attrs: dict[str, Any]) -> str | None:
        """The node ``prim(*args, **attrs)`` if the graph has it already."""
        return self._memo.get(_call_key(prim, args, attrs))

    def call(self, prim: str, *args: str, **attrs: Any) -> str:
        """The node ``prim(*args, **attrs)`` (defaults filled, shape inferred)."""
        p = PRIMITIVES[prim]
        attrs = p.with_defaults(attrs)
        key = _call_key(prim, args, attrs)
        if key in self._memo:
            return self._memo[key]
        same = self._identity(prim, args)
        if same is not None:
            return same
        if prim == "expand_as" and self.graph.node(args[0])["op"] == "const":
            # a number broadcast to a tensor's shape (the cotangent of `0.5 * sum(...)`): made from the tensor,
            # which gives it a dtype and a device
            return self.call("mul", self.call("ones_like", args[1]), args[0])
        ctx = ShapeCtx(callee=prim)
        shape = p.shape([self.shape(a) for a in args], attrs, ctx)
        origin = self._origin_data()
        nid = self.graph.add_node("call", span=origin["span"], shape=tuple(shape), args=args, prim=prim,
                                  attrs=attrs, module=None, inlined=origin.get("inlined"))
        self._record_assumptions(ctx, origin["span"])
        self._memo[key] = nid
        return nid

    def const(self, value: int | float) -> str:
        key = ("const", type(value), value)
        if key not in self._memo:
            self._memo[key] = self.graph.add_node("const", span=self._origin_data()["span"], shape=(),
                                                  value=value)
        return self._memo[key]

    def _identity(self, prim: str, args: tuple[str, ...]) -> str | None:
        """The argument that ``prim(*args)`` equals, for ``expand_as`` to its own shape and products
        with ones (the seed of ``grad``, a step of 1) that do not broadcast; else None."""
        if prim == "expand_as" and self.shape(args[0]) == self.shape(args[1]):
            return args[0]
        if prim == "mul":
            for one, other in (args, args[::-1]):
                if self._is_ones(one) and broadcast(self.shape(one), self.shape(other)) == self.shape(other):
                    return other
        return None

    def _is_ones(self, nid: str) -> bool:
        data = self.graph.node(nid)
        if data["op"] == "const":
            return data["value"] == 1 and not isinstance(data["value"], bool)
        if data["op"] != "call":
            return False
        if data["prim"] == "ones_like":
            return True
        return data["prim"] in ("unsqueeze", "expand_as", "reshape_as") and self._is_ones(self.args(nid)[0])

    def _origin_data(self) -> dict[str, Any]:
        if self._origin is None:
            raise RuntimeError("GraphBuilder: nodes are added only inside `with builder.deriving(node):`")
        return self._origin

    def _record_assumptions(self, ctx: ShapeCtx, span) -> None:
        known = {(a.expr, a.divisor) for a in self.graph.assumptions}
        for expr, divisor in ctx.assumptions:
            if (expr, divisor) not in known:
                self.graph.assumptions.append(Assumption(expr, divisor, span))


def _call_key(prim: str, args, attrs: dict[str, Any]):
    return ("call", prim, tuple(args), tuple(sorted((k, _hashable(v)) for k, v in attrs.items())))


def _hashable(value: Any) -> Any:
    return (type(value), tuple(_hashable(v) for v in value)) if isinstance(value, (tuple, list)) \
        else (type(value), value)


def _key(graph: LayerGraph, nid: str):
    data = graph.node(nid)
    if data["op"] == "const":
        return ("const", type(data["value"]), data["value"])
    if data["op"] == "call":
        return _call_key(data["prim"], graph.args(nid), data["attrs"])
    return None


def copy_node(b: GraphBuilder, src: LayerGraph, nid: str, mapping: dict[str, str]) -> str:
    """Copy node ``nid`` of ``src`` into ``b.graph`` (arguments through ``mapping``); its new id. A call identical
    to one already there (the spec wrote ``sigmoid(y)`` twice) is that one."""
    data = dict(src.node(nid))
    op, span, shape, name = data.pop("op"), data.pop("span"), data.pop("shape"), data.pop("name")
    if "attrs" in data:
        data["attrs"] = dict(data["attrs"])
    args = [(mapping[a], s) for a, s in src.arg_edges(nid)]
    key = None  # what remember(new) would file it under, computed once
    if op == "call":
        key = _call_key(data["prim"], [a for a, _ in args], data["attrs"])
        same = b._memo.get(key)
        if same is not None:
            return same
    elif op == "const":
        key = ("const", type(data["value"]), data["value"])
    new = b.graph.add_node(op, span=span, shape=shape, name=name, args=args, **data)
    if key is not None:
        b._memo.setdefault(key, new)
    return new


def copy_metadata(src: LayerGraph, dst: LayerGraph, mapping: dict[str, str]) -> None:
    """The metadata of ``src`` on ``dst`` through the node ``mapping``; lets and energies whose node
    is gone are dropped."""
    dst.inputs = {k: mapping[v] for k, v in src.inputs.items()}
    dst.states = {k: dataclasses.replace(info, node=mapping[info.node], init=mapping.get(info.init),
                                         update=mapping.get(info.update))
                  for k, info in src.states.items()}
    dst.params = {k: mapping[v] for k, v in src.params.items()}
    dst.modules = dict(src.modules)
    dst.lets = {k: mapping[v] for k, v in src.lets.items() if v in mapping}
    dst.energies = {k: mapping[v] for k, v in src.energies.items() if v in mapping}
    dst.value_spans = {k: s for k, s in src.value_spans.items() if k in dst.lets or k in dst.energies}
    dst.output = mapping.get(src.output) if src.output is not None else None
    dst.solve, dst.backward, dst.eval_solve = dict(src.solve), dict(src.backward), dict(src.eval_solve)
    dst.solve_spans, dst.backward_spans = dict(src.solve_spans), dict(src.backward_spans)
    dst.eval_spans = dict(src.eval_spans)
    dst.assumptions = list(src.assumptions)
    if type(src) is type(dst):
        dst.copy_extra_metadata(src, mapping)


def compact(graph: LayerGraph, roots: Iterable[str] | None = None, cls: type | None = None
            ) -> tuple[LayerGraph, dict[str, str]]:
    """A copy (of class ``cls``) of the nodes that ``roots`` need, renumbered; and the id mapping."""
    keep = graph.upstream(graph.roots() if roots is None else roots)
    out = (cls or type(graph))(graph.name, graph.span)
    b = GraphBuilder(out)
    mapping: dict[str, str] = {}
    for nid in graph.nodes():
        if nid in keep:
            mapping[nid] = copy_node(b, graph, nid, mapping)
    copy_metadata(graph, out, mapping)
    return out, mapping
