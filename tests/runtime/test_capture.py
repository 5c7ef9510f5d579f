"""Tensors the map reads besides its arguments (closures, modules, partials, bound methods, globals) get their
exact gradients, to second order, against unrolled autograd in float64; what cannot be reached raises."""
import functools

import pytest
import torch
from torch import nn

from fpidsl.runtime import fixed_point
from fpidsl.runtime.capture import HiddenTensorError, discover

from .helpers import DTYPE, TIGHT, TIGHT_BACKWARD, assert_orders_close, derivatives, smooth_loss, unrolled

STEPS = 120  # a contraction of factor < 0.6: 0.6^120 ~ 1e-27


def small_linear(n_in, n_out, seed, scale=0.4):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out).to(DTYPE)
    with torch.no_grad():
        lin.weight.mul_(scale)
    return lin


def x0_and_a(seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 4, generator=gen, dtype=DTYPE).requires_grad_()
    return torch.zeros(3, 4, dtype=DTYPE), a


def compare(f, x0, args, params, order=2, rtol=1e-8):
    """Orders 1..order of a loss of the fixed point of ``f`` w.r.t. ``params`` against unrolled iteration."""
    def fp_loss():
        return smooth_loss(fixed_point(f, x0, *args, backward=TIGHT_BACKWARD, **TIGHT))

    def unrolled_loss():
        return smooth_loss(unrolled(f, x0, args, STEPS))

    assert_orders_close(derivatives(fp_loss, params, order), derivatives(unrolled_loss, params, order), rtol)


def test_closure_captured_linear_gets_its_gradient_to_third_order():
    lin = small_linear(4, 4, seed=0)
    x0, a = x0_and_a()
    f = lambda x, a: torch.tanh(0.5 * lin(x) + a)  # noqa: E731 - the issue's example
    compare(f, x0, (a,), [lin.weight, lin.bias, a], order=3)


def test_closure_captured_tensor_and_nested_closure():
    W = (0.3 * torch.randn(4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(2))).requires_grad_()
    scale = torch.tensor(0.8, dtype=DTYPE, requires_grad=True)

    def inner(x):
        return x @ W.T

    def f(x, a):
        return torch.tanh(scale * inner(x) + a)

    x0, a = x0_and_a()
    compare(f, x0, (a,), [W, scale, a])


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = small_linear(4, 4, seed=3)
        self.gain = nn.Parameter(torch.tensor(0.9, dtype=DTYPE))

    def forward(self, x):
        return self.gain * self.lin(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.proj = small_linear(4, 4, seed=4)

    def forward(self, x):  # not the map: the map is the bound method below
        return x

    def step(self, x, a):
        return torch.tanh(self.proj(torch.sin(self.inner(x))) + a)


def test_nested_modules_in_a_closure():
    model = Outer()
    x0, a = x0_and_a()
    f = lambda x, a: model.step(x, a)  # noqa: E731
    compare(f, x0, (a,), [*model.parameters(), a])


def test_bound_method_of_a_module():
    model = Outer()
    x0, a = x0_and_a()
    compare(model.step, x0, (a,), [*model.parameters(), a])


def test_functools_partial_positional_keyword_and_module():
    lin = small_linear(4, 4, seed=5)
    b = torch.randn(4, dtype=DTYPE, generator=torch.Generator().manual_seed(6)).requires_grad_()
    c = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)

    def g(layer, bias, x, a, *, gain):
        return torch.tanh(gain * layer(x) + bias + a)

    f = functools.partial(g, lin, b, gain=c)
    x0, a = x0_and_a()
    compare(f, x0, (a,), [lin.weight, lin.bias, b, c, a])


GLOBAL_LIN = small_linear(4, 4, seed=7)


def test_module_read_as_a_global():
    x0, a = x0_and_a()
    compare(lambda x, a: torch.tanh(GLOBAL_LIN(x) + a), x0, (a,), [GLOBAL_LIN.weight, a])


class CallableMap:
    """A plain callable object with a tensor attribute and a module attribute read through a method."""

    def __init__(self):
        self.lin = small_linear(4, 4, seed=8)
        self.shift = torch.full((4,), 0.1, dtype=DTYPE, requires_grad=True)

    def __call__(self, x, a):
        return torch.tanh(self.lin(x) + self.shift + a)


def test_callable_object_attributes():
    f = CallableMap()
    x0, a = x0_and_a()
    compare(f, x0, (a,), [f.lin.weight, f.shift, a])


def test_module_with_a_plain_tensor_attribute_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = small_linear(4, 4, seed=9)
            self.b = nn.Linear(4, 4, bias=False).to(DTYPE)
            self.b.weight = self.a.weight  # tied
            self.temperature = torch.tensor(0.6, dtype=DTYPE, requires_grad=True)  # not a Parameter

        def forward(self, x, a):
            return torch.tanh(self.temperature * (self.a(x) + self.b(torch.sin(x))) + a)

    model = Tied()
    x0, a = x0_and_a()
    compare(model, x0, (a,), [model.a.weight, model.a.bias, model.temperature, a])


def test_no_explicit_argument_requires_grad_still_reaches_captured_parameters():
    lin = small_linear(4, 4, seed=10)
    x0, a = x0_and_a()
    a = a.detach()
    compare(lambda x: torch.tanh(lin(x) + a), x0, (), [lin.weight, lin.bias], order=1)


def test_frozen_parameters_and_backward_accumulates_into_grad():
    lin = small_linear(4, 4, seed=11)
    lin.bias.requires_grad_(False)
    x0, a = x0_and_a()
    f = lambda x, a: torch.tanh(lin(x) + a)  # noqa: E731
    assert [id(t) for t in discover(f).tensors] == [id(lin.weight)]
    fixed_point(f, x0, a, backward=TIGHT_BACKWARD, **TIGHT).sum().backward()
    got = lin.weight.grad.clone()
    lin.weight.grad = None
    unrolled(f, x0, (a,), STEPS).sum().backward()
    assert torch.allclose(got, lin.weight.grad, rtol=1e-9, atol=1e-12)
    assert lin.bias.grad is None


def test_values_are_restored_after_the_solve_and_after_an_error():
    lin = small_linear(4, 4, seed=12)
    w = torch.ones(4, dtype=DTYPE, requires_grad=True)
    weight = lin.weight
    x0, a = x0_and_a()

    def f(x, a):
        return torch.tanh(lin(x) * w + a)

    fixed_point(f, x0, a, **TIGHT).sum().backward()
    assert lin.weight is weight and f.__closure__[1].cell_contents is w

    def bad(x, a):
        if x.requires_grad or x.grad_fn is None:
            raise RuntimeError("boom")
        return f(x, a)

    with pytest.raises(RuntimeError, match="boom"):
        fixed_point(bad, x0, a, **TIGHT)
    assert lin.weight is weight and f.__closure__[1].cell_contents is w


def test_a_tensor_it_cannot_reach_raises_before_returning():
    hidden = (torch.tensor(0.5, dtype=DTYPE, requires_grad=True),)  # inside a tuple: not followed
    x0, a = x0_and_a()
    with pytest.raises(HiddenTensorError, match=r"reads a tensor of shape \[\] and dtype float64"):
        fixed_point(lambda x, a: torch.tanh(hidden[0] * x + a), x0, a, **TIGHT)
    with torch.no_grad():  # nothing can be differentiated: no check, no error
        fixed_point(lambda x, a: torch.tanh(hidden[0] * x + a), x0, a, **TIGHT)


def test_a_custom_adjoint_with_a_captured_tensor_raises():
    from fpidsl.runtime import AutogradAdjoint

    w = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    x0, a = x0_and_a()

    def f(x, a):
        return torch.tanh(w * x + a)

    with pytest.raises(HiddenTensorError, match="variable 'w' captured by .*f"):
        fixed_point(f, x0, a, adjoint=AutogradAdjoint(lambda x, a: torch.tanh(0.5 * x + a)), **TIGHT)


def test_capture_explicit_skips_discovery_and_bad_value_raises():
    lin = small_linear(4, 4, seed=13)
    x0, a = x0_and_a()
    fixed_point(lambda x, a: torch.tanh(lin(x) + a), x0, a, capture="explicit", **TIGHT).sum().backward()
    assert lin.weight.grad is None  # the caller said f reads nothing else: documented, not discovered
    with pytest.raises(ValueError, match="capture must be 'auto' or 'explicit'"):
        fixed_point(lambda x, a: x, x0, a, capture="closures")


def test_a_leaf_the_map_makes_itself_is_not_taken_for_a_captured_tensor():
    """An energy map takes an inner gradient through a leaf it makes from x: that is no hidden tensor."""
    lin = small_linear(4, 4, seed=14)
    x0, a = x0_and_a()

    def f(x, a):
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_()
            energy = 0.5 * (xx - a).square().sum() + 0.1 * torch.nn.functional.softplus(lin(xx)).sum()
            (gx,) = torch.autograd.grad(energy, xx, create_graph=True)
        return x - 0.5 * gx

    compare(f, x0, (a,), [lin.weight, a], order=1)


def test_tensors_in_lists_and_dicts():
    weights = [small_linear(4, 4, seed=15).weight.detach().requires_grad_()]
    gains = {"g": torch.tensor(0.8, dtype=DTYPE, requires_grad=True)}

    class Holder:
        def __init__(self):
            self.shifts = [torch.full((4,), 0.05, dtype=DTYPE, requires_grad=True)]

        def __call__(self, x, a):
            return torch.tanh(gains["g"] * (x @ weights[0].T) + self.shifts[0] + a)

    f = Holder()
    x0, a = x0_and_a()
    compare(f, x0, (a,), [weights[0], gains["g"], f.shifts[0], a])
    assert isinstance(weights, list) and weights[0].grad_fn is None  # restored: the caller's tensors
