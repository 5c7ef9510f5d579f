"""Index inputs (``input tokens : int [B, T]``, ``input m : bool [B, T]``) are read only where an index is expected.

An int or bool input carries no gradient and is not a number to compute with: it (or a shape op of it, which
``keeps_dtype``: ``tokens[:, 0]``, ``reshape(tokens, [-1])``) may be an argument of a primitive only at a
position whose ``index_args`` accept its dtype (gather's and index_select's index, an
Embedding's argument, where's condition for bool); anywhere else (arithmetic, a state's update, the output ...)
is a :class:`~fpidsl.errors.TypeErr` at the use. Conversely an index position takes an index input, never a
computed float. A rejected call gets no shape, so one mistake gives one error. The pass runs before shape
inference.
"""
from __future__ import annotations

from ..errors import ErrorSink, TypeErr
from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES
from .infer_shapes import callee

INDEX_USES = "gather's or index_select's index, an Embedding's argument, or (bool) where's condition"


def _where_used(graph: LayerGraph, nid: str) -> str:
    data = graph.node(nid)
    if data["op"] == "call":
        return f"an argument of {callee(graph, nid)}"
    return {"update": f"the update of state {data.get('state')}", "init": f"the start of state {data.get('state')}",
            "output": "an output"}.get(data["op"], "a value")


def _sparse_misuse(graph: LayerGraph, nid: str, arg: str, span, dtype: str) -> TypeErr:
    """A sparse input used where a dense value is expected, or spmm's matrix that is not a sparse input."""
    if dtype == "sparse":
        return TypeErr(f"the sparse input {graph.node(arg).get('name')} cannot be {_where_used(graph, nid)}", span,
                       hint="a sparse input is read only as the matrix of spmm(A, x); spmm(A, x) is dense")
    return TypeErr(f"spmm multiplies by a sparse input, but its A is {graph.label(arg)}", span,
                   hint="declare the matrix `input A : sparse [N, N]`; for a dense matrix use A @ x")


def _source(graph: LayerGraph, nid: str) -> str:
    """The index input that a shape op of it (``tokens[:, 0]``) reads."""
    while graph.node(nid)["op"] != "input":
        nid = graph.args(nid)[0]
    return graph.node(nid)["name"]


_FLOAT = ("float",)
_ACCEPTED: dict[int, tuple[object, dict[int, tuple[str, ...]]]] = {}


def _accepted(prim) -> dict[int, tuple[str, ...]]:
    """A primitive's ``dtypes_at`` of each position that accepts more than floats (the rest accept floats);
    kept by the primitive's id, with the primitive (so that its id stays its own)."""
    hit = _ACCEPTED.get(id(prim))
    if hit is None:
        hit = _ACCEPTED[id(prim)] = (prim, {p: prim.dtypes_at(p) for p, _ in prim.index_args})
    return hit[1]


def check_dtypes(graph: LayerGraph, sink: ErrorSink) -> None:
    failed: set[str] = set()  # rejected calls and what reads them: reported once
    nodes = graph.g._node  # the attribute dicts, as graph.node(nid) gives them
    for nid in graph.nodes():
        data = nodes[nid]
        args = graph.args(nid)
        if failed and any(a in failed for a in args):
            failed.add(nid)
            if data["op"] == "call":
                data["rejected"] = True
            continue
        prim = PRIMITIVES[data["prim"]] if data["op"] == "call" else None
        accepts = _accepted(prim) if prim is not None else None
        for pos, arg in enumerate(args):
            dtype = nodes[arg].get("dtype") or "float"  # graph.dtype(arg)
            accepted = accepts.get(pos, _FLOAT) if accepts is not None else _FLOAT
            if dtype in accepted:
                continue
            span = graph.arg_spans(nid)[pos]
            name = graph.node(arg).get("name")
            if "sparse" in (dtype, *accepted):
                sink.add(_sparse_misuse(graph, nid, arg, span, dtype))
            elif dtype != "float":
                what = f"the {dtype} input {name} is an index" if graph.node(arg)["op"] == "input" else \
                    f"this value (from the {dtype} input {_source(graph, arg)}) is an index"
                sink.add(TypeErr(f"{what} and cannot be {_where_used(graph, nid)}", span,
                                 hint=f"{'an' if dtype == 'int' else 'a'} {dtype} input is read only as {INDEX_USES}"))
            else:
                wanted = " or ".join(d for d in accepted if d != "float")
                sink.add(TypeErr(f"{callee(graph, nid)} expects an {wanted} input as its {prim.inputs[pos]}, "
                                 f"found {graph.label(arg)}", span,
                                 hint=f"declare the indices as an input: `input idx : {accepted[0]} [...]`"))
            failed.add(nid)
            if data["op"] == "call":
                data["rejected"] = True  # shape inference skips it and its users: one mistake, one error
            break
        else:
            if prim is not None and prim.keeps_dtype and graph.dtype(args[0]) != "float":
                data["dtype"] = graph.dtype(args[0])  # tokens[:, 0], reshape(tokens, ...): still an index
