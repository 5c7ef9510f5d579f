"""Narrowing: a slice of a product computed as the product with a slice of its factor.

``index(matmul(a, W), [:, lo:hi])`` becomes ``matmul(a, W[:, lo:hi])`` (and likewise the channel slice of a
convolution's input gradient) where ``W`` does not depend on the iterated variable, so the slice of ``W`` is
computed once and every iteration does only the part of the product it keeps. The transposed form, the product
of a scattered slice, ``matmul(index_backward(c, like, [:, lo:hi]), W)`` (zeros with c in columns lo:hi, times
W), becomes ``matmul(c, W[lo:hi])``: the VJP of a slice followed by a product, as every backward map of a
``cat([x, z])`` layer has (:func:`narrow`, which does both). Used on the backward map (the
variable is the cotangent; passes/split_backward.py) and on the forward iteration (the variable is the state;
passes/hoist.py).
"""
from __future__ import annotations

from ..ir.builder import GraphBuilder, compact, copy_metadata, copy_node
from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES, SliceSpec



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
        if sdata["op"] != "call" or PRIMITIVES[prim].narrow is None:
            continue
        pos, axis = PRIMITIVES[prim].narrow
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


def narrow_scattered_products(bg: LayerGraph, linear: set[str]) -> LayerGraph:
    """A copy of ``bg`` where ``matmul(index_backward(c, like, [:, lo:hi]), W)`` becomes ``matmul(c, W[lo:hi])``
    for a 2-D ``W`` that does not depend on the iterated variable (the scatter stays for its other users, such as
    a weight gradient computed once); ``bg`` itself when there is none. Both compute the same numbers: the zero columns of the scatter multiply
    rows of W that the narrowed product never reads."""
    plans: dict[str, SliceSpec] = {}
    for nid in bg.nodes():
        data = bg.node(nid)
        if data["op"] != "call" or data["prim"] != "matmul":
            continue
        scatter, w = bg.args(nid)
        sdata = bg.node(scatter)
        if sdata["op"] != "call" or sdata["prim"] != "index_backward" or w in linear:
            continue
        wshape, like_shape = bg.shape(w), bg.shape(bg.args(scatter)[1])
        if wshape is None or like_shape is None or len(wshape) != 2 or len(like_shape) < 2:
            continue
        sliced = _only_slice(sdata["attrs"]["index"], -1, len(like_shape))
        if sliced is not None:
            plans[nid] = sliced
    if not plans:
        return bg
    out = type(bg)(bg.name, bg.span)
    b = GraphBuilder(out)
    mapping: dict[str, str] = {}
    for nid in bg.nodes():
        if nid not in plans:
            mapping[nid] = copy_node(b, bg, nid, mapping)
            continue
        scatter, w = bg.args(nid)
        with b.deriving(nid, bg):
            rows = b.call("index", mapping[w], index=(plans[nid],))
            mapping[nid] = b.call("matmul", mapping[bg.args(scatter)[0]], rows)
        if out.node(mapping[nid]).get("name") is None:
            out.node(mapping[nid])["name"] = bg.node(nid).get("name")
    copy_metadata(bg, out, mapping)
    return compact(out)[0]


def narrow(bg: LayerGraph, linear: set[str]) -> LayerGraph:
    """Both narrowings: slices of products, then products of scattered slices (``linear``: the nodes that depend
    on the iterated variable)."""
    narrowed = narrow_slices(bg, linear)
    if narrowed is not bg:
        linear = _renamed_variant(narrowed, bg, linear)
    return narrow_scattered_products(narrowed, linear)


def _renamed_variant(new: LayerGraph, old: LayerGraph, linear: set[str]) -> set[str]:
    """``linear`` in ``new``'s node ids: what depends on the same iterated leaves."""
    leaves = [n for n in old.nodes() if n in linear and not old.args(n)]
    names = {(old.node(n)["op"], old.node(n).get("name"), old.node(n).get("role")) for n in leaves}
    sources = [n for n in new.nodes() if not new.args(n)
               and (new.node(n)["op"], new.node(n).get("name"), new.node(n).get("role")) in names]
    return new.downstream(sources)
