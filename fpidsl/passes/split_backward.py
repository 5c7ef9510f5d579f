"""Split a derived backward graph into what depends only on x̂ and what is linear in the cotangent c (the
backward map is narrowed first, by :mod:`fpidsl.passes.narrow`; both are lowering passes, :mod:`fpidsl.passes.lower`).

The first part is computed once per backward solve (``adjoint.prepare``); the second runs every
iteration (``adjoint.vjp_state``) or once at the end (``adjoint.vjp_args``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import LayerGraph
from ..ir.primitives import PRIMITIVES


@dataclass(frozen=True)
class BackwardParts:
    cotangents: list[str]          # one node per state, in state order
    saved: list[str]               # primal nodes the c-dependent part reads, in topological order
    state_grads: list[str | None]  # per state: the node of (dg/dx)^T c, None where structurally zero
    arg_grads: list[str | None]    # per input, then per param
    shape_only: frozenset = frozenset()  # saved nodes the c-dependent part reads for their shape only


def cotangent_nodes(bg: LayerGraph, state_names: list[str]) -> list[str]:
    """The cotangent input of each state."""
    by_state = {}
    for nid in bg.nodes():
        data = bg.node(nid)
        if data.get("role") == "cotangent":
            by_state[data.get("state") or data["name"].removeprefix("c_")] = nid
    return [by_state[s] for s in state_names]


def linear_nodes(bg: LayerGraph, state_names) -> set[str]:
    """The nodes that depend on a cotangent (the rest depends only on x̂ and the arguments)."""
    return bg.downstream(cotangent_nodes(bg, state_names))


def split_backward(bg: LayerGraph, state_names, input_names, param_names) -> BackwardParts:
    cot = cotangent_nodes(bg, state_names)
    linear = linear_nodes(bg, state_names)
    grad_of = bg.grad_of
    state_grads = [grad_of.get(f"state:{s}") for s in state_names]
    arg_grads = [grad_of.get(f"input:{n}") for n in input_names] + \
                [grad_of.get(f"param:{n}") for n in param_names]
    needed = bg.upstream_within([s for s in state_grads + arg_grads if s is not None], linear)
    saved = []
    for nid in bg.nodes():
        if nid in linear or bg.node(nid)["op"] == "const":
            continue
        if any(user in needed for user, _ in bg.users(nid)):
            saved.append(nid)
    for sink in state_grads + arg_grads:  # a gradient that does not depend on c at all
        if sink is not None and sink not in linear:
            raise ValueError(f"backward graph sink {sink} does not depend on the cotangent")
    shape_only = frozenset(s for s in saved if all(
        pos in PRIMITIVES[bg.node(user)["prim"]].shape_only for user, pos in bg.users(s) if user in needed))
    return BackwardParts(cot, saved, state_grads, arg_grads, shape_only)
