"""The forward iteration with what does not depend on the states computed once.

The map g is evaluated every iteration of the forward solve, but parts of it read only the inputs and the params
(``fc1(cat([y, x]))``'s share of ``x``, a bias, a slice of a weight). Three passes over the ``grad``-expanded
graph make that part as large as possible and cut it off:

* :func:`distribute_over_cat`: ``linear`` / ``conv2d`` / ``conv_transpose2d`` of a ``cat`` of state-dependent and
  state-free pieces becomes the sum of the same operation on each group of pieces with the matching slice of
  the weight (the bias goes with a state-free group), so the state-free product leaves the loop (convolutions
  only where the state-free channels are most of them, see ``CONV_SPLIT_SHARE``);
* :func:`~fpidsl.passes.narrow.narrow_slices` (shared with the backward map): a slice of a product with a
  state-free factor becomes the product with the slice of that factor (an FPI_GD step keeps only the state's
  share of ``fc1``'s input gradient);
* :func:`split_step`: the nodes that depend on no state and feed one that does are the *hoisted* values,
  computed once per solve by the emitted ``hoist``; ``iterate`` computes g from the states and them.

``iterate(x, *hoist(*args))`` computes the same numbers as ``step(x, *args)`` up to the order of floating-point
sums. The backward map is derived from the unchanged graph.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.builder import GraphBuilder, compact, copy_metadata, copy_node
from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES, SliceSpec
from .narrow import narrow

# A convolution is split only when its state-free input channels are at least this share of all of them: on CPU a
# convolution with few input channels costs about the same whatever their number, so splitting 1 + 1 channels
# only adds a pass (benchmarks/kernels.py, batch 8 of 64x64, 16 output channels: 2 channels whole 0.24 ms, split
# 0.26 ms; 4 channels whole 0.32 ms, split 0.26 ms). A linear layer's cost grows with its input features: always
# split.
CONV_SPLIT_SHARE = 0.75


def state_dependent(graph: LayerGraph) -> set[str]:
    """The nodes whose value depends on a state."""
    return graph.downstream(info.node for info in graph.states.values())


@dataclass(frozen=True)
class _Plan:
    prim: str
    data_axis: int           # the cat's axis, non-negative
    weight_axis: int
    groups: list[tuple[list[str], int, int, bool]]  # (pieces, lo, hi, state-dependent), in cat order


def _plan(graph: LayerGraph, nid: str, variant: set[str]) -> _Plan | None:
    data = graph.node(nid)
    prim = data.get("prim")
    if data["op"] != "call" or PRIMITIVES[prim].distribute is None:
        return None
    args = graph.args(nid)
    cat, weight = args[0], args[1]
    cdata = graph.node(cat)
    if cdata["op"] != "call" or cdata["prim"] != "cat" or weight in variant:
        return None
    if len(args) > 2 and args[2] in variant:
        return None
    shape = graph.shape(cat)
    if shape is None:
        return None
    axis_of_data, weight_axis = PRIMITIVES[prim].distribute  # the data axis the weight contracts, and its own
    rank = len(shape)
    axis = axis_of_data % rank
    if cdata["attrs"]["dim"] % rank != axis:
        return None
    pieces = graph.args(cat)
    flags = [p in variant for p in pieces]
    if all(flags) or not any(flags):
        return None
    sizes = [(graph.shape(p) or (None,) * rank)[axis] for p in pieces]
    if not all(isinstance(s, int) for s in sizes):
        return None
    free = sum(size for size, flag in zip(sizes, flags) if not flag)
    if prim != "linear" and free < CONV_SPLIT_SHARE * sum(sizes):
        return None
    groups: list[tuple[list[str], int, int, bool]] = []
    lo = 0
    for piece, size, flag in zip(pieces, sizes, flags):
        if groups and groups[-1][3] == flag:
            members, start, _, _ = groups[-1]
            groups[-1] = (members + [piece], start, lo + size, flag)
        else:
            groups.append(([piece], lo, lo + size, flag))
        lo += size
    return _Plan(prim, axis, weight_axis, groups)


def _distribute(b: GraphBuilder, graph: LayerGraph, nid: str, plan: _Plan, mapping: dict[str, str]) -> str:
    args = [mapping[a] for a in graph.args(nid)]
    weight, bias = args[1], (args[2] if len(args) > 2 else None)
    attrs = dict(graph.node(nid)["attrs"])
    full = SliceSpec(None, None, None)
    with_bias = next(i for i, group in enumerate(plan.groups) if not group[3])
    terms = []
    for i, (pieces, lo, hi, _) in enumerate(plan.groups):
        part = mapping[pieces[0]] if len(pieces) == 1 else b.call("cat", *(mapping[p] for p in pieces),
                                                                    dim=plan.data_axis)
        index = (full,) * plan.weight_axis + (SliceSpec(lo, hi, None),)
        w = b.call("index", weight, index=index)
        extra = (bias,) if i == with_bias and bias is not None else ()
        terms.append(b.call(plan.prim, part, w, *extra, **attrs))
    total = terms[0]
    for term in terms[1:]:
        total = b.call("add", total, term)
    return total


def distribute_over_cat(graph: LayerGraph) -> LayerGraph:
    """A copy of ``graph`` where a linear operation of a ``cat`` that mixes state-dependent and state-free
    pieces is split by pieces (see the module's doc); unchanged when there is none."""
    variant = state_dependent(graph)
    plans = {nid: plan for nid in graph.nodes() if (plan := _plan(graph, nid, variant)) is not None}
    if not plans:
        return graph
    out = LayerGraph(graph.name, graph.span)
    b = GraphBuilder(out)
    mapping: dict[str, str] = {}
    for nid in graph.nodes():
        if nid in plans:
            with b.deriving(nid, graph):
                mapping[nid] = _distribute(b, graph, nid, plans[nid], mapping)
        else:
            mapping[nid] = copy_node(b, graph, nid, mapping)
    copy_metadata(graph, out, mapping)
    return compact(out)[0]


def narrow_step(graph: LayerGraph) -> LayerGraph:
    """The step graph with slices of products narrowed to slices of their state-free factors (renumbered,
    identical slices made once)."""
    return narrow(graph, state_dependent(graph))


@dataclass(frozen=True)
class StepParts:
    """The forward iteration cut in two: ``hoisted`` (state-free nodes the loop reads, leaves included, in
    topological order) and, per hoisted node, whether dimension 0 is the batch of the states."""

    graph: LayerGraph
    roots: list[str]
    hoisted: list[str]
    batched: list[bool]

    @property
    def worthwhile(self) -> bool:
        """Whether anything is computed once (not only leaves passed through)."""
        return any(self.graph.node(n)["op"] == "call" for n in self.hoisted)


def split_step(graph: LayerGraph) -> StepParts | None:
    """The hoisted values of the forward iteration of ``graph`` (``grad`` expanded), after distributing and
    narrowing; None when a hoisted value's batch dimension cannot be told from its shape."""
    work = narrow_step(distribute_over_cat(graph))
    variant = state_dependent(work)
    roots = [work.args(work.states[s].update)[0] for s in work.states]
    needed = work.upstream_within(roots, variant)
    hoisted = [n for n in work.nodes()
               if n not in variant and work.node(n)["op"] != "const"
               and (n in roots or any(u in needed for u, _ in work.users(n)))]
    batch = {info.shape[0] for info in work.states.values() if info.shape and isinstance(info.shape[0], str)}
    reads_batch = work.downstream(nid for nid in work.inputs.values() if (work.shape(nid) or ("",))[0] in batch)
    batched = []
    for nid in hoisted:
        shape = work.shape(nid)
        if shape is None:
            return None
        # a value that reads a batched input but was reduced over the batch stays whole: such a map is not
        # samplewise, and the runtime slices hoisted values only for samplewise maps
        batched.append(nid in reads_batch and bool(shape) and shape[0] in batch)
    return StepParts(work, roots, hoisted, batched)
