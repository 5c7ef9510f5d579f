"""Structural checks that need shapes: updates and initial values fit their states, energies are
per-sample scalars, ``grad`` pairs an energy with a state it can be differentiated against, the
symbolic dimensions used in ``reshape`` inside fns are dimensions of the inputs, and a reshape has at most
one size that its argument's sizes do not give (the generated code writes it as -1)."""
from __future__ import annotations

from ..errors import ErrorSink, ShapeErr
from ..ir.graph import LayerGraph
from ..ir.shapes import broadcasts_to, fmt_shape, shape_symbols, sizes_not_given


def check_layer(graph: LayerGraph, sink: ErrorSink) -> None:
    for name, info in graph.states.items():
        if info.shape is None:
            continue
        if info.update is not None:
            _fits(graph, info.update, sink, exact=True,
                  message=lambda s: f"update {name} has shape {s}, but the state {name} has shape "
                                    f"{fmt_shape(info.shape)}",
                  hint="an update computes the next value of its state: the same shape")
        if info.init is not None and graph.args(info.init):
            _fits(graph, info.init, sink, exact=False,
                  message=lambda s: f"the initial value of state {name} has shape {s}, which does not broadcast "
                                    f"to the state's shape {fmt_shape(info.shape)}",
                  hint=None)
    leading = {info.shape[0] for info in graph.states.values() if info.shape}
    batch = " or ".join(f"[{d}]" for d in sorted(map(str, leading)))
    for name, nid in graph.energies.items():
        shape = graph.shape(nid)
        if shape is None or shape == () or (len(shape) == 1 and shape[0] in leading):
            continue
        sink.add(ShapeErr(
            f"energy {name} must be one value per sample (shape []{' or ' + batch if batch else ''}), but it has "
            f"shape {fmt_shape(shape)}", graph.value_spans.get(name, graph.node(nid)["span"]),
            hint="reduce it over the other dimensions, e.g. sum(..., dim=-1)"))
    inputs = set()
    for nid in graph.inputs.values():
        inputs |= shape_symbols(graph.shape(nid) or ())
    for nid in graph.nodes():
        data = graph.node(nid)
        if data["op"] != "call":
            continue
        if data["prim"] == "grad":
            _check_grad(graph, nid, sink)
        elif data["prim"] == "reshape":
            source = graph.shape(graph.args(nid)[0])
            error = (reshape_target_error(source, data["shape"], data["span"])
                     if data["shape"] is not None and source is not None else None)
            if error is not None:
                sink.add(error)
            unbound = sorted(shape_symbols(data["attrs"]["shape"]) - inputs)
            if unbound and data.get("inlined"):
                sink.add(ShapeErr(f"the dimension {unbound[0]} of this reshape is not a dimension of any input",
                                  data["span"], hint=f"in fn {data['inlined'][0]}, inlined at {data['inlined'][1]}"))


def reshape_target_error(source, shape, span) -> ShapeErr | None:
    """The error for a reshape the code generator cannot write: more than one size of its inferred result
    ``shape`` uses symbols that the sizes of its argument (of shape ``source``) do not give (the generated target
    writes the others from the argument's sizes and that one, if any, as -1)."""
    unknown = sizes_not_given(source, shape)
    if len(unknown) <= 1:
        return None
    return ShapeErr(
        f"the code generator can write a reshape of {fmt_shape(source)} with at most one size that the argument's "
        f"sizes do not give (it becomes -1), but this one's result {fmt_shape(shape)} has {len(unknown)}: "
        + ", ".join(str(shape[i]) for i in unknown),
        span, hint="reshape in two steps, or write one of the sizes as -1")


def _fits(graph: LayerGraph, sink_node: str, sink: ErrorSink, exact: bool, message, hint) -> None:
    (value,) = graph.args(sink_node)
    shape = graph.shape(value)
    target = graph.shape(sink_node)
    if shape is None:
        return
    if (tuple(shape) == tuple(target)) if exact else broadcasts_to(shape, target):
        return
    sink.add(ShapeErr(message(fmt_shape(shape)), graph.arg_spans(sink_node)[0], hint=hint))


def _check_grad(graph: LayerGraph, nid: str, sink: ErrorSink) -> None:
    energy, state = graph.args(nid)
    es, xs = graph.shape(energy), graph.shape(state)
    if es is None or xs is None or len(es) != 1:
        return
    if not xs or xs[0] != es[0]:
        sink.add(ShapeErr(
            f"grad: the energy has one value per sample ({fmt_shape(es)}), but the state "
            f"{graph.node(state)['name']} has shape {fmt_shape(xs)}, whose leading dimension differs",
            graph.node(nid)["span"], hint="an energy is [] or [B], B being the leading dimension of the state"))
