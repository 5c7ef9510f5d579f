"""MultiheadAttention(dim, heads, bias=true), lowered to einsum and softmax: the same numbers as
torch.nn.MultiheadAttention (batch first) with the same weights, with and without an additive mask; its state_dict
names are torch's; the fixed point and its first and second derivatives match unrolled autograd."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpidsl

from .helpers import assert_matches_unrolled_autograd, the_one_error, tight_layer

SPEC = """
layer Att {{
  input a : [B, 5, 8]
  state x : [B, 5, 8] = zeros
  param attn : MultiheadAttention(8, 2{options})
  update x = 0.5 * tanh(attn({call}))
}}
"""
CAUSAL = "-1e9 * triu(ones([5, 5]), diagonal=1)"


def load(tmp_path, call: str = "x, a, a", options: str = ""):
    return tight_layer(tmp_path, "att.fpi", SPEC.format(call=call, options=options))


@pytest.mark.parametrize("call, options, torch_mask", [
    ("x, a, a", "", None),
    ("x, x, a", ", bias=false", None),
    (f"x, a, a, mask={CAUSAL}", "", torch.triu(torch.full((5, 5), -1e9, dtype=torch.float64), diagonal=1)),
    (f"a, x, x, mask={CAUSAL}", "", torch.triu(torch.ones(5, 5), diagonal=1).bool()),  # torch's bool form
])
def test_one_step_is_torch_multihead_attention(tmp_path, call, options, torch_mask):
    layer = load(tmp_path, call, options)
    assert isinstance(layer.attn, nn.MultiheadAttention) and layer.attn.batch_first
    x, a = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    got = type(layer).step(x, a, *layer.parameter_tensors())
    q, k, v = ({"x": x, "a": a}[n.strip()] for n in call.split("mask")[0].split(",")[:3])
    want = 0.5 * torch.tanh(layer.attn(q, k, v, attn_mask=torch_mask, need_weights=False)[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_bool_input_mask_is_torch_s_bool_attn_mask(tmp_path):
    path = tmp_path / "attb.fpi"
    path.write_text(SPEC.format(call="x, a, a, mask=m", options="").replace(
        "input a : [B, 5, 8]", "input a : [B, 5, 8]\n  input m : bool [5, 5]"))
    torch.manual_seed(0)
    layer = fpidsl.load(path)().double()
    x, a = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    m = torch.rand(5, 5) < 0.3
    m.fill_diagonal_(False)  # every query sees at least itself
    got = type(layer).step(x, a, m, *layer.parameter_tensors())
    want = 0.5 * torch.tanh(layer.attn(x, a, a, attn_mask=m, need_weights=False)[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_state_dict_names_are_torch_s(tmp_path):
    layer = load(tmp_path)
    names = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    assert list(layer.state_dict()) == names
    torch_attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
    layer.attn.load_state_dict(torch_attn.state_dict())
    assert list(load(tmp_path, options=", bias=false").state_dict()) == ["attn.in_proj_weight", "attn.out_proj.weight"]


@pytest.mark.slow  # about 5 s
def test_the_fixed_point_and_its_derivatives_match_unrolled_autograd(tmp_path):
    layer = load(tmp_path, f"x, a, a, mask={CAUSAL}")
    assert type(layer).SAMPLEWISE
    assert_matches_unrolled_autograd(layer, 0.5 * torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("options, call, line, col, fragment", [
    (", 3", "x, a, a", 5, 38, "MultiheadAttention: dim 8 cannot be split into 3 heads"),
    ("", "x, a", 6, 25, "attn is a MultiheadAttention(8, 2) module: it takes q, k, v and an optional mask"),
    ("", "x, a, a, weights=a", 6, 39, "it takes q, k, v and an optional mask"),
])
def test_mistakes_are_positioned(options, call, line, col, fragment):
    text = SPEC.format(call=call, options="").replace("MultiheadAttention(8, 2)", f"MultiheadAttention(8{options or ', 2'})")
    error = the_one_error(text)
    assert (error.span.line, error.span.col) == (line, col)
    assert fragment in error.message
