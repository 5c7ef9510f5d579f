"""The adjoint protocol: a hand-written backward map for a tanh layer against AutogradAdjoint."""
import pytest
import torch
from torch.autograd import gradgradcheck

from fpidsl.runtime import AutogradAdjoint, fixed_point

from .helpers import (
    DTYPE,
    TIGHT,
    TIGHT_BACKWARD,
    assert_orders_close,
    derivatives,
    generator,
    randn,
    smooth_loss,
    tanh_map,
    unrolled,
)


class TanhAdjoint:
    """The backward map of g(x, W, U, z) = tanh(x W^T + z U^T), derived by hand (as a compiled layer emits it).

    With s = 1 - tanh(a)^2 at the fixed point: (dg/dx)^T c = (c*s) W, and (dg/dW)^T c = (c*s)^T x,
    (dg/dU)^T c = (c*s)^T z, (dg/dz)^T c = (c*s) U.
    """

    def __init__(self):
        self.prepared = 0
        self.state_products = 0

    def prepare(self, x_hat, args):
        self.prepared += 1
        (x,) = x_hat
        W, U, z = args
        slope = 1 - torch.tanh(x @ W.T + z @ U.T) ** 2  # everything that depends only on the fixed point
        return slope, x, W, U, z

    def vjp_state(self, saved, c):
        self.state_products += 1
        slope, _, W, _, _ = saved
        return ((c[0] * slope) @ W,)

    def vjp_args(self, saved, c):
        slope, x, W, U, z = saved
        cs = c[0] * slope
        return cs.T @ x, cs.T @ z, cs @ U


def case(batch=2, n=4, k=3, seed=5):
    gen = generator(seed)
    W = randn(n, n, scale=0.7 / n**0.5, gen=gen)
    U = randn(n, k, scale=0.8, gen=gen)
    z = randn(batch, k, gen=gen)
    return torch.zeros(batch, n, dtype=DTYPE), [W, U, z]


def solve_with(adjoint, x0, params, method="picard"):
    return fixed_point(tanh_map, x0, *params, adjoint=adjoint, method=method,
                       backward={**TIGHT_BACKWARD, "method": method}, **TIGHT)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_hand_written_adjoint_matches_autograd_to_order_3(method):
    x0, params = case()
    hand = TanhAdjoint()
    got = derivatives(lambda: smooth_loss(solve_with(hand, x0, params, method)), params, order=3)
    auto = derivatives(lambda: smooth_loss(solve_with(AutogradAdjoint(tanh_map), x0, params, method)), params, 3)
    default = derivatives(lambda: smooth_loss(solve_with(None, x0, params, method)), params, order=3)
    want = derivatives(lambda: smooth_loss(unrolled(tanh_map, x0, params, 150)), params, order=3)
    assert_orders_close(got, auto, rtol=1e-9)
    assert_orders_close(auto, default, rtol=1e-12)
    assert_orders_close(got, want, rtol=1e-8)
    assert hand.prepared >= 1 and hand.state_products > 0


def test_hand_written_adjoint_prepares_once_per_backward():
    x0, params = case()
    hand = TanhAdjoint()
    smooth_loss(solve_with(hand, x0, params)).backward()
    assert hand.prepared == 1
    assert hand.state_products > 5  # one product an iteration, nothing re-prepared


def test_hand_written_adjoint_passes_gradgradcheck():
    x0, params = case()
    assert gradgradcheck(lambda *ps: solve_with(TanhAdjoint(), x0, ps), params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_autograd_adjoint_single_state_calling_convention():
    x0, params = case()
    adjoint = AutogradAdjoint(tanh_map)
    x = solve_with(None, x0, params).detach()
    saved = adjoint.prepare((x,), tuple(params))
    c = (torch.randn(x.shape, generator=generator(1), dtype=DTYPE),)
    hand = TanhAdjoint()
    hand_saved = hand.prepare((x,), tuple(params))
    with torch.no_grad():
        assert torch.allclose(adjoint.vjp_state(saved, c)[0], hand.vjp_state(hand_saved, c)[0], rtol=1e-12)
        for a, b in zip(adjoint.vjp_args(saved, c), hand.vjp_args(hand_saved, c)):
            assert torch.allclose(a, b, rtol=1e-12)
