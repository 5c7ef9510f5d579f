"""torch 2.13's faulty derivatives of layer_norm / group_norm with a bias, worked around where fpidsl evaluates a
map to differentiate it (fpidsl/runtime/torch_faults.py): second derivatives through a map with a bias and no weight
equal those of the same map with a weight of ones (the same function; torch's formula with a weight is right), on
the autograd path, under torch.func and through an extern module of a compiled spec; torch.func.hessian of a
layer_norm map with a weight and a bias (which failed) equals that of the map with the bias added by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.runtime.torch_faults import norms_with_a_separate_bias

DT = torch.float64
N = 4
TIGHT = dict(tol=1e-12, max_iter=400)


def _norm(kind: str, h, weight, bias):
    if kind == "layer":
        return F.layer_norm(h, (N,), weight, bias)
    return F.group_norm(h, 2, weight, bias)


def _map(kind: str, with_ones: bool):
    """g(x, z, W, bias) = 0.5 tanh(norm(x W^T + z)), the norm given a weight of ones or none."""
    def g(x, z, W, bias):
        h = x @ W.T + z
        if kind == "group":
            h = h.view(h.shape[0], N, 1)
        weight = torch.ones(N, dtype=h.dtype) if with_ones else None
        return 0.5 * torch.tanh(_norm(kind, h, weight, bias)).reshape(x.shape)
    return g


def _inputs():
    gen = torch.Generator().manual_seed(0)
    W = (0.4 * torch.randn(N, N, generator=gen, dtype=DT)).requires_grad_()
    bias = torch.randn(N, generator=gen, dtype=DT).requires_grad_()
    z = torch.randn(3, N, generator=gen, dtype=DT)
    return z, W, bias


def _second_derivatives(g, z, W, bias, **settings):
    """d/d(W, bias) of |dL/dbias|^2 with L = sum(x*^3): every term passes through the bias gradient."""
    x = fpidsl.fixed_point(g, torch.zeros_like(z), z, W, bias, **TIGHT, **settings)
    (gb,) = torch.autograd.grad((x ** 3).sum(), bias, create_graph=True)
    return torch.autograd.grad((gb ** 2).sum(), (W, bias))


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_the_autograd_path_gives_the_second_derivatives_of_a_weight_of_ones(kind):
    z, W, bias = _inputs()
    want = _second_derivatives(_map(kind, True), z, W, bias, trace=False)
    got = _second_derivatives(_map(kind, False), z, W, bias, trace=False)
    assert want[1].abs().max() > 1e-2  # the term torch dropped is not small here
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_torch_func_hessian_with_respect_to_the_bias(kind):
    z, W, bias = _inputs()

    def loss(g):
        return lambda b: (fpidsl.fixed_point(g, torch.zeros_like(z), z, W.detach(), b, **TIGHT, trace=False) ** 3).sum()
    want = torch.func.hessian(loss(_map(kind, True)))(bias.detach())
    got = torch.func.hessian(loss(_map(kind, False)))(bias.detach())
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_torch_func_hessian_of_a_layer_norm_with_a_weight_and_a_bias():
    z, W, bias = _inputs()
    weight = torch.linspace(0.5, 1.5, N, dtype=DT)

    def loss(by_hand: bool):
        def g(x, z, W, b):
            h = x @ W.T + z
            y = F.layer_norm(h, (N,), weight, None) + b if by_hand else F.layer_norm(h, (N,), weight, b)
            return 0.5 * torch.tanh(y)
        return lambda b: (fpidsl.fixed_point(g, torch.zeros_like(z), z, W.detach(), b, **TIGHT, trace=False) ** 3).sum()
    want = torch.func.hessian(loss(True))(bias.detach())
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(torch.func.hessian(loss(False))(bias.detach()), want, rtol=1e-9, atol=1e-11)


class _BiasOnlyNorm(nn.Module):
    """tanh(layer_norm(x + a) + bias) with no weight, for an extern."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(N, generator=torch.Generator().manual_seed(1)))

    def forward(self, x, a):
        return torch.tanh(F.layer_norm(x + a, (N,), None, self.bias))


class _OnesWeightNorm(_BiasOnlyNorm):
    def forward(self, x, a):
        return torch.tanh(F.layer_norm(x + a, (N,), torch.ones(N, dtype=x.dtype), self.bias))


EXTERN_SPEC = f"""
layer WithExtern {{
  input a : [B, {N}]
  state x : [B, {N}] = zeros
  param f : extern ([B, {N}], [B, {N}]) -> [B, {N}]
  update x = 0.5 * f(x, a)
}}
"""


def test_an_extern_modules_second_derivatives(tmp_path):
    path = tmp_path / "spec.fpi"
    path.write_text(EXTERN_SPEC)
    cls = fpidsl.load(path)
    a = torch.randn(3, N, dtype=DT, generator=torch.Generator().manual_seed(2))
    results = []
    for module in (_OnesWeightNorm(), _BiasOnlyNorm()):
        layer = cls(f=module.double(), solve=dict(TIGHT), backward=dict(TIGHT)).double()
        (gb,) = torch.autograd.grad((layer(a) ** 3).sum(), module.bias, create_graph=True)
        results.append(torch.autograd.grad((gb ** 2).sum(), module.bias))
    assert results[0][0].abs().max() > 1e-2
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_the_mode_keeps_the_values_and_mends_the_derivatives(kind):
    gen = torch.Generator().manual_seed(3)
    shape = (3, N) if kind == "layer" else (3, N, 5)
    x = torch.randn(*shape, generator=gen, dtype=DT, requires_grad=True)
    bias = torch.randn(N, generator=gen, dtype=DT, requires_grad=True)
    ones = torch.ones(N, dtype=DT)
    with norms_with_a_separate_bias():
        y = _norm(kind, x, None, bias)
    torch.testing.assert_close(y, _norm(kind, x, None, bias), rtol=1e-13, atol=1e-13)

    def twice(separate: bool, weight):
        with norms_with_a_separate_bias() if separate else torch.enable_grad():
            out = torch.sin(_norm(kind, x, weight, bias)).sum()
            (gb,) = torch.autograd.grad(out, bias, create_graph=True)
        return torch.autograd.grad((gb ** 2).sum(), (x, bias))
    for a, b in zip(twice(True, None), twice(False, ones)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # torch's own function too, and with a weight; a norm without a bias is left alone
    weight = torch.linspace(0.5, 1.5, N, dtype=DT)
    with norms_with_a_separate_bias():
        aten = torch.layer_norm(x, (N,), None, bias) if kind == "layer" else None
        with_weight = _norm(kind, x, weight, bias)
        without_bias = _norm(kind, x, weight, None)
    if kind == "layer":
        torch.testing.assert_close(aten, F.layer_norm(x, (N,), None, bias), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(with_weight, _norm(kind, x, weight, bias), rtol=1e-13, atol=1e-13)
    assert torch.equal(without_bias, _norm(kind, x, weight, None))
