"""Operations that return a tuple in a traced map (issue 18): ``torch.split`` / ``torch.chunk`` / ``unbind`` become
index slices, ``nn.MultiheadAttention``'s output its ``MultiheadAttention`` module, an element with no primitive
(the attention weights) an extern; a tuple used whole is refused, saying so."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpidsl
import fpidsl.tracing
from fpidsl.tracing import UntraceableError, trace_map

from tests.runtime.helpers import assert_trace_agrees

DT = torch.float64


def _split_map():
    torch.manual_seed(0)
    z = torch.randn(4, 6, dtype=DT, requires_grad=True)
    w = (0.3 * torch.randn(6, 6, dtype=DT)).requires_grad_()

    def f(x, z):
        a, b = torch.split(x, [2, 4], dim=1)
        c = x.chunk(3, -1)
        rows = x.unbind(1)
        return torch.tanh(torch.cat([b * 0.5, a.sin()], 1) @ w + c[1].sum(1, keepdim=True) * 0.1
                          + 0.2 * rows[-1].unsqueeze(1) + z)
    return f, z, w


def test_split_chunk_unbind_are_slices_and_agree():
    f, z, w = _split_map()
    x0 = torch.zeros_like(z)
    text = trace_map(f, x0, (z,), externs=False).spec.text
    assert "x[:, 0:2]" in text and "x[:, 2:6]" in text and "x[:, 2:4]" in text and "x[:, 5]" in text
    traced, why = fpidsl.tracing.trace_status(f, x0, z)
    assert traced is not None and why.startswith("traced:"), why
    assert_trace_agrees(f, x0, (z,), (z, w), atol_x=1e-10, atol_g=1e-9, tol=1e-12)


def _attention(need_weights_used: bool):
    torch.manual_seed(1)
    attn = nn.MultiheadAttention(6, 2, batch_first=True).to(DT)
    with torch.no_grad():
        attn.in_proj_weight.mul_(0.3)
        attn.out_proj.weight.mul_(0.3)
    z = torch.randn(2, 5, 6, dtype=DT, requires_grad=True)

    def f(x, z):
        out, weights = attn(x, x, x)
        extra = weights.mean(-1, keepdim=True) if need_weights_used else 0.0
        return torch.tanh(0.5 * out + z + extra)
    return f, attn, z


def test_multihead_attention_self_attention_is_the_module_and_agrees():
    f, attn, z = _attention(False)
    x0 = torch.zeros_like(z)
    spec = trace_map(f, x0, (z,), externs=False).spec
    assert "MultiheadAttention(6, 2)" in spec.text and "att" in spec.text and not spec.externs
    traced, why = fpidsl.tracing.trace_status(f, x0, z)
    assert traced is not None and why.startswith("traced:"), why
    assert_trace_agrees(f, x0, (z,), (z, attn.in_proj_weight, attn.out_proj.weight), atol_x=1e-10, atol_g=1e-9,
                        tol=1e-12)


def test_attention_with_a_float_causal_mask_is_the_module_with_mask():
    f0, attn, z = _attention(False)
    t = z.shape[1]

    def f(x, z):
        mask = torch.triu(torch.full((t, t), -1e9, dtype=x.dtype), diagonal=1)
        out = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return torch.tanh(0.5 * out + z)
    x0 = torch.zeros_like(z)
    spec = trace_map(f, x0, (z,), externs=False).spec
    assert "mask=" in spec.text and not spec.externs
    assert_trace_agrees(f, x0, (z,), (z, attn.in_proj_weight), atol_x=1e-10, atol_g=1e-9, tol=1e-12)


def test_attention_weights_used_are_an_extern_and_agree():
    f, attn, z = _attention(True)
    x0 = torch.zeros_like(z)
    spec = trace_map(f, x0, (z,)).spec
    assert "MultiheadAttention(6, 2)" in spec.text and len(spec.externs) == 1
    assert next(iter(spec.externs.values())).item == 1
    traced, why = fpidsl.tracing.trace_status(f, x0, z)
    assert traced is not None and why.startswith("traced:"), why
    assert_trace_agrees(f, x0, (z,), (z, attn.in_proj_weight), atol_x=1e-10, atol_g=1e-9, tol=1e-12)


def test_tuple_used_whole_is_refused_plainly():
    z = torch.randn(4, 6, dtype=DT)

    def f(x, z):
        parts = torch.split(x, 3, 1)
        return torch.tanh(0.5 * torch.cat(parts, 1) + z)
    with pytest.raises(UntraceableError) as info:
        trace_map(f, torch.zeros_like(z), (z,))
    message = str(info.value)
    assert "returns a tuple of 2, and the map uses the tuple whole (torch.cat)" in message
    assert "Python value" not in message and "test_trace_tuples.py:" in message
    traced, why = fpidsl.tracing.trace_status(f, torch.zeros_like(z), z)
    assert traced is None and "uses the tuple whole" in why
