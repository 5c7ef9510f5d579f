"""The trace sees what the map's Python reads (fpidsl/tracing/python_state.py) and refuses what fx would get wrong
(in-place modules on shared memory, autograd.Functions, gradients turned off, hooks): every case gives the numbers
of ``trace=False``. Each stale case gave a wrong fixed point (0.2-3.4 apart) before."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.tracing.auto import trace_status
from fpidsl.tracing.python_state import MAX_ITEMS

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 500}
N = 6


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.zeros(3, N, dtype=DT), torch.randn(3, N, dtype=DT, generator=gen)


def _linear(bias=True):
    torch.manual_seed(1)
    lin = nn.Linear(N, N, bias=bias).to(DT)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    return lin


def _solve(f, trace=True):
    x0, z = _inputs()
    return fpidsl.fixed_point(f, x0, z, trace=trace, **TIGHT)


class Private(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self._alpha = _linear(), 0.5

    def forward(self, x, z):
        return self._alpha * torch.tanh(self.fc(x)) + z


class Config(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.cfg, self.d, self.coef = _linear(), SimpleNamespace(alpha=0.5), {"beta": 0.5}, [0.5] * 20

    def forward(self, x, z):
        return self.cfg.alpha * torch.tanh(self.fc(x)) + self.d["beta"] * z + (self.coef[3] - 0.5) * x


class ClassAttribute(nn.Module):
    scale = 0.5

    def __init__(self):
        super().__init__()
        self.fc = _linear()

    def forward(self, x, z):
        return self.scale * torch.tanh(self.fc(x)) + z


ALPHA = 0.5
BETA = 0.5
SETTINGS = SimpleNamespace(alpha=0.5)


class ReadsGlobal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = _linear()

    def forward(self, x, z):
        return ALPHA * torch.tanh(self.fc(x)) + z


class Activation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.fn = _linear(), nn.Tanh(), torch.tanh

    def forward(self, x, z):
        return 0.3 * self.act(self.fc(x)) + 0.3 * self.fn(x) + z


class Plain:  # not a module: a bound method's object
    def __init__(self):
        self.alpha, self.W = 0.5, _linear().weight.detach()

    def step(self, x, z):
        return self.alpha * torch.tanh(x @ self.W) + z


W_GLOBAL = _linear().weight.detach()


def _helper(x, W):
    return BETA * torch.tanh(x @ W)


def _reads_helper(x, z):  # W_GLOBAL itself is read by the map (a global tensor is looked up at every call)
    return _helper(x, W_GLOBAL) + z


def _reads_object(x, z):
    return SETTINGS.alpha * torch.tanh(x @ W_GLOBAL) + z


def _set_global(name, value):
    globals()[name] = value


def _cases():
    private, config, config2, config3, cls, act, act2, plain = (Private(), Config(), Config(), Config(),
                                                                 ClassAttribute(), Activation(), Activation(), Plain())
    return {
        "private attribute": (private, lambda: setattr(private, "_alpha", 0.9)),
        "config object": (config, lambda: setattr(config.cfg, "alpha", 0.9)),
        "dict entry": (config2, lambda: config2.d.__setitem__("beta", 2.0)),
        "long list": (config3, lambda: config3.coef.__setitem__(3, 0.9)),
        "class attribute": (cls, lambda: setattr(ClassAttribute, "scale", 0.9)),
        "global of forward": (ReadsGlobal(), lambda: _set_global("ALPHA", 0.9)),
        "submodule type": (act, lambda: setattr(act, "act", nn.Sigmoid())),
        "function attribute": (act2, lambda: setattr(act2, "fn", torch.sigmoid)),
        "bound method's object": (plain.step, lambda: setattr(plain, "alpha", 0.9)),
        "global of a called function": (_reads_helper, lambda: _set_global("BETA", 0.9)),
        "global object's field": (_reads_object, lambda: setattr(SETTINGS, "alpha", 0.9)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_a_changed_python_value_is_traced_again(case):
    f, change = _cases()[case]
    saved = (ALPHA, BETA, SETTINGS.alpha, ClassAttribute.scale)
    try:
        before = _solve(f)
        assert trace_status(f, *_inputs())[0] is not None, "the map should trace"
        change()
        after, plain = _solve(f), _solve(f, trace=False)
        assert float((after - before).detach().abs().max()) > 1e-2  # the change matters
        torch.testing.assert_close(after, plain, rtol=1e-10, atol=1e-12)
    finally:
        _set_global("ALPHA", saved[0])
        _set_global("BETA", saved[1])
        SETTINGS.alpha, ClassAttribute.scale = saved[2], saved[3]


def test_a_linear_that_loses_its_bias_is_traced_again():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear()

        def forward(self, x, z):
            return torch.tanh(self.fc(x)) + z

    cell = Cell()
    _solve(cell)
    cell.fc = _linear(bias=False)
    torch.testing.assert_close(_solve(cell), _solve(cell, trace=False), rtol=1e-10, atol=1e-12)


def test_a_map_reaching_too_much_python_state_is_not_traced():
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.table = _linear(), list(range(MAX_ITEMS + 1))

        def forward(self, x, z):
            return torch.tanh(self.fc(x)) + z

    big = Big()
    traced, why = trace_status(big, *_inputs())
    assert traced is None and f"more than {MAX_ITEMS} Python values" in why
    torch.testing.assert_close(_solve(big), _solve(big, trace=False), rtol=1e-10, atol=1e-12)


class InPlace(nn.Module):
    """h = 5 - x; relu_(h); the sum reads h after the in-place activation."""

    def __init__(self, view: bool):
        super().__init__()
        self.act, self.view = nn.ReLU(inplace=True), view

    def forward(self, x, z):
        h = 5 - x
        if self.view:
            y = self.act(h[:, :3])  # a view: h changes with it
        else:
            y = self.act(h)
        return 0.1 * (y.sum(-1, keepdim=True) + h) + z


@pytest.mark.parametrize("view", [False, True])
def test_an_in_place_activation_module(view):
    f = InPlace(view)
    x0, z = _inputs()
    z = z + 10  # h = 5 - x < 0 at the fixed point, so the in-place relu matters
    traced, why = trace_status(f, x0, z)
    assert (traced is not None) == (not view), why
    if view:
        assert "shares its memory" in why
    got = fpidsl.fixed_point(f, x0, z, **TIGHT)
    want = fpidsl.fixed_point(f, x0, z, trace=False, **TIGHT)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class TimesThreeBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 3 * g


def _custom(x, z):
    return 0.4 * torch.tanh(TimesThreeBackward.apply(x @ W_GLOBAL)) + z


def _no_grad(x, z):
    with torch.no_grad():
        c = 0.5 * z
    return 0.4 * torch.tanh(x @ W_GLOBAL) + c + z


@pytest.mark.parametrize("f, reason", [(_custom, "autograd.Function TimesThreeBackward"),
                                       (_no_grad, "with gradients off")])
def test_what_a_trace_would_differentiate_wrongly_is_not_traced(f, reason):
    x0, z = _inputs()
    traced, why = trace_status(f, x0, z)
    assert traced is None and reason in why
    z = z.requires_grad_()
    (got,) = torch.autograd.grad(fpidsl.fixed_point(f, x0, z, **TIGHT).sum(), z)
    (want,) = torch.autograd.grad(fpidsl.fixed_point(f, x0, z, trace=False, **TIGHT).sum(), z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_module_with_forward_hooks_is_not_traced():
    cell = ReadsGlobal()
    handle = cell.register_forward_hook(lambda module, args, out: 0.5 * out)
    try:
        traced, why = trace_status(cell, *_inputs())
        assert traced is None and "has hooks" in why
        torch.testing.assert_close(_solve(cell), _solve(cell, trace=False), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


@pytest.mark.parametrize("mask", ["computed", "bool argument"])
def test_masked_fill_is_where(mask):
    """x.masked_fill(mask, v) traces as where(mask, v, x); a computed mask made the tracer fail ("a bug")."""
    x0, z = _inputs()
    m = z > 0.3
    if mask == "computed":
        def f(x, z, m):
            return 0.5 * torch.tanh(x @ W_GLOBAL).masked_fill(z > 0, 0.3) + z
    else:
        def f(x, z, m):
            return 0.5 * torch.tanh(x @ W_GLOBAL).masked_fill(m, -0.2) + z
    traced, why = trace_status(f, x0, z, m)
    assert traced is not None, why
    z = z.requires_grad_()
    got, want = (fpidsl.fixed_point(f, x0, z, m, trace=t, **TIGHT) for t in (True, False))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), z)[0], torch.autograd.grad(want.sum(), z)[0])


def test_a_global_module_hook_registered_after_the_trace_is_seen():
    """torch's global hooks run in every module's call: they are part of the signature (a hook registered after
    the first call left the traced map 0.15 away from trace=False)."""
    cell = ReadsGlobal()
    _solve(cell)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: 0.5 * out if isinstance(module, nn.Linear) else None)
    try:
        torch.testing.assert_close(_solve(cell), _solve(cell, trace=False), rtol=1e-10, atol=1e-12)
    finally:
        handle.remove()


def test_a_submodule_with_a_backward_hook_is_not_traced():
    cell = ReadsGlobal()
    handle = cell.fc.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        traced, why = trace_status(cell, *_inputs())
        assert traced is None and "backward hooks" in why
    finally:
        handle.remove()
    assert trace_status(cell, *_inputs())[0] is not None


class Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.fc = _linear()
        self.register_buffer("scale", torch.tensor(scale, dtype=DT))

    def forward(self, x, z):
        return torch.tanh(self.scale * self.fc(x) + z)


class Deq(nn.Module):  # the usual DEQ module: fixed_point of a submodule with a buffer
    def __init__(self, scale):
        super().__init__()
        self.cell = Scaled(scale)

    def forward(self, z):
        return fpidsl.fixed_point(self.cell, torch.zeros_like(z), z, **TIGHT)


def test_vmap_over_an_ensemble_of_modules_with_buffers():
    """torch.func.stack_module_state + vmap of functional_call over DEQ modules with buffers: the buffers are vmap's
    batched tensors, which the buffer keeping around the capture check must leave alone (it raised)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    models = [Deq(0.3 + 0.2 * i) for i in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    _, z = _inputs()
    got = vmap(lambda p, b, z: functional_call(base, (p, b), (z,)), in_dims=(0, 0, None))(params, buffers, z)
    want = torch.stack([m(z) for m in models])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
