"""Derivatives at special values, against torch's autograd of the same math (float64): a masked-off place gets
exactly 0 even where an infinite cotangent arrives there (``sqrt(relu(a))`` at ``a <= 0``), a tie of ``maximum``
with a number splits 1/2 - 1/2 in every mode of autograd, a zero base of ``a ** w`` gives the exponent a zero
derivative, and third derivatives through a layer norm are right where torch's fused kernel is not."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import fpidsl
from fpidsl.errors import FpiErrors

DT = torch.float64
TIGHT = {"tol": 1e-14, "max_iter": 400}


def _layer(tmp_path, text: str, name: str | None = None):
    path = tmp_path / "t.fpi"
    path.write_text(text)
    return fpidsl.load(str(path), name=name)(solve=TIGHT, backward=TIGHT).double()


def _unrolled(f, a, k: int = 300):
    x = torch.zeros_like(a)
    for _ in range(k):
        x = f(x, a)
    return x


INFINITE_COTANGENT = {  # the update's term in the spec, and in torch
    "sqrt(relu(a))": lambda a: torch.sqrt(torch.relu(a)),
    "sqrt(clamp(a, 0, 1.5))": lambda a: torch.sqrt(torch.clamp(a, 0, 1.5)),
    "sqrt(maximum(a, 0))": lambda a: torch.sqrt(torch.maximum(a, torch.zeros_like(a))),
    "sqrt(-minimum(a, 0))": lambda a: torch.sqrt(-torch.minimum(a, torch.zeros_like(a))),
    "relu(a) ** 0.5": lambda a: torch.relu(a) ** 0.5,
}


@pytest.mark.parametrize("term", INFINITE_COTANGENT)
def test_a_masked_off_place_gets_zero_where_an_infinite_cotangent_arrives(tmp_path, term):
    layer = _layer(tmp_path, f"layer T {{\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * x + {term}\n}}\n")
    a0 = torch.tensor([[0.0, -1.0, 1.0, 2.0]], dtype=DT)
    a = a0.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        (g,) = torch.autograd.grad(layer(a).sum(), a)
    b = a0.clone().requires_grad_()
    (want,) = torch.autograd.grad(_unrolled(lambda x, a: 0.5 * x + INFINITE_COTANGENT[term](a), b).sum(), b)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(g), finite)  # sqrt(clamp) at 0 itself: inf in both (its own derivative)
    torch.testing.assert_close(g[finite], want[finite], rtol=1e-10, atol=1e-12)
    assert bool(layer.stats.backward.converged.all())


def test_an_energy_with_an_infinite_derivative_behind_relu_converges(tmp_path):
    """grad(E, x) is expanded with the same rules: relu's mask in front of sqrt' = inf at relu(x) = 0 made the
    forward map NaN, every sample 'diverged' at its first iteration."""
    layer = _layer(tmp_path, "layer T {\n  input a : [B, 4]\n  state x : [B, 4]\n"
                             "  energy E = sum(square(x - a), dim=1) + 0.1 * sum(sqrt(relu(x)), dim=1)\n"
                             "  descend x on E step 0.2\n}\n")
    a = torch.tensor([[-1.0, 1.0, 2.0, 0.5]], dtype=DT)

    def step(x, a):
        x = x.detach().requires_grad_()
        energy = ((x - a) ** 2).sum(1) + 0.1 * torch.sqrt(torch.relu(x)).sum(1)
        (g,) = torch.autograd.grad(energy.sum(), x)
        return x - 0.2 * g

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = layer(a)
    torch.testing.assert_close(x, _unrolled(step, a, 400), rtol=1e-10, atol=1e-12)


TIES = ("layer Update {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + maximum(a, 0)\n}\n"
        "layer Output {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + a\n"
        "  output maximum(x, 0) + 3 * minimum(x, 0)\n}\n")


def test_a_tie_with_a_number_splits_in_every_mode_of_autograd(tmp_path):
    """maximum(a, 0) / minimum(x, 0) at the tie: 1/2 - 1/2 (docs/LANGUAGE.md, as torch.maximum), also where torch's
    autograd differentiates the emitted code (outputs, unrolled, forward mode); clamp_min gave 1 there."""
    a0 = torch.tensor([[0.0, 1.0, -1.0]], dtype=DT)
    path = tmp_path / "t.fpi"
    path.write_text(TIES)
    update = fpidsl.load(str(path), name="Update")
    want = torch.tensor([[1.0, 2.0, 0.0]], dtype=DT)  # d x*/da: 2 * (1/2, 1, 0)
    for backward in (TIGHT, {**TIGHT, "mode": "unrolled", "k": 80}):
        layer = update(solve=TIGHT, backward=backward).double()
        a = a0.clone().requires_grad_()
        (g,) = torch.autograd.grad(layer(a).sum(), a)
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    layer = update(solve=TIGHT, backward=TIGHT).double()
    _, tangent = torch.func.jvp(layer, (a0,), (torch.ones_like(a0),))
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-12)
    output = fpidsl.load(str(path), name="Output")(solve=TIGHT, backward=TIGHT).double()
    a = torch.tensor([[0.0, 1.0, -1.0]], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(output(a).sum(), a)  # x* = 2a; the output's tie at x = 0: (1 + 3) / 2, times 2
    torch.testing.assert_close(g, torch.tensor([[4.0, 2.0, 6.0]], dtype=DT), rtol=1e-10, atol=1e-12)


def test_a_zero_base_gives_the_exponent_a_zero_derivative(tmp_path):
    layer = _layer(tmp_path, "layer T {\n  input a : [B, 4]\n  state x : [B, 4]\n  param w : tensor [4] = 1.5\n"
                             "  update x = 0.5 * x + a ** w\n}\n")
    a = torch.tensor([[0.0, 1.0, 2.0, 0.5]], dtype=DT)
    (g,) = torch.autograd.grad(layer(a).sum(), layer.w)
    w = layer.w.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(_unrolled(lambda x, a: 0.5 * x + a ** w, a).sum(), w)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def _third(fn, a: torch.Tensor) -> torch.Tensor:
    """A third-order directional derivative of sum(fn(a) ** 3) (three backward passes)."""
    a = a.clone().requires_grad_()
    v = torch.linspace(-1, 1, a.numel(), dtype=DT).reshape(a.shape)
    (g1,) = torch.autograd.grad((fn(a) ** 3).sum(), a, create_graph=True)
    (g2,) = torch.autograd.grad((g1 * v).sum(), a, create_graph=True)
    (g3,) = torch.autograd.grad((g2 * v.flip(-1)).sum(), a)
    return g3


def _layer_norm_by_hand(x, weight=None, bias=None):
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    return y if weight is None else y * weight + bias


def test_torch_fused_layer_norm_third_derivative_is_wrong():
    """The fault worked around (if torch fixes it, this fails: the work-around can go)."""
    a = torch.tensor([[0.3, -1.2, 0.8, 2.0]], dtype=DT)
    assert not torch.allclose(_third(lambda t: F.layer_norm(t, (4,)), a), _third(_layer_norm_by_hand, a), atol=1e-3)


def test_third_derivative_through_a_layer_norm_output(tmp_path):
    layer = _layer(tmp_path, "layer T {\n  input a : [B, 4]\n  state x : [B, 4]\n  param ln : LayerNorm(4)\n"
                             "  update x = 0.5 * x + a\n  output ln(x)\n}\n")
    with torch.no_grad():
        layer.ln.weight.copy_(torch.tensor([1.3, 0.7, -0.4, 1.1]))
        layer.ln.bias.copy_(torch.tensor([0.2, -0.1, 0.3, 0.0]))
    a = torch.tensor([[0.3, -1.2, 0.8, 2.0]], dtype=DT)
    weight, bias = layer.ln.weight.detach(), layer.ln.bias.detach()
    want = _third(lambda t: _layer_norm_by_hand(2 * t, weight, bias), a)
    torch.testing.assert_close(_third(layer, a), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("trace", [False, True])
def test_third_derivative_through_a_layer_norm_map(trace):
    """The autograd path (trace=False) differentiates the user's F.layer_norm three times at third order; the traced
    path has the derived rule. The oracle: the formula by hand, iterated with autograd."""
    torch.manual_seed(0)
    W = 0.3 * torch.randn(4, 4, dtype=DT)
    weight, bias = torch.tensor([1.3, 0.7, -0.4, 1.1], dtype=DT), torch.tensor([0.2, -0.1, 0.3, 0.0], dtype=DT)

    def f(x, z):
        return 0.4 * F.layer_norm(x @ W.T + z, (4,), weight, bias)

    def f_by_hand(x, z):
        return 0.4 * _layer_norm_by_hand(x @ W.T + z, weight, bias)

    z = torch.tensor([[0.3, -1.2, 0.8, 2.0], [1.0, 0.2, -0.5, 0.1]], dtype=DT)
    got = _third(lambda t: fpidsl.fixed_point(f, torch.zeros_like(t), t, trace=trace, per_sample=True,
                                               tol=1e-14, max_iter=400, backward=TIGHT), z)
    want = _third(lambda t: _unrolled(f_by_hand, t, 200), z)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_softplus_with_beta_zero_is_rejected(tmp_path):
    path = tmp_path / "t.fpi"
    path.write_text("layer T {\n  input a : [B, 4]\n  state x : [B, 4]\n"
                    "  update x = 0.5 * softplus(x, beta=0) + a\n}\n")
    with pytest.raises(FpiErrors) as info:
        fpidsl.load(str(path))
    (error,) = info.value.errors
    assert error.kind == "shape" and "beta of softplus must not be 0" in error.message
    assert (error.span.line, error.span.col) == (4, 37)


def test_the_layer_norm_formula_is_not_used_in_half_precision_or_under_autocast():
    """The formula in bfloat16 was 5x less accurate than the fused kernel (which accumulates in float32), and under
    autocast it returned float32 where the kernel gives bfloat16: there the fused kernel runs, as before."""
    from fpidsl.runtime import ops

    torch.manual_seed(0)
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    w, b = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    assert torch.equal(ops.layer_norm(x, w, b, shape=(64,)), F.layer_norm(x, (64,), w, b))
    xf = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.layer_norm(xf, w.float(), b.float(), shape=(64,))
        want = F.layer_norm(xf, (64,), w.float(), b.float())
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_recorded_layer_norm_is_fused_at_first_order_and_right_at_every_order():
    """The emitted layer_norm where autograd records it: torch's fused kernels for the forward and the first backward
    (the formula alone cost 3.5x in first-order training, a review found), the formula's backward of a backward."""
    from fpidsl.runtime import ops
    from torch.autograd import gradcheck, gradgradcheck

    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=DT, requires_grad=True)
    w = torch.randn(5, dtype=DT, requires_grad=True)
    b = torch.randn(5, dtype=DT, requires_grad=True)
    y = ops.layer_norm(x, w, b, shape=(5,))
    assert torch.equal(y, F.layer_norm(x, (5,), w, b))
    assert type(y.grad_fn).__name__ == "LayerNormExactAtEveryOrderBackward"
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (want,) = torch.autograd.grad(F.layer_norm(x, (5,), w, b).square().sum(), x)
    assert torch.equal(g, want)  # torch's own backward kernel

    def gradient(x, w, b):
        (gx,) = torch.autograd.grad((ops.layer_norm(x, w, b, shape=(5,)) ** 3).sum(), x, create_graph=True)
        return gx

    assert gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, shape=(5,)), (x, w, b))
    assert gradgradcheck(lambda x, w, b: ops.layer_norm(x, w, b, shape=(5,)), (x, w, b))
    assert gradgradcheck(gradient, (x, w, b))  # the third derivative: fails for F.layer_norm
    assert not gradgradcheck(lambda x, w, b: torch.autograd.grad((F.layer_norm(x, (5,), w, b) ** 3).sum(), x,
                                                                  create_graph=True)[0], (x, w, b),
                             raise_exception=False)
