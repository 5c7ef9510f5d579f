"""The lowering pipeline: a checked layer graph → a :class:`LoweredLayer`, everything the code generator prints.

The passes, in order (:data:`LOWERING`; each a pure function from the layer lowered so far to the next stage):

1. ``expand grads`` (:func:`~fpidsl.passes.differentiate.expand_grads`): ``grad(E, x)`` becomes explicit
   derivative nodes, so g is an ordinary graph (``step``);
2. ``hoist`` (:func:`~fpidsl.passes.hoist.split_step`): what g reads that depends on no state, computed once per
   forward solve (``forward``, None when nothing is worth hoisting);
3. ``samples`` (:func:`~fpidsl.ir.batching.samplewise`): whether g treats the samples independently, from each
   primitive's declared batch rule (``samplewise``), and which hoisted values follow the batch;
4. ``backward`` (:func:`~fpidsl.passes.differentiate.backward_graph`): the paper's backward map h = Σ c_sᵀ g_s;
5. ``narrow backward`` (:func:`~fpidsl.passes.narrow.narrow`): slices of products become products of slices,
   and products of scattered slices products with a slice, where the factor does not depend on the cotangent;
6. ``split backward`` (:func:`~fpidsl.passes.split_backward.split_backward`): what depends only on x̂
   (``prepare``) and what is linear in c (``vjp_state``, ``vjp_args``).

Every graph a pass returns passes :meth:`~fpidsl.ir.graph.LayerGraph.lint`; ``lower(graph, lint=True)`` checks
that between passes (the test suite always does: tests/conftest.py sets ``FPIDSL_LINT_PASSES=1``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

from ..ir.batching import batch_axes, samplewise
from ..ir.graph import BackwardGraph, LayerGraph
from .differentiate import backward_graph, expand_grads
from .hoist import StepParts, split_step
from .narrow import narrow
from .split_backward import BackwardParts, linear_nodes, split_backward


@dataclass(frozen=True)
class LoweredLayer:
    """One layer, lowered: the checked graph and what each lowering pass made of it."""

    source: LayerGraph                     # the checked graph (``grad`` unexpanded)
    step: LayerGraph | None = None         # g with ``grad`` expanded
    forward: StepParts | None = None       # the hoisted split of the forward iteration, when worthwhile
    samplewise: bool | None = None         # g never mixes samples: finished samples may be dropped
    hoist_batched: tuple[bool, ...] | None = None  # per hoisted value: dimension 0 is the batch
    backward: BackwardGraph | None = None  # the backward map, narrowed
    adjoint: BackwardParts | None = None   # the backward map split into prepare / vjp_state / vjp_args

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def state_names(self) -> list[str]:
        return list(self.source.states)

    @property
    def input_names(self) -> list[str]:
        return list(self.source.inputs)

    @property
    def param_names(self) -> list[str]:
        return list(self.source.params)

    def graphs(self) -> list[LayerGraph]:
        """Every graph this stage holds."""
        out = [self.source, self.step, self.forward.graph if self.forward else None, self.backward]
        return [g for g in out if g is not None]


def _expand(layer: LoweredLayer) -> LoweredLayer:
    return dataclasses.replace(layer, step=expand_grads(layer.source))


def _hoist(layer: LoweredLayer) -> LoweredLayer:
    parts = split_step(layer.step)
    return dataclasses.replace(layer, forward=parts if parts is not None and parts.worthwhile else None)


def _samples(layer: LoweredLayer) -> LoweredLayer:
    if layer.forward is None:
        return dataclasses.replace(layer, samplewise=samplewise(layer.step))
    parts = layer.forward
    ok = samplewise(parts.graph, extra_roots=parts.hoisted)
    axes = batch_axes(parts.graph, [*parts.roots, *parts.hoisted])
    return dataclasses.replace(layer, samplewise=ok, hoist_batched=tuple(axes.get(n) == 0 for n in parts.hoisted))


def _backward(layer: LoweredLayer) -> LoweredLayer:
    return dataclasses.replace(layer, backward=backward_graph(layer.step))


def _narrow_backward(layer: LoweredLayer) -> LoweredLayer:
    bg = layer.backward
    return dataclasses.replace(layer, backward=narrow(bg, linear_nodes(bg, layer.state_names)))


def _split_backward(layer: LoweredLayer) -> LoweredLayer:
    parts = split_backward(layer.backward, layer.state_names, layer.input_names, layer.param_names)
    return dataclasses.replace(layer, adjoint=parts)


LOWERING: tuple[tuple[str, Callable[[LoweredLayer], LoweredLayer]], ...] = (
    ("expand grads", _expand),
    ("hoist", _hoist),
    ("samples", _samples),
    ("backward", _backward),
    ("narrow backward", _narrow_backward),
    ("split backward", _split_backward),
)


def lower(graph: LayerGraph, lint: bool | None = None) -> LoweredLayer:
    """Run :data:`LOWERING` on a checked graph; with ``lint``, every graph is linted after every pass (by default
    when the environment sets ``FPIDSL_LINT_PASSES=1``, as the test suite does)."""
    if lint is None:
        lint = os.environ.get("FPIDSL_LINT_PASSES") == "1"
    layer = LoweredLayer(graph)
    for name, run in LOWERING:
        layer = run(layer)
        if lint:
            for g in layer.graphs():
                try:
                    g.lint()
                except AssertionError as e:
                    raise type(e)(f"after the lowering pass {name!r}: {e}") from None
    return layer
