"""Outside modules: ``param f : extern [B, C] -> [B, C]``, a user's ``nn.Module`` given at construction.

An extern ``f`` is two ``param`` nodes and one call node per use:

* ``f.module`` (role ``module``, shape ``[]``): the module handle, a runtime value that is not a tensor (the
  :class:`~fpidsl.runtime.layer.ExternHandle` the layer passes as an argument, with the declaration and the
  call's symbolic sizes); the node carries the :class:`ExternSpec` (``extern=``);
* ``f.parameters`` (role ``parameters``, shape ``[f.numel]``): the module's parameters flattened into one
  vector (``torch.cat`` of them, so its gradient reaches every parameter), made again at every call;
* ``extern(f.module, f.parameters, x1, ..., xk)``: the module applied to ``x1..xk`` with those parameters
  (``torch.func.functional_call``); its shape rule checks the arguments against the declared input shapes and
  gives the declared output shape.

Its VJP is ``extern_vjp``: the same arguments followed by cotangents ``u1..um`` and the static ``chain``
``(w1, ..., wm)`` of argument positions. ``extern_vjp`` with chain ``(w1)`` is ``(∂f/∂a_w1)ᵀ u1``; with chain
``(w1, ..., wm)`` it is the VJP, with cotangent ``um``, of the node with chain ``(w1, ..., w(m-1))`` with respect
to its argument ``wm`` (an input, the parameters or an earlier cotangent). The op computes it by
``torch.autograd.grad(..., create_graph=True)`` nested m times, and the VJP rule of a node with chain ``w`` is the
node with chain ``w + (p,)`` for each argument ``p``: derived graphs stay differentiable to every order.

Nothing here imports the graph: :func:`declare_extern` and :func:`call_extern` take any graph with
``add_node`` / ``params`` (a :class:`~fpidsl.ir.graph.LayerGraph`), which is the API a front-end other than the
parser (a torch.fx tracer) uses to make extern nodes for any callable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..source import Span
from .shapes import fmt_shape

EXTERN = "extern"
EXTERN_VJP = "extern_vjp"
FIXED_ARGS = 2  # the module handle and the flat parameter vector come before the inputs


@dataclass(frozen=True)
class ExternSpec:
    """A declared extern: its name, one shape per input, the output shape, and whether it keeps samples apart."""

    name: str
    inputs: tuple[tuple, ...]
    output: tuple
    samplewise: bool = False
    span: Span | None = field(default=None, compare=False)

    @property
    def handle_param(self) -> str:
        return f"{self.name}.module"

    @property
    def parameters_param(self) -> str:
        return f"{self.name}.parameters"

    def attrs(self) -> dict[str, Any]:
        """The static attributes of its call nodes."""
        return {"name": self.name, "inputs": tuple(tuple(s) for s in self.inputs), "output": tuple(self.output),
                "samplewise": self.samplewise}

    def format(self) -> str:
        """``extern samplewise ([B, 4], [B, 2]) -> [B, 4]``, as a spec writes it."""
        return format_declaration(self.inputs, self.output, self.samplewise)


def format_declaration(inputs: Sequence[tuple], output: tuple, samplewise: bool) -> str:
    ins = fmt_shape(inputs[0]) if len(inputs) == 1 else "(" + ", ".join(fmt_shape(s) for s in inputs) + ")"
    return f"extern {'samplewise ' if samplewise else ''}{ins} -> {fmt_shape(output)}"


def parameters_shape(name: str) -> tuple:
    """The shape of an extern's flat parameter vector: a size known only at construction (not a user symbol: a
    dot cannot be written in a spec)."""
    return (f"{name}.numel",)


def declare_extern(graph, spec: ExternSpec, span: Span) -> tuple[str, str]:
    """Add the param nodes of extern ``spec`` to ``graph`` (its ``params`` ``NAME.module`` and
    ``NAME.parameters``); returns their ids. The layer's constructor then takes the module as ``NAME=``."""
    handle = graph.add_node("param", span=span, shape=(), name=spec.handle_param, module=None, role="module",
                            extern=spec)
    flat = graph.add_node("param", span=span, shape=parameters_shape(spec.name), name=spec.parameters_param,
                          module=None, role="parameters", extern_of=spec.name)
    graph.params[spec.handle_param] = handle
    graph.params[spec.parameters_param] = flat
    return handle, flat


def call_extern(graph, spec: ExternSpec, args: Sequence[tuple[str, Span]], span: Span, **node_attrs: Any) -> str:
    """A call node applying extern ``spec`` to ``args`` (node ids with their use-site spans); its shape is set by
    shape inference (or by the caller)."""
    handle, flat = graph.params[spec.handle_param], graph.params[spec.parameters_param]
    edges = [(handle, span), (flat, span), *args]
    return graph.add_node("call", span=span, prim=EXTERN, attrs=spec.attrs(), args=edges, **node_attrs)


def externs(graph) -> dict[str, ExternSpec]:
    """The externs a graph declares, in declaration order."""
    out = {}
    for nid in graph.params.values():
        spec = graph.node(nid).get("extern")
        if spec is not None:
            out[spec.name] = spec
    return out


# --------------------------------------------------------------------------- shape rules


def _describe(attrs) -> str:
    return f"{attrs['name']} (declared {format_declaration(attrs['inputs'], attrs['output'], attrs['samplewise'])})"


def extern_shape(shapes, attrs, ctx):
    """The declared output shape, once every argument has its declared shape."""
    args = shapes[FIXED_ARGS:]
    declared = attrs["inputs"]
    if len(args) != len(declared):
        n = len(declared)
        raise ctx.fail(f"{_describe(attrs)} takes {n} argument{'s' if n != 1 else ''}, but {len(args)} "
                       f"{'were' if len(args) != 1 else 'was'} given", at_call=True,
                       hint=f"call it as {attrs['name']}({', '.join(f'x{i + 1}' for i in range(n))})")
    for i, (got, want) in enumerate(zip(args, declared)):
        if tuple(got) != tuple(want):
            raise ctx.fail(f"argument {i + 1} of {_describe(attrs)} must have shape {fmt_shape(want)}, found "
                           f"{fmt_shape(got)}", arg=FIXED_ARGS + i,
                           hint="an extern's arguments have exactly the declared shapes (a symbolic dimension "
                                "equals only itself)")
    return tuple(attrs["output"])


def extern_vjp_shape(shapes, attrs, ctx):
    """The shape of the argument the last VJP of the chain is taken with respect to."""
    return tuple(shapes[attrs["chain"][-1]])
