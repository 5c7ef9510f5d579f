"""Narrowing: a slice of a product computed as the product with a slice of its factor.

``index(matmul(a, W), [:, lo:hi])`` becomes ``matmul(a, W[:, lo:hi])`` (and likewise the channel slice of a
convolution's input gradient) where ``W`` does not depend on the iterated variable, so the slice of ``W`` is
computed once and every iteration does only the part of the product it keeps. Used on the backward map (the
variable is the cotangent; codegen/split.py) and on the forward iteration (the variable is the state;
passes/hoist.py).
"""
from __future__ import annotations

from ..ir.graph import LayerGraph
from ..ir.primitives import SliceSpec

_NARROWABLE = {"matmul": (1, -1), "conv2d_input_grad": (1, 1)}  # prim -> (factor position, sliced axis)


def _only_slice(index, axis: int, ndim: int):
    """The ``SliceSpec`` when ``index`` takes every element on every axis but ``axis`` (else None)."""
    full = SliceSpec(None, None, None)
    items = list(index)
    if len(items) > ndim or any(not isinstance(item, SliceSpec) for item in items):
        return None
    items += [full] * (ndim - len(items))
    axis = axis % ndim
    for i, item in enumerate(items):
        if i != axis and item != full:
            return None
    sliced = items[axis]
    return sliced if isinstance(sliced, SliceSpec) and sliced != full else None


def narrow_slices(bg: LayerGraph, linear: set[str]) -> LayerGraph:
    """A copy of ``bg`` where ``index(op(a, W, ...), [:, lo:hi])`` becomes ``op(a, W[:, lo:hi], ...)``.

    ``op`` is a matmul (slice of the last axis; ``W`` 2-D) or a convolution's input gradient (slice of the
    channel axis), whose other user is nobody and whose factor ``W`` does not depend on the cotangent: the slice
    of ``W`` is then computed once, in ``prepare``, and every iteration does only the part of the product it
    keeps (the state's share of ``cat([x, z])``'s gradient, not the input's). Both forms compute the same numbers.
    """
    import copy

    candidates: dict[str, list] = {}
    for nid in bg.nodes():
        data = bg.node(nid)
        if data["op"] != "call" or data["prim"] != "index":
            continue
        (src,) = bg.args(nid)
        sdata = bg.node(src)
        prim = sdata.get("prim")
        if sdata["op"] != "call" or prim not in _NARROWABLE:
            continue
        pos, axis = _NARROWABLE[prim]
        factor = bg.args(src)[pos]
        fshape, oshape = bg.shape(factor), bg.shape(src)
        if factor in linear or fshape is None or oshape is None or len(fshape) != (2 if prim == "matmul" else 4):
            continue
        sliced = _only_slice(data["attrs"]["index"], axis, len(oshape))
        if sliced is not None:
            candidates.setdefault(src, []).append((nid, src, pos, factor, sliced))
    plans = [plan for src, group in candidates.items() if len(group) == len(bg.users(src)) for plan in group]
    if not plans:
        return bg
    out = copy.copy(bg)
    g = bg.g.copy()
    order = list(g.nodes)
    for nid, src, pos, factor, sliced in plans:
        full = SliceSpec(None, None, None)
        fshape = list(bg.shape(factor))
        kept = len(range(*slice(sliced.lo, sliced.hi, sliced.step).indices(fshape[1]))) \
            if isinstance(fshape[1], int) else None
        new = f"n{len(order) + 1000}"
        while new in g:
            new += "_"
        span = g.nodes[nid]["span"]
        g.add_node(new, op="call", prim="index", attrs={"index": (full, sliced)}, span=span, name=None,
                   shape=(fshape[0], kept, *fshape[2:]) if kept is not None else None)
        g.add_edge(factor, new, key=0, pos=0, span=span)
        order.insert(order.index(nid), new)
        # the index node becomes the narrowed product; the wide product loses its only user
        sdata = g.nodes[src]
        g.nodes[nid].update(prim=sdata["prim"], attrs=dict(sdata["attrs"]), name=sdata.get("name"))
        g.remove_edge(src, nid, key=0)
        for u, _, d in list(bg.g.in_edges(src, data=True)):
            g.add_edge(new if d["pos"] == pos else u, nid, key=d["pos"], pos=d["pos"], span=d["span"])
    reordered = type(g)()
    reordered.add_nodes_from((n, g.nodes[n]) for n in order)
    reordered.add_edges_from(g.edges(keys=True, data=True))
    out.g = reordered
    return out
