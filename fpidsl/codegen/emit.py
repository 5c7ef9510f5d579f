"""Emit one readable Python module per spec: a ``CompiledLayer`` subclass per layer.

Each class holds, as straight-line code made of :mod:`fpidsl.runtime.ops` calls: ``step`` (the map g,
with ``grad`` expanded), ``adjoint`` (the derived backward map, split into what depends only on x̂ —
computed once by ``prepare`` — and what depends on the cotangent c), ``init_states`` and ``outputs``.
Every statement carries a ``# spec.fpi:LINE:COL`` comment; the only names in the output are validated
identifiers from a :class:`~fpidsl.codegen.namespace.Namespace` and the only values numeric literals.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..interface import emitted_check
from ..ir.extern import externs
from ..ir.graph import LayerGraph
from ..passes.lower import LoweredLayer
from ..ir.primitives import PRIMITIVES, SliceSpec
from ..ir.shapes import DimExpr
from .namespace import Namespace
from .sizes import reshape_target

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EQUATION = re.compile(r"[A-Za-z.,]*->[A-Za-z.]*")  # a canonical einsum equation (fpidsl.ir.linalg)
INDENT = "    "


def literal(value: Any) -> str:
    """A Python literal for an attribute or constant value written by the compiler."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
        return repr(float(value))
    if value is Ellipsis:
        return "..."
    if isinstance(value, SliceSpec):
        return f"slice({literal(value.lo)}, {literal(value.hi)}, {literal(value.step)})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, str) and (_IDENT.match(value) or _EQUATION.fullmatch(value)):
        return repr(value)
    if isinstance(value, DimExpr):  # a size such as 'H/2' (runtime/sizes.py reads it)
        return repr(str(value))
    raise TypeError(f"the code generator cannot write {value!r} as a literal")


@functools.lru_cache(maxsize=64)
def _file_name(path: str) -> str:
    """A spec's file name, safe inside a comment or a docstring (no line breaks, quotes or backslashes); one per
    emitted statement, so remembered."""
    name = os.path.basename(path)
    return "".join(ch if ch.isprintable() and ch not in "\"'\\" else "?" for ch in name)


def _where(span) -> str:
    return f"{_file_name(span.path)}:{span.line}:{span.col}"


@dataclass
class Block:
    """Statements computing some nodes of a graph from variables bound to others."""

    lines: list[str] = field(default_factory=list)
    var: dict[str, str] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)  # the node each line computes


def emit_nodes(graph: LayerGraph, roots: list[str], bound: dict[str, str], ns: Namespace,
               block: Block | None = None) -> Block:
    """Statements for ``roots`` and what they need, in topological order; ``bound`` maps leaf nodes
    (states, inputs, params, cotangents, already computed values) to variable names."""
    block = block or Block()
    block.var.update(bound)
    needed: set[str] = set()
    stack = [r for r in roots if r not in block.var]
    while stack:
        nid = stack.pop()
        if nid in needed or nid in block.var:
            continue
        needed.add(nid)
        stack.extend(a for a in graph.args(nid) if a not in block.var)
    for nid in graph.nodes():
        if nid not in needed:
            continue
        data = graph.node(nid)
        op = data["op"]
        if op == "const":
            block.var[nid] = literal(data["value"])
            continue
        if op != "call":
            raise ValueError(f"{nid} ({op}) is not bound and cannot be computed")
        args = [block.var[a] for a in graph.args(nid)]
        prim = data["prim"]
        if prim == "cat":
            args = ["[" + ", ".join(args) + "]"]
        attrs = dict(data["attrs"])
        if prim == "reshape":  # written from the argument's sizes (codegen/sizes.py)
            attrs["shape"] = _Code(reshape_target(graph.shape(graph.args(nid)[0]), data["shape"], args[0]))
        if prim == "interpolate" and attrs["size"] is not None and not all(isinstance(d, int) for d in attrs["size"]):
            attrs["size"] = _Code(reshape_target(graph.shape(graph.args(nid)[0]), attrs["size"], args[0]))
        kwargs = [f"{k}={v.text if isinstance(v, _Code) else literal(v)}" for k, v in sorted(attrs.items())]
        name = ns.create(data.get("name") or prim)
        call = f"_ops.{PRIMITIVES[prim].op}({', '.join(args + kwargs)})"
        block.lines.append(f"{name} = {call}  # {_where(data['span'])}")
        block.made.append(nid)
        block.var[nid] = name
    return block


def _guarded(graph: LayerGraph, block: Block, sinks: list[str | None]) -> list[str]:
    """``block``'s lines, each run only when a result that depends on it is asked for (``needs[i]``): runs of
    lines serving the same results share one ``if``; lines every result depends on are not guarded."""
    import networkx as nx

    serves: dict[str, set[int]] = {}
    for i, sink in enumerate(sinks):
        if sink is None:
            continue
        for nid in nx.ancestors(graph.g, sink) | {sink}:
            serves.setdefault(nid, set()).add(i)
    wanted = {i for i, sink in enumerate(sinks) if sink is not None}
    out: list[str] = []
    current: frozenset[int] | None = None
    for line, nid in zip(block.lines, block.made):
        users = frozenset(serves.get(nid, wanted))
        if users != current:
            current = users
            if users != wanted:
                out.append("if " + " or ".join(f"needs[{i}]" for i in sorted(users)) + ":")
        out.append(INDENT + line if users != wanted else line)
    return out


@dataclass(frozen=True)
class _Code:
    """An attribute written as code, not as a literal (a reshape's target from its argument's sizes)."""

    text: str


def _tuple(names: list[str]) -> str:
    return f"({names[0]},)" if len(names) == 1 else f"({', '.join(names)})"


def _indent(lines: list[str], depth: int) -> list[str]:
    return [INDENT * depth + line if line else "" for line in lines]


class LayerEmitter:
    """Writes the class of one layer."""

    def __init__(self, lowered: LoweredLayer, class_name: str):
        self.lowered = lowered
        self.source_graph = lowered.source
        self.graph = lowered.step
        self.class_name = class_name
        self.ns = Namespace()
        self.state_names = lowered.state_names
        self.input_names = lowered.input_names
        self.param_names = lowered.param_names

    # ------------------------------------------------------------------ helpers
    def _arg_vars(self, ns: Namespace) -> dict[str, str]:
        """Fresh variable names for the inputs and params (in the runtime's argument order)."""
        out = {}
        for name in self.input_names:
            out[self.graph.inputs[name]] = ns.create(name)
        for name in self.param_names:
            out[self.graph.params[name]] = ns.create(name.replace(".", "_"))
        return out

    def _leaf_vars(self, graph: LayerGraph, ns: Namespace) -> tuple[dict[str, str], list[str], list[str]]:
        """Variables of a graph's states, inputs and params, matched by name to this layer's."""
        states, args, bound = [], [], {}
        for name in self.state_names:
            var = ns.create(name)
            states.append(var)
            bound[graph.states[name].node] = var
        for name in self.input_names:
            var = ns.create(name)
            args.append(var)
            bound[graph.inputs[name]] = var
        for name in self.param_names:
            var = ns.create(name.replace(".", "_"))
            args.append(var)
            bound[graph.params[name]] = var
        return bound, states, args

    def _unpack(self, var_names: list[str], source: str) -> str:
        return f"{', '.join(var_names)}, = {source}" if var_names else f"_ = {source}"

    # ------------------------------------------------------------------ parts
    def _step(self) -> list[str]:
        g = self.graph
        ns = Namespace()
        bound, states, args = self._leaf_vars(g, ns)
        updates = [g.states[s].update for s in self.state_names]
        roots = [g.args(u)[0] for u in updates]
        block = emit_nodes(g, roots, bound, ns)
        single = len(states) == 1
        head = f"def step({'states' if not single else states[0]}{''.join(', ' + a for a in args)}):"
        body = [] if single else [self._unpack(states, "states")]
        body += block.lines
        results = [block.var[r] for r in roots]
        body.append(f"return {results[0]}" if single else f"return {_tuple(results)}")
        return ["@staticmethod", head, *_indent(['"""The map g: one fixed-point iteration."""'] + body, 1)]

    def _hoisted_iteration(self) -> list[str]:
        """``hoist`` (what g reads that depends on no state, computed once per forward solve) and ``iterate``
        (g from the states and those values), when something is worth hoisting (:mod:`fpidsl.passes.hoist`)."""
        parts = self.lowered.forward
        if parts is None:
            return ["HOIST_BATCHED = None"]
        g = parts.graph
        ns = Namespace()
        bound, _, args = self._leaf_vars(g, ns)
        pre = emit_nodes(g, parts.hoisted, bound, ns)
        values = [pre.var[n] for n in parts.hoisted]
        hoist = ["@staticmethod", f"def hoist({', '.join(args)}):",
                 *_indent(['"""What g reads that depends on no state: computed once per forward solve."""',
                           *pre.lines, f"return {_tuple(values)}"], 1)]
        ns2 = Namespace()
        states = [ns2.create(s) for s in self.state_names]
        names = [ns2.create(v) for v in values]
        bound2 = {g.states[s].node: var for s, var in zip(self.state_names, states)}
        bound2.update(zip(parts.hoisted, names))
        block = emit_nodes(g, parts.roots, bound2, ns2)
        single = len(states) == 1
        head = f"def iterate({'states' if not single else states[0]}{''.join(', ' + a for a in names)}):"
        body = ['"""The map g from the states and hoist\'s values: the forward solver\'s iteration."""']
        body += [] if single else [self._unpack(states, "states")]
        body += block.lines
        results = [block.var[r] for r in parts.roots]
        body.append(f"return {results[0]}" if single else f"return {_tuple(results)}")
        return [f"HOIST_BATCHED = {literal(self.lowered.hoist_batched)}", "", *hoist, "",
                "@staticmethod", head, *_indent(body, 1)]

    def _init_states(self) -> list[str]:
        g = self.graph
        ns = Namespace()
        bound, _, args = self._leaf_vars(g, ns)
        lines: list[str] = []
        results = []
        block = Block()
        for name in self.state_names:
            info = g.states[name]
            data = g.node(info.init)
            shape = literal(tuple(g.node(info.node)["shape"]))
            if data.get("fill") is not None:
                var = ns.create(f"{name}0")
                fill = literal(data["fill"])
                lines.append(
                    f"{var} = torch.full(_layer.concrete({shape}, dims), {fill}, dtype=like.dtype, "
                    f"device=like.device)  # {_where(data['span'])}"
                )
                results.append(var)
            else:
                root = g.args(info.init)[0]
                block = emit_nodes(g, [root], bound, ns, block)
                lines.extend(block.lines)
                block.lines = []
                var = ns.create(f"{name}0")
                lines.append(f"{var} = {block.var[root]}.expand(_layer.concrete({shape}, dims))"
                             f".contiguous()  # {_where(data['span'])}")
                results.append(var)
        head = f"def init_states(self, dims, like{''.join(', ' + a for a in args)}):"
        body = ['"""The start x0 of each state."""', *lines, f"return {_tuple(results)}"]
        return [head, *_indent(body, 1)]

    def _outputs(self) -> list[str]:
        g = self.graph
        ns = Namespace()
        bound, states, args = self._leaf_vars(g, ns)
        roots = g.args(g.output) if g.output else [g.states[s].node for s in self.state_names]
        block = emit_nodes(g, roots, bound, ns)
        # an output that reads no input, state or parameter (`output 2.0`) is a Python number here: made a tensor
        results = [block.var[r] if self._reads_a_tensor(g, r) else f"_layer.constant_output({block.var[r]}, states[0])"
                   for r in roots]
        body = ['"""What the layer returns, computed from the fixed point."""',
                self._unpack(states, "states"), *block.lines,
                f"return {results[0]}" if len(results) == 1 else f"return {_tuple(results)}"]
        return [f"def outputs(self, states{''.join(', ' + a for a in args)}):", *_indent(body, 1)]

    @staticmethod
    def _reads_a_tensor(g, root: str) -> bool:
        return any(g.g.nodes[n]["op"] in ("input", "state", "param") for n in g.upstream([root]))

    def _adjoint(self) -> list[str]:
        """``prepare`` (what depends only on x̂), ``vjp_state`` and ``vjp_args`` (linear in c)."""
        bg, parts = self.lowered.backward, self.lowered.adjoint
        ns = Namespace()
        bound, states, args = self._leaf_vars(bg, ns)
        prep = emit_nodes(bg, parts.saved, bound, ns)
        # a value the c-dependent part reads for its shape only is returned as its shape (the tensor is freed)
        saved_vars = [prep.var[s] + (".shape" if s in parts.shape_only else "") for s in parts.saved]
        prepare = [
            "@staticmethod",
            "def prepare(x_hat, args):",
            *_indent(['"""Everything the backward map needs that depends only on the fixed point."""',
                      self._unpack(states, "x_hat"), self._unpack(args, "args"), *prep.lines,
                      f"return {_tuple(saved_vars) if saved_vars else '()'}"], 1),
        ]

        def linear_part(fn_name: str, doc: str, sinks: list[str | None], zeros_like: list[str],
                        selective: bool = False) -> list[str]:
            ns2 = Namespace()
            saved_names = [ns2.create(prep.var[s]) for s in parts.saved]
            c_names = [ns2.create(f"c_{s}") for s in self.state_names]
            bound2 = dict(zip(parts.saved, saved_names))
            bound2.update(zip(parts.cotangents, c_names))
            roots = [s for s in sinks if s is not None]
            block = emit_nodes(bg, roots, bound2, ns2)
            results = []
            for sink, like in zip(sinks, zeros_like):
                results.append(block.var[sink] if sink is not None else like)
            body = [f'"""{doc}"""']
            read = {a for nid in block.made for a in bg.args(nid)}
            if saved_names:  # a saved value this function does not read is unpacked as _
                body.append(self._unpack([n if s in read else "_" for s, n in zip(parts.saved, saved_names)],
                                         "saved"))
            body.append(self._unpack(c_names, "c"))
            head = f"def {fn_name}(saved, c):"
            if selective:
                head = f"def {fn_name}(saved, c, needs={literal((True,) * len(sinks))}):"
                body += _guarded(bg, block, sinks)
                results = [r if r == "None" else f"{r} if needs[{i}] else None" for i, r in enumerate(results)]
            else:
                body += block.lines
            body.append(f"return {_tuple(results) if results else '()'}")
            return ["@staticmethod", head, *_indent(body, 1)]

        c_zero = [f"torch.zeros_like(c[{i}])" for i in range(len(self.state_names))]
        vjp_state = linear_part("vjp_state", "(dg/dx)^T c at the fixed point, one entry per state.",
                                parts.state_grads, c_zero)
        vjp_args = linear_part("vjp_args", "(dg/dz)^T c and (dg/dtheta)^T c, one entry per input and param; "
                               "only those ``needs`` asks for are computed, None for the others.",
                               parts.arg_grads, ["None"] * len(parts.arg_grads), selective=True)
        body = ['"""The backward fixed-point map of the paper, derived by the compiler."""', "",
                "SELECTIVE_VJP_ARGS = True", "", *prepare, "", *vjp_state, "", *vjp_args]
        return ["class adjoint:", *_indent(body, 1)]

    def _init(self) -> list[str]:
        g = self.graph
        outside = list(externs(g))  # the user's modules, given by keyword (fpidsl/runtime/extern.py)
        lines = [f"def __init__(self, *, {''.join(f'{n}=None, ' for n in outside)}solve=None, backward=None, "
                 "history=False, compile=False):",
                 *_indent(["super().__init__(solve=solve, backward=backward, history=history, compile=compile)"],
                          1)]
        lines += [f"{INDENT}self.{n} = _layer.extern_module(self, {literal(n)}, {n})" for n in outside]
        for name, spec in g.modules.items():
            if spec.kind == "MultiheadAttention":  # torch's, batch first (passes/attention.py)
                where = f"  # {_where(spec.span)}" if spec.span is not None else ""
                lines.append(f"{INDENT}self.{name} = _layer.make_module('MultiheadAttention', {spec.in_size}, "
                             f"{spec.groups}, bias={spec.bias}){where}")
                continue
            if spec.is_normalization:  # torch's GroupNorm(groups, channels) / LayerNorm(dims)
                sizes = [str(spec.groups), str(spec.in_size)] if spec.kind == "GroupNorm" else \
                    [literal(tuple(spec.normalized))]
                args = [literal(spec.kind), *sizes, f"eps={literal(spec.eps)}", f"affine={spec.bias}"]
                where = f"  # {_where(spec.span)}" if spec.span is not None else ""
                lines.append(f"{INDENT}self.{name} = _layer.make_module({', '.join(args)}){where}")
                continue
            args = [literal(spec.kind), str(spec.in_size), str(spec.out_size)]
            opts = [f"bias={spec.bias}"]
            if spec.kernel is not None:
                args.append(literal(tuple(spec.kernel)))
                opts += [f"stride={literal(tuple(spec.stride))}", f"padding={literal(tuple(spec.padding))}"]
            if spec.output_padding is not None and spec.kind == "ConvTranspose2d":
                opts.append(f"output_padding={literal(tuple(spec.output_padding))}")
            opts += [f"init_scale={literal(spec.init_scale)}", f"norm={literal(spec.norm)}"]
            if spec.kind == "Embedding":  # nn.Embedding(num, dim): no bias, no norm
                opts = [f"init_scale={literal(spec.init_scale)}"]
            where = f"  # {_where(spec.span)}" if spec.span is not None else ""
            lines.append(f"{INDENT}self.{name} = _layer.make_module({', '.join(args + opts)}){where}")
        for name, nid in g.params.items():
            data = g.node(nid)
            if data.get("module") is not None or "." in name:
                continue
            init = data["init"]
            shape = literal(tuple(data["shape"]))
            lines.append(f"{INDENT}self.{name} = _layer.make_tensor({shape}, {literal(init.kind)}, "
                         f"{literal(tuple(float(a) for a in init.args))})  # {_where(data['span'])}")
        return lines

    def _batched_params(self) -> tuple[bool, ...]:
        """Per param: whether its dimension 0 is the batch (dropout's per-sample seeds only)."""
        return tuple(self.graph.node(self.graph.params[n]).get("role") == "seeds" for n in self.param_names)

    def _externs(self) -> str:
        """``{name: (where declared, the declaration)}`` of the layer's extern modules, for messages."""
        items = [f"{literal(n)}: ({_where(spec.span)!r}, {spec.format()!r})" for n, spec in externs(self.graph).items()]
        return "{" + ", ".join(items) + "}"

    def _parameter_tensors(self) -> list[str]:
        def ref(name: str) -> str:
            data = self.graph.node(self.graph.params[name])
            if data.get("role") == "module" and data.get("extern") is not None:
                return f"_layer.extern_handle(self, {literal(data['extern'].name)})"
            if data.get("role") == "parameters" and data.get("extern_of") is not None:
                return f"_layer.extern_parameters(self.{data['extern_of']})"
            if data.get("role") == "seeds":  # dropout's per-sample seeds, drawn once per call (fpidsl/ir/dropout.py)
                return f"_layer.dropout_seeds(self, {literal(data['shape'][0])})"
            return f"self.{name}"

        refs = [ref(name) for name in self.param_names]
        body = ['"""The parameter tensors, in the order step and adjoint take them."""',
                f"return {_tuple(refs) if refs else '()'}"]
        return ["def parameter_tensors(self):", *_indent(body, 1)]

    def emit(self, spec_path: str) -> list[str]:
        g = self.graph
        shapes = lambda table: "{" + ", ".join(  # noqa: E731
            f"{literal(n)}: {literal(tuple(s))}" for n, s in table) + "}"
        inputs = shapes((n, g.node(nid)["shape"]) for n, nid in g.inputs.items())
        index_inputs = {n: g.dtype(nid) for n, nid in g.inputs.items() if g.dtype(nid) != "float"}
        states = shapes((n, info.shape) for n, info in g.states.items())
        checks = [f"({a.expr!r}, {a.divisor}, {_where(a.span)!r})" for a in g.assumptions]  # 'H*W', 4, 'x.fpi:3:9'
        assumptions = f"({checks[0]},)" if len(checks) == 1 else f"({', '.join(checks)})"
        settings = lambda table: "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in table.items()) + "}"  # noqa: E731
        doc = f'"""Layer {g.name} of {_file_name(spec_path)} (line {g.span.line})."""'
        body = [doc, "",
                f"SPEC = {_file_name(spec_path)!r}",
                f"INPUTS = {inputs}",
                *([f"INDEX_INPUTS = {settings(index_inputs)}"] if index_inputs else []),
                f"STATES = {states}",
                f"ASSUMPTIONS = {assumptions}",
                f"SAMPLEWISE = {self.lowered.samplewise}",
                f"SOLVE = {settings(g.solve)}",
                f"BACKWARD = {settings(g.backward)}",
                *([f"EXTERNS = {self._externs()}"] if externs(g) else []),
                *([f"BATCHED_PARAMS = {literal(self._batched_params())}"] if any(self._batched_params()) else []),
                *([f"EVAL = {settings(g.eval_solve)}"] if g.eval_solve else []),
                "", *self._init(), "", *self._parameter_tensors(), "", *self._init_states(), "",
                *self._step(), "", *self._hoisted_iteration(), "", *self._adjoint(), "", *self._outputs()]
        return [f"class {self.class_name}(_layer.CompiledLayer):", *_indent(body, 1)]


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def emit_module(checked, only: str | None = None) -> str:
    """The Python source of a checked spec (:class:`~fpidsl.compiler.CheckedSpec`), printed from its lowered
    layers (:mod:`fpidsl.passes.lower`): the code generator runs no pass itself."""
    path = checked.source.path
    ns = Namespace()
    classes, layer_map = [], []
    for name, lowered in checked.lowered().items():
        if only is not None and name != only:
            continue
        class_name = ns.create(name)
        classes.append(LayerEmitter(lowered, class_name).emit(path))
        layer_map.append(f"{literal(name)}: {class_name}")
    header = [
        f"# Generated by fpidsl {__version__} from {_file_name(path)}; do not edit.",
        f"# spec sha256: {spec_hash(checked.source.text)}",
        f'"""Fixed-point layers compiled from {_file_name(path)}."""',
        "import torch",
        "",
        "from fpidsl.runtime import layer as _layer",
        "from fpidsl.runtime import ops as _ops",
        *emitted_check(__version__),  # the runtime this module was emitted for (issue 15)
    ]
    out = header
    for cls in classes:
        out += ["", "", *cls]
    out += ["", "", "LAYERS = {" + ", ".join(layer_map) + "}", ""]
    return "\n".join(out)
