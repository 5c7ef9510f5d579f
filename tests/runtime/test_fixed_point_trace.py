"""fixed_point with the trace (fpidsl/tracing/auto.py): the same numbers as the autograd path, to second order."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.tracing import auto

from .helpers import assert_trace_agrees

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 2000}


class Cell(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.inj = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.fc.weight.mul_(0.5)

    def forward(self, x, z):
        return 0.6 * torch.tanh(self.fc(x) + self.inj(z)) + 0.1 * z


def _cell():
    torch.manual_seed(0)
    return Cell().to(DT)


def _entry(f):
    """The cache entries of f: whether the last solve used a traced map."""
    return [e.traced is not None for e in auto._CACHE.get(f, {}).values()]


def _solve(f, z, trace, **kw):
    return fpidsl.fixed_point(f, torch.zeros_like(z), z, trace=trace, backward=TIGHT, **TIGHT, **kw)


def test_the_traced_path_is_used_and_gives_the_autograd_paths_numbers():
    f = _cell()
    z = torch.randn(4, 5, dtype=DT, requires_grad=True)
    on, off = _solve(f, z, True), _solve(f, z, False)
    assert _entry(f) == [True]
    torch.testing.assert_close(on, off, rtol=0, atol=1e-11)
    params = [z, *f.parameters()]
    g_on = torch.autograd.grad(on.square().sum(), params)
    g_off = torch.autograd.grad(off.square().sum(), params)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("trace", [True, False])
def test_gradcheck_and_gradgradcheck_in_the_input_and_a_weight(trace):
    f = _cell()
    z = torch.randn(2, 5, dtype=DT, requires_grad=True)
    w = f.inj.weight

    def run(z, w):
        with torch.nn.utils.stateless._reparametrize_module(f, {"inj.weight": w}):
            return _solve(f, z, trace)

    assert torch.autograd.gradcheck(run, (z, w))
    assert torch.autograd.gradgradcheck(run, (z, w))


def test_second_derivatives_agree_between_the_paths():
    f = _cell()
    z = torch.randn(3, 5, dtype=DT, requires_grad=True)
    v = torch.randn(3, 5, dtype=DT)
    hvps = []
    for trace in (True, False):
        x = _solve(f, z, trace)
        (g,) = torch.autograd.grad((x.sin()).sum(), z, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), (z, f.fc.weight)))
    for a, b in zip(*hvps):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_traced_once_per_signature_and_weights_read_at_every_call():
    f = _cell()
    z = torch.randn(4, 5, dtype=DT)
    first = _solve(f, z, True)
    _solve(f, z, True)
    assert len(auto._CACHE[f]) == 1
    _solve(f, torch.randn(6, 5, dtype=DT), True)  # another batch size: another signature
    assert len(auto._CACHE[f]) == 2
    with torch.no_grad():
        f.fc.bias.add_(0.3)  # an optimizer step
    f.inj.weight = nn.Parameter(f.inj.weight.detach() * 2)  # a replaced parameter
    changed = _solve(f, z, True)
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, _solve(f, z, False), rtol=0, atol=1e-11)


def test_the_cache_does_not_keep_a_module_alive():
    f = _cell()
    _solve(f, torch.randn(2, 5, dtype=DT), True)
    assert f in auto._CACHE
    alive = weakref.ref(f)
    del f
    gc.collect()
    assert alive() is None


def test_a_map_that_does_not_trace_falls_back_with_the_same_numbers():
    def f(x, z):
        scale = 0.5 if float(x.abs().sum()) < 1e9 else 0.25  # a value read as a Python number: fx cannot trace it
        return scale * torch.tanh(x) + z

    z = torch.randn(3, 5, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on = _solve(f, z, True)
    assert _entry(f) == [False]
    torch.testing.assert_close(on, _solve(f, z, False), rtol=0, atol=0)


def test_an_operation_with_no_primitive_is_an_extern_and_agrees():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5).to(DT).eval()

    def f(x, z):
        return 0.5 * torch.cumsum(torch.tanh(x), dim=1) / 5 + 0.3 * bn(z) + z

    z = torch.randn(3, 5, dtype=DT, requires_grad=True)
    traced, why = fpidsl.tracing.trace_status(f, torch.zeros_like(z), z)
    assert traced is not None and set(traced.spec.externs) == {"cumsum_fn", "bn"}, why  # bn: a closure's
    g_on, g_off = assert_trace_agrees(f, torch.zeros_like(z), (z,), (z, bn.weight), atol_x=1e-11, atol_g=1e-10,
                                      create_graph=True, backward=TIGHT, **TIGHT)
    second = [torch.autograd.grad(g[0].sum(), z)[0] for g in (g_on, g_off)]
    torch.testing.assert_close(*second, rtol=0, atol=1e-9)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, z):
        self.calls += 1
        return 0.5 * x + z if self.calls == 1 else 0.25 * x + z


def test_a_traced_map_that_differs_falls_back_and_says_so_once():
    f = Counter()
    z = torch.randn(3, 4, dtype=DT)
    with pytest.warns(auto.TraceMismatchWarning, match="the traced map differs from the map"):
        x = _solve(f, z, True)
    torch.testing.assert_close(x, z / 0.75)  # f itself: x = 0.25 x + z
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _solve(f, z + 1, True)  # another signature? no: same shapes; the fallback is remembered, no warning


def test_a_replaced_closure_tensor_is_seen():
    shift = torch.randn(5, dtype=DT)
    f = _cell()

    def g(x, z):
        return f(x, z) + shift

    z = torch.randn(2, 5, dtype=DT)
    _solve(g, z, True)
    shift = torch.randn(5, dtype=DT)  # the cell now holds another tensor
    torch.testing.assert_close(_solve(g, z, True), _solve(g, z, False), rtol=0, atol=1e-11)
    assert _entry(g) == [True]


def test_a_map_that_swaps_a_modules_tensors_in_is_not_traced():
    """functional_call(m, params, ...) inside the map: fx records m's leaf modules, whose tensors are the passed
    ones only while the call runs, so a trace would solve with m's own weights. With params equal to them the
    numeric check passed, the trace was kept, and params got no gradient (and, once they changed, a stale map ran)."""
    from torch.func import functional_call, grad

    cell = _cell()
    z = torch.randn(3, 5, dtype=DT)
    params = {k: v.detach().clone().requires_grad_() for k, v in cell.named_parameters()}  # equal to the cell's

    def loss(p, trace):
        return _solve(lambda x, z: functional_call(cell, p, (x, z)), z, trace).sin().sum()

    status = fpidsl.tracing.trace_status(lambda x, z: functional_call(cell, params, (x, z)), torch.zeros_like(z), z)
    assert status[0] is None and "replaces the tensors of Cell.fc while it runs" in status[1]
    for trace in (True, False):
        got = torch.autograd.grad(loss(params, trace), list(params.values()))
        with torch.no_grad():
            for p in params.values():
                p.mul_(1.1)  # the passed weights change; the cell's do not
        moved = torch.autograd.grad(loss(params, trace), list(params.values()))
        by_func = grad(lambda p: loss(p, trace))(params)
        with torch.no_grad():
            for p in params.values():
                p.div_(1.1)
        if trace:
            first, second, third = got, moved, by_func
        else:
            for a, b in zip((*first, *second, *third.values()), (*got, *moved, *by_func.values())):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not all(torch.allclose(a, b) for a, b in zip(first, second))  # the changed weights were seen


class _WeightNormed(nn.Module):
    """torch.nn.utils.weight_norm (the old form): a pre-hook recomputes fc.weight from weight_g and weight_v at
    every call, so fc.weight is no parameter."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations.weight_norm
            self.fc = nn.utils.weight_norm(nn.Linear(5, 5))

    def forward(self, x, z):
        return 0.4 * torch.tanh(self.fc(x)) + z


def test_a_module_with_hooks_is_an_extern_and_its_parameters_get_their_gradients():
    """A hooked module was once mapped to its primitive, which read the weight the hook had left: the values
    agreed, and weight_g / weight_v got no gradient. Now it is an extern (the module's own call, hooks run)."""
    z = torch.randn(3, 5, dtype=DT)
    grads = {}
    for trace in (True, False):
        torch.manual_seed(0)
        m = _WeightNormed().to(DT)  # a module per path: the hook leaves its last weight on the module
        if trace:
            traced, status = fpidsl.tracing.trace_status(m, torch.zeros_like(z), z)
            assert traced is not None and "param fc : extern [B, 5] -> [B, 5]" in traced.spec.text, status
        _solve(m, z, trace).sin().sum().backward()
        grads[trace] = {name: p.grad for name, p in m.named_parameters()}
    assert set(grads[True]) == {"fc.bias", "fc.weight_g", "fc.weight_v"}
    for name, g in grads[False].items():
        assert grads[True][name] is not None, name
        torch.testing.assert_close(grads[True][name], g, rtol=1e-10, atol=1e-12)


class _FunctionalConv(nn.Module):
    """F.conv2d with weights of its own (an MDEQ written functionally), and a dilated one (no primitive)."""

    def __init__(self, dilated: bool = False):
        super().__init__()
        self.W = nn.Parameter(0.15 * torch.randn(2, 2, 3, 3))
        self.b = nn.Parameter(0.1 * torch.randn(2))
        self.dilated = dilated

    def forward(self, x, z):
        h = F.conv2d(x, self.W, self.b, padding=1) if not self.dilated else F.conv2d(x, self.W, padding=2, dilation=2)
        return 0.5 * torch.tanh(h + F.conv2d(z, self.W, stride=1, padding=(1, 1))) + z


@pytest.mark.parametrize("dilated", [False, True], ids=["conv2d", "dilated"])
def test_functional_conv2d_with_tensor_weights_is_the_conv2d_primitive(dilated):
    torch.manual_seed(0)
    m = _FunctionalConv(dilated).to(DT)
    z = torch.randn(2, 2, 5, 5, dtype=DT, requires_grad=True)
    traced, why = fpidsl.tracing.trace_status(m, torch.zeros_like(z), z)
    assert traced is not None, why
    text = traced.spec.text
    assert "param W : tensor [2, 2, 3, 3]" in text and "conv2d(z, W, padding=[1, 1])" in text
    assert ("conv2d(x, W, b, padding=[1, 1])" in text and not traced.spec.externs) if not dilated else \
        traced.spec.externs  # a dilation has no primitive: an extern
    wrt = (z, m.W, m.b) if not dilated else (z, m.W)
    g_on, g_off = assert_trace_agrees(m, torch.zeros_like(z), (z,), wrt, atol_x=1e-11, atol_g=1e-10,
                                      create_graph=True, backward=TIGHT, **TIGHT)
    second = [torch.autograd.grad(sum(g.square().sum() for g in grads), wrt) for grads in (g_on, g_off)]
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


class _FunctionalNorms(nn.Module):
    """F.group_norm and F.layer_norm with weights of their own; ``bias_only``: biases and no weights, which the
    language writes as the weightless norm plus the bias; ``added``: that written so in torch (torch 2.13's
    F.group_norm with a bias and no weight fails in backward: "tensor does not have a device")."""

    def __init__(self, mode: str = "affine"):
        super().__init__()
        self.gw = nn.Parameter(1 + 0.3 * torch.randn(4))
        self.gb = nn.Parameter(0.1 * torch.randn(4))
        self.lw = nn.Parameter(1 + 0.3 * torch.randn(3, 3))
        self.lb = nn.Parameter(0.1 * torch.randn(3, 3))
        self.mode = mode

    def forward(self, z, a):
        gw, lw = (self.gw, self.lw) if self.mode == "affine" else (None, None)
        gb, lb = (None, None) if self.mode == "added" else (self.gb, self.lb)
        g = F.group_norm(0.3 * z + a, 2, gw, gb)
        ln = F.layer_norm(a - 0.3 * z, [3, 3], lw, lb, eps=1e-3)
        if self.mode == "added":
            g, ln = g + self.gb.reshape(4, 1, 1), ln + self.lb
        return 0.3 * torch.tanh(g + ln + 0.1 * F.group_norm(a + 0.2 * z, 4, eps=1e-2)) + 0.3 * a


@pytest.mark.parametrize("mode", ["affine", "bias_only"])
def test_functional_norms_with_tensor_weights_are_the_norm_primitives(mode):
    torch.manual_seed(0)
    m = _FunctionalNorms(mode).to(DT)
    a = torch.randn(2, 4, 3, 3, dtype=DT, requires_grad=True)
    traced, why = fpidsl.tracing.trace_status(m, torch.zeros_like(a), a)
    assert traced is not None, why
    text = traced.spec.text
    assert not traced.spec.externs and "param gb : tensor [4]" in text and ", 4, eps=0.01)" in text
    if mode == "affine":
        assert ", 2, gw, gb)" in text and ", [3, 3], lw, lb, eps=0.001)" in text
    else:
        assert ", 2) + reshape(gb, [-1, 1, 1])" in text and ", [3, 3], eps=0.001) + lb" in text
    wrt = (a, m.gb, m.lb) + ((m.gw, m.lw) if mode == "affine" else ())
    reference = m
    if mode == "bias_only":  # torch's own fails there: the reference adds the biases in torch
        reference = _FunctionalNorms("added").to(DT)
        reference.gb, reference.lb = m.gb, m.lb
    runs = [fpidsl.fixed_point(f, torch.zeros_like(a), a, trace=trace, backward=TIGHT, **TIGHT)
            for f, trace in ((m, True), (reference, False))]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=1e-11)
    first = [torch.autograd.grad(x.sin().sum(), wrt, create_graph=True) for x in runs]
    second = [torch.autograd.grad(sum(g.square().sum() for g in grads), wrt) for grads in first]
    for (g_on, g_off), atol in [*((pair, 1e-10) for pair in zip(*first)), *((pair, 1e-9) for pair in zip(*second))]:
        torch.testing.assert_close(g_on, g_off, rtol=0, atol=atol)


def test_fixed_point_module_traces_too_and_trace_false_turns_it_off():
    f = _cell()
    z = torch.randn(2, 5, dtype=DT)
    layer = fpidsl.FixedPoint(f, solve=TIGHT)
    off = fpidsl.FixedPoint(f, solve=TIGHT, trace=False)
    torch.testing.assert_close(layer(torch.zeros_like(z), z), off(torch.zeros_like(z), z), rtol=0, atol=1e-11)
    assert _entry(f) == [True]
    g = _cell()
    _solve(g, z, False)
    assert g not in auto._CACHE


# ------------------------------------------------------------------ maps of the equilibrium literature, as PyTorch


class MonDEQ(nn.Module):
    """monDEQ's forward-backward step; W = (1 - m) I - AᵀA + B - Bᵀ is state-free (hoisted)."""

    def __init__(self, n=6, m=1.0):
        super().__init__()
        self.A = nn.Parameter(0.3 * torch.randn(n, n))
        self.B = nn.Parameter(0.3 * torch.randn(n, n))
        self.U = nn.Linear(4, n)
        self.m = m

    def forward(self, x, z):
        W = (1 - self.m) * torch.eye(x.shape[1], dtype=x.dtype) - self.A.T @ self.A + self.B - self.B.T
        return torch.relu(x - 0.5 * (x - (x @ W.T + self.U(z))))


class Hopfield(nn.Module):
    """A modern Hopfield update: attention of the state over stored patterns."""

    def __init__(self):
        super().__init__()
        self.Y = nn.Parameter(torch.randn(10, 6))

    def forward(self, x, z, beta=1.0):
        return torch.softmax(beta * x @ self.Y.T, dim=-1) @ self.Y * 0.5 + z


def ista(x, y, D, t=0.1):
    """ISTA: a gradient step on ½|xDᵀ - y|², then soft thresholding."""
    v = x - 0.2 * (x @ D.T - y) @ D
    return torch.sign(v) * torch.relu(v.abs() - t)


class DampedSinkhorn(nn.Module):
    """Log-domain Sinkhorn, damped and shrunk (the plain one is defined up to a constant, an eigenvalue 1)."""

    def __init__(self):
        super().__init__()
        self.C = nn.Parameter(torch.rand(5, 5))

    def forward(self, f, a):
        g = -torch.logsumexp(f[:, :, None] - self.C / 0.5, dim=1)
        return 0.4 * f + 0.5 * (-torch.logsumexp(g[:, None, :] - self.C / 0.5, dim=2) + a.log())


def _literature():
    torch.manual_seed(0)
    return {
        "mondeq": (MonDEQ().to(DT), (torch.randn(3, 4, dtype=DT),), 6),
        "hopfield": (Hopfield().to(DT), (torch.randn(3, 6, dtype=DT),), 6),
        "ista": (ista, (torch.randn(3, 8, dtype=DT), 0.3 * torch.randn(8, 6, dtype=DT)), 6),
        "sinkhorn": (DampedSinkhorn().to(DT), (torch.rand(3, 5, dtype=DT) + 0.5,), 5),
    }


@pytest.mark.parametrize("case", ["mondeq", "hopfield", "ista", "sinkhorn"])
def test_maps_of_the_literature_trace_and_agree(case):
    f, args, n = _literature()[case]
    args = tuple(a.requires_grad_() for a in args)
    x0 = torch.zeros(3, n, dtype=DT)
    traced, why = fpidsl.tracing.trace_status(f, x0, *args)
    assert traced is not None, why
    assert_trace_agrees(f, x0, args, args, atol_x=1e-10, atol_g=1e-9, backward=TIGHT, **TIGHT)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = 0.5

    def forward(self, x, z):
        return self.scale * torch.tanh(self.fc(x)) + z


def test_a_changed_python_value_of_the_map_is_seen():
    """fx fixes Python numbers into the graph (self.scale, a closure's k): a change makes another signature."""
    torch.manual_seed(0)
    f = Scaled().to(DT)
    z = torch.randn(2, 4, dtype=DT)
    first = _solve(f, z, True)
    f.scale = 0.25
    torch.testing.assert_close(_solve(f, z, True), _solve(f, z, False), rtol=0, atol=1e-11)
    assert not torch.allclose(_solve(f, z, True), first)
    k = 0.5

    def g(x, z):
        return k * torch.tanh(f.fc(x)) + z

    before = _solve(g, z, True)
    k = 0.1
    torch.testing.assert_close(_solve(g, z, True), _solve(g, z, False), rtol=0, atol=1e-11)
    assert not torch.allclose(_solve(g, z, True), before)


class TwoStates(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.g = nn.Linear(4, 4)

    def forward(self, xs, z):
        x, y = xs
        return 0.5 * torch.tanh(self.fc(y)) + z, 0.5 * torch.tanh(self.g(x))


def test_several_states_trace_and_agree_to_second_order():
    torch.manual_seed(0)
    f = TwoStates().to(DT)
    z = torch.randn(2, 4, dtype=DT, requires_grad=True)
    x0 = (torch.zeros(2, 4, dtype=DT), torch.zeros(2, 4, dtype=DT))
    traced, why = fpidsl.tracing.trace_status(f, x0, z)
    assert traced is not None and traced.spec.states == ["xs_1", "xs_2"], why

    def run(z, trace):
        x, y = fpidsl.fixed_point(f, x0, z, trace=trace, backward=TIGHT, **TIGHT)
        return x + y.sin()

    torch.testing.assert_close(run(z, True), run(z, False), rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda z: run(z, True), (z,))
    assert torch.autograd.gradgradcheck(lambda z: run(z, True), (z,))


@pytest.mark.parametrize("settings", [
    {"backward": {"mode": "jfb"}}, {"backward": {"mode": "phantom", "k": 3, "tau": 0.5}},
    {"backward": {"mode": "unrolled", "k": 4}}, {"backward": {"method": "gmres"}},
    {"method": "anderson"}, {"method": "broyden"},
], ids=["jfb", "phantom", "unrolled", "gmres", "anderson", "broyden"])
def test_gradient_modes_and_solvers_agree_between_the_paths(settings):
    f = _cell()
    z = torch.randn(3, 5, dtype=DT, requires_grad=True)
    assert_trace_agrees(f, torch.zeros_like(z), (z,), (z, f.fc.weight), atol_x=1e-12, atol_g=1e-12, tol=1e-10,
                        **settings)


class WithAMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def cell(self, x, z):
        return 0.5 * torch.tanh(self.fc(x)) + z


def test_a_bound_method_of_a_module_traces_and_sees_a_replaced_submodule():
    torch.manual_seed(0)
    owner = WithAMethod().to(DT)
    z = torch.randn(2, 4, dtype=DT)
    traced, why = fpidsl.tracing.trace_status(owner.cell, torch.zeros_like(z), z)
    assert traced is not None, why
    owner.fc = nn.Linear(4, 4).to(DT)
    torch.testing.assert_close(_solve(owner.cell, z, True), _solve(owner.cell, z, False), rtol=0, atol=1e-11)
