"""The traced path (fixed_point with trace=True) against autograd (trace=False) where the two once differed: at the
kinks of hardtanh / relu6 / one-sided clamp, elu'' at 0, softplus above its threshold, an integer cast inside the
map, and TorchScript submodules (whose parameters the trace gave no gradient)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.tracing import trace_status

DT = torch.float64
TIGHT = {"tol": 1e-14, "max_iter": 2000, "backward": {"tol": 1e-14, "max_iter": 2000}}


def _solve(f, x0, *args, trace):
    return fpidsl.fixed_point(f, x0, *args, trace=trace, **TIGHT)


def _derivatives(f, x0, args, wrt, trace):
    """The fixed point, the gradient of a cubic loss in ``wrt`` (first order) and the gradient of a weighted sum of
    that gradient (second order)."""
    x = _solve(f, x0, *args, trace=trace)
    g = torch.autograd.grad((x ** 3 + x).sum(), wrt, create_graph=True, allow_unused=True)
    g = [torch.zeros_like(w) if gi is None else gi for gi, w in zip(g, wrt)]
    s = sum((gi * torch.linspace(0.3, 1.1, gi.numel(), dtype=DT).view_as(gi)).sum() for gi in g)
    h = torch.autograd.grad(s, wrt, allow_unused=True) if s.requires_grad else [None] * len(wrt)
    h = [torch.zeros_like(w) if hi is None else hi for hi, w in zip(h, wrt)]
    return x.detach(), [gi.detach() for gi in g], list(h)


def _assert_agree(f, x0, args, wrt, atol=1e-11):
    traced, why = trace_status(f, x0, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    assert traced is not None, why
    on = _derivatives(f, x0, args, wrt, True)
    off = _derivatives(f, x0, args, wrt, False)
    torch.testing.assert_close(on[0], off[0], rtol=0, atol=atol)
    for a, b in zip(on[1] + on[2], off[1] + off[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    return on, off


# --------------------------------------------------------------------------- kinks: hardtanh, relu6, clamp

_KINKS = torch.tensor([[1.0, -1.0, 0.0, 6.0, 0.5, -0.5, 0.8, 7.0, -2.0]], dtype=DT)
_BOUND = torch.tensor([[1.0, 0.0, 0.0, 5.0, 0.5, -1.0, 0.8, 8.0, -2.0]], dtype=DT)
_ELEMENTWISE = {
    "F.hardtanh": lambda z: F.hardtanh(z),
    "F.hardtanh(-0.5, 0.8)": lambda z: F.hardtanh(z, -0.5, 0.8),
    "nn.Hardtanh(-0.5, 0.8)": nn.Hardtanh(-0.5, 0.8),
    "torch.nn.functional.relu6": lambda z: F.relu6(z),
    "nn.ReLU6": nn.ReLU6(),
    "clamp(min=0)": lambda z: z.clamp(min=0.0),
    "clamp(max=1)": lambda z: z.clamp(max=1.0),
    "torch.clamp(min=-1, max=1)": lambda z: torch.clamp(z, -1.0, 1.0),  # the language's clamp primitive
    "clip(0.5, 0.5)": lambda z: z.clip(0.5, 0.5),
}


class _Around(nn.Module):
    """x -> 0.5 x + g(z), a module (a closure per case would be a new closure of one code at every case, which the
    trace cache stops tracing after a few)."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x, z):
        return 0.5 * x + self.g(z)


@pytest.mark.parametrize("name", list(_ELEMENTWISE))
def test_the_derivative_on_a_kink_is_torchs(name):
    """x = 2 g(z): the traced dx/dz on the kinks is 2 g'(z) as torch's autograd defines g' there (hardtanh / relu6:
    0 on the bounds; clamp, one-sided or not: 1 on the bounds)."""
    g = _ELEMENTWISE[name]
    f = _Around(g)
    z = _KINKS.clone().requires_grad_()
    x0 = torch.zeros_like(z)
    on, off = _assert_agree(f, x0, (z,), [z], atol=1e-12)
    zz = _KINKS.clone().requires_grad_()
    (dg,) = torch.autograd.grad(g(zz).sum(), zz)
    x = _solve(f, x0, z, trace=True)
    (dx,) = torch.autograd.grad(x.sum(), z)
    torch.testing.assert_close(dx, 2 * dg, rtol=0, atol=1e-5)  # the backward solve's accuracy (1 - 0.5)
    assert torch.equal(dx == 0, dg == 0), (dx, dg)


@pytest.mark.parametrize("side", ["min", "max"])
def test_clamp_by_a_tensor_bound_is_torchs_on_the_bound(side):
    """clamp(z, min=t): 1 in z and 0 in t where z == t (it was maximum(z, t), which splits a tie 1/2 - 1/2)."""
    def f(x, z, t):
        return 0.5 * x + torch.clamp(z, **{side: t})

    z = _KINKS.clone().requires_grad_()
    t = _BOUND.clone().requires_grad_()
    on, _ = _assert_agree(f, torch.zeros_like(z), (z, t), [z, t], atol=1e-12)
    zz, tt = _KINKS.clone().requires_grad_(), _BOUND.clone().requires_grad_()
    dz, dt = torch.autograd.grad(torch.clamp(zz, **{side: tt}).sum(), (zz, tt))
    tie = _KINKS == _BOUND
    assert tie.any()
    assert torch.all(on[1][0][tie] != 0) and torch.all(on[1][1][tie] == 0)
    assert torch.equal(on[1][0] == 0, dz == 0) and torch.equal(on[1][1] == 0, dt == 0)


def test_a_state_on_the_kink_of_clamp_min_zero():
    """An all-zero sample (padding) has the fixed point x = 0, on the kink of clamp(min=0)."""
    torch.manual_seed(0)
    W = torch.randn(5, 5, dtype=DT) * 0.3

    def f(x, z):
        return 0.5 * torch.clamp(x @ W + z, min=0.0) + z

    z = torch.zeros(2, 5, dtype=DT)
    z[1] = torch.randn(5, dtype=DT)
    z.requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z])


def test_a_tensor_clamp_broadcasts_as_torchs():
    def f(x, z, t):
        return 0.5 * x + torch.clamp(z, max=t)

    z = torch.randn(4, 3, dtype=DT).requires_grad_()
    t = torch.tensor([0.1, -0.2, 0.3], dtype=DT).requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z, t), [z, t])


def test_hardtanh_in_the_state_to_second_order():
    torch.manual_seed(1)
    W = torch.randn(6, 6, dtype=DT) * 0.3

    def f(x, z):
        return 0.5 * F.hardtanh(x @ W + z, -0.5, 0.5) + F.relu6(3 * z) * 0.1

    z = torch.randn(5, 6, dtype=DT).requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z])


def test_hardtanh_with_crossed_bounds_is_refused():
    def f(x, z):
        return 0.5 * x + F.hardtanh(z, 1.0, -1.0)

    traced, why = trace_status(f, torch.zeros(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT))
    assert traced is None and "min_val" in why, why


# --------------------------------------------------------------------------- elu'' at 0


def test_elu_second_derivative_at_zero_is_torchs():
    """torch's elu'' is alpha exp(z) where z < 0, 0 from z = 0 on (elu' there is alpha)."""
    def f(x, z):
        return 0.5 * x + F.elu(z, 0.7)

    z = torch.tensor([[0.0, 0.5, -0.5, -30.0, 800.0]], dtype=DT).requires_grad_()
    on, _ = _assert_agree(f, torch.zeros_like(z), (z,), [z], atol=1e-10)
    assert torch.isfinite(on[2][0]).all()


def test_elu_in_the_state_to_second_order():
    torch.manual_seed(2)
    W = torch.randn(6, 6, dtype=DT) * 0.3

    act = nn.ELU(0.4)

    def f(x, z):
        return 0.5 * F.elu(x @ W + z, alpha=1.3) + act(z)

    z = torch.randn(5, 6, dtype=DT)
    z[0] = 0.0  # the fixed point of this sample is on elu's kink at 0 too
    z.requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z])


# --------------------------------------------------------------------------- softplus above its threshold


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_softplus_above_its_threshold_is_linear_to_second_order(beta):
    """torch: softplus' = 1 exactly where beta x > 20, softplus'' = 0 from beta x = 20 on."""
    def f(x, z):
        return 0.5 * x + 0.1 * F.softplus(z + 0.1 * x, beta=beta)

    z = torch.tensor([[19.0, 20.5, 21.0, 25.0, 0.3, 20.0 / beta]], dtype=DT) / beta
    z = z.requires_grad_()
    on, off = _assert_agree(f, torch.zeros_like(z), (z,), [z], atol=1e-13)
    assert torch.all(on[2][0][1:4] == 0)


def test_softplus_module_above_its_threshold():
    act = nn.Softplus()

    def f(x, z):
        return 0.5 * x + 0.2 * act(z)

    z = torch.tensor([[19.5, 20.0, 20.5, 30.0, -3.0]], dtype=DT).requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z], atol=1e-13)


# --------------------------------------------------------------------------- an integer cast inside the map


def test_an_integer_cast_in_the_map_has_a_zero_derivative():
    """(x * 4).long().double(): two externs, the second on an int64 tensor; its backward made that a leaf that
    requires grad (a RuntimeError). Autograd's derivative through the cast is zero."""
    torch.manual_seed(0)
    W = torch.randn(6, 6, dtype=DT) * 0.3

    def f(x, z):
        return torch.tanh(x @ W + z) + 0.1 * (x * 4).long().double() / 4

    z = torch.randn(8, 6, dtype=DT).requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z])


def test_an_integer_cast_of_an_input_has_a_zero_derivative():
    def f(x, z):
        return 0.5 * torch.tanh(x) + (z * 3).floor().long().to(z.dtype) * 0.1 + z

    z = torch.randn(4, 3, dtype=DT).requires_grad_()
    _assert_agree(f, torch.zeros_like(z), (z,), [z])


# --------------------------------------------------------------------------- TorchScript submodules


class _JitSub(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        inner = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        if how == "script":
            self.j = torch.jit.script(inner)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated
                self.j = torch.jit.trace(inner, torch.randn(2, 6))

    def forward(self, x, z):
        return torch.tanh(self.j(self.fc(x)) * 0.5 + z)


def _grads(f, params, z, trace):
    x = _solve(f, torch.zeros(8, 6, dtype=DT), z, trace=trace)
    return torch.autograd.grad(x.sin().sum(), [z, *params], allow_unused=True)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_submodule_with_parameters_is_not_traced(how):
    """fx calls a ScriptModule's C++ forward as one opaque extern without its parameters (zero gradient): the
    trace is refused, and fixed_point's gradients are autograd's."""
    torch.manual_seed(0)
    m = _JitSub(how).to(DT)
    z = torch.randn(8, 6, dtype=DT).requires_grad_()
    traced, why = trace_status(m, torch.zeros(8, 6, dtype=DT), z.detach())
    assert traced is None and "TorchScript" in why, why
    params = list(m.parameters())
    on, off = _grads(m, params, z, True), _grads(m, params, z, False)
    for name, a, b in zip(["z", *(n for n, _ in m.named_parameters())], on, off):
        assert a is not None and b is not None, name
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_function_closing_over_a_scripted_module_is_not_traced():
    torch.manual_seed(0)
    j = torch.jit.script(nn.Linear(6, 6).to(DT))

    def f(x, z):
        return torch.tanh(0.4 * j(x) + z)

    z = torch.randn(8, 6, dtype=DT).requires_grad_()
    traced, why = trace_status(f, torch.zeros(8, 6, dtype=DT), z.detach())
    assert traced is None and "TorchScript" in why, why
    params = list(j.parameters())
    on, off = _grads(f, params, z, True), _grads(f, params, z, False)
    for a, b in zip(on, off):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_scripted_module_without_parameters_stays_an_extern():
    act = torch.jit.script(nn.Tanh())

    def f(x, z):
        return act(0.5 * x + z)

    z = torch.randn(4, 6, dtype=DT).requires_grad_()
    traced, why = trace_status(f, torch.zeros(4, 6, dtype=DT), z.detach())
    assert traced is not None and traced.spec.externs, why
    _assert_agree(f, torch.zeros(4, 6, dtype=DT), (z,), [z])
