"""Vector-Jacobian products written with primitives: the ``vjp`` rule of every primitive.

A rule is ``rule(builder, node, ct) -> {argument position: node}``: given a ``call`` node of the graph
that ``builder`` extends and the node ``ct`` holding the cotangent of its value, it adds nodes computing
the cotangent of each argument (summed back to the argument's shape) and returns them. A position
that is left out has a structurally zero cotangent: a ``like`` argument, read for its shape only, or a
mask's argument. Rules may read the primal node's value itself (``sigmoid`` does).

The rules need a few *auxiliary* primitives (``relu_mask``, ``linear_weight_grad`` ...), which are entries of
:data:`~fpidsl.ir.primitives.PRIMITIVES` like every other (``builtin=False``), each with a rule of its own, so a
derived graph can be differentiated again; the masks (``*_mask``, ``sign``, ``ones_like``, ``zeros_like``,
``count``) are piecewise constant and their rule returns nothing. The table names each primitive's rule
(``vjp=RULES[...]``); this module only defines them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from . import linalg
from .primitives import SliceSpec
from .shapes import fmt_shape, normalize_dim

if TYPE_CHECKING:
    from .builder import GraphBuilder

VjpRule = Callable[["GraphBuilder", str, str], dict[int, str]]


# --------------------------------------------------------------------------- helpers for rules


def sum_to(b: GraphBuilder, x: str, shape: tuple) -> str:
    """``x`` (of a shape that ``shape`` broadcasts to) summed back to ``shape``."""
    have = b.shape(x)
    lead = len(have) - len(shape)
    if lead < 0:
        raise ValueError(f"sum_to: {fmt_shape(have)} has fewer dimensions than {fmt_shape(shape)}")
    if lead:
        x = b.call("sum", x, dim=_dims(range(lead)), keepdim=False)
    ones = [i for i, (h, t) in enumerate(zip(have[lead:], shape)) if h != t]
    for i in ones:
        if shape[i] != 1:
            raise ValueError(f"sum_to: {fmt_shape(have)} is not a broadcast of {fmt_shape(shape)}")
    if ones:
        x = b.call("sum", x, dim=_dims(ones), keepdim=True)
    return x


def _dims(dims) -> int | tuple[int, ...]:
    dims = tuple(dims)
    return dims[0] if len(dims) == 1 else dims


def reduced_dims(dim, rank: int) -> list[int]:
    """The sorted non-negative dims a reduction with ``dim`` (int, tuple or None) reduces."""
    if dim is None:
        return list(range(rank))
    listed = dim if isinstance(dim, tuple) else (dim,)
    return sorted(normalize_dim(d, rank) for d in listed)


def keep_dims(b: GraphBuilder, value: str, dims: list[int], keepdim: bool) -> str:
    """The result ``value`` of a reduction over ``dims`` with its reduced dims present (size 1)."""
    if keepdim or not dims or b.rank(value) == 0:
        return value
    return b.call("unsqueeze", value, dim=_dims(dims))


def unreduce(b: GraphBuilder, ct: str, x: str, dim, keepdim: bool) -> str:
    """The cotangent ``ct`` of ``sum(x, dim, keepdim)`` broadcast back to ``x``."""
    dims = reduced_dims(dim, b.rank(x))
    return b.call("expand_as", keep_dims(b, ct, dims, keepdim), x)


def _mul(b: GraphBuilder, a: str, c: str) -> str:
    return b.call("mul", a, c)


# --------------------------------------------------------------------------- rules: arithmetic


def _add(b, n, ct):
    x, y = b.args(n)
    return {0: sum_to(b, ct, b.shape(x)), 1: sum_to(b, ct, b.shape(y))}


def _sub(b, n, ct):
    x, y = b.args(n)
    return {0: sum_to(b, ct, b.shape(x)), 1: sum_to(b, b.call("neg", ct), b.shape(y))}


def _mul_rule(b, n, ct):
    x, y = b.args(n)
    return {0: sum_to(b, _mul(b, ct, y), b.shape(x)), 1: sum_to(b, _mul(b, ct, x), b.shape(y))}


def _div(b, n, ct):
    x, y = b.args(n)
    dy = b.call("neg", b.call("div", _mul(b, ct, n), y))
    return {0: sum_to(b, b.call("div", ct, y), b.shape(x)), 1: sum_to(b, dy, b.shape(y))}


def _matmul(b, n, ct):
    x, y = b.args(n)
    rx, ry = b.rank(x), b.rank(y)
    if rx == 1 and ry == 1:  # (k) @ (k) -> (): ct is a scalar
        return {0: _mul(b, ct, y), 1: _mul(b, ct, x)}
    if ry == 1:  # (..., n, k) @ (k) -> (..., n)
        col = b.call("unsqueeze", ct, dim=b.rank(ct))
        return {0: sum_to(b, _mul(b, col, y), b.shape(x)), 1: sum_to(b, _mul(b, col, x), b.shape(y))}
    if rx == 1:  # (k) @ (..., k, m) -> (..., m)
        row = b.call("unsqueeze", ct, dim=b.rank(ct) - 1)
        dx = b.call("sum", _mul(b, row, y), dim=-1, keepdim=False)
        dy = _mul(b, row, b.call("unsqueeze", x, dim=1))
        return {0: sum_to(b, dx, b.shape(x)), 1: sum_to(b, dy, b.shape(y))}
    dx = b.call("matmul", ct, b.call("transpose", y, dim0=-2, dim1=-1))
    dy = b.call("matmul", b.call("transpose", x, dim0=-2, dim1=-1), ct)
    return {0: sum_to(b, dx, b.shape(x)), 1: sum_to(b, dy, b.shape(y))}


def _pow(b, n, ct):
    (x,) = b.args(n)
    p = b.attrs(n)["exponent"]
    if p == 0:
        return {}
    if p == 1:
        return {0: ct}
    base = x if p == 2 else b.call("pow", x, exponent=p - 1)
    return {0: _mul(b, ct, _mul(b, base, b.const(p)))}


def _neg(b, n, ct):
    return {0: b.call("neg", ct)}


def _power(b, n, ct):
    """a ** b with a tensor exponent (a > 0): d/da = b a^(b-1), d/db = log(a) a^b; as torch's pow backward, d/da is
    0 where b == 0 and d/db is 0 where a == 0 and b >= 0 (the limits; log(0) a^b read -inf * 0 = NaN)."""
    x, y = b.args(n)
    zero = b.const(0)
    dx = _mul(b, ct, _mul(b, y, b.call("power", x, b.call("sub", y, b.const(1)))))
    dx = b.call("where", b.call("equal", y, zero), zero, dx)
    base = b.graph.node(x)
    if base["op"] == "const" and isinstance(base["value"], (int, float)) and base["value"] > 0:  # 2 ** y: log(2)
        dy = _mul(b, ct, _mul(b, b.const(math.log(base["value"])), n))
    else:
        at_zero = _mul(b, b.call("equal", x, zero), b.call("greater_equal", y, zero))
        dy = b.call("where", at_zero, zero, _mul(b, ct, _mul(b, b.call("log", x), n)))
    return {0: sum_to(b, dx, b.shape(x)), 1: sum_to(b, dy, b.shape(y))}


# --------------------------------------------------------------------------- rules: linear algebra


def _solve(b, n, ct):
    """x = A⁻¹ b: the cotangent of b is g = A⁻ᵀ ct (a solve with the transpose), that of A is -g xᵀ."""
    a, rhs = b.args(n)
    g = b.call("solve", b.call("transpose", a, dim0=-2, dim1=-1), ct)
    if linalg.solve_rhs_is_vector(b.rank(a), b.rank(rhs)):
        outer = _mul(b, b.call("unsqueeze", g, dim=-1), b.call("unsqueeze", n, dim=-2))
    else:
        outer = b.call("matmul", g, b.call("transpose", n, dim0=-2, dim1=-1))
    return {0: sum_to(b, b.call("neg", outer), b.shape(a)), 1: sum_to(b, g, b.shape(rhs))}


def _einsum(b, n, ct):
    """Each operand's cotangent is the einsum of ct with the other operands onto its letters
    (:func:`~fpidsl.ir.linalg.operand_gradient`), summed back over broadcast ``...`` dims and broadcast along
    the letters only that operand has."""
    operands = b.args(n)
    eq = linalg.parse(b.attrs(n)["equation"])
    out = {}
    for i, x in enumerate(operands):
        grad_eq, lonely = linalg.operand_gradient(eq, i)
        g = b.call("einsum", ct, *(o for j, o in enumerate(operands) if j != i), equation=str(grad_eq))
        shape = b.shape(x)
        g = sum_to(b, g, tuple(d for k, d in enumerate(shape) if k - len(shape) not in lonely))
        out[i] = b.call("expand_as", b.call("unsqueeze", g, dim=_dims(lonely)), x) if lonely else g
    return out


def _spmm(b, n, ct):
    """A x is linear in x: its cotangent is Aᵀ ct. The sparse input A gets none (it is data, not a parameter)."""
    a, _ = b.args(n)
    return {1: b.call("spmm", a, ct, transpose=not b.attrs(n)["transpose"])}


# --------------------------------------------------------------------------- rules: elementwise


def _times(factor: Callable[[GraphBuilder, str, str, dict], str]) -> VjpRule:
    """The rule ``ct * factor(x, y, attrs)`` of a one-argument elementwise primitive (y: its value)."""
    def rule(b, n, ct):
        (x,) = b.args(n)
        return {0: _mul(b, ct, factor(b, x, n, b.attrs(n)))}
    rule.__name__ = rule.__qualname__ = f"vjp_times_{factor.__name__.lstrip('_')}"
    return rule


def _leaky_relu_d(b, x, y, attrs):
    return b.call("leaky_relu_mask", x, slope=attrs["slope"])


def _tanh_d(b, x, y, attrs):
    return b.call("sub", b.const(1), b.call("square", y))


def _sigmoid_d(b, x, y, attrs):
    return _mul(b, y, b.call("sub", b.const(1), y))


# softplus is torch's F.softplus with its default threshold: linear (x) where beta * x > 20
SOFTPLUS_THRESHOLD = 20


def _softplus_d(b, x, y, attrs):
    """torch's softplus': sigmoid(beta x) up to the threshold, exactly 1 above it (beta x > 20), where the value is
    x itself. Its own derivative is torch's too: beta sigmoid'(beta x) below the threshold, 0 from it on (torch's
    double backward masks with beta x < 20, so at beta x == 20 the first derivative is sigmoid(20), a constant)."""
    beta, t = attrs["beta"], SOFTPLUS_THRESHOLD
    bx = x if beta == 1 else _mul(b, x, b.const(beta))
    at = b.call("where", b.call("greater", bx, b.const(t)), b.const(1), b.const(math.exp(t) / (math.exp(t) + 1)))
    return b.call("where", b.call("less", bx, b.const(t)), b.call("sigmoid", bx), at)


def _elu_d(b, x, y, attrs):
    """torch's elu': 1 where x > 0 (and for NaN), alpha exp(x) where x <= 0. Written with ``where`` (not the
    auxiliary ``elu_grad``) so that its own derivative, by this table or by torch's autograd of the emitted code,
    is torch's elu'': alpha exp(x) where x < 0 and 0 from x = 0 on (torch masks its double backward with x < 0); at
    x = 0 elu' is the constant alpha. exp reads x only where x < 0 (no 0 * inf in a derivative at large x)."""
    alpha = attrs["alpha"]
    negative = b.call("less", x, b.const(0))
    e = _mul(b, b.call("exp", b.call("where", negative, x, b.const(0))), b.const(alpha))
    return b.call("where", b.call("less_equal", x, b.const(0)), b.call("where", negative, e, b.const(alpha)),
                  b.const(1))


def _exp_d(b, x, y, attrs):
    return y


def _square_d(b, x, y, attrs):
    return _mul(b, x, b.const(2))


def _abs_d(b, x, y, attrs):
    return b.call("sign", x)


def _sin_d(b, x, y, attrs):
    return b.call("cos", x)


def _cos_d(b, x, y, attrs):
    return b.call("neg", b.call("sin", x))


def _gelu_d(b, x, y, attrs):
    if attrs["approximate"] == "tanh":  # 0.5 x (1 + tanh(u)), u = k (x + a x^3)
        k, a = math.sqrt(2 / math.pi), 0.044715
        x2 = b.call("square", x)
        t = b.call("tanh", _mul(b, b.call("add", x, _mul(b, _mul(b, x, x2), b.const(a))), b.const(k)))
        du = _mul(b, b.call("add", b.const(1), _mul(b, x2, b.const(3 * a))), b.const(k))
        half_x = _mul(b, x, b.const(0.5))
        return b.call("add", _mul(b, b.call("add", b.const(1), t), b.const(0.5)),
                      _mul(b, half_x, _mul(b, b.call("sub", b.const(1), b.call("square", t)), du)))
    # Phi(x) + x phi(x)
    cdf = _mul(b, b.call("add", b.const(1), b.call("erf", _mul(b, x, b.const(1 / math.sqrt(2))))), b.const(0.5))
    pdf = _mul(b, b.call("exp", _mul(b, b.call("square", x), b.const(-0.5))), b.const(1 / math.sqrt(2 * math.pi)))
    return b.call("add", cdf, _mul(b, x, pdf))


def _silu_d(b, x, y, attrs):
    s = b.call("sigmoid", x)
    return _mul(b, s, b.call("add", b.const(1), _mul(b, x, b.call("sub", b.const(1), s))))


def _erf_d(b, x, y, attrs):
    return _mul(b, b.call("exp", b.call("neg", b.call("square", x))), b.const(2 / math.sqrt(math.pi)))


def _reciprocal(b, n, ct):
    return {0: b.call("neg", _mul(b, ct, b.call("square", n)))}


def _where(b, n, ct):
    cond, x, y = b.args(n)
    zero = b.const(0)
    return {1: sum_to(b, b.call("where", cond, ct, zero), b.shape(x)),
            2: sum_to(b, b.call("where", cond, zero, ct), b.shape(y))}


def _log(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("div", ct, x)}


def _sqrt(b, n, ct):
    return {0: b.call("div", ct, _mul(b, n, b.const(2)))}


def _selected(b, ct: str, mask: str) -> str:
    """``ct`` where ``mask`` (a mask primitive's value) is positive, exactly 0 elsewhere (the auxiliary ``select``):
    torch's backwards of relu, clamp, maximum and minimum select (threshold_backward, where), so a masked-off place
    gets 0 even where the cotangent arriving there is inf or NaN (``sqrt(relu(a))`` at ``a <= 0``: sqrt' is inf
    there), where a product with the 0/1 mask gave NaN."""
    return b.call("select", ct, mask)


def _select(b, n, ct):
    """select is linear in its cotangent argument, and piecewise constant in its mask."""
    x, mask = b.args(n)
    return {0: sum_to(b, b.call("select", ct, mask), b.shape(x))}


def _relu(b, n, ct):
    (x,) = b.args(n)
    return {0: _selected(b, ct, b.call("relu_mask", x))}


def _clamp(b, n, ct):
    (x,) = b.args(n)
    attrs = b.attrs(n)
    return {0: _selected(b, ct, b.call("clamp_mask", x, lo=attrs["lo"], hi=attrs["hi"]))}


def _extremum(larger: bool) -> VjpRule:
    """maximum (``larger``) or minimum: the cotangent goes to the winner, split evenly on ties (selected, then
    halved at a tie: the loser gets exactly 0, as in torch)."""
    def rule(b, n, ct):
        x, y = b.args(n)
        wx = b.call("greater_mask", x, y) if larger else b.call("greater_mask", y, x)
        wy = b.call("greater_mask", y, x) if larger else b.call("greater_mask", x, y)
        return {0: sum_to(b, _mul(b, _selected(b, ct, wx), wx), b.shape(x)),
                1: sum_to(b, _mul(b, _selected(b, ct, wy), wy), b.shape(y))}
    rule.__name__ = rule.__qualname__ = "vjp_maximum" if larger else "vjp_minimum"
    return rule


# --------------------------------------------------------------------------- rules: reductions, shapes


def _sum(b, n, ct):
    (x,) = b.args(n)
    attrs = b.attrs(n)
    return {0: unreduce(b, ct, x, attrs["dim"], attrs["keepdim"])}


def _mean(b, n, ct):
    (x,) = b.args(n)
    attrs = b.attrs(n)
    sizes = [b.shape(x)[d] for d in reduced_dims(attrs["dim"], b.rank(x))]
    if all(isinstance(s, int) for s in sizes):
        total = 1
        for s in sizes:
            total *= s
        count = b.const(total)
    else:
        count = b.call("count", x, dim=attrs["dim"])
    return {0: unreduce(b, b.call("div", ct, count), x, attrs["dim"], attrs["keepdim"])}


def _softmax(b, n, ct):
    dim = b.attrs(n)["dim"]
    dot = b.call("sum", _mul(b, ct, n), dim=dim, keepdim=True)
    return {0: _mul(b, n, b.call("sub", ct, dot))}


def _logsumexp(b, n, ct):
    (x,) = b.args(n)
    attrs = b.attrs(n)
    dims = reduced_dims(attrs["dim"], b.rank(x))
    shift = b.call("sub", x, keep_dims(b, n, dims, attrs["keepdim"]))
    return {0: _mul(b, keep_dims(b, ct, dims, attrs["keepdim"]), b.call("exp", shift))}


def _extremum_reduction(larger: bool) -> VjpRule:
    """max (``larger``) or min along dims: the cotangent goes to the elements equal to the result, shared evenly
    among ties (as torch.amax / torch.amin)."""
    def rule(b, n, ct):
        (x,) = b.args(n)
        attrs = b.attrs(n)
        dims = reduced_dims(attrs["dim"], b.rank(x))
        mask = b.call("equal_mask", x, keep_dims(b, n, dims, attrs["keepdim"]))
        share = b.call("div", mask, b.call("sum", mask, dim=_dims(dims), keepdim=True))
        return {0: _mul(b, keep_dims(b, ct, dims, attrs["keepdim"]), share)}
    rule.__name__ = rule.__qualname__ = "vjp_max" if larger else "vjp_min"
    return rule


def _norm(b, n, ct):
    """d|x|_p / dx = sign(x) |x|^(p-1) / |x|_p^(p-1), and 0 where the norm is 0 (as torch)."""
    (x,) = b.args(n)
    attrs = b.attrs(n)
    dims = reduced_dims(attrs["dim"], b.rank(x))
    p = attrs["p"]
    norm = keep_dims(b, n, dims, attrs["keepdim"])
    if p == 1:
        factor = b.call("sign", x)
    elif p == 2:
        factor = b.call("safe_div", x, norm)
    else:
        power = _mul(b, b.call("sign", x), b.call("pow", b.call("abs", x), exponent=p - 1))
        factor = b.call("safe_div", power, b.call("pow", norm, exponent=p - 1))
    return {0: _mul(b, keep_dims(b, ct, dims, attrs["keepdim"]), factor)}


def _prod(b, n, ct):
    """The product of the other elements along dim, from prefix and suffix products of slices: exact where
    elements are 0 (no division), and made of products only, so differentiable again."""
    (x,) = b.args(n)
    attrs = b.attrs(n)
    d = normalize_dim(attrs["dim"], b.rank(x))
    size = b.shape(x)[d]
    ct = keep_dims(b, ct, [d], attrs["keepdim"])
    if size == 1:
        return {0: b.call("expand_as", ct, x)}
    part = [b.call("index", x, index=(SliceSpec(),) * d + (SliceSpec(j, j + 1),)) for j in range(size)]
    before = [None, part[0]]  # before[j]: the product of part[:j]
    for j in range(2, size):
        before.append(_mul(b, before[-1], part[j - 1]))
    after = [None] * size  # after[j]: the product of part[j + 1:]
    after[size - 2] = part[size - 1]
    for j in range(size - 3, -1, -1):
        after[j] = _mul(b, after[j + 1], part[j + 1])
    others = [after[0]] + [_mul(b, before[j], after[j]) for j in range(1, size - 1)] + [before[size - 1]]
    return {0: _mul(b, ct, b.call("cat", *others, dim=d))}


def _var(b, n, ct):
    """d var / dx = 2 (x - mean(x)) / (N - correction), N the number of elements reduced."""
    (x,) = b.args(n)
    attrs = b.attrs(n)
    dims = reduced_dims(attrs["dim"], b.rank(x))
    sizes = [b.shape(x)[d] for d in dims]
    if all(isinstance(s, int) for s in sizes):
        denominator = b.const(math.prod(sizes) - attrs["correction"])
    else:
        denominator = b.call("sub", b.call("count", x, dim=attrs["dim"]), b.const(attrs["correction"]))
    centered = b.call("sub", x, b.call("mean", x, dim=attrs["dim"], keepdim=True))
    factor = b.call("div", _mul(b, centered, b.const(2)), denominator)
    return {0: _mul(b, keep_dims(b, ct, dims, attrs["keepdim"]), factor)}


def _cat(b, n, ct):
    parts = b.args(n)
    dim = normalize_dim(b.attrs(n)["dim"], b.rank(n))
    sizes = [b.shape(p)[dim] for p in parts]
    out, start = {}, 0
    for i, size in enumerate(sizes):
        if isinstance(start, int) and isinstance(size, int):
            index = (SliceSpec(),) * dim + (SliceSpec(start, start + size),)
            out[i] = b.call("index", ct, index=index)
            start += size
        else:
            out[i] = b.call("cat_part", ct, *parts, dim=dim, item=i)
            start = None
    return out


def _reshape(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("reshape_as", ct, x)}


def _transpose(b, n, ct):
    attrs = b.attrs(n)
    return {0: b.call("transpose", ct, dim0=attrs["dim0"], dim1=attrs["dim1"])}


def _permute(b, n, ct):
    (x,) = b.args(n)
    dims = b.attrs(n)["dims"]
    order = [normalize_dim(d, b.rank(x)) for d in (dims if isinstance(dims, tuple) else (dims,))]
    inverse = tuple(order.index(i) for i in range(len(order)))
    return {0: b.call("permute", ct, dims=inverse)}


def _triangle(upper: bool) -> VjpRule:
    """triu / tril: a fixed mask, its own adjoint."""
    def rule(b, n, ct):
        return {0: b.call("triu" if upper else "tril", ct, diagonal=b.attrs(n)["diagonal"])}
    rule.__name__ = rule.__qualname__ = "vjp_triu" if upper else "vjp_tril"
    return rule


def _index(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("index_backward", ct, x, index=b.attrs(n)["index"])}


def _grad(b, n, ct):
    raise ValueError("grad(E, x) has no VJP rule: expand it first (fpidsl.passes.differentiate.expand_grads)")


# --------------------------------------------------------------------------- rules: modules


def _linear(b, n, ct):
    args = b.args(n)
    x, w = args[0], args[1]
    out = {0: b.call("matmul", ct, w), 1: b.call("linear_weight_grad", ct, x)}
    if len(args) == 3:
        out[2] = sum_to(b, ct, b.shape(args[2]))
    return out


def _conv_attrs(b, n) -> dict[str, Any]:
    attrs = b.attrs(n)
    return {"stride": attrs["stride"], "padding": attrs["padding"]}


def _kernel(b, w) -> tuple[int, int]:
    return tuple(b.shape(w)[2:])


def _bias_grad(b, ct) -> str:
    return b.call("sum", ct, dim=(0, 2, 3), keepdim=False)


def _conv2d(b, n, ct):
    args = b.args(n)
    x, w = args[0], args[1]
    conv = _conv_attrs(b, n)
    out = {0: b.call("conv2d_input_grad", ct, w, x, **conv),
           1: b.call("conv2d_weight_grad", ct, x, kernel=_kernel(b, w), **conv)}
    if len(args) == 3:
        out[2] = _bias_grad(b, ct)
    return out


def _conv_transpose2d(b, n, ct):
    args = b.args(n)
    x, w = args[0], args[1]
    conv = _conv_attrs(b, n)
    out = {0: b.call("conv2d", ct, w, **conv),
           1: b.call("conv2d_weight_grad", x, ct, kernel=_kernel(b, w), **conv)}
    if len(args) == 3:
        out[2] = _bias_grad(b, ct)
    return out


def _normalization_vjp(b, n, ct, mean_of, weight_view, weight_sum):
    """The VJP of ``weight * (x - m) r + bias``, m = M(x), r = (M((x - m)^2) + eps)^-1/2, with M the
    normalisation's mean broadcast back to x: dx = r (g - M(g) - xhat M(g xhat)), g = ct weight,
    xhat = (x - m) r. Written with primitives only (M is ``mean`` or ``group_mean``), so it differentiates
    again."""
    args = b.args(n)
    x = args[0]
    centered = b.call("sub", x, mean_of(x))
    variance = mean_of(_mul(b, centered, centered))
    r = b.call("pow", b.call("add", variance, b.const(b.attrs(n)["eps"])), exponent=-0.5)
    xhat = _mul(b, centered, r)
    g = ct if len(args) == 1 else _mul(b, ct, weight_view(args[1]))
    inner = b.call("sub", b.call("sub", g, mean_of(g)), _mul(b, xhat, mean_of(_mul(b, g, xhat))))
    out = {0: _mul(b, r, inner)}
    if len(args) >= 2:
        out[1] = weight_sum(_mul(b, ct, xhat))
    if len(args) == 3:
        out[2] = weight_sum(ct)
    return out


def _group_norm(b, n, ct):
    (x, *_) = b.args(n)
    attrs = b.attrs(n)
    rank = b.rank(x)
    others = _dims([0, *range(2, rank)])
    return _normalization_vjp(
        b, n, ct, lambda v: b.call("group_mean", v, groups=attrs["groups"]),
        lambda w: w if rank == 2 else b.call("reshape", w, shape=tuple(b.shape(w)) + (1,) * (rank - 2)),
        lambda v: b.call("sum", v, dim=others, keepdim=False))


def _layer_norm(b, n, ct):
    (x, *_) = b.args(n)
    normalized = tuple(b.attrs(n)["shape"])
    trailing = _dims(range(-len(normalized), 0))
    return _normalization_vjp(
        b, n, ct, lambda v: b.call("mean", v, dim=trailing, keepdim=True), lambda w: w,
        lambda v: sum_to(b, v, normalized))


# --------------------------------------------------------------------------- rules: auxiliary


def _zero(b, n, ct):
    """A piecewise-constant primitive (or one that reads its arguments' shapes only)."""
    return {}


def _elu_grad(b, n, ct):
    """elu'' = alpha exp(x) where x < 0, else 0: elu_grad(x) masked by x < 0 (torch's double backward uses x < 0,
    so elu'' is 0 at x = 0, where elu' itself is alpha)."""
    (x,) = b.args(n)
    return {0: _mul(b, ct, _mul(b, n, b.call("relu_mask", b.call("neg", x))))}


def _safe_div(b, n, ct):
    x, y = b.args(n)
    dy = b.call("neg", b.call("safe_div", _mul(b, ct, n), y))
    return {0: sum_to(b, b.call("safe_div", ct, y), b.shape(x)), 1: sum_to(b, dy, b.shape(y))}


def _unsqueeze(b, n, ct):
    return {0: b.call("sum", ct, dim=b.attrs(n)["dim"], keepdim=False)}


def _expand_as(b, n, ct):
    (x, _) = b.args(n)
    return {0: sum_to(b, ct, b.shape(x))}


def _reshape_as(b, n, ct):
    (x, _) = b.args(n)
    return {0: b.call("reshape_as", ct, x)}


def _index_backward(b, n, ct):
    return {0: b.call("index", ct, index=b.attrs(n)["index"])}


def _cat_part(b, n, ct):
    parts = b.args(n)[1:]
    attrs = b.attrs(n)
    pieces = [ct if i == attrs["item"] else b.call("zeros_like", p) for i, p in enumerate(parts)]
    return {0: b.call("cat", *pieces, dim=attrs["dim"])}


def _group_mean(b, n, ct):
    """Averaging over groups is an orthogonal projection: its own adjoint."""
    return {0: b.call("group_mean", ct, groups=b.attrs(n)["groups"])}


def _linear_weight_grad(b, n, ct):
    g, x = b.args(n)
    return {0: b.call("linear", x, ct), 1: b.call("matmul", g, ct)}


def _conv2d_input_grad(b, n, ct):
    g, w, _ = b.args(n)
    conv = _conv_attrs(b, n)
    return {0: b.call("conv2d", ct, w, **conv),
            1: b.call("conv2d_weight_grad", g, ct, kernel=_kernel(b, w), **conv)}


def _conv2d_weight_grad(b, n, ct):
    g, x = b.args(n)
    conv = _conv_attrs(b, n)
    return {0: b.call("conv2d", x, ct, **conv), 1: b.call("conv2d_input_grad", g, ct, x, **conv)}


# --------------------------------------------------------------------------- rules: indexing and resampling


def _gather(b, n, ct):
    x, index = b.args(n)
    return {0: b.call("gather_backward", ct, index, x, dim=b.attrs(n)["dim"])}


def _gather_backward(b, n, ct):
    _, index, _ = b.args(n)
    return {0: b.call("gather", ct, index, dim=b.attrs(n)["dim"])}


def _index_select(b, n, ct):
    x, index = b.args(n)
    return {0: b.call("index_select_backward", ct, index, x, dim=b.attrs(n)["dim"])}


def _index_select_backward(b, n, ct):
    _, index, _ = b.args(n)
    return {0: b.call("index_select", ct, index, dim=b.attrs(n)["dim"])}


def _embedding(b, n, ct):
    index, weight = b.args(n)
    return {1: b.call("embedding_backward", ct, index, weight)}


def _embedding_backward(b, n, ct):
    _, index, _ = b.args(n)
    return {0: b.call("embedding", index, ct)}


def _pad(b, n, ct):
    """The adjoint of padding is the slice that drops the padding."""
    attrs = b.attrs(n)
    pad = attrs["pad"] if isinstance(attrs["pad"], tuple) else (attrs["pad"],)
    cuts = [SliceSpec(pad[2 * k] or None, -pad[2 * k + 1] or None) for k in range(len(pad) // 2)]
    return {0: b.call("index", ct, index=(Ellipsis, *reversed(cuts)))}


def _pool_attrs(b, n) -> dict[str, Any]:
    attrs = b.attrs(n)
    return {"kernel": attrs["kernel"], "stride": attrs["stride"], "padding": attrs["padding"]}


def _avg_pool2d(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("avg_pool2d_backward", ct, x, **_pool_attrs(b, n))}


def _avg_pool2d_backward(b, n, ct):
    return {0: b.call("avg_pool2d", ct, **_pool_attrs(b, n))}


def _max_pool2d(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("max_pool2d_backward", ct, x, **_pool_attrs(b, n))}


def _max_pool2d_backward(b, n, ct):
    """Linear in the cotangent; piecewise constant in x (where the maxima are)."""
    _, x = b.args(n)
    return {0: b.call("max_pool2d_select", ct, x, **_pool_attrs(b, n))}


def _max_pool2d_select(b, n, ct):
    _, x = b.args(n)
    return {0: b.call("max_pool2d_backward", ct, x, **_pool_attrs(b, n))}


def _resampling(b, n) -> dict[str, Any]:
    attrs = b.attrs(n)
    return {"mode": attrs["mode"], "align_corners": attrs["align_corners"]}


def _interpolate(b, n, ct):
    (x,) = b.args(n)
    return {0: b.call("interpolate_backward", ct, x, **_resampling(b, n))}


def _interpolate_like(b, n, ct):
    x, _ = b.args(n)
    return {0: b.call("interpolate_backward", ct, x, **_resampling(b, n))}


def _interpolate_backward(b, n, ct):
    ct_in, _ = b.args(n)
    return {0: b.call("interpolate_like", ct, ct_in, **_resampling(b, n))}


def _grid_sample_attrs(b, n) -> dict[str, Any]:
    attrs = b.attrs(n)
    return {"mode": attrs["mode"], "padding_mode": attrs["padding_mode"], "align_corners": attrs["align_corners"]}


def _grid_sample(b, n, ct):
    """Each derivative of grid_sample by torch.autograd inside one auxiliary primitive (docs/ARCHITECTURE.md)."""
    args = b.args(n)
    return {i: b.call("grid_sample_vjp", ct, *args, path=(i,), **_grid_sample_attrs(b, n)) for i in range(len(args))}


def _grid_sample_vjp(b, n, ct):
    """The VJP of a VJP: one more level of the same primitive, for every argument (cotangents included)."""
    args = b.args(n)
    path = tuple(b.attrs(n)["path"])
    return {i: b.call("grid_sample_vjp", ct, *args, path=path + (i,), **_grid_sample_attrs(b, n))
            for i in range(len(args))}


INDEXING_RULES: dict[str, VjpRule] = {
    "gather": _gather, "gather_backward": _gather_backward, "index_select": _index_select,
    "index_select_backward": _index_select_backward, "embedding": _embedding,
    "embedding_backward": _embedding_backward, "pad": _pad, "avg_pool2d": _avg_pool2d,
    "avg_pool2d_backward": _avg_pool2d_backward, "max_pool2d": _max_pool2d,
    "max_pool2d_backward": _max_pool2d_backward, "max_pool2d_select": _max_pool2d_select,
    "interpolate": _interpolate, "interpolate_like": _interpolate_like, "interpolate_backward": _interpolate_backward,
    "grid_sample": _grid_sample, "grid_sample_vjp": _grid_sample_vjp,
}


def _dropout(b, n, ct):
    """x * mask: the cotangent through the same mask (the seeds have none)."""
    x, seeds = b.args(n)
    return {0: b.call("dropout", ct, seeds, **b.attrs(n))}


def _extern(b, n, ct):
    """An extern (or a VJP of one, chain w): the VJP with respect to each argument p but the module handle is the
    extern_vjp with chain w + (p,) and ct as its last cotangent (fpidsl/ir/extern.py)."""
    args, attrs = b.args(n), dict(b.attrs(n))
    chain = attrs.pop("chain", ())
    return {p: b.call("extern_vjp", *args, ct, chain=chain + (p,), **attrs) for p in range(1, len(args))}


# --------------------------------------------------------------------------- auxiliary shape rules


_ELEMENTWISE = {"leaky_relu": _leaky_relu_d, "tanh": _tanh_d, "sigmoid": _sigmoid_d,
                "softplus": _softplus_d, "elu": _elu_d, "exp": _exp_d, "square": _square_d, "abs": _abs_d,
                "sin": _sin_d, "cos": _cos_d, "gelu": _gelu_d, "silu": _silu_d, "erf": _erf_d}

RULES: dict[str, VjpRule] = {
    "add": _add, "sub": _sub, "mul": _mul_rule, "div": _div, "matmul": _matmul, "pow": _pow, "neg": _neg,
    **{name: _times(factor) for name, factor in _ELEMENTWISE.items()},
    "relu": _relu, "clamp": _clamp, "log": _log, "sqrt": _sqrt, "minimum": _extremum(False), "maximum": _extremum(True),
    "reciprocal": _reciprocal, "where": _where, "sign": _zero,
    # comparisons (operators < <= > >= == !=): 0/1 masks, piecewise constant
    "less": _zero, "less_equal": _zero, "greater": _zero, "greater_equal": _zero, "equal": _zero,
    "not_equal": _zero,
    "max": _extremum_reduction(True), "min": _extremum_reduction(False), "norm": _norm, "prod": _prod, "var": _var,
    "permute": _permute, "unsqueeze": _unsqueeze, "triu": _triangle(True), "tril": _triangle(False),
    "sum": _sum, "mean": _mean, "softmax": _softmax, "logsumexp": _logsumexp, "cat": _cat,
    "reshape": _reshape, "flatten": _reshape, "transpose": _transpose, "index": _index, "grad": _grad,
    "linear": _linear, "conv2d": _conv2d, "conv_transpose2d": _conv_transpose2d,
    "group_norm": _group_norm, "layer_norm": _layer_norm, "group_mean": _group_mean,
    "eye": _zero, "zeros": _zero, "ones": _zero, "full": _zero, "arange": _zero,
    "extern": _extern, "extern_vjp": _extern, "dropout": _dropout,
    "power": _power, "solve": _solve, "einsum": _einsum, "spmm": _spmm,
    # auxiliary
    "relu_mask": _zero, "leaky_relu_mask": _zero, "clamp_mask": _zero, "greater_mask": _zero,
    "equal_mask": _zero, "ones_like": _zero, "zeros_like": _zero, "count": _zero, "elu_grad": _elu_grad,
    "safe_div": _safe_div, "select": _select,
    "expand_as": _expand_as, "reshape_as": _reshape_as, "index_backward": _index_backward,
    "cat_part": _cat_part, "linear_weight_grad": _linear_weight_grad,
    "conv2d_input_grad": _conv2d_input_grad, "conv2d_weight_grad": _conv2d_weight_grad,
    **INDEXING_RULES,
}

ZERO_DERIVATIVE = frozenset(name for name, rule in RULES.items() if rule is _zero)
