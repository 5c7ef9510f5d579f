"""A reference interpreter: the value of every node of a graph, computed with :mod:`fpidsl.runtime.ops`.

It calls the ops functions exactly as generated code does (tensor arguments positional, ``cat``'s as
one list, attributes as keywords), after binding symbolic dimensions (``B``) from the leaves' values
for ``shape`` attributes. Used by tests to run any graph, original or derived.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..runtime import ops
from .graph import LayerGraph
from .primitives import PRIMITIVES
from .shapes import dim_value

LEAVES = ("input", "state", "param")


def evaluate(graph: LayerGraph, env: Mapping[str, Any], roots: Iterable[str] | None = None) -> dict[str, Any]:
    """Node id -> value for the nodes that ``roots`` need (default: all).

    ``env`` gives the leaves' values, keyed by node id or by name: an input's or state's name, a
    param's qualified name (``fc1.weight``) or a cotangent's (``c_x``). A key that is a node id of the
    graph means that node. ``init`` nodes with a fill take the shape of their state's value; an
    ``update`` has its argument's value and ``output`` the tuple of its arguments'."""
    values = _leaf_values(graph, env)
    dims = _bind_dims(graph, values)
    needed = _needed(graph, roots)
    for nid in graph.nodes():
        if nid in needed and nid not in values:
            values[nid] = _value(graph, nid, values, dims)
    return values


def _names(graph: LayerGraph) -> dict[str, str]:
    names = dict(graph.inputs)
    names.update((s, info.node) for s, info in graph.states.items())
    names.update(graph.params)
    for nid in graph.nodes():
        data = graph.node(nid)
        if data["op"] == "input" and data.get("role") == "cotangent":
            names.setdefault(data["name"], nid)
    return names


def _leaf_values(graph: LayerGraph, env: Mapping[str, Any]) -> dict[str, Any]:
    names = _names(graph)
    values = {}
    for key, value in env.items():
        nid = key if key in graph.g else names.get(key)
        if nid is None:
            raise KeyError(f"{key!r} is neither a node nor a leaf name of layer {graph.name}")
        values[nid] = value
    return values


def _bind_dims(graph: LayerGraph, values: Mapping[str, Any]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for nid, value in values.items():
        shape = graph.shape(nid)
        if isinstance(value, torch.Tensor) and shape is not None and len(shape) == value.dim():
            for want, got in zip(shape, value.shape):
                if isinstance(want, str):
                    dims.setdefault(want, got)
    return dims


def _needed(graph: LayerGraph, roots: Iterable[str] | None) -> set[str]:
    return set(graph.nodes()) if roots is None else graph.upstream(roots)


def _value(graph: LayerGraph, nid: str, values: dict[str, Any], dims: dict[str, int]) -> Any:
    data = graph.node(nid)
    op = data["op"]
    args = [values[a] for a in graph.args(nid)]
    if op in LEAVES:
        raise KeyError(f"no value given for {graph.label(nid)} ({nid}, {data['name']})")
    if op == "const":
        return data["value"]
    if op == "call":
        return _call(data["prim"], args, _concrete_attrs(data, dims))
    if op == "update":
        return args[0]
    if op == "init":
        if data.get("fill") is None:
            return args[0]
        return torch.full_like(values[graph.states[data["state"]].node], data["fill"])
    return tuple(args)  # output


def _call(prim: str, args: list[Any], attrs: dict[str, Any]) -> Any:
    fn = getattr(ops, prim)
    if prim == "cat":
        return fn(args, **attrs)
    return fn(*args, **attrs)


def _concrete_attrs(data: Mapping[str, Any], dims: Mapping[str, int]) -> dict[str, Any]:
    """The node's attributes with the symbolic sizes of ``shape`` attributes bound."""
    prim = PRIMITIVES[data["prim"]]
    out = dict(data["attrs"])
    for name, value in out.items():
        attr = prim.attr(name)
        if attr is not None and attr.kind == "shape" and value is not None:  # None: interpolate without a size
            out[name] = tuple(int(dim_value(d, dims)) for d in value)
    return out
