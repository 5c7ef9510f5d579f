"""A linear map has a closed-form fixed point x = (I - A)^-1 B z: value and derivatives of orders 1-3."""
import pytest
import torch

from .helpers import (
    assert_orders_close,
    derivatives,
    generator,
    linear_closed_form,
    linear_map,
    randn,
    rel_err,
    smooth_loss,
    solve,
)

METHODS = [{"method": "picard"}, {"method": "anderson", "m": 4}]


def problem(seed=0, batch=3, n=5, k=2):
    gen = generator(seed)
    A = randn(n, n, scale=0.5 / n**0.5, gen=gen)
    B = randn(n, k, gen=gen)
    z = randn(batch, k, gen=gen)
    return A, B, z


@pytest.mark.parametrize("settings", METHODS, ids=lambda s: s["method"])
def test_value_matches_closed_form(settings):
    A, B, z = problem()
    x = solve(linear_map, torch.zeros(3, 5, dtype=A.dtype), A, B, z, **settings)
    assert rel_err(x, linear_closed_form(A, B, z)) <= 1e-8


@pytest.mark.parametrize("settings", METHODS, ids=lambda s: s["method"])
@pytest.mark.parametrize("loss_kind", ["linear", "nonlinear"])
def test_derivatives_orders_1_to_3(settings, loss_kind):
    A, B, z = problem(seed=1)
    w = torch.randn(3, 5, generator=generator(9), dtype=A.dtype)

    def loss_of(x):
        return (x * w).sum() if loss_kind == "linear" else smooth_loss(x)

    def ours():
        backward = {"method": settings["method"]}
        return loss_of(solve(linear_map, torch.zeros(3, 5, dtype=A.dtype), A, B, z, backward=backward, **settings))

    got = derivatives(ours, [A, B, z], order=3)
    want = derivatives(lambda: loss_of(linear_closed_form(A, B, z)), [A, B, z], order=3)
    assert_orders_close(got, want, rtol=1e-8)


def test_gradient_with_respect_to_x0_is_zero():
    A, B, z = problem()
    x0 = torch.randn(3, 5, dtype=A.dtype, requires_grad=True)
    x = solve(linear_map, x0, A, B, z)
    g_x0, g_z = torch.autograd.grad(smooth_loss(x), [x0, z])
    assert torch.equal(g_x0, torch.zeros_like(x0))
    assert g_z.abs().sum() > 0
