"""The symbolic shape algebra: canonical dims, arithmetic, floor division under assumptions,
broadcasting and unification."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpidsl.ir.shapes import (
    DimConflict,
    DimExpr,
    ShapeCtx,
    broadcast,
    broadcasts_to,
    dim_add,
    dim_exact_div,
    dim_floordiv,
    dim_mul,
    dim_prod,
    dim_sub,
    fmt_shape,
    norm,
    normalize_dim,
    shape_symbols,
    unify,
)


def test_canonical_forms():
    assert norm(3) == 3
    assert norm("H") == "H"
    assert dim_sub(dim_add("H", 2), 2) == "H"
    assert dim_add("H", "H") == dim_mul(2, "H")
    assert isinstance(dim_mul(2, "H"), DimExpr)
    assert dim_sub("H", "H") == 0
    assert dim_mul("H", "W") == dim_mul("W", "H")
    assert hash(dim_mul("H", "W")) == hash(dim_mul("W", "H"))


@pytest.mark.parametrize("dim, text", [
    (dim_mul(4, dim_mul("H", "W")), "4*H*W"),
    (dim_sub(dim_mul(2, "H"), 1), "2*H-1"),
    (dim_floordiv("H", 2, ShapeCtx()), "H/2"),
    (dim_add(dim_floordiv(dim_mul(3, "H"), 2, ShapeCtx()), 1), "3*H/2+1"),
    (dim_sub(3, "H"), "-H+3"),
    (dim_mul("B", "B"), "B*B"),
])
def test_format(dim, text):
    assert str(dim) == text


def test_floordiv_of_numbers_is_exact_floor():
    assert dim_floordiv(7, 2) == 3
    assert dim_floordiv(-1, 2) == -1


def test_floordiv_records_divisibility():
    ctx = ShapeCtx()
    # (H + 2*1 - 3) // 2 + 1 with H even is H/2
    out = dim_add(dim_floordiv(dim_sub(dim_add("H", 2), 3), 2, ctx), 1)
    assert str(out) == "H/2"
    assert ctx.assumptions == [("H", 2)]
    back = dim_add(dim_sub(dim_mul(dim_sub(out, 1), 2), 2), 4)  # transposed conv k=4 s=2 p=1
    assert back == "H"


def test_floordiv_without_context_refuses_to_assume():
    with pytest.raises(ValueError):
        dim_floordiv("H", 2)


def test_exact_div():
    ctx = ShapeCtx()
    assert dim_exact_div(dim_mul(4, dim_mul("H", "W")), 4, ctx) == dim_mul("H", "W")
    assert dim_exact_div(dim_mul("B", "H"), "B", ctx) == "H"
    assert dim_exact_div(dim_add("H", 1), "W", ctx) is None
    assert dim_exact_div(10, 3, ctx) is None
    assert dim_exact_div(dim_mul(3, "H"), 2, ctx) == DimExpr(((("H",), Fraction(3, 2)),))
    assert ("H", 2) in ctx.assumptions


@pytest.mark.parametrize("a, b, out", [
    (("B", 10), (10,), ("B", 10)),
    (("B", 1), (1, 10), ("B", 10)),
    ((), ("B", 10), ("B", 10)),
    (("B", 10), ("B", 10), ("B", 10)),
    ((1,), ("B",), ("B",)),
])
def test_broadcast(a, b, out):
    assert broadcast(a, b) == out
    assert broadcast(b, a) == out


@pytest.mark.parametrize("a, b, index", [
    (("B", 10), ("B", 20), -1),
    (("B", 10), (10, 10), -2),   # a symbol equals only itself
    (("B",), ("C",), -1),
])
def test_broadcast_conflicts(a, b, index):
    with pytest.raises(DimConflict) as info:
        broadcast(a, b)
    assert info.value.index == index


def test_broadcasts_to_and_unify():
    assert broadcasts_to((10,), ("B", 10))
    assert not broadcasts_to(("B", 10), (10,))
    assert unify(("B", "H"), ("B", "H")) == ("B", "H")
    with pytest.raises(DimConflict):
        unify(("B", "H"), ("B", "W"))
    with pytest.raises(DimConflict):
        unify(("B",), ("B", 1))


def test_misc():
    assert fmt_shape(()) == "[]"
    assert fmt_shape(("B", dim_floordiv("H", 2, ShapeCtx()))) == "[B, H/2]"
    assert fmt_shape(None) == "[?]"
    assert normalize_dim(-1, 3) == 2
    assert normalize_dim(3, 3) is None
    assert normalize_dim(0, 0) is None
    assert shape_symbols(("B", dim_mul("H", "W"), 3)) == {"B", "H", "W"}
    assert dim_prod(["B", 2, "B"]) == dim_mul(2, dim_mul("B", "B"))


# Polynomial arithmetic agrees with integer arithmetic at every point.
_dims = st.recursive(
    st.one_of(st.integers(-5, 5), st.sampled_from(["H", "W"])),
    lambda inner: st.tuples(st.sampled_from("+-*"), inner, inner),
    max_leaves=6,
)


def _build(tree):
    if not isinstance(tree, tuple):
        return norm(tree)
    op, a, b = tree
    a, b = _build(a), _build(b)
    return {"+": dim_add, "-": dim_sub, "*": dim_mul}[op](a, b)


def _eval_tree(tree, env):
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        return env[tree]
    op, a, b = tree
    a, b = _eval_tree(a, env), _eval_tree(b, env)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _eval_dim(d, env):
    if isinstance(d, int):
        return d
    if isinstance(d, str):
        return env[d]
    total = Fraction(0)
    for mono, coef in d.terms:
        term = coef
        for s in mono:
            term *= env[s]
        total += term
    return total


@given(_dims, st.integers(1, 9), st.integers(1, 9))
def test_polynomials_evaluate_like_integers(tree, h, w):
    env = {"H": h, "W": w}
    assert _eval_dim(_build(tree), env) == _eval_tree(tree, env)


@given(_dims, st.integers(1, 4), st.integers(1, 20), st.integers(1, 20))
def test_floordiv_is_exact_when_the_assumptions_hold(tree, k, h, w):
    ctx = ShapeCtx()
    d = dim_floordiv(_build(tree), k, ctx)
    env = {"H": h, "W": w}
    holds = all(_eval_dim(norm(dim_prod(expr.split("*"))), env) % div == 0 for expr, div in ctx.assumptions)
    if holds:
        assert _eval_dim(d, env) == _eval_tree(tree, env) // k
