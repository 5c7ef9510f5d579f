"""Helpers for the differentiation tests: one-primitive graphs, random points, shipped layers."""
from __future__ import annotations

from pathlib import Path

import torch

from fpidsl.compiler import check_file, check_source
from fpidsl.ir.builder import GraphBuilder
from fpidsl.ir.graph import LayerGraph
from fpidsl.ir.interpret import evaluate
from fpidsl.passes.differentiate import reverse_mode
from fpidsl.runtime import ops
from fpidsl.source import Source, Span

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(p for p in (ROOT / "specs").iterdir() if p.suffix in (".fpi", ".yaml"))
SPAN = Span("t.fpi", 1, 1, 1, 2)
DTYPE = torch.float64


# --------------------------------------------------------------------------- one-primitive graphs


class PrimGraph:
    """A graph of leaves (inputs ``a0, a1, ...``) and nodes added by a :class:`GraphBuilder`."""

    def __init__(self, shapes):
        self.graph = LayerGraph("T", SPAN)
        self.builder = GraphBuilder(self.graph)
        self.leaves = [self.leaf(f"a{i}", s) for i, s in enumerate(shapes)]

    def leaf(self, name: str, shape) -> str:
        nid = self.graph.add_node("input", span=SPAN, shape=tuple(shape), name=name)
        self.graph.inputs[name] = nid
        return nid

    def call(self, prim: str, args, attrs) -> str:
        with self.builder.deriving(self.leaves[0]):
            return self.builder.call(prim, *args, **attrs)

    def vjp(self, seeds, wrt) -> dict:
        """Cotangent-weighted gradients: ``seeds`` maps node -> its cotangent's leaf name."""
        pairs = [(node, self.leaf(name, self.graph.shape(node))) for node, name in seeds.items()]
        return reverse_mode(self.builder, pairs, wrt)

    def run(self, env: dict, roots) -> dict:
        return evaluate(self.graph, env, roots=[r for r in roots if r is not None])


def call_op(prim: str, args, attrs):
    """The ops function applied as generated code applies it."""
    fn = getattr(ops, prim)
    return fn(list(args), **attrs) if prim == "cat" else fn(*args, **attrs)


def rand(shape, gen: torch.Generator, domain: str = "any") -> torch.Tensor:
    x = torch.randn(tuple(shape), generator=gen, dtype=DTYPE)
    if domain == "positive":
        return 0.5 + x.abs()
    if domain == "nonzero":
        return torch.where(x >= 0, 0.5 + x, x - 0.5)
    return x


def grads_or_none(out, inputs, grad_outputs, **kw):
    """``torch.autograd.grad`` with None for every input when ``out`` does not depend on any."""
    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out])]
    cts = grad_outputs if isinstance(grad_outputs, (list, tuple)) else [grad_outputs]
    live = [(o, c) for o, c in zip(outs, cts) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not live:
        return [None] * len(inputs)
    return list(torch.autograd.grad([o for o, _ in live], inputs, [c for _, c in live], allow_unused=True, **kw))


def assert_same_grad(got, want, what: str) -> None:
    """``got`` (None: structurally zero) equals ``want`` (None: unused)."""
    if got is None and want is None:
        return
    ref = want if want is not None else torch.zeros_like(got)
    val = got if got is not None else torch.zeros_like(want)
    assert val.shape == ref.shape, f"{what}: shape {tuple(val.shape)} vs {tuple(ref.shape)}"
    torch.testing.assert_close(val, ref, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- layers


def shipped_layers() -> list[tuple[str, str, LayerGraph]]:
    """(spec file name, layer name, graph) of every layer in specs/."""
    out = []
    for path in SPECS:
        for name, graph in check_file(str(path)).graphs.items():
            out.append((path.name, name, graph))
    return out


def layers_of(text: str, path: str = "t.fpi") -> dict[str, LayerGraph]:
    return check_source(Source(path, text)).graphs


def concrete(shape, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def random_env(graph: LayerGraph, dims: dict[str, int], gen: torch.Generator, scale: float = 0.5) -> dict:
    """Random float64 values for every input, state and param (by name), requiring grad."""
    env = {}
    leaves = dict(graph.inputs)
    leaves.update((s, info.node) for s, info in graph.states.items())
    leaves.update(graph.params)
    for name, nid in leaves.items():
        value = scale * rand(concrete(graph.shape(nid), dims), gen)
        env[name] = value.requires_grad_()
    return env
