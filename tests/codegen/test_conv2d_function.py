"""``conv2d(x, W, b, stride=, padding=)`` with tensor params (torch's ``F.conv2d``): the fixed point against the
map written with F.conv2d, derivatives in the input and both weights by gradcheck and gradgradcheck (float64), and
a wrong weight, bias, stride or padding as one positioned error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpidsl.errors import ShapeErr

from .helpers import the_one_error, tight_layer

SPEC = """
layer FConv {
  input a : [B, 2, 6, 6]
  state x : [B, 2, 6, 6]
  param W : tensor [2, 2, 3, 3] = normal(0, 0.15)
  param b : tensor [2] = normal(0, 0.1)
  param D : tensor [2, 2, 3, 3] = normal(0, 0.15)
  let injected = interpolate(conv2d(a, D, stride=[2, 2], padding=[1, 1]), scale_factor=2)
  update x = 0.5 * tanh(conv2d(x, W, b, padding=[1, 1]) + injected) + a
}
"""


def _map(x, a, W, b, D):
    injected = F.interpolate(F.conv2d(a, D, stride=2, padding=1), scale_factor=2)
    return 0.5 * torch.tanh(F.conv2d(x, W, b, padding=1) + injected) + a


@pytest.fixture
def layer(tmp_path):
    return tight_layer(tmp_path, "fconv.fpi", SPEC)


def test_the_fixed_point_is_that_of_the_map_written_with_f_conv2d(layer):
    a = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = layer(a)
    torch.testing.assert_close(x, _map(x, a, layer.W, layer.b, layer.D), rtol=0, atol=1e-12)
    y = torch.zeros_like(a)
    for _ in range(300):
        y = _map(y, a, layer.W, layer.b, layer.D)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-11)


def test_derivatives_in_the_input_and_the_weights_pass_gradcheck_and_gradgradcheck(layer):
    a = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    W, b, D = (p.detach().clone().requires_grad_() for p in (layer.W, layer.b, layer.D))

    def solve(a, W, b, D):
        return torch.func.functional_call(layer, {"W": W, "b": b, "D": D}, (a,))

    assert torch.autograd.gradcheck(solve, (a, W, b, D))
    assert torch.autograd.gradgradcheck(solve, (a, W, b, D))


HEAD = """layer L {
  input a : [B, 2, 6, 6]
  state x : [B, 2, 6, 6]
  param W : tensor [2, 2, 3, 3] = zeros
  param W3 : tensor [2, 2, 3] = zeros
  param b3 : tensor [3] = zeros
"""

BAD = [
    # (body, line, col, fragment)
    ("conv2d(x, W3, padding=[1, 1])", 7, 24, "conv2d expects a 4-D weight, but its weight has shape [2, 2, 3]"),
    ("conv2d(x, W, b3, padding=[1, 1])", 7, 27, "conv2d expects a bias of shape [2] (its output channels)"),
    ("conv2d(x, W, padding=[1, 1], stride=0)", 7, 50, "conv2d needs a stride of at least 1, found [0, 0]"),
    ("conv2d(x, W, padding=[-1, 1])", 7, 35, "conv2d needs a padding of at least 0, found [-1, 1]"),
    ("conv2d(a[:, 0:1], W, padding=[1, 1])", 7, 14, "conv2d expects 2 input channels, but its argument has shape"),
]


@pytest.mark.parametrize("call, line, col, fragment", BAD, ids=[b[0] for b in BAD])
def test_a_wrong_weight_bias_stride_or_padding_is_one_positioned_error(call, line, col, fragment):
    error = the_one_error(HEAD + f"  update x = {call} + a\n}}\n")
    assert isinstance(error, ShapeErr), error
    assert (error.span.line, error.span.col) == (line, col), error
    assert fragment in error.message, error.message
