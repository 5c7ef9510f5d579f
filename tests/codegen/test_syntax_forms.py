"""Issue 13's new syntax in compiled layers: comparisons (0/1 masks), ``None`` index items (new size-1 dims) and
``//`` on numbers. A small layer using each form checks, compiles and loads; its fixed point and its first and second
derivatives match autograd through the unrolled iteration of its own map (float64); gradcheck and gradgradcheck
pass on the compiled layer. Mistakes are one positioned error."""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.compiler import check_file, check_source
from fpidsl.errors import FpiError, FpiErrors, ShapeErr, SyntaxErr, TypeErr
from fpidsl.source import Source

from ..runtime.helpers import derivatives
from .helpers import ONE_STATE_SPEC, TIGHT, UNROLL, assert_body_matches_unrolled_autograd, the_one_error

BODIES = {
    "greater-as-where-condition": "where(h > 0, h, 0.5 * h)",
    "masks-in-arithmetic": "h * (a >= 0) + (h < 0.1) * 0.3 * h",
    "equal-and-not-equal": "h * (sign(a) == 1) + h * (sign(a) != 1) * 0.5",
    "number-on-the-left": "(0 <= a) * h + 0.5 * h",
    "mask-of-the-state": "h * (x > 0) + 0.2 * h",
    "none-items": "sum(h[:, None] * sigmoid(a)[:, :, None], dim=1)",
    "none-before-the-batch": "h + sum(h[None], dim=0) * 0.5",
    "none-with-ellipsis": "sum(h[..., None] * h[:, None, :], dim=1) * 0.3 + h",
    "floordiv-of-numbers": "reshape(reshape(h, [B, 8 // 4, 5 // 2]), [B, 4])",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BODIES))
def test_a_layer_with_the_form_matches_unrolled_autograd(name, tmp_path):
    assert_body_matches_unrolled_autograd(BODIES[name], tmp_path)


def test_a_comparison_is_a_float_mask_with_no_gradient(tmp_path):
    spec = tmp_path / "mask.fpi"
    spec.write_text("""
layer M {
  input a : [B, 3]
  state x : [B, 3] = zeros
  update x = 0.5 * x + (a > 0.25) - (a <= -0.5) + 2 * (a == 0) + 3 * (a != a)
}
""")
    layer = fpidsl.load(spec)(solve=TIGHT).double()
    a = torch.tensor([[0.3, -0.7, 0.0], [0.25, -0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    out = layer(a)
    assert out.dtype == torch.float64
    want = 2 * ((a > 0.25).double() - (a <= -0.5).double() + 2 * (a == 0).double())
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.sum(), a, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0


def test_comparisons_and_floordiv_of_numbers_fold_at_compile_time(tmp_path):
    spec = tmp_path / "fold.fpi"
    spec.write_text("""
layer F {
  input a : [B, 6]
  const C = 6
  const G = 4
  const K = C // G + (C > G) + (C == 6) * 10 + (7 // -2)
  state x : [B, 6] = zeros
  update x = 0.5 * x + K * a
}
""")
    layer = fpidsl.load(spec)(solve=TIGHT).double()
    a = torch.ones(2, 6, dtype=torch.float64)
    # K = 1 + 1 + 10 - 4 = 8; the fixed point of x = x/2 + 8a is 16a
    torch.testing.assert_close(layer(a), 16 * a, rtol=1e-12, atol=1e-12)


def _error(body: str):
    text = ONE_STATE_SPEC.format(body=body)
    return the_one_error(text), text


BAD = [
    # (body, error kind, the text the error points at, a fragment of its message)
    ("h // 2", TypeErr, "h // 2", "`//` is integer division of numbers and consts"),
    ("h > 0 > a", SyntaxErr, "> a", "comparisons do not chain"),
    ("h * (h > reshape(h, [B, 2, 2]))", ShapeErr, "h > reshape", "which do not broadcast"),
    ("h[:, None, None, 0, 1]", ShapeErr, None, "too many indices"),
    ("h[:, None] + reshape(h, [B, 2, 2])", ShapeErr, "h[:, None] +", "which do not broadcast"),
    ("h * (1 // 0)", TypeErr, "1 // 0", "division by zero"),
    ("reshape(reshape(h, [B, 8 / 4, 2]), [B, 4])", TypeErr, "8 / 4", "`//` divides integers"),
    ("fc.weight @ h", SyntaxErr, ".weight", "attribute access ('.weight')"),
    ("reshape(h, [B, 2, 2]).T", SyntaxErr, ".T", "use transpose(x, 0, 1)"),
    ("h.T", SyntaxErr, ".T", "use transpose(h, 0, 1)"),
    ("h.sum(dim=1)", SyntaxErr, ".sum", "use sum(h, dim=...)"),
]


@pytest.mark.parametrize("body, kind, at, fragment", BAD, ids=[b for b, *_ in BAD])
def test_mistakes_with_the_new_forms_are_one_positioned_error(body, kind, at, fragment):
    error, text = _error(body)
    assert isinstance(error, kind), error
    assert fragment in f"{error.message} {error.hint}", (error.message, error.hint)
    assert error.span.line == 7, error.span  # the update line of _spec
    line = text.splitlines()[error.span.line - 1]
    if at is not None:  # the first occurrence of `at` in the body
        assert error.span.col - 1 == line.index(at, line.index(body)), (error.span, at)


# --------------------------------------------------------------------------- declared shapes with arithmetic

SHAPED = """
layer S {
  const C = 6
  const G = 3
  input a : [B, C // G * 2]
  state x : [B, G, C / G + 0] = zeros
  param W : tensor [(C + G) // 2 + 2, C - 2 + 2] = normal(0, 0.3)
  let h = reshape(x, [B, C]) @ W
  update x = 0.5 * tanh(reshape(h + cat([a, a[:, 0:2]], dim=-1), [B, G, C // G]))
}
"""


def test_declared_shapes_with_arithmetic_of_consts_compile_and_match_unrolled_autograd(tmp_path):
    spec = tmp_path / "shaped.fpi"
    spec.write_text(SHAPED)
    cls = fpidsl.load(spec)
    torch.manual_seed(0)
    layer = cls(solve=TIGHT, backward=TIGHT).double()
    assert tuple(layer.W.shape) == (6, 6)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def unrolled():
        x = torch.zeros(3, 3, 2, dtype=torch.float64)
        for _ in range(UNROLL):
            x = type(layer).step(x, a, *layer.parameter_tensors())
        return x

    torch.testing.assert_close(layer(a), unrolled(), rtol=1e-10, atol=1e-12)
    params = [a, *layer.parameters()]
    weight = torch.randn(3, 3, 2, dtype=torch.float64)
    got = derivatives(lambda: (weight * layer(a)).sum(), params, order=2)
    want = derivatives(lambda: (weight * unrolled()).sum(), params, order=2)
    for g_order, w_order in zip(got, want):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)
    small = a[:2].detach().requires_grad_()
    assert torch.autograd.gradcheck(layer, (small,))
    assert torch.autograd.gradgradcheck(layer, (small,))


SHAPE_HEAD = "layer L {\n  const C = 6\n  input a : [B, H]\n"

BAD_SHAPES = [
    # (declaration, error kind, column, a fragment of the message)
    ("state x : [B, H/2] = zeros", None, None, None),  # symbolic arithmetic: tests/ir/test_shape_arithmetic.py
    ("state x : [B, H/B] = zeros", ShapeErr, 19, "a size may be divided only by a positive number"),
    ("state x : [B, C / 4] = zeros", ShapeErr, 17, "is not a whole number: 6 / 4 = 1.5"),
    ("state x : [B, C - 6] = zeros", ShapeErr, 17, "the dimension C - 6 of state x is 0"),
    ("state x : [B, C - 7 + 2] = zeros", None, None, None),  # only the whole dimension must be positive
    ("state x : [B, (C + 1) // 0] = zeros", ShapeErr, 17, "divides by zero"),
    ("param w : tensor [C * T] = ones", ShapeErr, 25, "its dimension T is symbolic"),
    ("state x : [B, C ** 2] = zeros", SyntaxErr, 20, "expected a name or an integer, found '*'"),
    ("state x : [B, 9223372036854775807 * 2] = zeros", ShapeErr, 17, "does not fit in 64 bits"),
]


@pytest.mark.parametrize("decl, kind, col, fragment", BAD_SHAPES, ids=[d for d, *_ in BAD_SHAPES])
def test_mistakes_in_declared_shape_arithmetic_are_one_positioned_error(decl, kind, col, fragment):
    update = "  update x = 0.5 * x\n" if decl.startswith("state x") else ""
    text = SHAPE_HEAD + f"  {decl}\n  state y : [B, H] = zeros\n{update}  update y = tanh(a)\n}}\n"
    if kind is None:
        check_source(Source("ok.fpi", text))
        return
    with pytest.raises((FpiError, FpiErrors)) as info:
        check_source(Source("bad.fpi", text))
    errors = info.value.errors if isinstance(info.value, FpiErrors) else [info.value]
    assert len(errors) == 1, errors
    error = errors[0]
    assert isinstance(error, kind), error
    assert fragment in error.message, error.message
    assert (error.span.line, error.span.col) == (4, col), error.span


def test_the_yaml_form_takes_the_same_arithmetic(tmp_path):
    spec = tmp_path / "shaped.yaml"
    spec.write_text(
        "fpi: 1\nlayers:\n  Y:\n    inputs:\n      a: [B, 4]\n    consts:\n      C: 6\n"
        "    states:\n      x: {shape: [B, \"C // 3 + 2\"], init: zeros}\n"
        "      y: {shape: \"[B, C / 3 * 2]\", init: zeros}\n"
        "    updates:\n      x: \"0.5 * tanh(x + a) * (a > 0)\"\n      y: \"0.5 * y + x[:, None][:, 0] * (x >= 0)\"\n"
    )
    layer = fpidsl.load(spec)(solve=TIGHT).double()
    a = torch.randn(2, 4, dtype=torch.float64)
    x, y = layer(a)
    assert x.shape == y.shape == (2, 4)
    torch.testing.assert_close(y, 2 * x * (x >= 0), rtol=1e-10, atol=1e-12)
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace('"C // 3 + 2"', '"C / 4"'))
    with pytest.raises((FpiError, FpiErrors)) as info:
        check_file(str(bad))
    errors = info.value.errors if isinstance(info.value, FpiErrors) else [info.value]
    assert len(errors) == 1 and isinstance(errors[0], ShapeErr), errors
    assert (errors[0].span.line, errors[0].span.col) == (9, 23), errors[0].span  # the C inside the quotes


@pytest.mark.parametrize("module", ["Lineer(8, 4)", "Linear(8)", "Linear(8, 4, norm=spectal)"])
def test_a_failed_module_declaration_is_one_error_however_often_the_module_is_called(module):
    text = ("layer L {\n  input a : [B, 4]\n  state x : [B, 4] = zeros\n"
            f"  param fc : {module}\n  let h = fc(cat([x, a], dim=-1))\n  update x = tanh(fc(h) + h)\n}}\n")
    with pytest.raises((FpiError, FpiErrors)) as info:
        check_source(Source("bad.fpi", text))
    errors = info.value.errors if isinstance(info.value, FpiErrors) else [info.value]
    assert len(errors) == 1, errors
    assert errors[0].span.line == 4, errors[0].span
