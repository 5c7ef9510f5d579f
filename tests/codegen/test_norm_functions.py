"""``group_norm(x, groups, W, b, eps=)`` and ``layer_norm(x, shape, W, b, eps=)`` with tensor params (torch's
``F.group_norm`` and ``F.layer_norm``; the modules GroupNorm and LayerNorm lower to the same primitives): the fixed
point against the map written with the torch functions, derivatives in the input and every weight by gradcheck and
gradgradcheck (float64), and a wrong weight, bias, groups, shape or eps as one positioned error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fpidsl
from fpidsl.errors import ShapeErr, TypeErr

from .helpers import TIGHT, the_one_error, tight_layer

SPEC = """
layer FNorm {
  input a : [B, 4, 3, 3]
  state x : [B, 4, 3, 3]
  param gw : tensor [4] = normal(1, 0.3)
  param gb : tensor [4] = normal(0, 0.1)
  param lw : tensor [3, 3] = normal(1, 0.3)
  param lb : tensor [3, 3] = normal(0, 0.1)
  param lv : tensor [3] = normal(1, 0.3)
  let g = group_norm(0.3 * x + a, 2, gw, gb)
  let l = layer_norm(a - 0.3 * x, [3, 3], lw, lb, eps=1e-3)
  let plain = group_norm(a + 0.2 * x, 4, eps=1e-2) + layer_norm(x + a, [3], lv)
  update x = 0.3 * tanh(g + l + 0.1 * plain) + 0.3 * a
}
"""
NAMES = ("gw", "gb", "lw", "lb", "lv")


def _map(x, a, gw, gb, lw, lb, lv):
    g = F.group_norm(0.3 * x + a, 2, gw, gb)
    l = F.layer_norm(a - 0.3 * x, (3, 3), lw, lb, eps=1e-3)  # noqa: E741
    plain = F.group_norm(a + 0.2 * x, 4, eps=1e-2) + F.layer_norm(x + a, (3,), lv)
    return 0.3 * torch.tanh(g + l + 0.1 * plain) + 0.3 * a


@pytest.fixture
def layer(tmp_path):
    return tight_layer(tmp_path, "fnorm.fpi", SPEC)


def test_the_fixed_point_is_that_of_the_map_written_with_the_torch_functions(layer):
    a = torch.randn(3, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = layer(a)
    weights = [getattr(layer, n) for n in NAMES]
    torch.testing.assert_close(x, _map(x, a, *weights), rtol=0, atol=1e-12)
    y = torch.zeros_like(a)
    for _ in range(300):
        y = _map(y, a, *weights)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


def test_derivatives_in_the_input_and_the_weights_pass_gradcheck_and_gradgradcheck(layer):
    a = torch.randn(1, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in NAMES)

    def solve(a, *weights):
        return torch.func.functional_call(layer, dict(zip(NAMES, weights)), (a,))

    assert torch.autograd.gradcheck(solve, (a, *weights))
    assert torch.autograd.gradgradcheck(solve, (a, *weights))


def test_group_norm_runs_on_symbolic_spatial_sizes(tmp_path):
    path = tmp_path / "gn.fpi"
    path.write_text("""
layer G {
  input a : [B, 4, H, W]
  state x : [B, 4, H, W]
  param gw : tensor [4] = normal(1, 0.3)
  update x = 0.3 * tanh(group_norm(0.3 * x + a, 2, gw)) + 0.3 * a
}
""")
    layer = fpidsl.load(path)(solve=TIGHT).double()
    a = torch.randn(2, 4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = layer(a)
    torch.testing.assert_close(x, 0.3 * torch.tanh(F.group_norm(0.3 * x + a, 2, layer.gw)) + 0.3 * a,
                               rtol=0, atol=1e-12)


HEAD = """layer L {
  input a : [B, 4, 3, 3]
  state x : [B, 4, 3, 3]
  param g4 : tensor [4] = ones
  param g3 : tensor [3] = ones
  param w33 : tensor [3, 3] = ones
  param w3 : tensor [3] = ones
"""

BAD = [
    # (call, kind, line, col, fragment)
    ("group_norm(x, 2, g3)", ShapeErr, 8, 31, "group_norm expects its weight of shape [4], found [3]"),
    ("group_norm(x, 2, g4, g3)", ShapeErr, 8, 35, "group_norm expects its bias of shape [4], found [3]"),
    ("group_norm(x, 3, g4)", ShapeErr, 8, 28, "group_norm: 4 channels cannot be split into 3 groups"),
    ("group_norm(x, 0)", ShapeErr, 8, 28, "group_norm: 4 channels cannot be split into 0 groups"),
    ("group_norm(x, 2, eps=0)", ShapeErr, 8, 35, "group_norm needs an eps above 0, found 0"),
    ("group_norm(x, 2, g4, g4, -1e-3)", ShapeErr, 8, 39, "group_norm needs an eps above 0, found -0.001"),
    ("group_norm(x[:, 0:3], 3, g4)", ShapeErr, 8, 39, "group_norm expects its weight of shape [3], found [4]"),
    ("group_norm(x, 2, bias=g4)", TypeErr, 8, 36, "group_norm takes bias only together with weight"),
    ("group_norm(x, 2, channels=4)", TypeErr, 8, 31, "group_norm has no argument channels"),
    ("layer_norm(x, [3, 3], w3)", ShapeErr, 8, 36, "layer_norm expects its weight of shape [3, 3], found [3]"),
    ("layer_norm(x, [3, 3], w33, w3)", ShapeErr, 8, 41, "layer_norm expects its bias of shape [3, 3], found [3]"),
    ("layer_norm(x, [3, 4])", ShapeErr, 8, 14, "layer_norm normalizes over trailing dimensions [3, 4], but its"),
    ("layer_norm(x, [3, 3], eps=0.0)", ShapeErr, 8, 40, "layer_norm needs an eps above 0, found 0.0"),
    ("layer_norm(x, [0])", ShapeErr, 8, 28, "normalizes over trailing dimensions of known positive sizes, found [0]"),
    ("layer_norm(x, [])", ShapeErr, 8, 28, "normalizes over trailing dimensions of known positive sizes, found []"),
    ("layer_norm(x, [3, 3], bias=w33)", TypeErr, 8, 41, "layer_norm takes bias only together with weight"),
    ("layer_norm(x, 3)", TypeErr, 8, 28, "shape of layer_norm must be a list of sizes"),
]


@pytest.mark.parametrize("call, kind, line, col, fragment", BAD, ids=[b[0] for b in BAD])
def test_a_wrong_weight_bias_groups_shape_or_eps_is_one_positioned_error(call, kind, line, col, fragment):
    error = the_one_error(HEAD + f"  update x = {call} + a\n}}\n")
    assert isinstance(error, kind), error
    assert (error.span.line, error.span.col) == (line, col), error
    assert fragment in error.message, error.message


def test_symbolic_sizes_of_layer_norm_are_one_positioned_error():
    error = the_one_error("""layer S {
  input a : [B, C, H, W]
  state x : [B, C, H, W]
  update x = layer_norm(x, [H, W]) + a
}
""")
    assert isinstance(error, ShapeErr), error
    assert (error.span.line, error.span.col) == (4, 28), error
    assert "known positive sizes, found [H, W]" in error.message, error.message
