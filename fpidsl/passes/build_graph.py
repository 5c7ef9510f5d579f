"""AST → :class:`~fpidsl.ir.graph.LayerGraph`: one node per value, with spans; no shapes yet beyond
the declared ones (inputs, states, params, consts).

Lowering done here:

* numbers, ``const`` s and arithmetic on them fold to one ``const`` node of shape ``()``;
* operators become ``add sub mul div matmul pow neg``, ``x[...]`` an ``index`` call;
* a param module call ``fc(x)`` becomes ``linear(x, fc.weight[, fc.bias])`` (``conv2d``,
  ``conv_transpose2d``), the module's weights being ``param`` nodes made at its declaration;
* ``fn`` calls are inlined: arguments are built once at the call site and bound to the parameters;
* ``descend x on E step s`` becomes ``update x = x - s * grad(E, x)``;
* lets and energies are built on first use (any order), each once.

Errors are collected in the sink; a value that failed is ``None`` and its users are not built, so one
mistake gives one error.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx

from ..errors import ErrorSink, FpiError, FpiWarning, LimitErr, NameErr, ShapeErr, StructureErr, TypeErr
from ..frontend import ast
from ..ir.dropout import DROPOUT, SEEDS
from . import attention
from ..ir.extern import EXTERN, ExternSpec, declare_extern
from ..ir.graph import Assumption, LayerGraph, ModuleSpec, StateInfo, TensorInit
from ..ir.shapes import (
    ShapeCtx, dim_add, dim_coefficients, dim_exact_div, dim_floordiv, dim_mul, dim_sub, dim_terms, fmt_dim,
    never_positive, symbols,
)
from ..ir.primitives import (
    ATTR_KINDS,
    BINARY_OPS,
    COMPARISON_OPS,
    BUILTINS,
    MODULE_KINDS,
    NORMALIZATIONS,
    NORMS,
    Attr,
    Primitive,
    SliceSpec,
    format_attr,
)
from ..ir import linalg
from ..limits import MAX_CHAIN
from ..source import Span
from .resolve import (
    KIND_WORDS,
    WORDS,
    FnTable,
    LayerScope,
    NotStatic,
    Number,
    UnknownStatic,
    _copy,
    did_you_mean,
    static_number,
    static_outcome,
)

_FAIL: Any = object()


class _Lazy:
    """A message's text written when formatted, by ``write``."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[], str]):
        self.write = write

    def __format__(self, spec: str) -> str:
        return format(self.write(), spec)

    def __str__(self) -> str:
        return self.write()
MAX_INLINED = 10_000  # fn calls inlined into one layer; more is a mistake (or an attack)
MAX_PARAM_ELEMENTS = 2**31 - 1  # numbers in one parameter tensor (8 GiB of float32)
MAX_BUILD_DEPTH = 4 * MAX_CHAIN  # nested build_expr calls: a chain of MAX_CHAIN lets `l2 = 0.5 * l1` is 2 each
def _dim_text(d, need: int = 0) -> str:
    """A declared dimension as written (``H / 2``, ``(C + 1) // 2``) for messages."""
    if isinstance(d, ast.Name):
        return d.id
    if isinstance(d, ast.Num):
        return d.text
    if not isinstance(d, ast.BinOp):  # a size in an expression (a reshape's target) may hold any expression
        return "(...)"
    level = 0 if d.op in "+-" else 1
    text = f"{_dim_text(d.left, level)} {d.op} {_dim_text(d.right, level + 1)}"
    return f"({text})" if level < need else text


NEW_AXIS = frozenset(("None", "none"))  # the index item `x[:, None]` (a new size-1 dimension)


@dataclass(frozen=True)
class Val:
    """What an ``fn`` parameter stands for: a node, a compile-time number, or nothing (``node`` and
    ``number`` both None: a failed argument, or a placeholder while checking an fn body alone).
    ``span`` is where the argument is written at the call site."""

    span: Span
    node: str | None = None
    number: Number | None = None


Env = dict  # fn parameter name -> Val; None outside fn bodies


def build_graph(scope: LayerScope, fns: FnTable, sink: ErrorSink) -> LayerGraph:
    """Build the graph of one resolved layer."""
    return _Builder(scope, fns, sink).build()


def check_fn_bodies(fns: FnTable, sink: ErrorSink) -> None:
    """Check each fn body once on its own (names, calls, arguments), so that an fn that no layer calls
    is checked too. Its parameters are placeholders; shapes are checked where it is inlined."""
    for fn in fns.fns.values():
        builder = _Builder(None, fns, sink)
        builder.build_expr(fn.body, {p.id: Val(p.span) for p in fn.params})


class _Builder:
    def __init__(self, scope: LayerScope | None, fns: FnTable, sink: ErrorSink):
        self.scope = scope
        self.fns = fns
        self.sink = sink
        layer = scope.layer if scope else None
        self.graph = LayerGraph(layer.name if layer else "<fn>", layer.span if layer else Span("<fn>", 0, 0, 0, 0))
        self.named: dict[str, str | None] = {}
        self.building: list[str] = []
        self.inline: list[tuple[str, Span]] = []
        self.init_of: str | None = None
        self.input_symbols: set[str] = set()
        self.sizes_named_like_values: set[str] = set()
        self.inlined = 0
        self.static_cache: dict[int, tuple[dict, Env | None]] = {}
        self.depth = 0  # build_expr calls in progress
        self.too_deep = False

    # ------------------------------------------------------------------ errors
    def error(self, cls: type[FpiError], message: str, span: Span, hint: str | None = None) -> None:
        if self.inline and not _inside(span, self.graph.span):
            fn, site = self.inline[-1][0], self.inline[0][1]
            where = f"in fn {fn}, inlined at {site}"
            hint = f"{hint} ({where})" if hint else where
        self.sink.add(cls(message, span, hint))

    # ------------------------------------------------------------------ the layer
    def build(self) -> LayerGraph:
        scope, g = self.scope, self.graph
        for sym in scope.of_kind("input"):
            shape = self.declared_shape(sym.decl.shape, f"input {sym.name}")
            if sym.decl.dtype == "sparse" and shape is not None and len(shape) != 2:
                self.error(ShapeErr, f"the sparse input {sym.name} is a matrix [N, M], but its shape has "
                                     f"{len(shape)} dimension{'s' if len(shape) != 1 else ''}", sym.decl.shape.span,
                           hint="spmm(A, x) multiplies by a sparse matrix; a batch of graphs is one block-diagonal "
                                "matrix")
                shape = None  # reported: its uses are not checked again
            nid = g.add_node("input", span=sym.decl.span, shape=shape, name=sym.name,
                             **({} if sym.decl.dtype == "float" else {"dtype": sym.decl.dtype}))
            g.inputs[sym.name] = nid
            self.named[sym.name] = nid
            for d in shape or ():
                if isinstance(d, str):
                    self.input_symbols.add(d)
        self.check_computed_input_sizes(scope)
        for sym in scope.of_kind("state"):
            shape = self.declared_shape(sym.decl.shape, f"state {sym.name}", bound=True)
            nid = g.add_node("state", span=sym.decl.span, shape=shape, name=sym.name)
            g.states[sym.name] = StateInfo(sym.name, nid, shape, sym.decl.span)
            self.named[sym.name] = nid
        for sym in scope.symbols.values():
            if sym.kind == "module":
                self.lower_module(sym.decl)
            elif sym.kind == "tensor":
                self.tensor_param(sym.decl)
            elif sym.kind == "extern":
                self.extern_param(sym.decl)
        for sym in scope.of_kind("state"):
            self.state_init(sym.decl)
        for sym in scope.symbols.values():
            if sym.kind in ("let", "energy"):
                self.define(sym.name, sym.span)
        for sym in scope.of_kind("state"):
            decl = scope.updates.get(sym.name)
            if decl is not None:
                self.update(sym.name, decl)
        self.output()
        return g

    def check_computed_input_sizes(self, scope: LayerScope) -> None:
        """An input's size computed from symbols (``[B, T*D]``) is checked at call time, so each of its symbols
        must be bound by an input that has it as a whole dimension."""
        for sym in scope.of_kind("input"):
            shape = self.graph.node(self.graph.inputs[sym.name])["shape"] or ()
            for d, written in zip(shape, sym.decl.shape.dims):
                unbound = sorted(symbols(d) - self.input_symbols)
                if unbound:
                    self.error(ShapeErr, f"the dimension {_dim_text(written)} of input {sym.name} uses {unbound[0]}, "
                                         "which no input has as a whole dimension, so its size is unknown when "
                                         "the layer is called", written.span,
                               hint=f"declare an input with a dimension {unbound[0]}, or write this size as "
                                    "one symbol")

    def declared_shape(self, shape: ast.Shape, what: str, bound: bool = False,
                       symbolic: bool = True) -> tuple | None:
        """The dims of a declared shape; names are symbols (or consts). ``bound``: symbols must be
        dimensions of inputs. ``symbolic``: whether symbols are allowed at all."""
        dims = [self.declared_dim(d, what, bound, symbolic) for d in shape.dims]
        return None if any(d is None for d in dims) else tuple(dims)

    def declared_dim(self, d, what: str, bound: bool, symbolic: bool, part: bool = False):
        """One dimension of a declared shape (None: it failed, already reported). ``part``: an operand of
        dimension arithmetic (any integer; only the whole dimension must be positive)."""
        if isinstance(d, ast.BinOp):
            value = self.dim_arithmetic(d, what, bound, symbolic)
            if value is not None and never_positive(value) and not part:
                why = (f"{value}, not a positive integer" if isinstance(value, int)
                       else f"never positive ({fmt_dim(value)} with every size at least 1)")
                self.error(ShapeErr, f"the dimension {_dim_text(d)} of {what} is {why}", d.span)
                return None
            return value
        if isinstance(d, ast.Num):
            if not isinstance(d.value, int) or (d.value < 1 and not part):
                self.error(ShapeErr, f"a dimension must be a positive integer, found {d.text}", d.span)
                return None
            return d.value
        if d.id in self.scope.consts:
            value = self.scope.consts[d.id]
            if not isinstance(value, int) or (value < 1 and not part):
                self.error(ShapeErr, f"the dimension {d.id} of {what} is the const {format_attr(value)}, "
                                     "not a positive integer", d.span)
                return None
            return value
        named = self.scope.symbols.get(d.id)
        if named is not None:  # a size spelled like a declared value: two meanings of one name (said once)
            if d.id in self.sizes_named_like_values:
                return None
            self.sizes_named_like_values.add(d.id)
            self.error(ShapeErr, f"the dimension {d.id} of {what} has the name of {KIND_WORDS[named.kind]} "
                                 f"(line {named.span.line}); a size is a number, a const or a symbolic dimension",
                       d.span, hint=f"rename the {KIND_WORDS[named.kind].split()[-1]} or the dimension")
            return None
        if not symbolic:
            self.error(ShapeErr, f"{what} has a fixed size, but its dimension {d.id} is symbolic", d.span,
                       hint="a tensor param's dimensions are integers (or consts)")
            return None
        if bound and d.id not in self.input_symbols:
            self.error(ShapeErr, f"the dimension {d.id} of {what} is not a dimension of any input, so its "
                                 "size is unknown when the layer is called", d.span,
                       hint=did_you_mean(d.id, self.input_symbols) or "use a dimension of an input, or a number")
            return None
        return d.id

    def dim_arithmetic(self, d: ast.BinOp, what: str, bound: bool, symbolic: bool):
        """``a + b``, ``a - b``, ``a * b``, ``a / b`` (exact) or ``a // b`` of declared dimensions."""
        left = self.declared_dim(d.left, what, bound, symbolic, part=True)
        right = self.declared_dim(d.right, what, bound, symbolic, part=True)
        if left is None or right is None:
            return None
        return self.size_arithmetic(d, left, right, what)

    def size_arithmetic(self, d: ast.BinOp, left, right, what: str):
        """``left d.op right`` for two sizes (ints, symbols or polynomials, ``ir.shapes``); None after an error.
        A symbolic size may be divided only by a positive number; ``/`` must leave a whole constant part and
        ``//`` floors it; either records that the symbolic part divides exactly (checked at call time)."""
        text = _dim_text(d)
        if d.op in ("/", "//") and right == 0:
            self.error(ShapeErr, f"the dimension {text} of {what} divides by zero", d.span)
            return None
        if isinstance(left, int) and isinstance(right, int):
            if d.op == "/" and left % right:
                self.error(ShapeErr, f"the dimension {text} of {what} is not a whole number: {left} / {right} "
                                     f"= {left / right}", d.span, hint=f"use {left} // {right} to round down")
                return None
            value = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv,
                     "//": operator.floordiv}[d.op](left, right)
        elif d.op in ("+", "-", "*"):
            value = {"+": dim_add, "-": dim_sub, "*": dim_mul}[d.op](left, right)
        elif not isinstance(right, int) or right < 0:
            self.error(ShapeErr, f"the dimension {text} of {what} divides by {fmt_dim(right)}: a size may be "
                                 "divided only by a positive number", d.right.span,
                       hint="divide by a number or a const (`H / 2`), or declare an input whose dimension is "
                            "that size")
            return None
        else:
            ctx = ShapeCtx()
            value = (dim_exact_div if d.op == "/" else dim_floordiv)(left, right, ctx)
            if value is None:
                const = sum((c for m, c in dim_terms(left) if not m), start=0)
                self.error(ShapeErr, f"the dimension {text} of {what} is not a whole number for every size: the "
                                     f"constant {const} of {fmt_dim(left)} does not divide by {right}", d.span,
                           hint=f"divide only the symbolic part (`H / 2 + 1`), or round down with `//`")
                return None
            known = {(a.expr, a.divisor) for a in self.graph.assumptions}
            self.graph.assumptions.extend(Assumption(e, k, d.span) for e, k in ctx.assumptions if (e, k) not in known)
        if any(abs(c.numerator) > 2**63 - 1 or c.denominator > 2**63 - 1 for c in dim_coefficients(value)):
            self.error(ShapeErr, f"the dimension {text} of {what} does not fit in 64 bits", d.span)
            return None
        return value

    # ------------------------------------------------------------------ params
    def lower_module(self, decl: ast.ModuleParamDecl) -> None:
        call = decl.module
        kind = MODULE_KINDS.get(call.func.id)
        if kind is None:
            self.error(NameErr, f"unknown module {call.func.id}", call.func.span,
                       hint=did_you_mean(call.func.id, MODULE_KINDS)
                       or "modules are " + ", ".join(k.signature() for k in MODULE_KINDS.values()))
            return
        bound = self.bind(call, [a.name for a in kind.params],
                          {a.name for a in kind.params if a.required}, kind.name, kind.signature())
        if bound is None:
            return
        values = {}
        for attr in kind.params:
            expr = bound.get(attr.name)
            if expr is None:
                values[attr.name] = attr.default
                continue
            value = self.attr_value(attr, expr, None, kind.name)
            if value is _FAIL:
                return
            if not self.module_value_ok(kind.name, attr.name, value, expr, values):
                return
            values[attr.name] = value
        if kind.name == attention.KIND:
            dim, heads = values["dim"], values["heads"]
            if dim < 1 or heads < 1 or dim % heads:
                self.error(TypeErr, f"MultiheadAttention: dim {dim} cannot be split into {heads} heads",
                           bound["heads"].span, hint="dim must be a positive multiple of heads")
                return
            spec = ModuleSpec(kind.name, dim, dim, bias=values["bias"], span=decl.span, groups=heads)
        elif kind.name in NORMALIZATIONS:
            spec = self.normalization_spec(kind.name, values, bound, decl.span)
            if spec is None:
                return
        elif kind.name == "Embedding":  # nn.Embedding(num, dim): a [num, dim] weight, read by an int input
            spec = ModuleSpec(kind.name, values["num"], values["dim"], bias=False, init_scale=values["init_scale"],
                              span=decl.span)
        elif kind.name == "Conv1d":  # conv2d's (h, w) pairs with a height of 1 (module_call lowers it so)
            spec = ModuleSpec(kind.name, values["in"], values["out"], (1, values["kernel"]), (1, values["stride"]),
                              (0, values["padding"]), None, values["bias"], values["init_scale"], values["norm"],
                              decl.span)
        else:
            spec = ModuleSpec(
                kind.name, values["in"], values["out"], values.get("kernel"), values.get("stride"),
                values.get("padding"), values.get("output_padding"), values["bias"], values["init_scale"],
                values["norm"], decl.span)
        if self.too_many_elements(f"the weight of {decl.name}", spec.weight_shape(), call.span):
            return
        self.graph.modules[decl.name] = spec
        roles = attention.param_shapes(spec).items() if spec.kind == attention.KIND else (
            ("weight", spec.weight_shape()), ("bias", spec.bias_shape()))
        for role, shape in roles:
            if not spec.bias and (role == "bias" or spec.is_normalization):
                continue
            qual = f"{decl.name}.{role}"
            self.graph.params[qual] = self.graph.add_node(
                "param", span=decl.span, shape=tuple(shape), name=qual, module=decl.name, role=role)

    def normalization_spec(self, kind: str, values: dict, bound: dict, span: Span) -> ModuleSpec | None:
        """GroupNorm(groups, channels, eps, affine) / LayerNorm(dims, eps, affine), checked; None after an
        error at the offending argument."""
        def bad(key: str, problem: str, hint: str | None = None) -> None:
            self.error(TypeErr, f"{kind}: {problem}", bound[key].span, hint=hint)

        eps = values["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            return bad("eps", f"eps must be a positive number, found {format_attr(eps)}")
        if kind == "GroupNorm":
            groups, channels = values["groups"], values["channels"]
            if groups < 1:
                return bad("groups", f"groups must be a positive integer, found {groups}")
            if channels < 1:
                return bad("channels", f"channels must be a positive integer, found {channels}")
            if channels % groups:
                return bad("channels", f"{channels} channels cannot be split into {groups} groups",
                           hint="the number of channels must be a multiple of the number of groups")
            return ModuleSpec(kind, channels, channels, bias=values["affine"], span=span, groups=groups,
                              eps=float(eps))
        dims = values["dims"] if isinstance(values["dims"], tuple) else (values["dims"],)
        if min(dims) < 1:
            return bad("dims", f"dims must be positive sizes, found {format_attr(values['dims'])}",
                       hint="LayerNorm(dims) takes the sizes of the trailing dimensions it normalizes over")
        return ModuleSpec(kind, math.prod(dims), math.prod(dims), bias=values["affine"], span=span,
                          normalized=dims, eps=float(eps))

    def too_many_elements(self, what: str, shape, span: Span) -> bool:
        """Report (and say True) a parameter too large to be allocated: one of more than
        ``MAX_PARAM_ELEMENTS`` numbers would fail when the layer is constructed, not here."""
        count = math.prod(shape)
        if count <= MAX_PARAM_ELEMENTS:
            return False
        self.error(LimitErr, f"{what} would hold {count:,} numbers; a parameter holds at most "
                             f"{MAX_PARAM_ELEMENTS:,}", span, hint="is a dimension mistyped?")
        return True

    def module_value_ok(self, kind: str, key: str, value, expr, values: dict) -> bool:
        problem = None
        if key in ("in", "out", "num", "dim") and value < 1:
            problem = f"{key} must be a positive integer, found {value}"
        elif key in ("kernel", "stride") and min(_sizes(value)) < 1:
            problem = f"{key} must be at least 1, found {format_attr(value)}"
        elif key in ("padding", "output_padding") and min(_sizes(value)) < 0:
            problem = f"{key} must be at least 0, found {format_attr(value)}"
        elif key == "output_padding" and any(o >= s for o, s in zip(value, values.get("stride", (1, 1)))):
            problem = f"output_padding must be smaller than the stride {format_attr(values['stride'])}, " \
                      f"found {format_attr(value)}"
        elif key == "init_scale" and not value > 0:
            problem = f"init_scale must be positive, found {format_attr(value)}"
        elif key == "norm" and value not in NORMS:
            problem = f"unknown norm {value}"
        if problem:
            hint = did_you_mean(value, NORMS) if key == "norm" else None
            self.error(TypeErr, f"{kind}: {problem}", expr.span,
                       hint=hint or (f"norms are {', '.join(NORMS)}" if key == "norm" else None))
            return False
        return True

    def tensor_param(self, decl: ast.TensorParamDecl) -> None:
        shape = self.declared_shape(decl.shape, f"the tensor param {decl.name}", symbolic=False)
        if shape is not None and self.too_many_elements(f"the tensor param {decl.name}", shape, decl.shape.span):
            shape = None
        init = self.tensor_init(decl.init)
        if shape is None or init is None:
            self.named[decl.name] = None
            return
        nid = self.graph.add_node("param", span=decl.span, shape=shape, name=decl.name, init=init)
        self.graph.params[decl.name] = nid
        self.named[decl.name] = nid

    def tensor_init(self, expr) -> TensorInit | None:
        usage = "a tensor param starts as zeros, ones, a number, normal(mean, std) or uniform(lo, hi)"
        if expr is None:
            return TensorInit("zeros")
        if isinstance(expr, ast.Name) and expr.id in ("zeros", "ones"):
            return TensorInit(expr.id)
        if isinstance(expr, ast.Call) and expr.func.id in ("normal", "uniform"):
            names = ["mean", "std"] if expr.func.id == "normal" else ["lo", "hi"]
            bound = self.bind(expr, names, set(names), expr.func.id, f"{expr.func.id}({', '.join(names)})")
            if bound is None:
                return None
            args = []
            for n in names:
                v = self.attr_value(Attr(n, "number"), bound[n], None, expr.func.id)
                if v is _FAIL:
                    return None
                args.append(float(v))
            if expr.func.id == "normal" and not args[1] > 0:
                self.error(TypeErr, f"normal(mean, std) needs std > 0, found {format_attr(args[1])}",
                           bound["std"].span)
                return None
            if expr.func.id == "uniform" and not args[0] < args[1]:
                self.error(TypeErr, f"uniform(lo, hi) needs lo < hi, found {format_attr(args[0])} and "
                                    f"{format_attr(args[1])}", expr.span)
                return None
            return TensorInit(expr.func.id, tuple(args))
        try:
            return TensorInit("fill", (static_number(expr, self.scope.const_lookup),))
        except NotStatic as e:
            self.error(TypeErr, f"{usage}, but {e.reason}", e.expr.span,
                       hint=did_you_mean(expr.func.id, ("normal", "uniform"))
                       if isinstance(expr, ast.Call) else None)
        except UnknownStatic:
            pass
        except FpiError as e:
            self.sink.add(e)
        return None

    # ------------------------------------------------------------------ states
    def state_init(self, decl: ast.StateDecl) -> None:
        info = self.graph.states[decl.name]
        expr = decl.init
        fill = None
        if expr is None or (isinstance(expr, ast.Name) and expr.id in ("zeros", "ones")):
            fill = 1 if expr is not None and expr.id == "ones" else 0
        else:
            try:
                fill = static_number(expr, self.scope.const_lookup)
            except (NotStatic, UnknownStatic, FpiError):
                fill = None
        if fill is not None:
            info.init = self.graph.add_node("init", span=decl.span, shape=info.shape, state=decl.name, fill=fill)
            return
        self.init_of = decl.name
        try:
            node = self.build_expr(expr, None)
        finally:
            self.init_of = None
        if node is not None:
            info.init = self.graph.add_node("init", span=decl.span, shape=info.shape, state=decl.name,
                                            fill=None, args=[(node, expr.span)])

    def update(self, name: str, decl) -> None:
        info = self.graph.states[name]
        if isinstance(decl, ast.UpdateDecl):
            node = self.build_expr(decl.value, None)
            use = decl.value.span
        else:
            node = self.descend(info, decl)
            use = decl.span
        if node is not None:
            info.update = self.graph.add_node("update", span=decl.span, shape=info.shape, state=name,
                                              args=[(node, use)])

    def descend(self, info: StateInfo, decl: ast.DescendDecl) -> str | None:
        energy = self.energy_node(decl.energy, None, "descend")
        step = self.build_expr(decl.step, None)
        if energy is None or step is None:
            return None
        g = self.graph
        grad = g.add_node("call", span=decl.span, prim="grad", attrs={}, module=None, inlined=None,
                          args=[(energy, decl.energy.span), (info.node, decl.name_span)])
        scaled = g.add_node("call", span=decl.span, prim="mul", attrs={}, module=None, inlined=None,
                            args=[(step, decl.step.span), (grad, decl.span)])
        return g.add_node("call", span=decl.span, prim="sub", attrs={}, module=None, inlined=None,
                          args=[(info.node, decl.name_span), (scaled, decl.span)])

    def output(self) -> None:
        decl = self.scope.output
        g = self.graph
        if decl is None:
            args = [(info.node, info.span) for info in g.states.values()]
            span = self.scope.layer.span
        else:
            args = []
            for expr in decl.values:
                node = self.build_expr(expr, None)
                if node is None:
                    return
                args.append((node, expr.span))
            span = decl.span
        g.output = g.add_node("output", span=span, shape=(), args=args)

    # ------------------------------------------------------------------ lets and energies
    def define(self, name: str, ref: Span) -> str | None:
        """The node of a let or energy, built on first use."""
        if name in self.named:
            return self.named[name]
        sym = self.scope.symbols[name]
        if name in self.building:
            cycle = self.building[self.building.index(name):] + [name]
            self.error(StructureErr, f"{sym.kind} {name} is defined in terms of itself ({' → '.join(cycle)})",
                       ref, hint="only a state carries a value around the loop: use a state and an update")
            return None
        self.building.append(name)
        saved = self.init_of, self.inline
        self.init_of, self.inline = None, []
        try:
            node = self.build_expr(sym.decl.value, None)
        finally:
            self.init_of, self.inline = saved
            self.building.pop()
        self.named[name] = node
        if node is not None:
            table = self.graph.energies if sym.kind == "energy" else self.graph.lets
            table[name] = node
            self.graph.value_spans[name] = sym.decl.value.span
            data = self.graph.node(node)
            if data["name"] is None and data["op"] in ("call", "const"):
                data["name"] = name
        return node

    def energy_node(self, expr, env: Env | None, what: str) -> str | None:
        """The node of the energy named by ``expr`` (``grad``'s first argument, ``descend ... on E``)."""
        node = self.build_expr(expr, env)
        if node is None:
            return None
        if node not in self.graph.energies.values():
            label = self.graph.label(node) if isinstance(expr, ast.Name) else "this expression"
            self.error(TypeErr, f"{what} needs an energy, but {label} is not one", expr.span,
                       hint="declare it: energy E = EXPR, one value per sample")
            return None
        return node

    # ------------------------------------------------------------------ expressions
    def build_expr(self, expr, env: Env | None) -> str | None:
        """The node of a tensor-valued expression (None: it failed, already reported)."""
        if self.depth >= MAX_BUILD_DEPTH:
            if not self.too_deep:
                self.too_deep = True
                self.error(LimitErr, f"this expression is nested more than {MAX_BUILD_DEPTH:,} levels deep "
                                     "through the lets, energies and fn calls it uses", self.use_span(expr, env),
                           hint=f"each level of a let or fn it uses counts; chains of at most {MAX_CHAIN:,} "
                                "short lets or fns are accepted")
            return None
        self.depth += 1
        try:
            return self._build_expr(expr, env)
        finally:
            self.depth -= 1

    def _build_expr(self, expr, env: Env | None) -> str | None:
        ok, value = self.static_outcome(expr, env)  # without raising: most subexpressions are not numbers
        if ok:
            return self.const(value, self.use_span(expr, env))
        if isinstance(value, UnknownStatic):
            return None
        if isinstance(value, FpiError):
            self.sink.add(_copy(value))
            return None
        if isinstance(expr, ast.Name):
            return self.name(expr, env)
        if isinstance(expr, ast.BinOp):
            return self.binop(expr, env)
        if isinstance(expr, ast.Neg):
            x = self.build_expr(expr.operand, env)
            return None if x is None else self.call("neg", [(x, expr.operand)], {}, expr.span, env)
        if isinstance(expr, ast.Call):
            return self.call_expr(expr, env)
        if isinstance(expr, ast.Index):
            return self.index(expr, env)
        if isinstance(expr, ast.ListExpr):
            self.error(TypeErr, "a list is not a tensor", expr.span,
                       hint="lists are arguments of cat, reshape and dim=; to stack values use cat([...], dim)")
            return None
        if isinstance(expr, ast.Str):
            self.error(TypeErr, "a string is not a tensor", self.use_span(expr, env),
                       hint='a string is only the equation of einsum: einsum("bi,ij->bj", x, W)')
            return None
        raise TypeError(f"not an expression: {expr!r}")  # pragma: no cover

    def use_span(self, expr, env: Env | None) -> Span:
        """Where a value is written: for an fn parameter, the call-site argument."""
        if env is not None and isinstance(expr, ast.Name) and expr.id in env:
            return env[expr.id].span
        return expr.span

    def const(self, value: Number, span: Span) -> str:
        return self.graph.add_node("const", span=span, shape=(), value=value)

    def call(self, prim: str, args: list[tuple[str, Any]], attrs: dict, span: Span, env: Env | None,
             module: str | None = None) -> str:
        edges = [(node, self.use_span(expr, env) if not isinstance(expr, Span) else expr) for node, expr in args]
        return self.graph.add_node("call", span=span, prim=prim, attrs=attrs, module=module,
                                   inlined=(self.inline[-1][0], self.inline[0][1]) if self.inline else None,
                                   args=edges)

    def static(self, expr, env: Env | None) -> Number:
        """A compile-time number, or :class:`NotStatic`. Memoized per (expression, fn environment), so that
        trying every subexpression of a tree (as :meth:`build_expr` does) stays linear."""
        ok, value = self.static_outcome(expr, env)
        if ok:
            return value
        raise _copy(value)

    def static_outcome(self, expr, env: Env | None) -> tuple[bool, Any]:
        """:meth:`static` as ``(True, number)`` or ``(False, the cached exception)``."""
        key = id(env)
        entry = self.static_cache.get(key)
        if entry is None:  # the environment is kept alive: its id stays its own
            entry = self.static_cache[key] = ({}, env)
        # the lookup made per call: kept in the cache, it would tie the builder and its cache in a cycle
        return static_outcome(expr, lambda ref: self.static_name(ref, env), entry[0])

    def static_name(self, ref: ast.Name, env: Env | None) -> Number:
        if env is not None:
            val = env.get(ref.id)
            if val is None:
                raise NotStatic(ref, f"{ref.id} is not a parameter of the fn", unknown=True)
            if val.number is not None:
                return val.number
            if val.node is None:
                raise UnknownStatic()
            raise NotStatic(ref, f"the fn's argument {ref.id} is a tensor")
        if self.scope is None:
            raise NotStatic(ref, f"{ref.id} is not declared", unknown=True)
        return self.scope.const_lookup(ref)

    def name(self, ref: ast.Name, env: Env | None) -> str | None:
        if env is not None:
            val = env.get(ref.id)
            if val is not None:
                return val.node
            self.error(NameErr, f"unknown name {ref.id} in an fn body", ref.span,
                       hint=did_you_mean(ref.id, env) or
                       f"an fn sees only its parameters ({', '.join(env) or 'none'}); pass {ref.id} as an argument")
            return None
        sym = self.scope.symbols.get(ref.id) if self.scope else None
        if sym is None:
            self.unknown_name(ref)
            return None
        if sym.kind == "extern":
            self.error(TypeErr, f"{ref.id} is an extern module, not a value", ref.span,
                       hint=f"call it on its inputs: {ref.id}(x)")
            return None
        if sym.kind == "module":
            spec = self.graph.modules.get(ref.id)
            what = f" ({spec.describe()})" if spec else ""
            self.error(TypeErr, f"{ref.id} is a param module{what}, not a value", ref.span,
                       hint=f"call it on a tensor: {ref.id}(x)")
            return None
        if self.init_of is not None and sym.kind == "state":
            self.error(StructureErr, f"the initial value of state {self.init_of} cannot use the state {ref.id}",
                       ref.span, hint="a state's initial value is computed from inputs and params, before "
                                      "the iteration starts")
            return None
        if sym.kind in ("let", "energy"):
            node = self.define(ref.id, ref.span)
            if node is not None and self.init_of is not None:
                states = [self.graph.node(a)["name"] for a in nx.ancestors(self.graph.g, node) | {node}
                          if self.graph.node(a)["op"] == "state"]
                if states:
                    self.error(StructureErr, f"the initial value of state {self.init_of} cannot use the "
                                             f"{sym.kind} {ref.id}: it depends on the state {sorted(states)[0]}",
                               ref.span, hint="a state's initial value is computed from inputs and params, "
                                              "before the iteration starts")
                    return None
            return node
        return self.named.get(ref.id)

    def unknown_name(self, ref: ast.Name) -> None:
        if ref.id in BUILTINS or ref.id in self.fns.fns:
            self.error(TypeErr, f"{ref.id} is a function, not a value", ref.span, hint=f"call it: {ref.id}(...)")
        elif ref.id in WORDS:
            self.error(NameErr, f"{ref.id} is not a value here", ref.span,
                       hint=f"{ref.id} is {WORDS[ref.id]}, used in declarations and keyword arguments")
        else:
            names = list(self.scope.symbols) if self.scope else []
            self.error(NameErr, f"unknown name {ref.id}", ref.span,
                       hint=did_you_mean(ref.id, names) or "declare it: input, state, param, const, let or energy")

    def binop(self, expr: ast.BinOp, env: Env | None) -> str | None:
        if expr.op == "**":
            try:
                exponent = self.static(expr.right, env)
            except NotStatic:
                return self.tensor_power(expr, env)
            except UnknownStatic:
                return None
            except FpiError as e:
                self.sink.add(e)
                return None
            base = self.build_expr(expr.left, env)
            if base is None:
                return None
            return self.call("pow", [(base, expr.left)], {"exponent": exponent}, expr.span, env)
        if expr.op == "//":
            self.error(TypeErr, "`//` is integer division of numbers and consts, not of tensors", expr.span,
                       hint="for tensors use `/`; a comparison such as `x > 0` gives a 0/1 mask")
            return None
        left = self.build_expr(expr.left, env)
        right = self.build_expr(expr.right, env)
        if left is None or right is None:
            return None
        prim = COMPARISON_OPS.get(expr.op) or BINARY_OPS[expr.op]
        return self.call(prim, [(left, expr.left), (right, expr.right)], {}, expr.span, env)

    def tensor_power(self, expr: ast.BinOp, env: Env | None) -> str | None:
        """``a ** b`` with a tensor exponent: the ``power`` primitive (``a`` must be positive; a number base is
        checked here, a tensor base gives NaN where it is negative)."""
        base = self.build_expr(expr.left, env)
        exponent = self.build_expr(expr.right, env)
        if base is None or exponent is None:
            return None
        data = self.graph.node(base)
        if data["op"] == "const" and not data["value"] > 0:
            self.error(TypeErr, f"the base of ** with a tensor exponent must be positive, found {data['value']}",
                       self.use_span(expr.left, env), hint="a ** b is exp(b log(a)), defined for a > 0")
            return None
        return self.call("power", [(base, expr.left), (exponent, expr.right)], {}, expr.span, env)

    def _declared(self, name: str, env: Env | None) -> bool:
        """Whether ``name`` is a declared name or fn parameter (which then shadows the word ``None``)."""
        if env is not None:
            return name in env
        return bool(self.scope and name in self.scope.symbols)

    def index(self, expr: ast.Index, env: Env | None) -> str | None:
        value = self.build_expr(expr.value, env)
        items: list = []
        spans = tuple(item.span for item in expr.items)
        for item in expr.items:
            if isinstance(item, ast.EllipsisIndex):
                items.append(Ellipsis)
            elif isinstance(item, ast.Name) and item.id in NEW_AXIS and not self._declared(item.id, env):
                items.append(None)  # x[:, None]: a new dimension of size 1
            elif isinstance(item, ast.Slice):
                parts = []
                for part in (item.lo, item.hi, item.step):
                    parts.append(None if part is None else self.attr_value(Attr("slice bound", "int"), part,
                                                                           env, "index"))
                if _FAIL in parts:
                    return None
                items.append(SliceSpec(*parts))
            else:
                v = self.attr_value(Attr("index", "int"), item, env, "index")
                if v is _FAIL:
                    return None
                items.append(v)
        if value is None or self.numbers_only("index", [value], [expr.value], expr.span, env):
            return None
        node = self.call("index", [(value, expr.value)], {"index": tuple(items)}, expr.span, env)
        self.graph.node(node)["item_spans"] = spans
        return node

    # ------------------------------------------------------------------ calls
    def call_expr(self, call: ast.Call, env: Env | None) -> str | None:
        fname = call.func.id
        if env is not None and fname in env:
            self.error(TypeErr, f"{fname} is a parameter of the fn, not a function", call.func.span,
                       hint="fns take tensors and numbers, not functions")
            return None
        sym = self.scope.symbols.get(fname) if (env is None and self.scope) else None
        if sym is not None:
            if sym.kind == "module":
                return self.module_call(fname, call, env)
            if sym.kind == "extern":
                return self.extern_call(fname, call, env)
            self.error(TypeErr, f"{fname} is {KIND_WORDS[sym.kind]}, not a function", call.func.span,
                       hint="only built-in functions, fns and param modules can be called")
            return None
        if fname in self.fns.fns:
            return self.inline_fn(self.fns.fns[fname], call, env)
        if fname == "grad":
            return self.grad(call, env)
        if fname == DROPOUT:
            return self.dropout(call, env)
        if fname == "einsum":
            return self.einsum(call, env)
        if fname in BUILTINS:
            return self.builtin(BUILTINS[fname], call, env)
        if fname in MODULE_KINDS:
            self.error(TypeErr, f"{fname}(...) declares a param module; it is not a function", call.func.span,
                       hint=f"declare it, `param m : {fname}(...)`, and call it: m(x)")
            return None
        modules = [s.name for s in self.scope.of_kind("module")] if (self.scope and env is None) else []
        self.error(NameErr, f"unknown function {fname}", call.func.span,
                   hint=did_you_mean(fname, list(BUILTINS) + list(self.fns.fns) + modules)
                   or "functions are the built-ins, fns and param modules")
        return None

    def bind(self, call: ast.Call, params: list[str], required: set[str], what: str,
             signature: str | Callable[[], str]) -> dict[str, Any] | None:
        """Match a call's arguments to parameter names, Python-style; None after reporting an error. The
        ``signature`` for the messages may be given as a function that writes it (only an error needs it)."""
        if callable(signature):
            signature = _Lazy(signature)
        out: dict[str, Any] = {}
        if len(call.args) > len(params):
            extra = call.args[len(params)]
            n = len(params)
            self.error(TypeErr, f"{what} takes {n} argument{'s' if n != 1 else ''}, but {len(call.args)} "
                                "were given", extra.span, hint=f"the signature is {signature}")
            return None
        out.update(zip(params, call.args))
        for kw in call.kwargs:
            if kw.name not in params:
                self.error(TypeErr, f"{what} has no argument {kw.name}", kw.name_span,
                           hint=did_you_mean(kw.name, params) or f"the signature is {signature}")
                return None
            if kw.name in out:
                self.error(TypeErr, f"{what} got {kw.name} twice", kw.span, hint=f"the signature is {signature}")
                return None
            out[kw.name] = kw.value
        missing = [p for p in params if p in required and p not in out]
        if missing:
            self.error(TypeErr, f"{what} needs {missing[0]}", call.span, hint=f"the signature is {signature}")
            return None
        return out

    def builtin(self, prim: Primitive, call: ast.Call, env: Env | None) -> str | None:
        if prim.dtype_from_state:
            return self.constructor(prim, call, env)
        names = prim.parameter_names()
        required = set(prim.inputs[:prim.min_args if not prim.variadic else 1])
        required |= {a.name for a in prim.attrs if a.required}
        bound = self.bind(call, names, required, prim.name, prim.signature)
        if bound is None:
            return None
        exprs = []
        if prim.variadic:
            items = bound[prim.inputs[0]]
            if not isinstance(items, ast.ListExpr) or not items.items:
                self.error(TypeErr, f"{prim.name} takes a non-empty list of tensors", items.span,
                           hint=f"e.g. {prim.name}([a, b], dim=1)")
                return None
            exprs = list(items.items)
        else:
            gap = next((n for n in prim.inputs if n not in bound), None)  # an optional input left out ...
            late = [n for n in prim.inputs[prim.inputs.index(gap):] if n in bound] if gap else []
            if late:  # ... before one given by keyword (layer_norm(x, [4], bias=b)): the args are positional
                self.error(TypeErr, f"{prim.name} takes {late[0]} only together with {gap}",
                           self.use_span(bound[late[0]], env), hint=f"the signature is {prim.signature()}")
                return None
            exprs = [bound[n] for n in prim.inputs if n in bound]
        attrs = {}
        for a in prim.attrs:
            if a.name in bound:
                attrs[a.name] = self.attr_value(a, bound[a.name], env, prim.name)
        nodes = [self.build_expr(e, env) for e in exprs]
        if None in nodes or _FAIL in attrs.values():
            return None
        self.warn_positional_reduction(prim.name, call, env)
        if self.numbers_only(prim.name, nodes, exprs, call.span, env):
            return None
        if prim.name == "where" and self.graph.dtype(nodes[0]) in ("bool", "int") and self.graph.states and \
                all(self.graph.node(n)["op"] == "const" for n in nodes[1:]):
            nodes[1] = self.number_in_state_dtype(nodes[1], exprs[1], env)
        node = self.call(prim.name, list(zip(nodes, exprs)), prim.with_defaults(attrs), call.span, env)
        if attrs:
            self.graph.node(node)["attr_spans"] = {k: self.use_span(bound[k], env) for k in attrs}
        return node

    def number_in_state_dtype(self, const: str, expr: ast.Expr, env: Env | None) -> str:
        """``where(mask, 1, 0)`` of a bool or int mask has no tensor to take its dtype from (torch would make it
        in the default dtype, float32, and ``0.1 * where(m, 1, 0)`` in a float64 layer would be rounded to
        float32): its first number becomes a 0-dimensional ``full`` in the first state's dtype and device."""
        state = next(iter(self.graph.states.values())).node
        value = self.graph.node(const)["value"]
        return self.call("full", [(state, expr.span)], {"shape": (), "value": value}, expr.span, env)

    def warn_positional_reduction(self, name: str, call: ast.Call, env: Env | None) -> None:
        """``max(v, 0)`` / ``min(v, 1)``: a number as the second positional argument is the dimension reduced
        over (torch's reading), which an elementwise ``maximum(v, 0)`` is easily mistaken for."""
        if name not in ("max", "min") or len(call.args) < 2 or not isinstance(call.args[1], ast.Num):
            return
        dim = call.args[1].text
        self.graph.warnings.append(FpiWarning(
            f"{name}(..., {dim}) reduces over dimension {dim}"
            + (" (of a [B, ...] value: over the samples, so that each depends on the others)" if dim == "0"
               else ""), self.use_span(call.args[1], env),
            hint=f"for the elementwise {name}imum with {dim}, write {name}imum(..., {dim}); "
                 f"to mean the reduction (and silence this), write {name}(..., dim={dim})"))

    def constructor(self, prim: Primitive, call: ast.Call, env: Env | None) -> str | None:
        """``eye(n)``, ``zeros([..])`` ...: static arguments only; the node's one argument is the layer's first
        state, which gives the result its dtype and device (never its values)."""
        bound = self.bind(call, [a.name for a in prim.attrs], {a.name for a in prim.attrs if a.required},
                          prim.name, prim.signature())
        if bound is None:
            return None
        attrs = {a.name: self.attr_value(a, bound[a.name], env, prim.name) for a in prim.attrs if a.name in bound}
        if _FAIL in attrs.values() or not self.graph.states:
            return None
        state = next(iter(self.graph.states.values())).node
        node = self.call(prim.name, [(state, call.func.span)], prim.with_defaults(attrs), call.span, env)
        self.graph.node(node)["attr_spans"] = {k: self.use_span(bound[k], env) for k in attrs}
        return node

    def einsum(self, call: ast.Call, env: Env | None) -> str | None:
        """``einsum("equation", a, b, ...)``: the equation is checked here (errors at its character) and stored in
        its canonical explicit form; the operands' shapes are checked by the shape rule."""
        usage = 'einsum("bi,ij->bj", x, W)'
        if call.kwargs:
            self.error(TypeErr, "einsum takes its equation and operands by position", call.kwargs[0].span,
                       hint=f"e.g. {usage}")
            return None
        written = call.args[0] if call.args else None
        if not isinstance(written, ast.Str):
            self.error(TypeErr, "the first argument of einsum is its equation, a string in double quotes",
                       self.use_span(written, env) if written is not None else call.span, hint=f"e.g. {usage}")
            return None
        try:
            eq = linalg.parse(written.value)
        except linalg.EquationError as e:
            at = written.span
            exact = at.line == at.end_line and at.end_col - at.col == len(written.value) + 2  # not a YAML escape
            col = at.col + 1 + e.offset
            self.error(TypeErr, e.message, Span(at.path, at.line, col, at.line, col + e.length) if exact else at,
                       hint=e.hint)
            return None
        operands = call.args[1:]
        if len(operands) != len(eq.operands):
            n = len(eq.operands)
            where = self.use_span(operands[n], env) if len(operands) > n else written.span
            self.error(TypeErr, f'the equation "{written.value}" names {n} operand{"s" if n != 1 else ""}, but '
                                f"einsum was given {len(operands)}", where,
                       hint="one comma-separated term of subscripts per operand, in order")
            return None
        nodes = [self.build_expr(e, env) for e in operands]
        if None in nodes:
            return None
        for node, e in zip(nodes, operands):
            if self.graph.node(node)["op"] == "const":
                self.error(TypeErr, "the operands of einsum are tensors, but this one is a number",
                           self.use_span(e, env), hint="multiply the result by the number instead")
                return None
        node = self.call("einsum", list(zip(nodes, operands)), {"equation": str(eq)}, call.span, env)
        self.graph.node(node)["attr_spans"] = {"equation": written.span}
        return node

    def numbers_only(self, what: str, nodes: list[str], exprs, span: Span, env: Env | None) -> bool:
        """Report (and say True) when every argument of a call that needs a tensor is a number: the
        elementwise built-ins are folded instead (see :data:`fpidsl.frontend.numbers.FOLDS`)."""
        if not nodes or any(self.graph.node(n)["op"] != "const" for n in nodes):
            return False
        written = self.use_span(exprs[0], env) if len(exprs) == 1 else span
        found = "its argument is a number" if len(nodes) == 1 else "all its arguments are numbers"
        self.error(TypeErr, f"{what} needs a tensor, but {found}", written,
                   hint="compute with numbers in a const, or apply it to a tensor")
        return True

    def grad(self, call: ast.Call, env: Env | None) -> str | None:
        bound = self.bind(call, ["energy", "state"], {"energy", "state"}, "grad", "grad(E, x)")
        if bound is None:
            return None
        energy = self.energy_node(bound["energy"], env, "grad")
        state = self.build_expr(bound["state"], env)
        if state is None or energy is None:
            return None
        if self.graph.node(state)["op"] != "state":
            label = self.graph.label(state) if isinstance(bound["state"], ast.Name) else "this expression"
            self.error(TypeErr, f"grad differentiates with respect to a state, but {label} is not one",
                       bound["state"].span, hint="grad(E, x) needs an energy E and a state x of the same layer")
            return None
        return self.call("grad", [(energy, bound["energy"]), (state, bound["state"])], {}, call.span, env)

    def dropout(self, call: ast.Call, env: Env | None) -> str | None:
        """``dropout(x, p=0.1, spatial=false)``: x and the layer's per-sample seeds (one param for every dropout
        call, made at the first; each call its own ``key``; ``spatial`` an attr only when true: fpidsl/ir/dropout.py)."""
        prim = BUILTINS[DROPOUT]
        bound = self.bind(call, ["x", "p", "spatial"], {"x"}, DROPOUT, prim.signature())
        if bound is None:
            return None
        p = self.attr_value(prim.attr("p"), bound["p"], env, DROPOUT) if "p" in bound else 0.1
        spatial = self.attr_value(prim.attr("spatial"), bound["spatial"], env, DROPOUT) if "spatial" in bound else False
        x = self.build_expr(bound["x"], env)
        if x is None or p is _FAIL or spatial is _FAIL or not self.graph.states:
            return None
        if SEEDS not in self.graph.params:
            lead = next(iter(self.graph.states.values())).shape
            self.graph.params[SEEDS] = self.graph.add_node(
                "param", span=call.span, shape=(lead[0],) if lead else (1,), name=SEEDS, module=None, role="seeds")
        key = sum(1 for n in self.graph.nodes() if self.graph.node(n).get("prim") == DROPOUT)
        attrs = {"p": p, "key": key, **({"spatial": True} if spatial else {})}  # spatial=false: the plain node
        node = self.call(DROPOUT, [(x, bound["x"]), (self.graph.params[SEEDS], call.func.span)], attrs,
                         call.span, env)
        spans = {name: self.use_span(bound[name], env) for name in ("p", "spatial") if name in bound}
        if spans:
            self.graph.node(node)["attr_spans"] = spans
        return node

    def extern_param(self, decl: ast.ExternParamDecl) -> None:
        """``param f : extern SHAPES -> SHAPE``: its declared shapes (dimensions of inputs) and its two param nodes
        (fpidsl/ir/extern.py)."""
        what = f"extern {decl.name}"
        inputs = [self.declared_shape(s, what, bound=True) for s in decl.extern.inputs]
        output = self.declared_shape(decl.extern.output, what, bound=True)
        if output is None or None in inputs:
            return
        spec = ExternSpec(decl.name, tuple(inputs), output, decl.extern.samplewise, decl.span)
        declare_extern(self.graph, spec, decl.span)

    def extern_call(self, name: str, call: ast.Call, env: Env | None) -> str | None:
        handle = self.graph.params.get(f"{name}.module")
        if call.kwargs:
            self.error(TypeErr, f"{name} is an extern module: it takes its inputs by position", call.kwargs[0].span,
                       hint=f"call it as {name}(x, ...)")
            return None
        nodes = [self.build_expr(e, env) for e in call.args]
        if handle is None or None in nodes:
            return None
        spec = self.graph.node(handle)["extern"]
        flat = self.graph.params[spec.parameters_param]
        args = [(handle, call.func.span), (flat, call.func.span), *zip(nodes, call.args)]
        return self.call(EXTERN, args, spec.attrs(), call.span, env)

    def conv1d(self, name: str, spec: ModuleSpec, call: ast.Call, env: Env | None) -> str | None:
        """``c(x)`` of a Conv1d, x ``[N, in, L]``: conv2d of ``x[:, :, None]`` with the weight as ``[out, in, 1, k]``,
        then the size-1 height dropped; nn.Conv1d's weight and bias, conv2d's derivatives."""
        x = self.build_expr(call.args[0], env)
        if x is None or self.numbers_only(name, [x], call.args, call.span, env):
            return None
        at = call.func.span

        def add(prim, args, attrs):
            return self.call(prim, args, attrs, call.span, env, module=name)

        x4 = add("unsqueeze", [(x, call.args[0])], {"dim": 2})
        w4 = add("reshape", [(self.graph.params[f"{name}.weight"], at)], {"shape": spec.weight_shape()[:2] + spec.kernel})
        args = [(x4, call.args[0]), (w4, at)] + ([(self.graph.params[f"{name}.bias"], at)] if spec.bias else [])
        y = add("conv2d", args, spec.attrs())
        return add("index", [(y, call.span)], {"index": (SliceSpec(), SliceSpec(), 0)})

    def attention(self, name: str, spec: ModuleSpec, call: ast.Call, env: Env | None) -> str | None:
        """``attn(q, k, v)`` or ``attn(q, k, v, mask=m)`` of a MultiheadAttention (passes/attention.py)."""
        usage = f"{name}(q, k, v) or {name}(q, k, v, mask=m)"
        extra = [kw for kw in call.kwargs if kw.name != "mask"]
        if len(call.args) != 3 or extra:
            where = extra[0].name_span if extra else call.span
            self.error(TypeErr, f"{name} is a {spec.describe()} module: it takes q, k, v and an optional mask",
                       where, hint=f"call it as {usage}")
            return None
        nodes = [self.build_expr(e, env) for e in call.args]
        mask = next((kw.value for kw in call.kwargs), None)
        mask_node = self.build_expr(mask, env) if mask is not None else None
        if None in nodes or (mask is not None and mask_node is None):
            return None
        if mask_node is not None and self.graph.dtype(mask_node) == "bool":  # torch's bool attn_mask: True masks out
            consts = [self.graph.add_node("const", span=mask.span, shape=(), value=v) for v in (attention.MASKED, 0)]
            mask_node = self.call("where", [(mask_node, mask), *((c, mask) for c in consts)], {}, call.span, env,
                                  module=name)
        params = {role: self.graph.params[f"{name}.{role}"] for role in attention.param_shapes(spec)}

        def add(prim, args, attrs):
            if prim == "const":
                return self.graph.add_node("const", span=call.span, shape=(), value=attrs["value"])
            spans = {nodes[0]: call.args[0], nodes[1]: call.args[1], nodes[2]: call.args[2], mask_node: mask}
            return self.call(prim, [(a, self.use_span(spans[a], env) if a in spans else call.span) for a in args],
                             attrs, call.span, env, module=name)

        return attention.lower(add, spec, params, *nodes, mask_node, call.span)

    def module_call(self, name: str, call: ast.Call, env: Env | None) -> str | None:
        spec = self.graph.modules.get(name)
        if spec is None:  # its declaration failed, and said so: one mistake, one error
            return None
        if spec.kind == attention.KIND:
            return self.attention(name, spec, call, env)
        if spec.kind == "Conv1d" and len(call.args) == 1 and not call.kwargs:
            return self.conv1d(name, spec, call, env)
        what = spec.describe() if spec else name
        if call.kwargs:
            self.error(TypeErr, f"{name} is a {what} module: it takes its one argument by position, not by keyword",
                       call.span, hint=f"call it on one tensor: {name}(x)")
            return None
        if len(call.args) != 1:
            self.error(TypeErr, f"{name} is a {what} module: it takes one argument, but {len(call.args)} were given",
                       call.span, hint=f"call it on one tensor: {name}(x)")
            return None
        x = self.build_expr(call.args[0], env)
        if x is None or spec is None or self.numbers_only(name, [x], call.args, call.span, env):
            return None
        args = [(x, call.args[0])]
        if spec.has_weight:
            args.append((self.graph.params[f"{name}.weight"], call.func.span))
        if spec.bias:
            args.append((self.graph.params[f"{name}.bias"], call.func.span))
        return self.call(spec.prim, args, spec.attrs(), call.span, env, module=name)

    def inline_fn(self, fn: ast.FnDef, call: ast.Call, env: Env | None) -> str | None:
        params = [p.id for p in fn.params]
        signature = f"{fn.name}({', '.join(params)})"
        bound = self.bind(call, params, set(params), f"fn {fn.name}", signature)
        if bound is None or fn.name in self.fns.recursive:
            return None
        self.inlined += 1
        if self.inlined > MAX_INLINED:
            if self.inlined == MAX_INLINED + 1:
                self.error(StructureErr, f"more than {MAX_INLINED:,} fn calls to inline (the last: {fn.name})",
                           call.span, hint="each call of an fn copies its body; fns that call each other "
                                           "several times grow exponentially")
            return None
        inner: dict[str, Val] = {}
        for p in params:
            expr = bound[p]
            span = self.use_span(expr, env)
            try:
                inner[p] = Val(span, number=self.static(expr, env))
                continue
            except NotStatic:
                pass
            except UnknownStatic:
                inner[p] = Val(span)
                continue
            except FpiError as e:
                self.sink.add(e)
                return None
            inner[p] = Val(span, node=self.build_expr(expr, env))
        if self.scope is None:
            return None  # checking an fn body alone: the callee's body is checked on its own
        self.inline.append((fn.name, call.span))
        try:
            return self.build_expr(fn.body, inner)
        finally:
            self.inline.pop()

    # ------------------------------------------------------------------ static arguments
    def attr_value(self, attr: Attr, expr, env: Env | None, fname: str):
        """The value of a static argument of kind ``attr.kind``; ``_FAIL`` after reporting an error."""
        kind = attr.kind
        if kind == "bool":
            if isinstance(expr, ast.Name) and expr.id in ("true", "false"):
                return expr.id == "true"
            return self.bad_attr(attr, expr, fname, f"found {_what(expr)}")
        if kind == "word":
            if isinstance(expr, ast.Name):
                return expr.id
            return self.bad_attr(attr, expr, fname, f"found {_what(expr)}")
        if kind in ("dims", "sizes", "shape", "pair", "ints") and isinstance(expr, ast.ListExpr):
            if kind == "pair" and len(expr.items) != 2:
                return self.bad_attr(attr, expr, fname, f"found a list of {len(expr.items)}")
            if kind in ("dims", "sizes", "ints") and not expr.items:
                return self.bad_attr(attr, expr, fname, "found an empty list")
            items = []
            for item in expr.items:
                if kind == "shape" and self.mentions_symbol(item, env):
                    items.append(self.target_size(item, env, f"the shape of {fname}"))
                elif isinstance(item, ast.Name) and item.id in self.input_symbols and not self.is_number_name(item, env):
                    self.error(TypeErr, f"{attr.name} of {fname} must be {ATTR_KINDS[attr.kind]}, but found the "
                                        f"symbolic dimension {item.id}, whose size is known only when the layer is "
                                        "called", item.span,
                               hint="a static argument is a number or a const")
                    return _FAIL
                else:
                    items.append(self.attr_value(Attr(attr.name, "int"), item, env, fname))
                if items[-1] is _FAIL:
                    return _FAIL  # one error for the list
            return tuple(items)
        if kind in ("shape",):
            return self.bad_attr(attr, expr, fname, f"found {_what(expr)}")
        try:
            value = self.static(expr, env)
        except NotStatic as e:
            if e.unknown and env is None:
                self.unknown_name(e.expr)
                return _FAIL
            return self.bad_attr(attr, e.expr, fname, e.reason, self.use_span(e.expr, env))
        except UnknownStatic:
            return _FAIL
        except FpiError as e:
            self.sink.add(e)
            return _FAIL
        if kind in ("int", "dim", "dims", "sizes", "pair", "ints") and not isinstance(value, int):
            return self.bad_attr(attr, expr, fname, f"found {format_attr(value)}")
        if kind == "pair":
            return (value, value)
        return value

    def bad_attr(self, attr: Attr, expr, fname: str, found: str, span: Span | None = None):
        if fname == "index":
            message = f"an index must be an integer, a slice lo:hi:step or ..., but {found}"
        else:
            message = f"{attr.name} of {fname} must be {ATTR_KINDS[attr.kind]}, but {found}"
        hint = None
        if isinstance(expr, ast.BinOp) and expr.op == "/":
            hint = "`/` always gives a float; `//` divides integers (`C // G`)"
        self.error(TypeErr, message, span or expr.span, hint=hint)
        return _FAIL

    def is_number_name(self, ref: ast.Name, env: Env | None) -> bool:
        if env is not None:
            return ref.id in env
        return self.scope is not None and ref.id in self.scope.symbols

    def mentions_symbol(self, expr, env: Env | None) -> bool:
        """Whether a size of a shape argument is written with a symbolic dimension (``H``, ``H / 2``, ``C * H``)."""
        if isinstance(expr, ast.Name):
            return not self.is_number_name(expr, env)
        return isinstance(expr, ast.BinOp) and expr.op in _SIZE_OPS and (
            self.mentions_symbol(expr.left, env) or self.mentions_symbol(expr.right, env))

    def target_size(self, expr, env: Env | None, what: str):
        """A size of a shape argument written with symbols: a dim (``ir.shapes``); ``_FAIL`` after an error."""
        if isinstance(expr, ast.Name) and not self.is_number_name(expr, env):
            return self.shape_symbol(expr, env)
        if not (isinstance(expr, ast.BinOp) and expr.op in _SIZE_OPS):
            return self.attr_value(Attr("shape", "int"), expr, env, what)
        left, right = self.target_size(expr.left, env, what), self.target_size(expr.right, env, what)
        if _FAIL in (left, right):
            return _FAIL
        value = self.size_arithmetic(expr, left, right, what)
        return _FAIL if value is None else value

    def shape_symbol(self, ref: ast.Name, env: Env | None):
        if self.scope is not None and env is None and ref.id not in self.input_symbols:
            self.error(ShapeErr, f"the dimension {ref.id} is not a dimension of any input", ref.span,
                       hint=did_you_mean(ref.id, self.input_symbols) or "use a dimension of an input, or a number")
            return _FAIL
        return ref.id


_SIZE_OPS = frozenset(("+", "-", "*", "/", "//"))  # the arithmetic a size may be written with


def _sizes(value) -> tuple:
    """A module size argument as a tuple (an int, or a pair)."""
    return value if isinstance(value, tuple) else (value,)


def _what(expr) -> str:
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Num):
        return expr.text
    return "an expression"


def _inside(span: Span, outer: Span) -> bool:
    return (span.path == outer.path and (outer.line, outer.col) <= (span.line, span.col)
            and (span.end_line, span.end_col) <= (outer.end_line, outer.end_col))

