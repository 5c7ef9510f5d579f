"""Issue 13's normalisation modules, GroupNorm and LayerNorm, in compiled layers: each layer checks, compiles,
loads; its fixed point and its first and second derivatives (input and every parameter, the norms' weight and
bias included) match autograd through the unrolled iteration of its own map in float64; gradcheck and
gradgradcheck pass on the compiled layer. The modules are torch's (state_dict names ``gn.weight``, ``gn.bias``),
and their mistakes are one positioned error."""
from __future__ import annotations

import pytest
import torch

import fpidsl
from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors, ShapeErr, TypeErr
from fpidsl.source import Source

from ..runtime.helpers import derivatives
from .helpers import TIGHT, UNROLL, assert_matches_unrolled_autograd, the_one_error


CONV_LAYER = """
layer N {{
  input a : [B, 4, 3, 3]
  state x : [B, 4, 3, 3] = zeros
  param c : Conv2d(8, 4, 3, padding=1, init_scale=0.4)
  param {decl}
  update x = 0.5 * tanh(0.3 * {body} + a)
}}
"""

FLAT_LAYER = """
layer N {{
  input a : [B, 6]
  state x : [B, 6] = zeros
  param fc : Linear(12, 6, init_scale=0.4)
  param {decl}
  update x = 0.5 * tanh(0.3 * {body} + a)
}}
"""

h_conv = "c(cat([x, a], dim=1))"
h_flat = "fc(cat([x, a], dim=-1))"
LAYERS = {
    "group_norm": (CONV_LAYER, "gn : GroupNorm(2, 4)", f"gn({h_conv})"),
    "group_norm-1-group": (FLAT_LAYER, "gn : GroupNorm(1, 6, eps=1e-3)", f"gn({h_flat})"),
    "group_norm-no-affine": (FLAT_LAYER, "gn : GroupNorm(6, 6, affine=false)", f"gn({h_flat})"),
    "group_norm-2d": (FLAT_LAYER, "gn : GroupNorm(3, 6)", f"gn({h_flat})"),
    "layer_norm": (FLAT_LAYER, "ln : LayerNorm(6)", f"ln({h_flat})"),
    "layer_norm-no-affine": (FLAT_LAYER, "ln : LayerNorm(6, eps=1e-4, affine=false)", f"ln({h_flat})"),
    "layer_norm-2-dims": (CONV_LAYER, "ln : LayerNorm([3, 3])", f"ln({h_conv})"),
    "layer_norm-3-dims": (CONV_LAYER, "ln : LayerNorm([4, 3, 3])", f"ln({h_conv})"),
}


def _load(tmp_path, name):
    template, decl, body = LAYERS[name]
    spec = tmp_path / "norm.fpi"
    spec.write_text(template.format(decl=decl, body=body))
    return fpidsl.load(spec)


def _perturb(layer):
    """Weights away from torch's (1, 0) start, so the affine part is exercised."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith(("gn.", "ln.")):
                p.add_(0.3 * torch.randn_like(p))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_layer_with_the_norm_matches_unrolled_autograd(name, tmp_path):
    cls = _load(tmp_path, name)
    torch.manual_seed(0)
    layer = cls(solve=TIGHT, backward=TIGHT).double()
    _perturb(layer)
    shape = (3, 4, 3, 3) if LAYERS[name][0] is CONV_LAYER else (3, 6)
    a = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert_matches_unrolled_autograd(layer, a)


def test_the_modules_are_torchs_with_torchs_state_dict_names(tmp_path):
    layer = _load(tmp_path, "group_norm")()
    assert isinstance(layer.gn, torch.nn.GroupNorm)
    assert (layer.gn.num_groups, layer.gn.num_channels, layer.gn.eps) == (2, 4, 1e-5)
    assert {"gn.weight", "gn.bias"} <= set(layer.state_dict())
    layer = _load(tmp_path, "layer_norm-2-dims")()
    assert isinstance(layer.ln, torch.nn.LayerNorm) and layer.ln.normalized_shape == (3, 3)
    assert layer.state_dict()["ln.weight"].shape == (3, 3)
    layer = _load(tmp_path, "layer_norm-no-affine")()
    assert not any(k.startswith("ln.") for k in layer.state_dict())


def test_a_loaded_torch_state_dict_is_used(tmp_path):
    """The emitted map reads the module's own tensors: weights set through torch change the output as
    torch.nn.functional.group_norm says."""
    layer = _load(tmp_path, "group_norm")(solve=TIGHT).double()
    a = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        layer.gn.weight.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
        layer.gn.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    x = layer(a)
    h = layer.c(torch.cat([x, a], dim=1))
    normed = torch.nn.functional.group_norm(h, 2, layer.gn.weight, layer.gn.bias, 1e-5)
    expected = 0.5 * torch.tanh(0.3 * normed + a)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-11)


def test_group_norm_and_layer_norm_are_per_sample_unless_normalizing_the_batch(tmp_path):
    assert _load(tmp_path, "group_norm").SAMPLEWISE
    assert _load(tmp_path, "layer_norm-3-dims").SAMPLEWISE


def _error(template: str, decl: str, body: str):
    text = template.format(decl=decl, body=body)
    return the_one_error(text), text


BAD = [
    # (template, declaration, body, kind, the line, the text the error points at, a fragment of its message)
    (CONV_LAYER, "gn : GroupNorm(3, 4)", f"gn({h_conv})", TypeErr, 6, "4)",
     "GroupNorm: 4 channels cannot be split into 3 groups"),
    (CONV_LAYER, "gn : GroupNorm(0, 4)", f"gn({h_conv})", TypeErr, 6, "0,", "groups must be a positive integer"),
    (CONV_LAYER, "gn : GroupNorm(2, 4, eps=0)", f"gn({h_conv})", TypeErr, 6, "0)", "eps must be a positive number"),
    (CONV_LAYER, "gn : GroupNorm(2, 8)", f"gn({h_conv})", ShapeErr, 7, "gn(",
     "expects 8 channels (dimension 1), but its argument has shape [B, 4, 3, 3]"),
    (FLAT_LAYER, "ln : LayerNorm(4)", f"ln({h_flat})", ShapeErr, 7, "ln(",
     "normalizes over trailing dimensions [4], but its argument has shape [B, 6]"),
    (CONV_LAYER, "ln : LayerNorm([3, 4])", f"ln({h_conv})", ShapeErr, 7, "ln(",
     "normalizes over trailing dimensions [3, 4], but its argument has shape [B, 4, 3, 3]"),
    (FLAT_LAYER, "ln : LayerNorm([6, 0])", f"ln({h_flat})", TypeErr, 6, "[6, 0]", "dims must be positive sizes"),
    (FLAT_LAYER, "ln : LayerNorm(6.5)", f"ln({h_flat})", TypeErr, 6, "6.5",
     "dims of LayerNorm must be a size or a list of sizes (positive integers), but found 6.5"),
    (FLAT_LAYER, "ln : LayerNorm(6, affine=2)", f"ln({h_flat})", TypeErr, 6, "2)",
     "affine of LayerNorm must be true or false"),
    (FLAT_LAYER, "ln : LayerNorm(6)", f"ln({h_flat}, x)", TypeErr, 7, "ln(", "it takes one argument, but 2"),
]


@pytest.mark.parametrize("template, decl, body, kind, line, at, fragment", BAD, ids=[b[1] + b[2] for b in BAD])
def test_mistakes_with_the_norms_are_one_positioned_error(template, decl, body, kind, line, at, fragment):
    error, text = _error(template, decl, body)
    assert isinstance(error, kind), error
    assert fragment in error.message, error.message
    assert error.span.line == line, error.span
    source_line = text.splitlines()[error.span.line - 1]
    start = source_line.index(decl) if line == 6 else source_line.index(body)
    assert error.span.col - 1 == source_line.index(at, start), (error.span, at, source_line)


# --------------------------------------------------------------------------- constructors

CONSTRUCTED = """
layer E {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param W : tensor [4, 4] = normal(0, 0.3)
  const n = 4
  update x = tanh(0.5 * x @ (W + 0.2 * eye(n)) + a * ones([4]) + full([1, 4], -0.1) + zeros([4]) * x)
}
"""


def _constructed(tmp_path):
    spec = tmp_path / "eye.fpi"
    spec.write_text(CONSTRUCTED)
    return fpidsl.load(spec)


def _constructed_unrolled(layer, a):
    (w,) = layer.parameter_tensors()
    x = torch.zeros_like(a)
    for _ in range(UNROLL):
        x = torch.tanh(0.5 * x @ (w + 0.2 * torch.eye(4, dtype=a.dtype)) + a - 0.1)
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_constructors_take_the_layers_dtype(dtype, tmp_path):
    """eye / zeros / ones / full are made in the dtype (and on the device) of the layer's state, so a float64
    layer and a float32 layer both run; the float64 one matches the map written by hand in torch to second
    order and passes gradcheck and gradgradcheck."""
    torch.manual_seed(0)
    layer = _constructed(tmp_path)(solve=TIGHT if dtype == torch.float64 else None,
                                   backward=TIGHT if dtype == torch.float64 else None).to(dtype)
    assert layer.SAMPLEWISE
    a = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    x = layer(a)
    assert x.dtype == dtype
    want = _constructed_unrolled(layer, a)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(x, want, **tol)
    (grad_a,) = torch.autograd.grad(x.sum(), a)
    assert grad_a.dtype == dtype
    if dtype == torch.float32:
        return
    weight = torch.randn(3, 4, dtype=dtype)
    params = [a, *layer.parameters()]
    got = derivatives(lambda: (weight * layer(a)).sum(), params, order=2)
    want = derivatives(lambda: (weight * _constructed_unrolled(layer, a)).sum(), params, order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda m: f"order {k}: {m}")
    small = a[:2].detach().requires_grad_()
    assert torch.autograd.gradcheck(layer, (small,))
    assert torch.autograd.gradgradcheck(layer, (small,))


CONSTRUCTOR_BAD = [
    # (body, the text the error points at, a fragment of its message)
    ("zeros([B, 4]) + x", "[B, 4]", "the sizes of zeros must be numbers (or consts), found B in [B, 4]"),
    ("eye(0) + x", "0", "eye(n) needs a positive size, found 0"),
    ("full([4], x) + x", "x)", "value of full must be a number"),
    ("ones([2, -1]) + x", "[2, -1]", "the sizes of ones must be positive"),
    ("eye(x, 4) + x", "4)", "eye takes 1 argument, but 2 were given"),
]


@pytest.mark.parametrize("body, at, fragment", CONSTRUCTOR_BAD, ids=[b[0] for b in CONSTRUCTOR_BAD])
def test_mistakes_with_the_constructors_are_one_positioned_error(body, at, fragment):
    text = CONSTRUCTED.replace("tanh(0.5 * x @ (W + 0.2 * eye(n)) + a * ones([4]) + full([1, 4], -0.1) + "
                               "zeros([4]) * x)", f"tanh({body} + a)")
    with pytest.raises((FpiError, FpiErrors)) as info:
        check_source(Source("bad.fpi", text))
    errors = info.value.errors if isinstance(info.value, FpiErrors) else [info.value]
    assert len(errors) == 1, errors
    error = errors[0]
    assert fragment in error.message, error.message
    line = text.splitlines()[error.span.line - 1]
    assert error.span.line == 7 and error.span.col - 1 == line.index(at, line.index(body)), (error.span, line)


def test_fmt_keeps_the_norms_and_constructors():
    """`fpidsl fmt` lays the new forms out unchanged (they are ordinary calls) and its output checks."""
    from fpidsl.tools.fmt import format_source

    for name in ("group_norm-no-affine", "layer_norm-2-dims"):
        template, decl, body = LAYERS[name]
        text = format_source(Source("n.fpi", template.format(decl=decl, body=body)))
        assert decl in text and body in text
        assert format_source(Source("n.fpi", text)) == text
        check_source(Source("n.fpi", text))
    text = format_source(Source("e.fpi", CONSTRUCTED))
    assert "eye(n)" in text and "full([1, 4], -0.1)" in text and format_source(Source("e.fpi", text)) == text
