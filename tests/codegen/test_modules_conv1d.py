"""Conv1d(in, out, kernel, stride=1, padding=0, bias=true), lowered to conv2d of a size-1 height: torch's nn.Conv1d
with its parameter names, the same numbers, derivatives against unrolled autograd; norm=weight (torch's weight_norm
parametrization) beside norm=spectral, for Linear and the convolutions."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fpidsl

from .helpers import assert_matches_unrolled_autograd, the_one_error, tight_layer

SPEC = """
layer C1 {{
  input a : [B, 2, 7]
  state x : [B, 2, 7] = zeros
  param c : Conv1d(4, 3, 3, padding=1{norm})
  param d : Conv1d(3, 2, 3, stride={stride}, padding={padding}, bias=false)
  update x = 0.5 * tanh({body})
}}
"""


def load(tmp_path, norm: str = "", stride: int = 1, padding: int = 1, body: str = "d(tanh(c(cat([x, a], dim=1))))"):
    return tight_layer(tmp_path, "c1.fpi", SPEC.format(norm=norm, stride=stride, padding=padding, body=body))


def test_conv1d_is_torch_s(tmp_path):
    layer = load(tmp_path)
    assert isinstance(layer.c, nn.Conv1d) and layer.c.weight.shape == (3, 4, 3)
    assert list(layer.state_dict()) == ["c.weight", "c.bias", "d.weight"]
    x, a = torch.randn(2, 3, 2, 7, dtype=torch.float64)
    got = type(layer).step(x, a, *layer.parameter_tensors())
    torch.testing.assert_close(got, 0.5 * torch.tanh(layer.d(torch.tanh(layer.c(torch.cat([x, a], 1))))),
                               rtol=1e-12, atol=1e-13)


def test_a_strided_conv1d_has_torch_s_output_size(tmp_path):
    layer = load(tmp_path, stride=2, padding=0, body="0 * x + sum(d(c(cat([x, a], dim=1))), dim=-1, keepdim=true)")
    x, a = torch.randn(2, 3, 2, 7, dtype=torch.float64)
    want = layer.d(layer.c(torch.cat([x, a], 1)))  # [3, 2, 3]: (7 - 3) // 2 + 1
    assert want.shape[-1] == 3
    got = type(layer).step(x, a, *layer.parameter_tensors())
    torch.testing.assert_close(got, 0.5 * torch.tanh(0 * x + want.sum(-1, keepdim=True)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("norm", ["", ", norm=weight"])
def test_derivatives_match_unrolled_autograd(tmp_path, norm):
    layer = load(tmp_path, norm)
    assert parametrize.is_parametrized(layer.c) == bool(norm)
    assert_matches_unrolled_autograd(layer, torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True))


def test_weight_norm_is_torch_s_parametrization(tmp_path):
    path = tmp_path / "wn.fpi"
    path.write_text("layer W {\n  input a : [B, 4]\n  state x : [B, 4]\n  param fc : Linear(8, 4, norm=weight)\n"
                    "  update x = 0.5 * tanh(fc(cat([x, a], dim=-1)))\n}\n")
    layer = fpidsl.load(path)()
    assert list(layer.state_dict()) == ["fc.bias", "fc.parametrizations.weight.original0",
                                        "fc.parametrizations.weight.original1"]
    g, v = layer.fc.parametrizations.weight.original0, layer.fc.parametrizations.weight.original1
    torch.testing.assert_close(layer.fc.weight, g * v / v.norm(dim=1, keepdim=True))


def test_mistakes():
    error = the_one_error(SPEC.format(norm=", norm=weights", stride=1, padding=1, body="d(c(cat([x, a], dim=1)))"))
    assert (error.span.line, error.span.col) == (5, 45)
    assert "unknown norm weights" in error.message and "weight" in error.hint
    error = the_one_error(SPEC.format(norm="", stride=0, padding=1, body="d(c(cat([x, a], dim=1)))"))
    assert "stride must be at least 1, found 0" in error.message
