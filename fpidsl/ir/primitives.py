"""THE primitive table: every op a graph ``call`` node may apply, with its signature and shape rule.

A :class:`Primitive` names its tensor inputs (``inputs``, the last ``optional_inputs`` of which may be
absent; ``variadic``: one list of any length, for ``cat``) and its static attributes (:class:`Attr`:
numbers, booleans, dims, never AST). ``builtin`` primitives are callable by name in ``.fpi`` with the
Python-like signature ``name(*inputs, *attrs)`` (positional or keyword). The others come from
operators (``+ - * / @ ** -x``), indexing, module calls and ``descend``.

Every fact about a primitive is declared in its entry, and nowhere else:

* ``shape``: the shape rule (below); ``attrs``, ``inputs``: its signature;
* ``vjp``: its vector-Jacobian product written with primitives (the body in :mod:`fpidsl.ir.derivatives`);
* ``batch``: how the samples of a batch flow through it (a rule of :mod:`fpidsl.ir.batching`), which decides
  whether a layer may drop finished samples;
* ``op``: the :mod:`fpidsl.runtime.ops` function the emitted code calls (its torch lowering);
* ``lipschitz``: its Lipschitz factor or the name of a rule of :mod:`fpidsl.passes.lipschitz` (None: unknown);
* ``narrow`` / ``distribute``: whether the narrowing and hoisting passes may rewrite it, and how.

``tests/ir/test_primitive_table.py`` fails when an entry lacks one of them. docs/ARCHITECTURE.md, "Adding a
primitive", says what to write.

A shape rule is ``rule(shapes, attrs, ctx) -> shape``: ``shapes`` are the input shapes in argument
order, ``attrs`` the node's attributes with defaults filled, ``ctx`` a :class:`~fpidsl.ir.shapes.ShapeCtx`.
It raises :class:`~fpidsl.ir.shapes.ShapeRuleError` (via ``ctx.fail``) with a message that states
what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import functools
import math
from typing import Any, Callable, Mapping

from . import batching as _B
from . import linalg
from .linalg import solve_rhs_is_vector
from .shapes import (
    DimConflict,
    Shape,
    ShapeCtx,
    broadcast,
    dim_add,
    dim_exact_div,
    dim_floordiv,
    dim_mul,
    dim_prod,
    dim_sub,
    fmt_dim,
    fmt_shape,
    normalize_dim,
    numel,
    sizes_not_given,
)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

GELU_APPROXIMATIONS = ("none", "tanh")

# Attribute kinds: what a static argument may be.
ATTR_KINDS = {
    "number": "a number",
    "int": "an integer",
    "bool": "true or false",
    "dim": "a dimension index (an integer)",
    "dims": "a dimension index or a list of them",
    "sizes": "a size or a list of sizes (positive integers)",
    "shape": "a list of sizes (integers, symbolic dimensions, one -1)",
    "index": "an index (integers, slices, ...)",
    "pair": "an integer or a pair [a, b] of integers",
    "word": "a name",
    "ints": "an integer or a list of integers",
    "equation": "an einsum equation, a string in double quotes (\"ij,jk->ik\")",
    "shapes": "a list of shapes",
    "positions": "a list of argument positions",
}


@dataclass(frozen=True)
class SliceSpec:
    """``lo:hi:step`` of an index attribute; missing parts are None."""

    lo: int | None = None
    hi: int | None = None
    step: int | None = None

    def __str__(self) -> str:
        text = f"{'' if self.lo is None else self.lo}:{'' if self.hi is None else self.hi}"
        return text if self.step is None else f"{text}:{self.step}"


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


ShapeRule = Callable[[list, Mapping[str, Any], ShapeCtx], Shape]


@dataclass(frozen=True)
class Primitive:
    name: str
    inputs: tuple[str, ...]
    shape: ShapeRule
    attrs: tuple[Attr, ...] = ()
    optional_inputs: int = 0
    variadic: bool = False
    builtin: bool = False
    doc: str = ""
    emit: Callable | None = None
    vjp: Callable | None = None
    batch: Callable | None = None  # how samples flow through it (:mod:`fpidsl.ir.batching`)
    op: str = ""  # the function of fpidsl.runtime.ops the code generator calls (the torch lowering)
    lipschitz: float | str | None = None  # a constant factor, a rule of passes/lipschitz.py, or None: no rule
    narrow: tuple[int, int] | None = None  # (factor position, axis): a slice of the result along axis is the
    #                                        product with that factor sliced (passes/narrow.py)
    shape_only: tuple[int, ...] = ()  # argument positions read for their shape only (the emitted backward may
    #                                   pass a shape there)
    distribute: tuple[int, int] | None = None  # (data axis, weight axis): linear in its data argument's pieces
    #                                            along data axis, with the weight cut along weight axis (hoist.py)
    dtype_from_state: bool = False  # a constructor (eye, zeros ...): its one tensor input is not written in specs;
    #                                 the compiler passes the layer's first state, read for dtype and device only
    written: str = ""  # the call as specs write it, where that is not the inputs then the attributes (einsum)
    index_args: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (position, dtypes): where an int / bool input
    #                                 (an index) is expected (passes/check_dtypes.py); elsewhere floats only
    keeps_dtype: bool = False  # a shape op (reshape, index ...): its result has the dtype of argument 0
    order: tuple[str, ...] = ()  # the parameter names in the order specs write them, where that is not the
    #                              inputs then the attributes (``gather(x, dim, index)``, as torch)
    module_attrs: tuple[str, ...] = ()  # attributes only the module form sets (a spec's call cannot write them)

    def parameter_names(self) -> list[str]:
        """The names a call binds positionally, in written order."""
        return list(self.order) or list(self.written_inputs) + [a.name for a in self.attrs]

    @functools.cached_property
    def call_rules(self) -> tuple[int, int | None, frozenset[str], tuple[str, ...]]:
        """(min_args, max_args, the attribute names, the required ones): what a call node's lint checks, computed
        once per primitive, not per node."""
        return (self.min_args, self.max_args, frozenset(a.name for a in self.attrs),
                tuple(a.name for a in self.attrs if a.required))

    def dtypes_at(self, pos: int) -> tuple[str, ...]:
        """The dtypes argument ``pos`` accepts: ``("float",)`` unless ``index_args`` says otherwise."""
        return next((dtypes for p, dtypes in self.index_args if p == pos), ("float",))

    @property
    def min_args(self) -> int:
        return 1 if self.variadic else len(self.inputs) - self.optional_inputs

    @property
    def max_args(self) -> int | None:
        return None if self.variadic else len(self.inputs)

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)

    def with_defaults(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        out = {a.name: a.default for a in self.attrs if not a.required}
        out.update(attrs)
        return out

    @property
    def written_inputs(self) -> tuple[str, ...]:
        """The tensor inputs a spec writes (a constructor's dtype source is supplied by the compiler)."""
        return () if self.dtype_from_state else self.inputs

    def signature(self) -> str:
        if self.written:
            return self.written
        text = {n: f"[{n}, ...]" if self.variadic else n for n in self.written_inputs}
        for a in self.attrs:
            text[a.name] = a.name if a.required else f"{a.name}={format_attr(a.default)}"
        return f"{self.name}({', '.join(text[n] for n in self.parameter_names())})"


def format_attr(value: Any) -> str:
    """Attribute values as the text form and messages write them."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is Ellipsis:
        return "..."
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------- shape rules


def _same(shapes, attrs, ctx):
    return tuple(shapes[0])


def _softplus(shapes, attrs, ctx):
    if attrs["beta"] == 0:  # log(1 + exp(0 x)) / 0: NaN everywhere
        raise ctx.fail("beta of softplus must not be 0 (softplus(x, beta) = log(1 + exp(beta x)) / beta)",
                       attr="beta")
    return tuple(shapes[0])


def _broadcast(shapes, attrs, ctx):
    a, b = shapes
    try:
        return broadcast(a, b)
    except DimConflict as c:
        raise ctx.fail(
            f"the operands of {ctx.callee} have shapes {fmt_shape(a)} and {fmt_shape(b)}, which do not "
            f"broadcast: {fmt_dim(c.a)} vs {fmt_dim(c.b)} in dimension {c.index}",
            hint="broadcasting pairs dimensions from the right; each pair must be equal or contain a 1, "
                 "and a symbolic dimension equals only itself",
        ) from None


def _dim(d: int, shape: Shape, ctx: ShapeCtx, what: str = "dim") -> int:
    n = normalize_dim(d, len(shape))
    if n is None:
        raise ctx.fail(
            f"{what}={d} is out of range for {ctx.callee} of a tensor of shape {fmt_shape(shape)} "
            f"({len(shape)} dimensions)", attr=what,
            hint=f"valid dims are {-len(shape)}..{len(shape) - 1}" if shape else "a scalar has no dimensions",
        )
    return n


def _reduce(shapes, attrs, ctx):
    (x,) = shapes
    dims = attrs["dim"]
    keep = attrs.get("keepdim", False)
    if dims is None:
        picked = set(range(len(x)))
    else:
        listed = dims if isinstance(dims, tuple) else (dims,)
        picked = set()
        for d in listed:
            n = _dim(d, x, ctx)
            if n in picked:
                raise ctx.fail(f"dim {d} appears twice in the dims of {ctx.callee}", attr="dim")
            picked.add(n)
    return tuple(1 if i in picked else d for i, d in enumerate(x) if keep or i not in picked)


def _softmax(shapes, attrs, ctx):
    _dim(attrs["dim"], shapes[0], ctx)
    return tuple(shapes[0])


def _cat(shapes, attrs, ctx):
    first = shapes[0]
    if not first:
        raise ctx.fail("cat cannot join scalars (shape [])", arg=0)
    d = _dim(attrs["dim"], first, ctx)
    total = first[d]
    for i, s in enumerate(shapes[1:], start=1):
        if len(s) != len(first):
            raise ctx.fail(
                f"cat needs tensors of the same rank: item {i} has shape {fmt_shape(s)} but item 0 has "
                f"{fmt_shape(first)}", arg=i)
        for j, (a, b) in enumerate(zip(first, s)):
            if j != d and a != b:
                raise ctx.fail(
                    f"cat along dim {attrs['dim']} needs the other dimensions to agree: item {i} has shape "
                    f"{fmt_shape(s)} but item 0 has {fmt_shape(first)} ({fmt_dim(b)} vs {fmt_dim(a)} in "
                    f"dimension {j})", arg=i)
        total = dim_add(total, s[d])
    return tuple(total if j == d else a for j, a in enumerate(first))


def _reshape(shapes, attrs, ctx):
    (x,) = shapes
    target = attrs["shape"]
    if sum(1 for t in target if t == -1) > 1:
        raise ctx.fail("reshape accepts at most one -1 in its target shape", attr="shape")
    for t in target:
        if isinstance(t, int) and t != -1 and t <= 0:
            raise ctx.fail(f"reshape sizes must be positive (or one -1), found {t}", attr="shape")
    total = numel(x)
    known = dim_prod(t for t in target if t != -1)
    if -1 in target:
        inferred = dim_exact_div(total, known, ctx)
        if inferred is None or (isinstance(inferred, int) and inferred <= 0):
            raise ctx.fail(
                f"reshape cannot infer the -1 of {format_attr(tuple(target))}: {fmt_shape(x)} has "
                f"{fmt_dim(total)} elements, which is not a multiple of {fmt_dim(known)}", attr="shape")
        return tuple(inferred if t == -1 else t for t in target)
    if total != known:
        raise ctx.fail(
            f"reshape cannot turn {fmt_shape(x)} ({fmt_dim(total)} elements) into "
            f"{format_attr(tuple(target))} ({fmt_dim(known)} elements)", attr="shape")
    return tuple(target)


def _transpose(shapes, attrs, ctx):
    (x,) = shapes
    a = _dim(attrs["dim0"], x, ctx, "dim0")
    b = _dim(attrs["dim1"], x, ctx, "dim1")
    out = list(x)
    out[a], out[b] = out[b], out[a]
    return tuple(out)


def _flatten(shapes, attrs, ctx):
    (x,) = shapes
    if not x:
        return (1,)
    s = _dim(attrs["start"], x, ctx, "start")
    e = _dim(attrs["end"], x, ctx, "end")
    if s > e:
        raise ctx.fail(f"flatten: start={attrs['start']} comes after end={attrs['end']} for shape "
                       f"{fmt_shape(x)}", attr="start")
    return tuple(x[:s]) + (dim_prod(x[s:e + 1]),) + tuple(x[e + 1:])


def _slice_text(s: SliceSpec) -> str:
    return f"slice {s}"


def _index(shapes, attrs, ctx):
    (x,) = shapes
    items = attrs["index"]
    n_ell = sum(1 for it in items if it is Ellipsis)
    if n_ell > 1:
        raise ctx.fail("an index can have only one ...")
    explicit = sum(1 for it in items if it is not Ellipsis and it is not None)  # None adds a dim, reads none
    if explicit > len(x):
        raise ctx.fail(f"too many indices: a tensor of shape {fmt_shape(x)} has {len(x)} dimensions but "
                       f"{explicit} are indexed", arg=0)
    expanded: list = []  # (item, its position in the index)
    for i, it in enumerate(items):
        if it is Ellipsis:
            expanded.extend([(SliceSpec(), i)] * (len(x) - explicit))
        else:
            expanded.append((it, i))
    expanded.extend([(SliceSpec(), None)] * (len(x) + (len(items) - n_ell - explicit) - len(expanded)))
    out = []
    dims = iter(x)
    for it, i in expanded:
        if it is None:  # x[:, None]: a new dimension of size 1
            out.append(1)
            continue
        d = next(dims)
        if isinstance(it, int):
            if isinstance(d, int) and not -d <= it < d:
                raise ctx.fail(f"index {it} out of range for dimension of size {d}", item=i)
            continue
        out.append(_slice_dim(d, it, ctx, i))
    return tuple(out)


def _slice_dim(d, s: SliceSpec, ctx, item):
    step = 1 if s.step is None else s.step
    if step <= 0:
        raise ctx.fail(f"{_slice_text(s)}: the step must be positive, found {step}", item=item)
    if isinstance(d, int):
        bounds = []
        for b, default in ((s.lo, 0), (s.hi, d)):
            if b is None:
                bounds.append(default)
                continue
            v = b + d if b < 0 else b
            if not 0 <= v <= d:
                raise ctx.fail(f"{_slice_text(s)} out of range for dimension of size {d}", item=item)
            bounds.append(v)
        lo, hi = bounds
        length = max(0, -(-(hi - lo) // step))
        if length == 0:
            raise ctx.fail(f"{_slice_text(s)} is empty for dimension of size {d}", item=item)
        return length
    lo = 0 if s.lo is None else (dim_add(d, s.lo) if s.lo < 0 else s.lo)
    hi = d if s.hi is None else (dim_add(d, s.hi) if s.hi < 0 else s.hi)
    length = dim_sub(hi, lo)
    if isinstance(length, int) and length <= 0:
        raise ctx.fail(f"{_slice_text(s)} is empty", item=item)
    if step > 1:
        length = dim_floordiv(dim_add(length, step - 1), step, ctx)
    return length


def _matmul(shapes, attrs, ctx):
    a, b = shapes
    if not a or not b:
        raise ctx.fail(f"@ needs tensors of at least one dimension, found {fmt_shape(a)} @ {fmt_shape(b)}",
                       hint="use * to multiply by a scalar")
    a2 = a if len(a) >= 2 else (1,) + tuple(a)
    b2 = b if len(b) >= 2 else tuple(b) + (1,)
    if a2[-1] != b2[-2]:
        raise ctx.fail(
            f"@ needs the last dimension of the left operand to equal the "
            f"{'only' if len(b) == 1 else 'second-to-last'} dimension of the right one: "
            f"{fmt_shape(a)} @ {fmt_shape(b)} ({fmt_dim(a2[-1])} vs {fmt_dim(b2[-2])})")
    try:
        batch = broadcast(a2[:-2], b2[:-2])
    except DimConflict as c:
        raise ctx.fail(f"the batch dimensions of {fmt_shape(a)} @ {fmt_shape(b)} do not broadcast: "
                       f"{fmt_dim(c.a)} vs {fmt_dim(c.b)}") from None
    out = tuple(batch)
    if len(a) >= 2:
        out += (a2[-2],)
    if len(b) >= 2:
        out += (b2[-1],)
    return out


def _linear(shapes, attrs, ctx):
    x, w = shapes[0], shapes[1]
    if not x:
        raise ctx.fail(f"{ctx.callee} expects a tensor of at least one dimension, but its argument is a "
                       "scalar", arg=0, at_call=True)
    if x[-1] != w[1]:
        raise ctx.fail(f"{ctx.callee} expects {fmt_dim(w[1])} input features, but its argument has shape "
                       f"{fmt_shape(x)}", arg=0, dim=len(x) - 1, at_call=True)
    return tuple(x[:-1]) + (w[0],)


def _conv_common(shapes, ctx, channels_in):
    x = shapes[0]
    if len(x) != 4:
        raise ctx.fail(f"{ctx.callee} expects a 4-D input [N, C, H, W], but its argument has shape "
                       f"{fmt_shape(x)}", arg=0, at_call=True)
    if x[1] != channels_in:
        raise ctx.fail(f"{ctx.callee} expects {fmt_dim(channels_in)} input channels, but its argument has "
                       f"shape {fmt_shape(x)}", arg=0, dim=1, at_call=True)
    return x


def _conv_weights(shapes, attrs, ctx, out_at: int) -> None:
    """A weight written as a tensor (``conv2d(x, W, b, ...)``; a module's are right by construction): 4-D, a bias
    of its output channels (``w[out_at]``), a positive stride and a padding of at least 0."""
    w = shapes[1]
    if len(w) != 4:
        raise ctx.fail(f"{ctx.callee} expects a 4-D weight, but its weight has shape {fmt_shape(w)}", arg=1,
                       hint="conv2d's weight is [out, in, kh, kw]; conv_transpose2d's [in, out, kh, kw]")
    if len(shapes) > 2 and shapes[2] is not None and tuple(shapes[2]) != (w[out_at],):
        raise ctx.fail(f"{ctx.callee} expects a bias of shape [{fmt_dim(w[out_at])}] (its output channels), but "
                       f"its bias has shape {fmt_shape(shapes[2])}", arg=2)
    if any(s < 1 for s in attrs["stride"]):
        raise ctx.fail(f"{ctx.callee} needs a stride of at least 1, found {list(attrs['stride'])}", attr="stride")
    if any(p < 0 for p in attrs["padding"]):
        raise ctx.fail(f"{ctx.callee} needs a padding of at least 0, found {list(attrs['padding'])}",
                       attr="padding")


def _conv2d(shapes, attrs, ctx):
    _conv_weights(shapes, attrs, ctx, 0)
    w = shapes[1]
    x = _conv_common(shapes, ctx, w[1])
    out = [x[0], w[0]]
    for i in range(2):
        size, k, s, p = x[2 + i], w[2 + i], attrs["stride"][i], attrs["padding"][i]
        span = dim_sub(dim_add(size, 2 * p), k)
        if isinstance(span, int) and span < 0:
            raise ctx.fail(f"{ctx.callee} cannot slide a kernel of size {k} over a dimension of size "
                           f"{fmt_dim(size)} with padding {p}", arg=0, dim=2 + i)
        out.append(dim_add(dim_floordiv(span, s, ctx), 1))
    return tuple(out)


def _conv_transpose2d(shapes, attrs, ctx):
    w = shapes[1]
    x = _conv_common(shapes, ctx, w[0])
    out = [x[0], w[1]]
    for i in range(2):
        size, k = x[2 + i], w[2 + i]
        s, p, op = attrs["stride"][i], attrs["padding"][i], attrs["output_padding"][i]
        d = dim_add(dim_sub(dim_mul(dim_sub(size, 1), s), 2 * p), k + op)
        if isinstance(d, int) and d <= 0:
            raise ctx.fail(f"{ctx.callee} would produce an empty output ({d}) from a dimension of size "
                           f"{fmt_dim(size)}", arg=0, dim=2 + i)
        out.append(d)
    return tuple(out)


def _grad(shapes, attrs, ctx):
    return tuple(shapes[1])



def _gelu(shapes, attrs, ctx):
    if attrs["approximate"] not in GELU_APPROXIMATIONS:
        raise ctx.fail(f"approximate of gelu must be none or tanh, found {format_attr(attrs['approximate'])}",
                       attr="approximate", hint="gelu(x) is exact (with erf); gelu(x, approximate=tanh) the tanh "
                                                "formula")
    return tuple(shapes[0])


def _extremum(shapes, attrs, ctx):
    """max / min: a reduction whose ``dim`` is required."""
    return _reduce(shapes, attrs, ctx)


def _reduce_dims(x, attrs, ctx) -> list[int]:
    """The non-negative dims a reduction's ``dim`` attribute names (checked as :func:`_reduce` checks them)."""
    _reduce([x], attrs, ctx)
    dims = attrs["dim"]
    listed = range(len(x)) if dims is None else (dims if isinstance(dims, tuple) else (dims,))
    return sorted(normalize_dim(d, len(x)) for d in listed)


def _norm(shapes, attrs, ctx):
    p = attrs["p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1 <= p < float("inf"):
        raise ctx.fail(f"p of norm must be a number of at least 1, found {format_attr(p)}", attr="p",
                       hint="norm(x, dim, p=2) is the Euclidean norm; p=1 the sum of absolute values")
    return _reduce(shapes, attrs, ctx)


PROD_MAX_SIZE = 256  # the exact VJP of prod is built from about 4 products per element of the reduced dim


def _prod(shapes, attrs, ctx):
    (x,) = shapes
    out = _reduce(shapes, attrs, ctx)
    size = x[normalize_dim(attrs["dim"], len(x))]
    if not isinstance(size, int):
        raise ctx.fail(f"prod along dim {attrs['dim']} of {fmt_shape(x)} needs a dimension of known size, found "
                       f"{fmt_dim(size)}", attr="dim",
                       hint="its derivative is built element by element (exact where elements are 0); use "
                            "exp(sum(log(x), dim)) for positive x along a symbolic dimension")
    if size > PROD_MAX_SIZE:
        raise ctx.fail(f"prod along a dimension of {size} elements (at most {PROD_MAX_SIZE})", attr="dim",
                       hint="use exp(sum(log(x), dim)) for positive x")
    return out


def _var(shapes, attrs, ctx):
    (x,) = shapes
    out = _reduce(shapes, attrs, ctx)
    count = dim_prod(x[d] for d in _reduce_dims(x, attrs, ctx))
    correction = attrs["correction"]
    if correction < 0:
        raise ctx.fail(f"correction of var must be at least 0, found {correction}", attr="correction")
    if isinstance(count, int) and count <= correction:
        raise ctx.fail(f"var over {count} element{'s' if count != 1 else ''} with correction={correction} divides "
                       f"by {count - correction}", attr="correction",
                       hint="correction=0 is the population variance, correction=1 (the default) the sample "
                            "variance")
    return out


def _triangle(shapes, attrs, ctx):
    (x,) = shapes
    if len(x) < 2:
        raise ctx.fail(f"{ctx.callee} needs a tensor of at least 2 dimensions (a matrix, or a batch of them), "
                       f"found {fmt_shape(x)}", arg=0, hint=f"{ctx.callee} keeps a triangle of the last two dims")
    return tuple(x)


def _permute(shapes, attrs, ctx):
    (x,) = shapes
    dims = attrs["dims"] if isinstance(attrs["dims"], tuple) else (attrs["dims"],)
    if len(dims) != len(x):
        raise ctx.fail(f"permute needs one dim per dimension of {fmt_shape(x)} ({len(x)}), found "
                       f"{len(dims)}: {format_attr(tuple(dims))}", attr="dims",
                       hint=f"list every dim 0..{len(x) - 1} once, in the order of the result" if x else
                       "a scalar has no dimensions")
    order = [_dim(d, x, ctx, "dims") for d in dims]
    if len(set(order)) != len(order):
        twice = next(n for n in order if order.count(n) > 1)
        spelled = {d for d, n in zip(dims, order) if n == twice}
        written = f" ({' and '.join(map(str, sorted(spelled, reverse=True)))})" if len(spelled) > 1 else ""
        raise ctx.fail(f"permute lists dimension {twice} twice{written} in {format_attr(tuple(dims))}",
                       attr="dims", hint=f"list every dim 0..{len(x) - 1} once")
    return tuple(x[i] for i in order)


def _where(shapes, attrs, ctx):
    cond, a, b = shapes
    out = tuple(cond)
    for i, s in ((1, a), (2, b)):
        try:
            out = broadcast(out, s)
        except DimConflict as c:
            raise ctx.fail(
                f"the arguments of where have shapes {fmt_shape(cond)}, {fmt_shape(a)} and {fmt_shape(b)}, which "
                f"do not broadcast: {fmt_dim(c.a)} vs {fmt_dim(c.b)} in dimension {c.index}", arg=i,
                hint="broadcasting pairs dimensions from the right; each pair must be equal or contain a 1") from None
    return out


def _unsqueeze_shape(shapes, attrs, ctx):
    """Size-1 dims inserted at ``dim``: positions in the result (negative ones count from its end)."""
    (x,) = shapes
    dims = attrs["dim"] if isinstance(attrs["dim"], tuple) else (attrs["dim"],)
    rank = len(x) + len(dims)
    picked = []
    for d in dims:
        n = normalize_dim(d, rank)
        if n is None:
            raise ctx.fail(f"dim={d} is out of range for unsqueeze of a tensor of shape {fmt_shape(x)}: the result "
                           f"has {rank} dimensions", attr="dim", hint=f"valid dims are {-rank}..{rank - 1}")
        if n in picked:
            raise ctx.fail(f"dim {d} appears twice in the dims of unsqueeze", attr="dim")
        picked.append(n)
    rest = iter(x)
    return tuple(1 if i in picked else next(rest) for i in range(rank))


def _affine_parameters(shapes, ctx, expected: tuple) -> None:
    """The weight and bias of a normalisation, when present, have the shape ``expected``."""
    for i, s in enumerate(shapes[1:], start=1):
        if tuple(s) != tuple(expected):
            raise ctx.fail(f"{ctx.callee} expects its {'weight' if i == 1 else 'bias'} of shape "
                           f"{fmt_shape(expected)}, found {fmt_shape(s)}", arg=i)


def _positive_eps(attrs, ctx) -> None:
    """A normalisation's ``eps`` (added to the variance) is above 0 (a module's is checked where declared)."""
    if not attrs["eps"] > 0:
        raise ctx.fail(f"{ctx.callee} needs an eps above 0, found {format_attr(attrs['eps'])}", attr="eps",
                       hint="eps is added to the variance before its square root; torch's default is 1e-5")


def _group_norm(shapes, attrs, ctx):
    x = shapes[0]
    groups, channels = attrs["groups"], attrs["channels"]
    if len(x) < 2:
        raise ctx.fail(f"{ctx.callee} expects an input [N, C, ...] of at least 2 dimensions, but its argument "
                       f"has shape {fmt_shape(x)}", arg=0, at_call=True)
    if channels is None:  # the function form, group_norm(x, groups, weight, bias): x's own channels
        channels = x[1]
        if not isinstance(channels, int):
            raise ctx.fail(f"{ctx.callee} needs a known number of channels (dimension 1), but its argument has "
                           f"shape {fmt_shape(x)}", arg=0, dim=1, at_call=True)
    elif x[1] != channels:
        raise ctx.fail(f"{ctx.callee} expects {channels} channels (dimension 1), but its argument has shape "
                       f"{fmt_shape(x)}", arg=0, dim=1, at_call=True)
    _positive_eps(attrs, ctx)
    if groups < 1 or channels % groups:
        raise ctx.fail(f"{ctx.callee}: {channels} channels cannot be split into {groups} groups",
                       attr="groups", hint="the number of channels must be a multiple of the number of groups")
    _affine_parameters(shapes, ctx, (channels,))
    return tuple(x)


def _layer_norm(shapes, attrs, ctx):
    x = shapes[0]
    normalized = tuple(attrs["shape"])
    if not normalized or any(not isinstance(d, int) or d < 1 for d in normalized):
        raise ctx.fail(f"{ctx.callee} normalizes over trailing dimensions of known positive sizes, found "
                       f"{fmt_shape(normalized)}", attr="shape", hint="the sizes are numbers or consts")
    if len(x) < len(normalized) or tuple(x[len(x) - len(normalized):]) != normalized:
        raise ctx.fail(f"{ctx.callee} normalizes over trailing dimensions {fmt_shape(normalized)}, but its "
                       f"argument has shape {fmt_shape(x)}", arg=0, at_call=True,
                       hint="LayerNorm(dims) normalizes the last dimensions of its input, which must equal dims")
    _positive_eps(attrs, ctx)
    _affine_parameters(shapes, ctx, normalized)
    return tuple(x)


def _group_mean(shapes, attrs, ctx):
    x = shapes[0]
    if len(x) < 2 or not isinstance(x[1], int) or x[1] % attrs["groups"]:
        raise ctx.fail(f"group_mean: {fmt_shape(x)} has no dimension 1 that {attrs['groups']} groups divide")
    return tuple(x)


def _constructed_shape(shape, ctx, what: str = "shape"):
    for d in shape:
        if not isinstance(d, int):
            raise ctx.fail(f"the sizes of {ctx.callee} must be numbers (or consts), found {fmt_dim(d)} in "
                           f"{format_attr(tuple(shape))}", attr=what,
                           hint="a tensor sized by a dimension of an input is made from that input: "
                                "0 * x + 1 is ones shaped like x")
        if d < 1:
            raise ctx.fail(f"the sizes of {ctx.callee} must be positive, found {format_attr(tuple(shape))}",
                           attr=what, hint="a -1 is only for reshape")
    return tuple(shape)


def _eye(shapes, attrs, ctx):
    if attrs["n"] < 1:
        raise ctx.fail(f"eye(n) needs a positive size, found {attrs['n']}", attr="n")
    return (attrs["n"], attrs["n"])


def _filled(shapes, attrs, ctx):
    return _constructed_shape(attrs["shape"], ctx)


def _arange(shapes, attrs, ctx):
    if attrs["n"] < 1:
        raise ctx.fail(f"arange(n) needs a positive size, found {attrs['n']}", attr="n")
    return (attrs["n"],)


_SOLVE_HINT = ("b is read as vectors [.., n] when it has one dimension or one fewer than A, else as matrices "
               "[.., n, k] of right-hand sides; batch dims broadcast")


def _solve(shapes, attrs, ctx):
    a, b = shapes
    if len(a) < 2 or a[-1] != a[-2]:
        raise ctx.fail(f"solve needs a square matrix A of shape [.., n, n], found {fmt_shape(a)}", arg=0,
                       hint="solve(A, b) is x with A x = b (torch.linalg.solve)")
    if not b:
        raise ctx.fail("solve needs a right-hand side b of at least one dimension, found a scalar", arg=1,
                       hint=_SOLVE_HINT)
    n = a[-1]
    vector = solve_rhs_is_vector(len(a), len(b))
    rows, rest = (b[-1], b[:-1]) if vector else (b[-2], b[:-2])
    if rows != n:
        want = f"[.., {fmt_dim(n)}]" if vector else f"[.., {fmt_dim(n)}, k]"
        raise ctx.fail(f"solve(A, b) with A of shape {fmt_shape(a)} needs b of shape {want}, found {fmt_shape(b)} "
                       f"({fmt_dim(rows)} vs {fmt_dim(n)})", arg=1, hint=_SOLVE_HINT)
    try:
        batch = broadcast(a[:-2], rest)
    except DimConflict as c:
        raise ctx.fail(f"the batch dims of solve's A {fmt_shape(a)} and b {fmt_shape(b)} do not broadcast: "
                       f"{fmt_dim(c.a)} vs {fmt_dim(c.b)}", arg=1, hint=_SOLVE_HINT) from None
    return tuple(batch) + ((n,) if vector else (n, b[-1]))


def _einsum(shapes, attrs, ctx):
    eq = linalg.parse(attrs["equation"])  # the graph builder reports a malformed equation at its character
    if len(eq.operands) != len(shapes):
        raise ctx.fail(f"the einsum equation {eq} names {len(eq.operands)} operands, but {len(shapes)} were given",
                       attr="equation")
    sizes: dict[str, tuple] = {}  # letter -> (its size, the operand that set it)
    spread: tuple = ()
    for i, (term, s) in enumerate(zip(eq.operands, shapes)):
        own = linalg.letters(term)
        free = linalg.ELLIPSIS in term
        if len(s) < len(own) or (not free and len(s) != len(own)):
            raise ctx.fail(f"operand {i} of einsum has shape {fmt_shape(s)} ({len(s)} dims), but its subscripts "
                           f"{''.join(term) or '(none)'} name {len(own)}{' or more' if free else ''}", arg=i,
                           hint="one letter per dimension; `...` first stands for any leading dims")
        lead = linalg.ellipsis_rank(term, len(s))
        try:
            spread = broadcast(spread, s[:lead])
        except DimConflict as c:
            raise ctx.fail(f"the `...` dims of operand {i} of einsum ({fmt_shape(s[:lead])}) do not broadcast with "
                           f"the other operands': {fmt_dim(c.a)} vs {fmt_dim(c.b)}", arg=i) from None
        for letter, d in zip(own, s[lead:]):
            if letter in sizes and sizes[letter][0] != d:
                size, where = sizes[letter]
                raise ctx.fail(f"einsum's letter {letter} is {fmt_dim(size)} in operand {where} but {fmt_dim(d)} in "
                               f"operand {i} (shape {fmt_shape(s)})", arg=i,
                               hint="the dims one letter names must be equal (letters do not broadcast; `...` does)")
            sizes.setdefault(letter, (d, i))
    head = tuple(spread) if eq.has_ellipsis else ()
    return head + tuple(sizes[letter][0] for letter in linalg.letters(eq.output))


def _spmm(shapes, attrs, ctx):
    a, x = shapes
    if len(a) != 2:
        raise ctx.fail(f"spmm needs a sparse matrix A [N, M], found {fmt_shape(a)}", arg=0)
    if len(x) != 2:
        raise ctx.fail(f"spmm needs a dense matrix x of 2 dims, found {fmt_shape(x)}", arg=1,
                       hint="a vector v is the one-column matrix unsqueeze(v, -1)")
    rows, cols = (a[1], a[0]) if attrs["transpose"] else (a[0], a[1])
    if x[0] != cols:
        product = "Aᵀ x" if attrs["transpose"] else "A x"
        raise ctx.fail(f"spmm: {product} with A of shape {fmt_shape(a)} needs x of shape [{fmt_dim(cols)}, D], "
                       f"found {fmt_shape(x)}", arg=1)
    return (rows, x[1])


# --------------------------------------------------------------------------- indexing and resampling (issue 13)

INTERPOLATE_MODES = ("nearest", "bilinear")
GRID_SAMPLE_MODES = ("bilinear", "nearest")
GRID_SAMPLE_PADDINGS = ("zeros", "border", "reflection")


def _word(attrs, name: str, allowed: tuple[str, ...], ctx) -> None:
    if attrs[name] not in allowed:
        raise ctx.fail(f"{name} of {ctx.callee} must be {' or '.join(allowed)}, found {format_attr(attrs[name])}",
                       attr=name)


def _gather(shapes, attrs, ctx):
    x, index = shapes
    if len(index) != len(x):
        raise ctx.fail(f"gather needs an index of the rank of x: x has shape {fmt_shape(x)}, the index "
                       f"{fmt_shape(index)}", arg=1, hint="index_select(x, dim, index) takes a 1-D index")
    d = _dim(attrs["dim"], x, ctx)
    for j, (a, i) in enumerate(zip(x, index)):
        if j != d and a != i and not (isinstance(a, int) and isinstance(i, int) and i <= a):
            raise ctx.fail(f"gather's index may not be larger than x outside dim {attrs['dim']}: x has shape "
                           f"{fmt_shape(x)}, the index {fmt_shape(index)} ({fmt_dim(i)} vs {fmt_dim(a)} in "
                           f"dimension {j})", arg=1)
    return tuple(index)


def _index_select(shapes, attrs, ctx):
    x, index = shapes
    if len(index) != 1:
        raise ctx.fail(f"index_select needs a 1-D index, found shape {fmt_shape(index)}", arg=1,
                       hint="gather(x, dim, index) takes an index of the rank of x")
    d = _dim(attrs["dim"], x, ctx)
    return tuple(index[0] if j == d else a for j, a in enumerate(x))


def _embedding(shapes, attrs, ctx):
    index, weight = shapes
    return tuple(index) + (weight[1],)


def _image(x, ctx, what: str = "input"):
    if len(x) != 4:
        raise ctx.fail(f"{ctx.callee} expects a 4-D {what} [N, C, H, W], found shape {fmt_shape(x)}", arg=0)
    return x


def _pad(shapes, attrs, ctx):
    (x,) = shapes
    pad = attrs["pad"] if isinstance(attrs["pad"], tuple) else (attrs["pad"],)
    if len(pad) % 2 or len(pad) > 2 * len(x):
        raise ctx.fail(f"pad takes a pair [left, right] per padded dimension, last dimension first, at most "
                       f"{len(x)} pairs for {fmt_shape(x)}; found {format_attr(pad)}", attr="pad",
                       hint="pad(x, [l, r]) pads the last dimension, pad(x, [l, r, t, b]) the last two")
    if any(p < 0 for p in pad):
        raise ctx.fail(f"pad sizes must be at least 0, found {format_attr(pad)}", attr="pad",
                       hint="cut with a slice instead: x[..., 1:-1]")
    out = list(x)
    for k in range(len(pad) // 2):
        out[len(x) - 1 - k] = dim_add(x[len(x) - 1 - k], pad[2 * k] + pad[2 * k + 1])
    return tuple(out)


def _pool(shapes, attrs, ctx):
    x = _image(shapes[0], ctx)
    kernel, padding = attrs["kernel"], attrs["padding"]
    stride = kernel if attrs["stride"] is None else attrs["stride"]
    out = list(x[:2])
    for i in range(2):
        k, s, p, size = kernel[i], stride[i], padding[i], x[2 + i]
        if k < 1 or s < 1:
            raise ctx.fail(f"{ctx.callee} needs a positive kernel and stride, found kernel={format_attr(kernel)}, "
                           f"stride={format_attr(stride)}", attr="kernel" if k < 1 else "stride")
        if p < 0 or 2 * p > k:
            raise ctx.fail(f"padding of {ctx.callee} must be between 0 and half the kernel ({k // 2}), found {p}",
                           attr="padding")
        span = dim_sub(dim_add(size, 2 * p), k)
        if isinstance(span, int) and span < 0:
            raise ctx.fail(f"{ctx.callee} cannot slide a kernel of size {k} over a dimension of size "
                           f"{fmt_dim(size)} with padding {p}", arg=0)
        out.append(dim_add(dim_floordiv(span, s, ctx), 1))
    return tuple(out)


def _interpolate(shapes, attrs, ctx):
    x = _image(shapes[0], ctx)
    _word(attrs, "mode", INTERPOLATE_MODES, ctx)
    if attrs["align_corners"] and attrs["mode"] == "nearest":
        raise ctx.fail("align_corners applies to mode=bilinear only", attr="align_corners")
    scale, size = attrs["scale_factor"], attrs["size"]
    if (scale is None) == (size is None):
        raise ctx.fail("interpolate takes one of scale_factor=s (a positive integer) and size=[h, w]",
                       attr="scale_factor" if scale is not None else None, at_call=True,
                       hint="interpolate(x, scale_factor=2) doubles H and W; interpolate(x, size=[8, 8]) resizes")
    if scale is not None:
        if scale < 1:
            raise ctx.fail(f"scale_factor of interpolate must be a positive integer, found {scale}",
                           attr="scale_factor", hint="a downsampling is avg_pool2d(x, 2)")
        return tuple(x[:2]) + (dim_mul(x[2], scale), dim_mul(x[3], scale))
    if len(size) != 2:
        raise ctx.fail(f"size of interpolate is [h, w], found {format_attr(tuple(size))}", attr="size")
    if any(isinstance(s, int) and s < 1 for s in size):
        raise ctx.fail(f"size of interpolate must be positive, found {format_attr(tuple(size))}", attr="size")
    missing = [size[i] for i in sizes_not_given(x, size)]
    if missing:  # the emitted code writes each size from x's own (codegen/sizes.py)
        raise ctx.fail(f"size of interpolate may use only the sizes of x {fmt_shape(x)}, found {fmt_dim(missing[0])}",
                       attr="size", hint="interpolate(x, scale_factor=2) doubles H and W; a size [2*H, W] of x "
                                         "[B, C, H, W] is written from x's own sizes")
    return tuple(x[:2]) + tuple(size)


def _grid_sample(shapes, attrs, ctx):
    x, grid = _image(shapes[0], ctx), shapes[1]
    _word(attrs, "mode", GRID_SAMPLE_MODES, ctx)
    _word(attrs, "padding_mode", GRID_SAMPLE_PADDINGS, ctx)
    if len(grid) != 4 or grid[3] != 2 or grid[0] != x[0]:
        raise ctx.fail(f"grid_sample needs a grid [N, H_out, W_out, 2] with the N of x {fmt_shape(x)}, found "
                       f"{fmt_shape(grid)}", arg=1, hint="grid[n, i, j] holds the (x, y) place to sample, in [-1, 1]")
    return (x[0], x[1], grid[1], grid[2])


def _interpolate_like(shapes, attrs, ctx):
    x, like = shapes
    return tuple(x[:2]) + tuple(like[2:])


def _pooled(shapes, attrs, ctx):
    """max_pool2d_select(u, x): the pooled shape of x."""
    return _pool(shapes[1:], attrs, ctx)


def _vjp_of_level(shapes, attrs, ctx):
    """An autograd-backed VJP (``grid_sample_vjp``): the shape of the argument it differentiates by."""
    return tuple(shapes[1 + attrs["path"][-1]])


# --------------------------------------------------------------------------- the table

_X = ("x",)
_AB = ("a", "b")


def _p(name, inputs, rule, *attrs, vjp, batch, lipschitz=None, narrow=None, distribute=None, op=None,
       builtin=False, optional=0, variadic=False, doc="", index_args=(), order=(), keeps_dtype=False,
       module_attrs=()):
    if keeps_dtype:  # a shape op: an index input stays an index through it (passes/check_dtypes.py)
        index_args = ((0, ("float", "int", "bool")),)
    return Primitive(name, inputs, rule, tuple(attrs), optional, variadic, builtin, doc, vjp=vjp, batch=batch,
                     op=op or name, lipschitz=lipschitz, narrow=narrow, distribute=distribute,
                     index_args=tuple(index_args), order=tuple(order), keeps_dtype=keeps_dtype,
                     module_attrs=tuple(module_attrs))


# The comparison operators and their primitives.
COMPARISON_OPS = {"<": "less", "<=": "less_equal", ">": "greater", ">=": "greater_equal", "==": "equal",
                  "!=": "not_equal"}

# The VJP rules' bodies are in derivatives.py (they build graphs with the primitives below).
from . import derivatives as _D  # noqa: E402 - needs the classes above

_V = _D.RULES
_EW = _B.elementwise()
_POOL = (Attr("kernel", "pair"), Attr("stride", "pair", None), Attr("padding", "pair", (0, 0)))
_RESAMPLE = (Attr("mode", "word", "nearest"), Attr("align_corners", "bool", False))
_GRID_SAMPLE = (Attr("mode", "word", "bilinear"), Attr("padding_mode", "word", "zeros"),
                Attr("align_corners", "bool", False))
from . import extern as _X_EXTERN  # noqa: E402 - the extern primitives' rules
from . import dropout as _DROPOUT  # noqa: E402 - dropout's shape rule

_EXTERN_ATTRS = (Attr("name", "word"), Attr("inputs", "shapes"), Attr("output", "shape"), Attr("samplewise", "bool"))

_TABLE = [
    # arithmetic (operators)
    _p("add", _AB, _broadcast, batch=_EW, doc="a + b", vjp=_V["add"], lipschitz="sum_of_args"),
    _p("sub", _AB, _broadcast, batch=_EW, doc="a - b", vjp=_V["sub"], lipschitz="sum_of_args"),
    _p("mul", _AB, _broadcast, batch=_EW, doc="a * b", vjp=_V["mul"], lipschitz="product"),
    _p("div", _AB, _broadcast, batch=_EW, doc="a / b", vjp=_V["div"], lipschitz="quotient"),
    _p("matmul", _AB, _matmul, batch=_B.matrix_product(), doc="a @ b (torch.matmul)", vjp=_V["matmul"], lipschitz="matrix_product", narrow=(1, -1)),
    _p("pow", _X, _same, Attr("exponent", "number"), batch=_EW, doc="x ** exponent", vjp=_V["pow"], lipschitz="unbounded"),
    _p("power", _AB, _broadcast, batch=_EW, doc="a ** b, b a tensor (a must be positive)", vjp=_V["power"],
       lipschitz="unbounded"),
    _p("neg", _X, _same, batch=_EW, doc="-x", vjp=_V["neg"], lipschitz=1.0),
    # elementwise built-ins
    _p("relu", _X, _same, batch=_EW, builtin=True, vjp=_V["relu"], lipschitz=1.0),
    _p("leaky_relu", _X, _same, Attr("slope", "number", 0.01), batch=_EW, builtin=True, vjp=_V["leaky_relu"], lipschitz="leaky_relu"),
    _p("tanh", _X, _same, batch=_EW, builtin=True, vjp=_V["tanh"], lipschitz=1.0),
    _p("sigmoid", _X, _same, batch=_EW, builtin=True, vjp=_V["sigmoid"], lipschitz=0.25),
    _p("softplus", _X, _softplus, Attr("beta", "number", 1.0), batch=_EW, builtin=True, vjp=_V["softplus"], lipschitz=1.0),
    _p("elu", _X, _same, Attr("alpha", "number", 1.0), batch=_EW, builtin=True, vjp=_V["elu"], lipschitz="elu"),
    _p("exp", _X, _same, batch=_EW, builtin=True, vjp=_V["exp"], lipschitz="unbounded"),
    _p("log", _X, _same, batch=_EW, builtin=True, vjp=_V["log"], lipschitz="unbounded"),
    _p("sqrt", _X, _same, batch=_EW, builtin=True, vjp=_V["sqrt"], lipschitz="unbounded"),
    _p("square", _X, _same, batch=_EW, builtin=True, vjp=_V["square"], lipschitz="unbounded"),
    _p("abs", _X, _same, batch=_EW, builtin=True, vjp=_V["abs"], lipschitz=1.0),
    _p("sin", _X, _same, batch=_EW, builtin=True, vjp=_V["sin"], lipschitz=1.0),
    _p("cos", _X, _same, batch=_EW, builtin=True, vjp=_V["cos"], lipschitz=1.0),
    _p("clamp", _X, _same, Attr("lo", "number"), Attr("hi", "number"), batch=_EW, builtin=True, vjp=_V["clamp"], lipschitz=1.0),
    _p("minimum", _AB, _broadcast, batch=_EW, builtin=True, vjp=_V["minimum"], lipschitz="sum_of_args"),
    _p("maximum", _AB, _broadcast, batch=_EW, builtin=True, vjp=_V["maximum"], lipschitz="sum_of_args"),
    _p("gelu", _X, _gelu, Attr("approximate", "word", "none"), batch=_EW, builtin=True, vjp=_V["gelu"],
       lipschitz=1.129, doc="x * Phi(x); approximate=tanh: the tanh formula"),  # max |gelu'| = 1.12899 (tanh)
    _p("silu", _X, _same, batch=_EW, builtin=True, vjp=_V["silu"], lipschitz=1.0999, doc="x * sigmoid(x)"),
    _p("erf", _X, _same, batch=_EW, builtin=True, vjp=_V["erf"], lipschitz=2 / math.sqrt(math.pi),
       doc="the error function"),
    _p("sign", _X, _same, batch=_EW, builtin=True, vjp=_V["sign"], lipschitz="unbounded", doc="-1, 0 or 1"),
    _p("reciprocal", _X, _same, batch=_EW, builtin=True, vjp=_V["reciprocal"], lipschitz="unbounded", doc="1 / x"),
    # comparisons (operators): 0/1 masks in the operands' float dtype, not differentiable (zero VJP)
    *(_p(name, _AB, _broadcast, batch=_EW, vjp=_V[name], lipschitz="unbounded", doc=f"1 where a {op} b, else 0")
      for op, name in COMPARISON_OPS.items()),
    _p("where", ("cond", "a", "b"), _where, batch=_EW, builtin=True, vjp=_V["where"], lipschitz="unbounded",
       doc="a where cond != 0, else b (not differentiable in cond)", index_args=((0, ("float", "bool")),)),
    # constructors: no written tensor input; the dtype and device are the first state's (dtype_from_state)
    *(dataclasses.replace(entry, dtype_from_state=True) for entry in (
        _p("eye", ("dtype_like",), _eye, Attr("n", "int"), batch=_B.constant(), builtin=True, vjp=_V["eye"],
           lipschitz=0.0, doc="the n x n identity matrix"),
        _p("zeros", ("dtype_like",), _filled, Attr("shape", "shape"), batch=_B.constant(), builtin=True,
           vjp=_V["zeros"], lipschitz=0.0, doc="a tensor of zeros of the given shape"),
        _p("ones", ("dtype_like",), _filled, Attr("shape", "shape"), batch=_B.constant(), builtin=True,
           vjp=_V["ones"], lipschitz=0.0, doc="a tensor of ones of the given shape"),
        _p("full", ("dtype_like",), _filled, Attr("shape", "shape"), Attr("value", "number"), batch=_B.constant(),
           builtin=True, vjp=_V["full"], lipschitz=0.0, doc="a tensor of the given shape filled with value"),
        _p("arange", ("dtype_like",), _arange, Attr("n", "int"), batch=_B.constant(), builtin=True, vjp=_V["arange"],
           lipschitz=0.0, doc="0, 1, ..., n - 1 (floats)"))),
    # linear algebra
    _p("solve", ("A", "b"), _solve, batch=_B.solving(), builtin=True, vjp=_V["solve"], lipschitz="unbounded",
       doc="x with A x = b (torch.linalg.solve)"),
    dataclasses.replace(
        _p("einsum", ("operands",), _einsum, Attr("equation", "equation"), variadic=True, batch=_B.contracting(),
           builtin=True, vjp=_V["einsum"], lipschitz="unbounded", doc="torch.einsum"),
        written="einsum(equation, a, b, ...)"),
    _p("spmm", ("A", "x"), _spmm, Attr("transpose", "bool", False), batch=_B.sparse_product(), builtin=True,
       vjp=_V["spmm"], lipschitz="sparse_operator", doc="A x for a sparse input A (Aᵀ x with transpose=true)",
       index_args=((0, ("sparse",)),)),
    # reductions and shape ops
    _p("sum", _X, _reduce, Attr("dim", "dims", None), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["sum"], lipschitz="sum_reduction"),
    _p("mean", _X, _reduce, Attr("dim", "dims", None), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["mean"], lipschitz=1.0),
    _p("softmax", _X, _softmax, Attr("dim", "dim"), batch=_B.along(), builtin=True, vjp=_V["softmax"], lipschitz=1.0),
    _p("logsumexp", _X, _reduce, Attr("dim", "dims"), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["logsumexp"], lipschitz=1.0),
    _p("max", _X, _extremum, Attr("dim", "dims"), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["max"], lipschitz=1.0, doc="the largest values along dim (ties share the gradient)"),
    _p("min", _X, _extremum, Attr("dim", "dims"), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["min"], lipschitz=1.0, doc="the smallest values along dim (ties share the gradient)"),
    _p("norm", _X, _norm, Attr("dim", "dims", None), Attr("p", "number", 2), Attr("keepdim", "bool", False),
       batch=_B.reduction(), builtin=True, vjp=_V["norm"], lipschitz="sum_reduction", doc="the p-norm along dim"),
    _p("prod", _X, _prod, Attr("dim", "dim"), Attr("keepdim", "bool", False), batch=_B.reduction(),
       builtin=True, vjp=_V["prod"], lipschitz="unbounded", doc="the product along dim (exact gradient at zeros)"),
    _p("var", _X, _var, Attr("dim", "dims"), Attr("keepdim", "bool", False), Attr("correction", "int", 1),
       batch=_B.reduction(), builtin=True, vjp=_V["var"], lipschitz="unbounded", doc="the variance along dim (torch.var)"),
    _p("cat", ("tensors",), _cat, Attr("dim", "dim", 0), batch=_B.concatenation(), builtin=True, variadic=True, vjp=_V["cat"], lipschitz="root_sum_squares"),
    _p("reshape", _X, _reshape, Attr("shape", "shape"), batch=_B.reshaping(), builtin=True, vjp=_V["reshape"], lipschitz=1.0,
       keeps_dtype=True),
    _p("transpose", _X, _transpose, Attr("dim0", "dim"), Attr("dim1", "dim"), batch=_B.transposing(),
       builtin=True, vjp=_V["transpose"], lipschitz=1.0, keeps_dtype=True),
    _p("flatten", _X, _flatten, Attr("start", "dim", 1), Attr("end", "dim", -1), batch=_B.flattening(),
       builtin=True, vjp=_V["flatten"], lipschitz=1.0, keeps_dtype=True),
    _p("permute", _X, _permute, Attr("dims", "dims"), batch=_B.permuting(), builtin=True, vjp=_V["permute"],
       lipschitz=1.0, doc="x with its dims in the order dims", keeps_dtype=True),
    _p("unsqueeze", _X, _unsqueeze_shape, Attr("dim", "dims"), batch=_B.unsqueezing(), builtin=True,
       vjp=_V["unsqueeze"], lipschitz=1.0, doc="size-1 dims inserted at dim (positions in the result)",
       keeps_dtype=True),
    _p("triu", _X, _triangle, Attr("diagonal", "int", 0), batch=_B.per_row(row_rank=2), builtin=True,
       vjp=_V["triu"], lipschitz=1.0, doc="the upper triangle of the last two dims (from diagonal up)"),
    _p("tril", _X, _triangle, Attr("diagonal", "int", 0), batch=_B.per_row(row_rank=2), builtin=True,
       vjp=_V["tril"], lipschitz=1.0, doc="the lower triangle of the last two dims (up to diagonal)"),
    _p("index", _X, _index, Attr("index", "index"), batch=_B.indexing(), doc="x[items]", vjp=_V["index"], lipschitz=1.0,
       keeps_dtype=True),
    # indexing (an int input as the index) and resampling
    _p("gather", ("x", "index"), _gather, Attr("dim", "dim"), batch=_B.gathering(), builtin=True, vjp=_V["gather"],
       lipschitz="repeated_index", index_args=((1, ("int",)),), order=("x", "dim", "index"),
       doc="x[..., index[i, j, ...], ...] along dim (torch.gather); the index an int input"),
    _p("index_select", ("x", "index"), _index_select, Attr("dim", "dim"), batch=_B.selecting(), builtin=True,
       vjp=_V["index_select"], lipschitz="repeated_index", index_args=((1, ("int",)),), order=("x", "dim", "index"),
       doc="the slices index[k] of x along dim; the index a 1-D int input"),
    _p("pad", _X, _pad, Attr("pad", "ints"), Attr("value", "number", 0.0),
       batch=_B.spatial(lambda attrs: len(attrs["pad"]) // 2 if isinstance(attrs["pad"], tuple) else 1),
       builtin=True, vjp=_V["pad"], lipschitz=1.0, doc="x padded with value: [left, right, top, bottom], last dim first"),
    _p("avg_pool2d", _X, _pool, *_POOL, batch=_B.spatial(), builtin=True, vjp=_V["avg_pool2d"], lipschitz=1.0,
       doc="the mean of each kernel window (stride: the kernel unless given; zero padding counted)"),
    _p("max_pool2d", _X, _pool, *_POOL, batch=_B.spatial(), builtin=True, vjp=_V["max_pool2d"],
       lipschitz="window_overlap", doc="the largest value of each kernel window (padding: -inf)"),
    _p("interpolate", _X, _interpolate, Attr("scale_factor", "int", None), Attr("size", "shape", None),
       Attr("mode", "word", "nearest"), Attr("align_corners", "bool", False), batch=_B.spatial(), builtin=True,
       vjp=_V["interpolate"], lipschitz="resampling",
       doc="x resampled (nearest or bilinear) to scale_factor times H and W, or to size"),
    _p("grid_sample", ("x", "grid"), _grid_sample, Attr("mode", "word", "bilinear"),
       Attr("padding_mode", "word", "zeros"), Attr("align_corners", "bool", False), batch=_B.spatial(3),
       builtin=True, vjp=_V["grid_sample"], lipschitz="unbounded",
       doc="x sampled at the (x, y) places of grid [N, H, W, 2] in [-1, 1] (torch.nn.functional.grid_sample)"),
    # modules, lowered (weights are param nodes)
    _p("linear", ("x", "weight", "bias"), _linear, batch=_B.per_row(row_rank=1), optional=1,
       doc="x @ weight.T + bias", vjp=_V["linear"], lipschitz="weight_norm", distribute=(-1, 1)),
    _p("conv2d", ("x", "weight", "bias"), _conv2d, Attr("stride", "pair", (1, 1)),
       Attr("padding", "pair", (0, 0)), batch=_B.per_row(row_rank=3), optional=1, vjp=_V["conv2d"], lipschitz="weight_norm", distribute=(1, 1),
       builtin=True),
    _p("conv_transpose2d", ("x", "weight", "bias"), _conv_transpose2d, Attr("stride", "pair", (1, 1)),
       Attr("padding", "pair", (0, 0)), Attr("output_padding", "pair", (0, 0)), batch=_B.per_row(row_rank=3),
       optional=1, vjp=_V["conv_transpose2d"], lipschitz="weight_norm", distribute=(1, 0)),
    _p("embedding", ("index", "weight"), _embedding, batch=_B.embedding(), vjp=_V["embedding"], lipschitz=1.0,
       index_args=((0, ("int",)),), doc="Embedding: row index[...] of weight (the index an int input)"),
    # written as a module call, or as torch's functions (channels: none, x's own): group_norm(x, groups, W, b)
    _p("group_norm", ("x", "weight", "bias"), _group_norm, Attr("groups", "int"), Attr("channels", "int", None),
       Attr("eps", "number", 1e-5), batch=_B.normalizing(lambda rank, attrs: rank - 1), optional=2,
       vjp=_V["group_norm"], builtin=True, order=("x", "groups", "weight", "bias", "eps"), module_attrs=("channels",),
       lipschitz="normalization",
       doc="GroupNorm: x normalized over each group of channels (and space), then weight * . + bias per channel"),
    _p("layer_norm", ("x", "weight", "bias"), _layer_norm, Attr("shape", "shape"), Attr("eps", "number", 1e-5),
       batch=_B.normalizing(lambda rank, attrs: len(attrs["shape"])), optional=2, vjp=_V["layer_norm"],
       builtin=True, order=("x", "shape", "weight", "bias", "eps"), lipschitz="normalization",
       doc="LayerNorm: x normalized over its trailing dims shape, then weight * . + bias"),
    # differentiation, expanded by a later pass
    _p("grad", ("energy", "state"), _grad, batch=_B.unexpanded(), builtin=True,
       doc="gradient of the energy (summed over the batch) with respect to the state", vjp=_V["grad"], lipschitz="curvature"),
    # variational dropout (fpidsl/ir/dropout.py): x and the solve's per-sample seeds, which the compiler supplies
    dataclasses.replace(_p(
        _DROPOUT.DROPOUT, ("x", "seeds"), _DROPOUT.dropout_shape, Attr("p", "number", 0.1), Attr("key", "int", 0),
        Attr("spatial", "bool", False), batch=_B.leading(), vjp=_V["dropout"], lipschitz="dropout", builtin=True,
        doc="x times a mask drawn once per forward solve, fixed over its iterations (identity in eval mode); "
            "spatial=true: one mask value per (sample, channel), the same at every position"),
        written="dropout(x, p=0.1, spatial=false)"),
    # an outside nn.Module (fpidsl/ir/extern.py): handle, flat parameters, then its inputs
    _p(_X_EXTERN.EXTERN, ("args",), _X_EXTERN.extern_shape, *_EXTERN_ATTRS, batch=_B.external(),
       variadic=True, vjp=_V["extern"], lipschitz=None,
       doc="a user's nn.Module (param f : extern ...) on its inputs; its VJP is taken by autograd"),
]

def _like(shapes, attrs, ctx):
    """The shape of the last argument (``like``)."""
    return tuple(shapes[-1])


def _scalar(shapes, attrs, ctx):
    return ()


def _broadcast2(shapes, attrs, ctx):
    try:
        return broadcast(shapes[0], shapes[1])
    except DimConflict:
        raise ctx.fail(f"{ctx.callee}: {fmt_shape(shapes[0])} and {fmt_shape(shapes[1])} do not broadcast") \
            from None


def _cat_part_shape(shapes, attrs, ctx):
    return tuple(shapes[1 + attrs["item"]])


def _linear_weight_grad_shape(shapes, attrs, ctx):
    ct, x = shapes
    return (ct[-1], x[-1])


def _conv2d_weight_grad_shape(shapes, attrs, ctx):
    ct, x = shapes
    return (ct[1], x[1]) + tuple(attrs["kernel"])


def _aux(name, inputs, rule, *attrs, vjp, batch=_EW, narrow=None, shape_only=(), variadic=False, doc="",
         index_args=()):
    # the static Lipschitz bound is taken on checked graphs, where no auxiliary primitive occurs: no rule
    entry = _p(name, inputs, rule, *attrs, vjp=vjp, batch=batch, narrow=narrow, variadic=variadic, doc=doc,
               index_args=index_args)
    return dataclasses.replace(entry, shape_only=shape_only)


_CONV = (Attr("stride", "pair", (1, 1)), Attr("padding", "pair", (0, 0)))

# auxiliary primitives: made only by the differentiation pass (the VJP rules' building blocks)
AUXILIARY: tuple[Primitive, ...] = (
    # indexing and resampling: adjoint pairs (each the other's VJP), and grid_sample's autograd-backed derivatives
    _aux("gather_backward", ("ct", "index", "like"), _like, Attr("dim", "dim"), batch=_B.gathering(),
         doc="zeros shaped like `like` with ct added at gather's places (scatter_add)", vjp=_V["gather_backward"],
         shape_only=(2,), index_args=((1, ("int",)),)),
    _aux("index_select_backward", ("ct", "index", "like"), _like, Attr("dim", "dim"), batch=_B.selecting(),
         doc="zeros shaped like `like` with ct's slices added at index (index_add)", vjp=_V["index_select_backward"],
         shape_only=(2,), index_args=((1, ("int",)),)),
    _aux("embedding_backward", ("ct", "index", "like"), _like, batch=_B.sample_free_result(),
         doc="the weight gradient of embedding: ct's rows added at their indices", vjp=_V["embedding_backward"],
         shape_only=(2,), index_args=((1, ("int",)),)),
    _aux("avg_pool2d_backward", ("ct", "like"), _like, *_POOL, batch=_B.spatial(),
         doc="the adjoint of avg_pool2d: a transposed convolution with the constant kernel", shape_only=(1,),
         vjp=_V["avg_pool2d_backward"]),
    _aux("max_pool2d_backward", ("ct", "x"), _like, *_POOL, batch=_B.spatial(),
         doc="ct added at each window's maximum of x", vjp=_V["max_pool2d_backward"]),
    _aux("max_pool2d_select", ("u", "x"), _pooled, *_POOL, batch=_B.spatial(),
         doc="u read at each window's maximum of x", vjp=_V["max_pool2d_select"]),
    _aux("interpolate_like", ("x", "like"), _interpolate_like, *_RESAMPLE, batch=_B.spatial(),
         doc="x resampled to the H and W of like", vjp=_V["interpolate_like"], shape_only=(1,)),
    _aux("interpolate_backward", ("ct", "like"), _like, *_RESAMPLE, batch=_B.spatial(),
         doc="the adjoint of resampling like to ct's H and W", vjp=_V["interpolate_backward"], shape_only=(1,)),
    _aux("grid_sample_vjp", ("tensors",), _vjp_of_level, Attr("path", "dims"), *_GRID_SAMPLE, variadic=True,
         batch=_B.spatial(3), vjp=_V["grid_sample_vjp"],
         doc="a derivative of grid_sample by torch.autograd: cotangents then x and grid; path: the argument "
             "differentiated at each level"),
    _aux(_X_EXTERN.EXTERN_VJP, ("args",), _X_EXTERN.extern_vjp_shape, *_EXTERN_ATTRS, Attr("chain", "positions"),
         variadic=True, batch=_B.external_vjp(), vjp=_V["extern_vjp"],
         doc="nested VJPs of an extern along chain (torch.autograd.grad with create_graph=True)"),
    _aux("relu_mask", ("x",), _same, doc="1 where x > 0, else 0", vjp=_V["relu_mask"]),
    _aux("leaky_relu_mask", ("x",), _same, Attr("slope", "number"), doc="1 where x > 0, else slope", vjp=_V["leaky_relu_mask"]),
    _aux("elu_grad", ("x",), _same, Attr("alpha", "number"), doc="elu'(x): 1 where x > 0, else alpha*exp(x)", vjp=_V["elu_grad"]),
    _aux("clamp_mask", ("x",), _same, Attr("lo", "number"), Attr("hi", "number"),
         doc="1 where lo <= x <= hi, else 0", vjp=_V["clamp_mask"]),
    _aux("greater_mask", ("a", "b"), _broadcast2, doc="1 where a > b, 1/2 where a == b, else 0", vjp=_V["greater_mask"]),
    _aux("equal_mask", ("a", "b"), _broadcast2, doc="1 where a == b, else 0", vjp=_V["equal_mask"]),
    _aux("safe_div", ("a", "b"), _broadcast2, doc="a / b where b != 0, else 0", vjp=_V["safe_div"]),
    _aux("select", ("ct", "mask"), _broadcast2, doc="ct where mask > 0, else exactly 0 (also where ct is inf or NaN)",
         vjp=_V["select"]),
    _aux("ones_like", ("x",), _same, vjp=_V["ones_like"]),
    _aux("zeros_like", ("x",), _same, vjp=_V["zeros_like"]),
    _aux("count", ("x",), _scalar, Attr("dim", "dims", None), batch=_B.counting(), doc="how many elements mean(x, dim) averages", vjp=_V["count"]),
    _aux("expand_as", ("x", "like"), _like, batch=_B.like(1), doc="x broadcast to the shape of like", vjp=_V["expand_as"], shape_only=(1,)),
    _aux("reshape_as", ("x", "like"), _like, batch=_B.reshaping(like_position=1), doc="x reshaped to the shape of like", vjp=_V["reshape_as"], shape_only=(1,)),
    _aux("index_backward", ("ct", "like"), _like, Attr("index", "index"),
         batch=_B.indexing(data=0, like_position=1),
         doc="zeros shaped like `like`, with ct at [index]", vjp=_V["index_backward"], shape_only=(1,)),
    _aux("cat_part", ("ct", "parts"), _cat_part_shape, Attr("dim", "dim"), Attr("item", "int"), variadic=True,
         batch=_B.cat_piece(),
         doc="the slice of ct = cotangent of cat(parts, dim) that belongs to parts[item]", vjp=_V["cat_part"]),
    _aux("linear_weight_grad", ("ct", "x"), _linear_weight_grad_shape, batch=_B.sample_free_result(),
         doc="sum over batch dims of ct (x) x: the weight gradient of linear", vjp=_V["linear_weight_grad"]),
    _aux("conv2d_input_grad", ("ct", "weight", "like"), _like, *_CONV,
         batch=_B.per_row(row_rank=3, shape_only=(2,)),
         doc="the input gradient of conv2d(like, weight)", vjp=_V["conv2d_input_grad"], shape_only=(2,), narrow=(1, 1)),
    _aux("conv2d_weight_grad", ("ct", "x"), _conv2d_weight_grad_shape, Attr("kernel", "pair"), *_CONV,
         batch=_B.sample_free_result(),
         doc="the weight gradient of conv2d(x, W)", vjp=_V["conv2d_weight_grad"]),
    _aux("group_mean", ("x",), _group_mean, Attr("groups", "int"),
         batch=_B.normalizing(lambda rank, attrs: rank - 1),
         doc="each element replaced by the mean of its group (dim 1 cut into groups, with every later dim)",
         vjp=_V["group_mean"]),
)


PRIMITIVES: dict[str, Primitive] = {p.name: p for p in (*_TABLE, *AUXILIARY)}
BUILTINS: dict[str, Primitive] = {p.name: p for p in _TABLE if p.builtin}

BINARY_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div", "@": "matmul"}


# --------------------------------------------------------------------------- modules

@dataclass(frozen=True)
class ModuleKind:
    """A ``param NAME : Kind(...)`` module: its surface parameters (name, attr kind, default) and the
    primitive its calls lower to."""

    name: str
    prim: str
    params: tuple[Attr, ...]

    def signature(self) -> str:
        parts = [a.name if a.required else f"{a.name}={format_attr(a.default)}" for a in self.params]
        return f"{self.name}({', '.join(parts)})"


_COMMON = (Attr("bias", "bool", True), Attr("init_scale", "number", None), Attr("norm", "word", None))

MODULE_KINDS: dict[str, ModuleKind] = {
    "Linear": ModuleKind("Linear", "linear", (Attr("in", "int"), Attr("out", "int")) + _COMMON),
    "Conv2d": ModuleKind("Conv2d", "conv2d", (
        Attr("in", "int"), Attr("out", "int"), Attr("kernel", "pair"),
        Attr("stride", "pair", (1, 1)), Attr("padding", "pair", (0, 0))) + _COMMON),
    "ConvTranspose2d": ModuleKind("ConvTranspose2d", "conv_transpose2d", (
        Attr("in", "int"), Attr("out", "int"), Attr("kernel", "pair"),
        Attr("stride", "pair", (1, 1)), Attr("padding", "pair", (0, 0)),
        Attr("output_padding", "pair", (0, 0))) + _COMMON),
    "GroupNorm": ModuleKind("GroupNorm", "group_norm", (
        Attr("groups", "int"), Attr("channels", "int"), Attr("eps", "number", 1e-5), Attr("affine", "bool", True))),
    "LayerNorm": ModuleKind("LayerNorm", "layer_norm", (
        Attr("dims", "sizes"), Attr("eps", "number", 1e-5), Attr("affine", "bool", True))),
    "Embedding": ModuleKind("Embedding", "embedding", (
        Attr("num", "int"), Attr("dim", "int"), Attr("init_scale", "number", None))),
    # lowered to conv2d of a size-1 height (passes/build_graph.py, conv1d); kernel, stride, padding: one size each
    "Conv1d": ModuleKind("Conv1d", "conv2d", (
        Attr("in", "int"), Attr("out", "int"), Attr("kernel", "int"), Attr("stride", "int", 1),
        Attr("padding", "int", 0)) + _COMMON),
    # lowered to einsum, softmax and linear pieces (passes/build_graph.py, attention): no primitive of its own
    "MultiheadAttention": ModuleKind("MultiheadAttention", "einsum", (
        Attr("dim", "int"), Attr("heads", "int"), Attr("bias", "bool", True))),
}

NORMALIZATIONS = ("GroupNorm", "LayerNorm")  # module kinds whose weight and bias exist only when affine

NORMS = ("spectral", "weight")  # torch's spectral_norm and weight_norm parametrizations

# Initialisers of raw ``tensor`` params and states: name -> number of numeric arguments.
TENSOR_INITS = {"zeros": 0, "ones": 0, "normal": 2, "uniform": 2}
