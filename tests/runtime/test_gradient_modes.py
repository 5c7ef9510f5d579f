"""Gradient modes against their definitions: JFB is the one-step gradient, phantom is autograd through k damped
steps from the fixed point, unrolled is plain autograd through the same iterations (to second order), from the
runtime and from a compiled spec."""
import textwrap

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.runtime import FixedPoint, fixed_point
from fpidsl.runtime.settings import PhantomGradient

from .helpers import DTYPE, rel_err

N, BATCH = 6, 3


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (0.6 * torch.randn(N, N, dtype=DTYPE, generator=g) / N**0.5).requires_grad_()
    c = torch.randn(BATCH, N, dtype=DTYPE, generator=g).requires_grad_()
    w = torch.randn(BATCH, N, dtype=DTYPE, generator=g)  # a linear loss: the same dL/dx wherever it is taken
    return W, c, w


def f(x, W, c):
    return torch.tanh(x @ W.T + c)


def _grads(mode: dict, W, c, w):
    x = fixed_point(f, torch.zeros_like(c), W, c, tol=1e-13, backward=mode)
    return x, torch.autograd.grad((w * x).sum(), (W, c))


def test_jfb_equals_the_gradient_of_one_step_at_the_fixed_point():
    W, c, w = _problem()
    x, grads = _grads({"mode": "jfb"}, W, c, w)
    one_step = torch.autograd.grad((w * f(x.detach(), W, c)).sum(), (W, c))
    for a, b in zip(grads, one_step):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("k, tau", [(1, 1.0), (5, 0.5), (12, 0.8)])
def test_phantom_equals_autograd_through_k_damped_steps_from_the_fixed_point(k, tau):
    W, c, w = _problem(1)
    x, grads = _grads({"mode": "phantom", "k": k, "tau": tau}, W, c, w)
    z = x.detach()
    for _ in range(k):
        z = (1 - tau) * z + tau * f(z, W, c)
    unrolled = torch.autograd.grad((w * z).sum(), (W, c))
    for a, b in zip(grads, unrolled):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_phantom_tends_to_the_implicit_gradient_and_jfb_differs():
    W, c, w = _problem(2)
    _, exact = _grads({"tol": 1e-13}, W, c, w)
    _, phantom = _grads({"mode": "phantom", "k": 60}, W, c, w)
    _, jfb = _grads({"mode": "jfb"}, W, c, w)
    assert rel_err(phantom[0], exact[0]) < 1e-8
    assert rel_err(jfb[0], exact[0]) > 1e-3


def _unrolled(x0, W, c, k, beta):
    x = x0
    for _ in range(k):
        x = (1 - beta) * x + beta * f(x, W, c)
    return x


def test_unrolled_equals_plain_autograd_through_the_same_iterations_to_second_order():
    W, c, w = _problem(3)
    x0 = torch.full_like(c, 0.1)
    x, stats = fixed_point(f, x0, W, c, beta=0.7, backward={"mode": "unrolled", "k": 9}, return_stats=True)
    assert torch.allclose(x, _unrolled(x0, W, c, 9, 0.7), rtol=1e-14, atol=1e-15)
    assert stats.forward.iterations.tolist() == [9] * BATCH
    ours = torch.autograd.grad((w * x).sum(), (W, c), create_graph=True)
    plain = torch.autograd.grad((w * _unrolled(x0, W, c, 9, 0.7)).sum(), (W, c), create_graph=True)
    for a, b in zip(ours, plain):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    second = torch.autograd.grad(ours[0].pow(2).sum(), c)
    second_plain = torch.autograd.grad(plain[0].pow(2).sum(), c)
    assert torch.allclose(second[0], second_plain[0], rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradgradcheck(
        lambda c: fixed_point(f, x0, W.detach(), c, backward={"mode": "unrolled", "k": 4}), (c,))


def test_unrolled_k_defaults_to_the_forward_max_iter_and_does_not_apply_on_fail():
    W, c, _ = _problem(4)
    with torch.no_grad():
        _, stats = fixed_point(f, torch.zeros_like(c), W, c, max_iter=3, tol=1e-14, on_fail="raise",
                               backward={"mode": "unrolled"}, return_stats=True)
    assert stats.forward.iterations.tolist() == [3] * BATCH and not stats.forward.all_ok


def test_modes_reach_modules_and_nn_module_parameters():
    torch.manual_seed(0)
    inner = nn.Linear(N, N).double()
    with torch.no_grad():
        inner.weight.mul_(0.5)
    layer = FixedPoint(lambda x, u: torch.tanh(inner(x) + u), backward={"mode": "phantom", "k": 3, "tau": 0.5})
    module = nn.ModuleList([inner])
    u = torch.randn(BATCH, N, dtype=DTYPE)
    x = layer(torch.zeros_like(u), u)
    (gW,) = torch.autograd.grad(x.sum(), module[0].weight)
    z = x.detach()
    for _ in range(3):
        z = 0.5 * z + 0.5 * torch.tanh(inner(z) + u)
    (ref,) = torch.autograd.grad(z.sum(), module[0].weight)
    assert torch.allclose(gW, ref, rtol=1e-12, atol=1e-14)


SPEC = textwrap.dedent("""\
    layer Modes {
      input a : [B, 6]
      state x : [B, 6]
      param W : Linear(6, 6, bias=false)
      update x = tanh(W(x)) * 0.5 + a
      solve { method = broyden(m=30), tol = 1e-12 }
      backward { mode = phantom(k=4, tau=0.5) }
    }
""")


def test_modes_from_a_spec_use_the_compiled_backward(tmp_path):
    path = tmp_path / "modes.fpi"
    path.write_text(SPEC)
    cls = fpidsl.load(str(path))
    layer = cls().double()
    assert layer.backward_settings.gradient == PhantomGradient(4, 0.5)
    assert layer.solve_settings.method == "broyden" and layer.solve_settings.memory == 30
    a = torch.randn(BATCH, N, dtype=DTYPE)
    x = layer(a)
    assert layer.stats.forward.all_ok and layer.stats.forward.settings.method == "broyden"
    (weight,) = [p for p in layer.parameters()]
    (ours,) = torch.autograd.grad(x.pow(2).sum() * 0 + (x * a).sum(), weight)
    z = x.detach()
    for _ in range(4):
        z = 0.5 * z + 0.5 * (torch.tanh(z @ weight.T) * 0.5 + a)
    (ref,) = torch.autograd.grad((z * a).sum(), weight)
    assert torch.allclose(ours, ref, rtol=1e-11, atol=1e-13)
    jfb = cls(backward={"mode": "jfb"}).double()
    jfb.load_state_dict(layer.state_dict())
    x = jfb(a)
    (g1,) = torch.autograd.grad((x * a).sum(), list(jfb.parameters())[0])
    (ref1,) = torch.autograd.grad((torch.tanh(x.detach() @ weight.T) * 0.5 * a).sum(), weight)
    assert torch.allclose(g1, ref1, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("mode", [{"mode": "jfb"}, {"mode": "phantom", "k": 5, "tau": 0.5}])
def test_forward_ad_over_a_surrogate_backward_differentiates_its_formula(mode):
    """The surrogate gradient G(W) = d/dW' [w . z_k(x*, W')] at W' = W, x*(W) the fixed point, differentiated
    along V by forward AD over the backward: the total derivative of G, x*'s implicit tangent included."""
    from torch.autograd import forward_ad
    from torch.func import grad, jvp

    W, c, w = _problem(3)
    W, c = W.detach(), c.detach()
    V = torch.cos(W)
    k, tau = (1, 1.0) if mode["mode"] == "jfb" else (mode["k"], mode["tau"])

    def surrogate(W):
        x_star = c
        for _ in range(200):  # contraction about 0.6: 0.6^200 is far below rounding
            x_star = f(x_star, W, c)

        def loss(W_held):
            z = x_star
            for _ in range(k):
                z = (1 - tau) * z + tau * f(z, W_held, c)
            return (w * z).sum()

        return grad(loss)(W)

    want = jvp(surrogate, (W,), (V,))
    with forward_ad.dual_level():
        W_dual = forward_ad.make_dual(W.clone().requires_grad_(), V)
        x = fixed_point(f, torch.zeros_like(c), W_dual, c, tol=1e-13, backward={**mode, "tol": 1e-13})
        (g_W,) = torch.autograd.grad((w * x).sum(), W_dual)
        got = forward_ad.unpack_dual(g_W)
    assert got.tangent is not None
    assert rel_err(got.primal, want[0]) < 1e-11 and rel_err(got.tangent, want[1]) < 1e-10


UNROLLED_FROM_AN_INPUT = """layer U {
  input a : [B, 3]
  state x : [B, 3] = 2 * a
  update x = 0.5 * tanh(x) + a
  backward { mode = unrolled(k=3) }
}
"""


def test_unrolled_differentiates_through_a_start_read_from_an_input(tmp_path):
    """unrolled(k)'s output is k steps from the start: its gradient must follow the start (= 2 a) too. The start
    was detached for every mode (right for a fixed point, which does not depend on it): 1.509 instead of 1.606."""
    path = tmp_path / "u.fpi"
    path.write_text(UNROLLED_FROM_AN_INPUT)
    layer = fpidsl.load(str(path))().double()
    a = torch.tensor([[0.3, -1.0, 2.0]], dtype=DTYPE, requires_grad=True)
    x = 2 * a
    for _ in range(3):
        x = 0.5 * torch.tanh(x) + a
    (expected,) = torch.autograd.grad(x.sum(), a)
    (got,) = torch.autograd.grad(layer(a).sum(), a)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-14)
    assert torch.autograd.gradcheck(layer, (a,)) and torch.autograd.gradgradcheck(layer, (a,))
