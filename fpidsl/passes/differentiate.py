"""Differentiation as graph passes: reverse mode over the primitives' VJP rules.

* :func:`expand_grads` replaces every ``grad(E, x)`` by the explicit derivative of ``sum(E)`` with
  respect to the state ``x`` (an FPI_GD layer's update becomes an ordinary graph);
* :func:`backward_graph` derives the paper's backward map ``h = Σ_s c_sᵀ g_s``: the primal nodes of g
  (values at x̂), one cotangent input per state and the gradients of h with respect to the states,
  inputs and params (a :class:`BackwardGraph`).

Both are built with :func:`reverse_mode`, which adds the VJP of some nodes of a graph to that graph:
cotangent contributions are summed once per node, derived nodes take the span of the primal node
they differentiate, identical nodes are made once, and nodes nobody uses are pruned.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from ..ir.builder import GraphBuilder, compact, copy_metadata, copy_node
from ..ir.graph import BackwardGraph, LayerGraph
from ..ir.primitives import PRIMITIVES
from ..ir.shapes import fmt_shape


# --------------------------------------------------------------------------- reverse mode


def reverse_mode(b: GraphBuilder, seeds: Sequence[tuple[str, str]], wrt: Sequence[str]) -> dict[str, str | None]:
    """Add to ``b.graph`` the gradient of ``Σ <ct, node>`` over the ``(node, ct)`` seeds with respect to
    each node of ``wrt``; return wrt node -> its gradient node (None where structurally zero)."""
    graph = b.graph
    relevant = _between(graph, [node for node, _ in seeds], wrt)
    pending: dict[str, list[str]] = {}
    for node, ct in seeds:
        if node in relevant:
            pending.setdefault(node, []).append(ct)
    total: dict[str, str] = {}
    for nid in reversed(graph.nodes()):
        if nid not in pending:
            continue
        total[nid] = _accumulate(b, nid, pending.pop(nid))
        if graph.node(nid)["op"] == "call":
            _propagate(b, nid, total[nid], relevant, pending)
    return {w: total.get(w) for w in wrt}


def _between(graph: LayerGraph, outputs: Iterable[str], wrt: Iterable[str]) -> set[str]:
    """Nodes on a path from a ``wrt`` node to an output node (both included)."""
    up = graph.upstream(outputs)
    down = graph.downstream(wrt)
    return up & down


def _accumulate(b: GraphBuilder, nid: str, parts: list[str]) -> str:
    total = parts[0]
    with b.deriving(nid):
        for part in parts[1:]:
            total = b.call("add", total, part)
    return total


def _propagate(b: GraphBuilder, nid: str, ct: str, relevant: set[str], pending: dict[str, list[str]]) -> None:
    """Apply the VJP rule of ``nid`` and queue the cotangents of its relevant arguments."""
    prim = b.graph.node(nid)["prim"]
    args = b.args(nid)
    with b.deriving(nid):
        grads = PRIMITIVES[prim].vjp(b, nid, ct)
    for pos, grad in sorted(grads.items()):
        arg = args[pos]
        if arg not in relevant:
            continue
        if b.shape(grad) != b.shape(arg):
            raise AssertionError(f"the VJP rule of {prim} gives argument {pos} of {nid} a cotangent of shape "
                                 f"{fmt_shape(b.shape(grad))}, but the argument has {fmt_shape(b.shape(arg))}")
        pending.setdefault(arg, []).append(grad)


# --------------------------------------------------------------------------- the passes


def expand_grads(graph: LayerGraph) -> LayerGraph:
    """A new graph in which every ``grad(E, x)`` is the explicit gradient of ``sum(E)`` with respect to
    the state ``x``; every other node of ``graph`` is kept."""
    out = LayerGraph(graph.name, graph.span)
    b = GraphBuilder(out)
    mapping: dict[str, str] = {}
    grads = [nid for nid in graph.nodes() if _is_grad(graph, nid)]
    for nid in graph.nodes():
        if grads and _is_grad(graph, nid):
            energy, state = (mapping[a] for a in graph.args(nid))
            with b.deriving(nid, graph):
                mapping[nid] = _energy_grad(b, energy, state)
        else:
            mapping[nid] = copy_node(b, graph, nid, mapping)
    copy_metadata(graph, out, mapping)
    if not grads:  # every node of the copy is one of graph's: nothing to prune, and compacting would copy it again
        return out
    kept = [mapping[nid] for nid in graph.nodes() if not _is_grad(graph, nid)]
    return compact(out, kept, LayerGraph)[0]


def backward_graph(graph: LayerGraph) -> BackwardGraph:
    """The graph of ``h = Σ_s c_sᵀ g_s`` and its gradients (see :class:`BackwardGraph`); ``grad`` calls
    are expanded first."""
    primal = expand_grads(graph) if any(_is_grad(graph, n) for n in graph.nodes()) else graph
    work = LayerGraph(graph.name, graph.span)
    b = GraphBuilder(work)
    mapping: dict[str, str] = {}
    for nid in primal.nodes():
        if primal.node(nid)["op"] != "output":
            mapping[nid] = copy_node(b, primal, nid, mapping)
    copy_metadata(primal, work, mapping)
    cotangents = {s: _cotangent(work, s) for s in work.states}
    seeds = [(work.args(info.update)[0], cotangents[s]) for s, info in work.states.items()]
    targets = _grad_targets(work)
    grads = reverse_mode(b, seeds, list(targets.values()))
    grad_of = {key: grads[nid] for key, nid in targets.items() if grads[nid] is not None}
    work.output = work.add_node("output", span=graph.span, shape=(), args=list(grad_of.values()))
    roots = [work.output, *cotangents.values(), *targets.values()]
    roots += [sink for info in work.states.values() for sink in (info.update, info.init)]
    bg, renamed = compact(work, roots, BackwardGraph)
    bg.cotangents = {s: renamed[c] for s, c in cotangents.items()}
    bg.grad_of = {key: renamed[nid] for key, nid in grad_of.items()}
    return bg


def _is_grad(graph: LayerGraph, nid: str) -> bool:
    data = graph.node(nid)
    return data["op"] == "call" and data["prim"] == "grad"


def _energy_grad(b: GraphBuilder, energy: str, state: str) -> str:
    """The gradient of ``sum(energy)`` with respect to ``state`` (zeros where it does not depend on it)."""
    seed = b.call("ones_like", energy)
    grad = reverse_mode(b, [(energy, seed)], [state])[state]
    return grad if grad is not None else b.call("zeros_like", state)


def _cotangent(graph: LayerGraph, state: str) -> str:
    info = graph.states[state]
    return graph.add_node("input", span=info.span, shape=graph.shape(info.node), name=f"c_{state}",
                          role="cotangent", state=state)


def _grad_targets(graph: LayerGraph) -> dict[str, str]:
    """``state:x`` / ``input:a`` / ``param:p`` -> the leaf node, in state, input, param order."""
    out = {f"state:{s}": info.node for s, info in graph.states.items()}
    out.update((f"input:{n}", nid) for n, nid in graph.inputs.items())
    out.update((f"param:{n}", nid) for n, nid in graph.params.items())
    return out


