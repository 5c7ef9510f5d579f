"""Narrowing: a slice of a product computed as the product with a slice of its factor.

``index(matmul(a, W), [:, lo:hi])`` becomes ``matmul(a, W[:, lo:hi])`` (and likewise the channel slice of a
convolution's input gradient) where ``W`` does not depend on the iterated variable, so the slice of ``W`` is
computed once and every iteration does only the part of the product it keeps. Used on the backward map (the
variable is the cotangent; passes/split_backward.py) and on the forward iteration (the variable is the state;
passes/hoist.py).
"""
from __future__ import annotations

from ..ir.builder import GraphBuilder, compact, copy_metadata, copy_node
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
    The copy is built with the graph builder, so it is renumbered and passes ``lint()``; ``bg`` is returned
    unchanged when nothing narrows.
    """
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
            candidates.setdefault(src, []).append((nid, pos, sliced))
    plans = {nid: (src, pos, sliced) for src, group in candidates.items() if len(group) == len(bg.users(src))
             for nid, pos, sliced in group}
    if not plans:
        return bg
    wide = {src for src, _, _ in plans.values()}
    out = type(bg)(bg.name, bg.span)
    b = GraphBuilder(out)
    mapping: dict[str, str] = {}
    full = SliceSpec(None, None, None)
    for nid in bg.nodes():
        if nid in wide:
            continue
        if nid not in plans:
            mapping[nid] = copy_node(b, bg, nid, mapping)
            continue
        src, pos, sliced = plans[nid]
        sdata = bg.node(src)
        with b.deriving(nid, bg):
            args = [mapping[a] for a in bg.args(src)]
            args[pos] = b.call("index", args[pos], index=(full, sliced))
            mapping[nid] = b.call(sdata["prim"], *args, **sdata["attrs"])
        if out.node(mapping[nid]).get("name") is None:
            out.node(mapping[nid])["name"] = sdata.get("name")
    copy_metadata(bg, out, mapping)
    return compact(out)[0]
