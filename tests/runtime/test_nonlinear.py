"""Nonlinear maps against unrolled iteration run to convergence: derivatives of orders 1-3, gradcheck, gradgradcheck."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fpidsl

from .helpers import (
    DTYPE,
    as_tuple,
    assert_orders_close,
    conv_map,
    derivatives,
    generator,
    max_rel_err,
    randn,
    smooth_loss,
    solve,
    tanh_layers,
    two_state_map,
    unrolled,
)

# Enough unrolled steps that every map below (contraction factor <= ~0.6) is converged to rounding,
# derivatives included (order-k derivatives of the iterates converge like n^k q^n).
UNROLLED_STEPS = 120


def tanh_case(batch=2, n=4, k=3, seed=0):
    gen = generator(seed)
    params = [
        randn(n, n, scale=0.6 / n**0.5, gen=gen),  # W1
        randn(n, k, scale=0.5, gen=gen),  # U
        randn(n, scale=0.1, gen=gen),  # b1
        randn(n, n, scale=0.6 / n**0.5, gen=gen),  # W2
        randn(n, scale=0.1, gen=gen),  # b2
        randn(batch, k, gen=gen),  # z
    ]
    return tanh_layers, torch.zeros(batch, n, dtype=DTYPE), params


def conv_case(batch=2, channels=2, size=4, seed=1):
    gen = generator(seed)
    params = [
        randn(channels, channels, 3, 3, scale=0.12, gen=gen),  # K
        randn(channels, 1, 3, 3, scale=0.3, gen=gen),  # Kz
        randn(batch, 1, size, size, gen=gen),  # z
    ]
    return conv_map, torch.zeros(batch, channels, size, size, dtype=DTYPE), params


def two_state_case(batch=2, n=3, seed=2):
    gen = generator(seed)
    params = [
        randn(n, n, scale=0.5 / n**0.5, gen=gen),  # W
        randn(n, n, scale=0.3 / n**0.5, gen=gen),  # V
        randn(batch, n, gen=gen),  # z
    ]
    x0 = (torch.zeros(batch, n, dtype=DTYPE), torch.zeros(batch, n, dtype=DTYPE))
    return two_state_map, x0, params


CASES = {"tanh_layers": tanh_case, "conv": conv_case, "two_state": two_state_case}
METHODS = ["picard", "anderson"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_value_and_derivatives_match_unrolled(case, method):
    f, x0, params = CASES[case]()
    settings = {"method": method, "backward": {"method": method}}
    x_hat = solve(f, x0, *params, **settings)
    x_ref = unrolled(f, x0, params, UNROLLED_STEPS)
    assert max_rel_err(as_tuple(x_hat), as_tuple(x_ref)) <= 1e-10

    got = derivatives(lambda: smooth_loss(solve(f, x0, *params, **settings)), params, order=3)
    want = derivatives(lambda: smooth_loss(unrolled(f, x0, params, UNROLLED_STEPS)), params, order=3)
    assert_orders_close(got, want, rtol=1e-8)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.slow
def test_gradcheck_and_gradgradcheck(case):
    f, x0, params = CASES[case](batch=1) if case == "conv" else CASES[case]()

    def layer(*ps):
        return solve(f, x0, *ps)

    assert gradcheck(layer, params, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert gradgradcheck(layer, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_hessian_vector_product_and_jvp_match_unrolled():
    f, x0, params = tanh_case()
    W1, U, b1, W2, b2, z = params
    rest = [W1, U, b1, W2, b2]

    def ours(z_):
        return smooth_loss(solve(f, x0, *rest, z_))

    def reference(z_):
        return smooth_loss(unrolled(f, x0, [*rest, z_], UNROLLED_STEPS))

    v = torch.randn(z.shape, generator=generator(3), dtype=DTYPE)
    _, hvp_ours = torch.autograd.functional.hvp(ours, z.detach(), v)
    _, hvp_ref = torch.autograd.functional.hvp(reference, z.detach(), v)
    assert max_rel_err([hvp_ours], [hvp_ref]) <= 1e-8

    def fp(z_):
        return solve(f, x0, *rest, z_)

    _, jvp_ours = torch.autograd.functional.jvp(fp, z.detach(), v)
    _, jvp_ref = torch.autograd.functional.jvp(lambda z_: unrolled(f, x0, [*rest, z_], UNROLLED_STEPS), z.detach(), v)
    assert max_rel_err([jvp_ours], [jvp_ref]) <= 1e-8


def test_a_constant_argument_that_is_none_keeps_the_tensors_in_their_places():
    """Constants among the arguments (None, a number) sit between tensors: the backward once took a None constant
    for a saved tensor's place and failed (StopIteration); the derivatives are those of the map without them."""
    import fpidsl

    gen = generator()
    w, z = randn(3, 3, scale=0.3, gen=gen), randn(2, 3, gen=gen)

    def f(x, w, nothing, z, k):
        assert nothing is None and k == 0.5
        return k * torch.tanh(x @ w) + z

    def layer(w, z):
        return fpidsl.fixed_point(f, torch.zeros(2, 3, dtype=DTYPE), w, None, z, 0.5, trace=False, tol=1e-12,
                                  backward={"tol": 1e-12})

    def by_hand(w, z):
        return unrolled(lambda x, w, z: 0.5 * torch.tanh(x @ w) + z, torch.zeros(2, 3, dtype=DTYPE), (w, z), 200)

    assert_orders_close(derivatives(lambda: smooth_loss(layer(w, z)), [w, z], order=2),
                        derivatives(lambda: smooth_loss(by_hand(w, z)), [w, z], order=2))
    assert gradcheck(layer, (w, z), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("trace", [True, False])
def test_a_list_of_states_comes_back_as_a_list(trace):
    """The result has x0's structure (the docstring): a list for a list (torchdeq's states are a list), a tuple for a
    tuple; a list came back as a tuple."""
    def f(xs, z):
        return 0.5 * torch.tanh(xs[1]) + z, 0.5 * torch.tanh(xs[0])

    z = torch.ones(2, 3, dtype=torch.float64)
    starts = [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)]
    out = fpidsl.fixed_point(f, starts, z, trace=trace)
    assert isinstance(out, list) and len(out) == 2
    assert isinstance(fpidsl.fixed_point(f, tuple(starts), z, trace=trace), tuple)
    assert isinstance(fpidsl.FixedPoint(f, trace=trace)(starts, z), list)
    torch.testing.assert_close(out[1], 0.5 * torch.tanh(out[0]))
