"""Declared shapes with arithmetic on symbols (``[B, C, H/2, W/2]``, ``[B, T*D]``): the canonical form of a
dim, shape rules comparing canonical forms, the divisibility assumptions recorded, and positioned errors."""
from __future__ import annotations

from fractions import Fraction

import pytest

from fpidsl.errors import ShapeErr
from fpidsl.frontend.ast_compare import strip_spans
from fpidsl.frontend.parser import parse_fpi
from fpidsl.ir.shapes import (
    DimExpr,
    ShapeCtx,
    broadcast,
    dim_add,
    dim_exact_div,
    dim_floordiv,
    dim_mul,
    dim_sub,
    dim_substitute,
    dim_value,
    never_positive,
    sizes_not_given,
    symbols_given_by,
)
from fpidsl.source import Source
from fpidsl.tools.fmt import format_source
from fpidsl.tools.unparse import shape as unparse_shape

from .helpers import PATH, errors, graph, locate

HALF_H = dim_exact_div("H", 2, ShapeCtx())


# --------------------------------------------------------------------------- the canonical form


def test_a_dim_has_one_canonical_form_so_equal_sizes_compare_equal():
    assert dim_add(HALF_H, HALF_H) == "H"
    assert dim_mul(2, HALF_H) == "H"
    assert dim_mul("T", "D") == dim_mul("D", "T") and isinstance(dim_mul("T", "D"), DimExpr)
    assert hash(dim_mul("T", "D")) == hash(dim_mul("D", "T"))
    assert dim_sub(dim_add("H", 1), 1) == "H" and dim_sub("H", "H") == 0
    assert dim_add(dim_mul(2, "C"), "C") == dim_mul(3, "C") != dim_mul(2, "C")
    assert HALF_H != "K" and HALF_H != dim_exact_div("W", 2, ShapeCtx())
    assert str(HALF_H) == "H/2" and str(dim_sub(dim_mul("C", dim_mul("H", "W")), 1)) == "C*H*W-1"


def test_plain_symbols_and_integers_stay_python_strings_and_ints():
    assert dim_add(3, 4) == 7 and type(dim_add(3, 4)) is int
    assert dim_mul("H", 1) == "H" and type(dim_mul("H", 1)) is str
    assert broadcast(("B", HALF_H), (1, HALF_H)) == ("B", HALF_H)


def test_dividing_a_symbolic_size_records_that_it_divides_exactly():
    ctx = ShapeCtx()
    assert str(dim_exact_div(dim_mul("C", dim_mul("H", "W")), 4, ctx)) == "C*H*W/4"
    assert ctx.assumptions == [("C*H*W", 4)]
    ctx = ShapeCtx()
    assert str(dim_floordiv(dim_add("H", 1), 2, ctx)) == "H/2"  # the constant part is floored
    assert ctx.assumptions == [("H", 2)]
    assert dim_exact_div(dim_add("H", 1), 2, ShapeCtx()) is None  # 1/2 is not a whole number


def test_values_and_what_a_tensor_shape_gives():
    assert dim_value(dim_add(HALF_H, 3), {"H": 10}) == 8
    assert dim_value(HALF_H, {"H": 5}) == Fraction(5, 2)
    given = symbols_given_by(("B", HALF_H, dim_add("T", 1)))
    assert given["B"] == "@0" and dim_substitute("H", given) == dim_mul(2, "@1")
    assert dim_substitute(dim_mul("T", "B"), given) == dim_mul(dim_sub("@2", 1), "@0")
    assert sizes_not_given(("B", dim_mul("C", "H")), ("B", "C", -1)) == [1]
    assert never_positive(dim_sub(0, "H")) and not never_positive(dim_sub(2, "H")) and never_positive(0)


# --------------------------------------------------------------------------- shape rules on declared shapes

TWO_SCALE = """layer Down {
  input x : [B, C, H, W]
  state s : [B, C, H/2, W/2]
  let blocks = mean(mean(reshape(x, [B, C, H/2, 2, W/2, 2]), dim=5), dim=3)
  update s = 0.5 * s + blocks
}
"""


def test_a_half_size_state_broadcasts_against_a_value_computed_to_the_same_size():
    g = graph(TWO_SCALE)
    assert g.states["s"].shape == ("B", "C", HALF_H, dim_exact_div("W", 2, ShapeCtx()))
    assert [(a.expr, a.divisor, (a.span.line, a.span.col)) for a in g.assumptions] == [("H", 2, (3, 20)),
                                                                                        ("W", 2, (3, 25))]
    text = g.format()
    assert "assume H % 2 == 0" in text and "state s : [B, C, H/2, W/2]" in text


def test_matmul_inner_sizes_compare_by_canonical_form():
    g = graph("""layer M {
  input a : [N, K]
  input b : [K, M]
  input c : [N, 2*K]
  state y : [N, M]
  update y = 0.5 * tanh(c @ cat([b, b], dim=0)) + 0 * a[:, 0:1]
}
""")
    assert g.states["y"].shape == ("N", "M")


def test_reshape_with_several_symbolic_sizes_computes_the_minus_one_symbolically():
    g = graph("""layer G {
  const G = 4
  input v : [B, C, H, W]
  state s : [B, G, C*H*W/G]
  update s = 0.5 * s + reshape(v, [B, G, -1])
}
""")
    assert str(g.states["s"].shape[2]) == "C*H*W/4"
    assert {(a.expr, a.divisor) for a in g.assumptions} == {("C*H*W", 4)}


def check_one_error(text: str, anchor: str, fragment: str, nth: int = 1):
    (error,) = errors(text)
    assert isinstance(error, ShapeErr), error
    assert fragment in error.message, error.message
    assert (error.span.path, error.span.line, error.span.col) == (PATH, *locate(text, anchor, nth)), error.span
    return error


HEAD = "layer L {\n  input x : [B, C, H, W]\n  input k : [K]\n"
BAD = [
    # (state shape, anchor of the error, a fragment of its message)
    ("[B, C, H/K, W]", "K, W]", "a size may be divided only by a positive number"),
    ("[B, C, (H + 1)/2, W]", "(H + 1)/2", "the constant 1 of H+1 does not divide by 2"),
    ("[B, C, 0 - H, W]", "0 - H", "is never positive"),
    ("[B, C, H/2, Q/2]", "Q/2", "the dimension Q of state s is not a dimension of any input"),
    ("[B, C, H/0, W]", "H/0", "divides by zero"),
]


@pytest.mark.parametrize("shape, anchor, fragment", BAD, ids=[b[0] for b in BAD])
def test_a_mistake_in_a_declared_size_is_one_positioned_shape_error(shape, anchor, fragment):
    text = HEAD + f"  state s : {shape}\n  update s = 0.5 * s\n}}\n"
    check_one_error(text, anchor, fragment)


def test_an_unprovable_equality_is_an_error_at_the_use():
    text = HEAD + "  input y : [B, C, K, W]\n  state s : [B, C, H/2, W]\n  update s = 0.5 * s + y\n}\n"
    check_one_error(text, "0.5 * s + y", "H/2 vs K in dimension -2")


def test_an_input_size_computed_from_symbols_needs_each_symbol_as_a_whole_dimension():
    text = "layer L {\n  input x : [B, T*D]\n  state s : [B, 3]\n  update s = 0.5 * s\n}\n"
    check_one_error(text, "T*D", "uses D, which no input has as a whole dimension")
    ok = "layer L {\n  input x : [B, T*D]\n  input t : [T, D]\n  state s : [B, T*D]\n  update s = 0.5 * s + x\n}\n"
    assert str(graph(ok).states["s"].shape[1]) == "D*T"


def test_a_reshape_target_divided_by_a_symbol_is_a_positioned_error():
    text = HEAD + "  state s : [B, C, H, W]\n  update s = 0.5 * s + reshape(x, [B, C, H/K, -1])\n}\n"
    check_one_error(text, "K, -1", "a size may be divided only by a positive number")


def test_fmt_and_unparse_round_trip_symbolic_sizes():
    text = "layer L {\n  input x : [B, T, D]\n  state s : [B, T*D+1, (T + 1)//2, T/2 - 1]\n}\n"
    formatted = format_source(Source(PATH, text))
    assert "state s : [B, T * D + 1, (T + 1) // 2, T / 2 - 1]" in formatted
    shape = parse_fpi(Source(PATH, text)).layers[0].decls[1].shape
    again = parse_fpi(Source(PATH, formatted)).layers[0].decls[1].shape
    assert unparse_shape(shape) == "[B, T * D + 1, (T + 1) // 2, T / 2 - 1]"
    assert strip_spans(again) == strip_spans(shape)


def test_the_runtime_reads_every_size_as_the_compiler_prints_it():
    from fpidsl.runtime.sizes import size

    third = dim_exact_div(dim_mul(2, dim_mul("H", "W")), 3, ShapeCtx())
    dims = [7, "H", HALF_H, third, dim_sub(dim_add(third, HALF_H), 5), dim_sub(1, dim_mul("T", "T")),
            dim_exact_div(dim_add(dim_mul("C", "H"), 6), 3, ShapeCtx())]
    for sizes in ({"H": 6, "W": 9, "T": 2, "C": 3}, {"H": 5, "W": 4, "T": 1, "C": 7}):
        for d in dims:
            written = d if isinstance(d, int) else str(d)
            assert size(written, sizes) == dim_value(d, sizes), (written, sizes)


def test_the_graph_interpreter_binds_symbolic_reshape_sizes():
    import torch
    import torch.nn.functional as F

    from fpidsl.ir.interpret import evaluate

    g = graph(TWO_SCALE)
    x, s = torch.randn(2, 3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 2, 3, dtype=torch.float64)
    got = evaluate(g, {"x": x, "s": s})[g.states["s"].update]
    torch.testing.assert_close(got, 0.5 * s + F.avg_pool2d(x, 2), rtol=1e-12, atol=1e-12)
