"""Compiled layers against hand-written PyTorch: forward, gradients (gradcheck, gradgradcheck), the
emitted backward map against the autograd fallback, closed forms, and a short training run."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import fpidsl
from fpidsl.runtime.fixed_point import fixed_point

torch.manual_seed(0)
TIGHT = {"tol": 1e-12, "max_iter": 2000, "on_fail": "raise"}


def layer(spec, name, **settings):
    torch.manual_seed(0)
    path = f"tests/specs/{spec}" if spec.startswith("quad") else f"specs/{spec}"
    cls = fpidsl.load(path, name=name)
    return cls(solve={**TIGHT, **settings}, backward=TIGHT).double()


def solve(step, x0, *args):
    """The reference: the same map iterated by hand to convergence, differentiated by autograd through
    the runtime's plain operator (no emitted adjoint)."""
    return fixed_point(step, x0, *args, tol=1e-12, max_iter=2000, on_fail="raise",
                       backward={"tol": 1e-12, "max_iter": 2000, "on_fail": "raise"})


def box_nn_map(m):
    return lambda x, a: m.fc2(F.relu(m.fc1(torch.cat([x, a], -1))))


def gd_map(energy, step):
    """x - step * grad(E, x), differentiated by autograd."""
    def g(x, a):
        with torch.enable_grad():
            xx = x if x.requires_grad else x.detach().requires_grad_()
            (gx,) = torch.autograd.grad(energy(xx, a).sum(), xx, create_graph=True)
        return x - step * gx
    return g


def box_gd_energy(m):
    return lambda x, a: m.e2(F.relu(m.e1(torch.cat([x, a], -1)))).square().sum(-1)


def quad_energy(m):
    return lambda x, a: 0.5 * (x - a).square().sum(-1) + F.softplus(
        m.e2(torch.tanh(m.e1(torch.cat([x, a], -1))))).sum(-1)


def test_box_projection_nn_matches_hand_written():
    m = layer("box_projection.fpi", "BoxProjectionNN")
    a = torch.randn(4, 10, dtype=torch.float64)
    x = m(a)
    g = box_nn_map(m)
    assert torch.allclose(g(x, a), x, atol=1e-10)
    x_ref = solve(g, torch.zeros_like(a), a)
    assert torch.allclose(x, x_ref, atol=1e-10)


def test_box_projection_gd_step_matches_hand_written():
    # The paper's energy has a rank-one Hessian in x (a scalar squared), so its fixed points are not
    # isolated; compare the compiled map g itself at random points.
    m = layer("box_projection.fpi", "BoxProjectionGD")
    x, a = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    ours = type(m).step(x, a, *m.parameter_tensors())
    assert torch.allclose(ours, gd_map(box_gd_energy(m), 0.01)(x, a), atol=1e-12)


def test_quadratic_gd_matches_hand_written():
    m = layer("quad_gd.fpi", "QuadGD")
    a = torch.randn(3, 4, dtype=torch.float64)
    x = m(a)
    g = gd_map(quad_energy(m), 0.5)
    assert torch.allclose(g(x, a), x, atol=1e-10)
    assert torch.allclose(x, solve(g, torch.zeros_like(a), a), atol=1e-10)


@pytest.mark.parametrize("spec, name", [("box_projection.fpi", "BoxProjectionNN"), ("quad_gd.fpi", "QuadGD")])
def test_gradcheck_and_gradgradcheck(spec, name):
    m = layer(spec, name)
    a = torch.randn(2, m.INPUTS["a"][1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (a,), atol=1e-6)
    assert torch.autograd.gradgradcheck(m, (a,), atol=1e-5)


@pytest.mark.parametrize("spec, name, shape", [
    ("box_projection.fpi", "BoxProjectionNN", (3, 10)),
    ("quad_gd.fpi", "QuadGD", (3, 4)),
    ("denoise.fpi", "DenoiseNN", (2, 1, 6, 6)),
    ("denoise_residual.fpi", "DenoiseResNN", (2, 1, 6, 6)),
    ("optical_flow.fpi", "FlowRefineNN", (2, 2, 8, 8)),
])
def test_emitted_backward_equals_autograd_fallback(spec, name, shape):
    m = layer(spec, name)
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = m(z)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [z, *m.parameters()])
    adjoint = type(m).adjoint
    type(m).adjoint = None  # the runtime's autograd fallback
    try:
        out2 = m(z)
        grads2 = torch.autograd.grad((out2 * w).sum(), [z, *m.parameters()])
    finally:
        type(m).adjoint = adjoint
    for g1, g2 in zip(grads, grads2):
        assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-10)


def test_denoise_matches_hand_written():
    m = layer("denoise.fpi", "DenoiseNN")
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x = m(z)
    g = lambda x, z: m.conv2(F.relu(m.conv1(torch.cat([x, z], 1))))  # noqa: E731
    assert torch.allclose(g(x, z), x, atol=1e-10)


def test_optical_flow_matches_hand_written():
    m = layer("optical_flow.fpi", "FlowRefineNN")
    f = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x = m(f)
    g = lambda x, f: m.up(F.relu(m.down(torch.cat([x, f], 1))))  # noqa: E731
    assert torch.allclose(g(x, f), x, atol=1e-12)


def test_bibtex_layers_run_and_fix():
    nn_layer = layer("bibtex.fpi", "BibtexNN")
    x = (torch.rand(2, 1836, dtype=torch.float64) < 0.05).double()
    y = nn_layer(x)
    g = lambda y, x: torch.sigmoid(nn_layer.fc2(F.relu(nn_layer.fc1(torch.cat([y, x], -1)))))  # noqa: E731
    assert torch.allclose(g(y, x), y, atol=1e-9)
    gd = layer("bibtex.fpi", "BibtexGD", tol=1e-10, criterion="absolute", method="anderson")
    out = gd(x)
    assert out.shape == (2, 159) and ((out > 0) & (out < 1)).all()
    (y,) = gd._last_states
    energy = lambda y, x: (y - gd.fc2(F.relu(gd.fc1(torch.cat([torch.sigmoid(y), x], -1))))).square().mean(-1)  # noqa: E731
    assert torch.allclose(gd_map(energy, 1.0)(y, x), y, atol=1e-9)
    assert torch.allclose(out, torch.sigmoid(y))


def test_closed_form_linear_fixed_point(tmp_path):
    spec = tmp_path / "lin.fpi"
    spec.write_text(
        "layer Lin {\n  input z : [B, 3]\n  state x : [B, 3]\n"
        "  param A : tensor [3, 3] = uniform(-0.2, 0.2)\n  param Bm : tensor [3, 3] = normal(0, 1)\n"
        "  update x = x @ transpose(A, 0, 1) + z @ transpose(Bm, 0, 1)\n}\n"
    )
    m = fpidsl.load(str(spec))(solve=TIGHT, backward=TIGHT).double()
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(3, dtype=torch.float64)

    def closed(z, A, Bm):
        return torch.linalg.solve(eye - A, Bm @ z.T).T

    x = m(z)
    assert torch.allclose(x, closed(z, m.A, m.Bm), atol=1e-10)
    # derivatives of orders 1..3 in z, A, B against the closed form
    w = torch.randn(2, 3, dtype=torch.float64)
    params = [z, m.A, m.Bm]

    def third(fn):
        out = (fn() * w).sum()
        g1 = torch.autograd.grad(out, params, create_graph=True)
        s1 = sum((g * g).sum() for g in g1)
        g2 = torch.autograd.grad(s1, params, create_graph=True)
        s2 = sum((g * torch.ones_like(g)).sum() for g in g2)
        g3 = torch.autograd.grad(s2, params)
        return g1, g2, g3

    ours = third(lambda: m(z))
    ref = third(lambda: closed(z, m.A, m.Bm))
    for order_ours, order_ref in zip(ours, ref):
        for a, b in zip(order_ours, order_ref):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    m = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")(solve={"tol": 1e-5})
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    a = 2 * torch.randn(256, 10)
    target = a.clamp(-1, 1)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(m(a), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_settings_override_and_unknown_keys():
    cls = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")
    m = cls(solve={"tol": 1e-10}, backward={"max_iter": 2000})
    assert m.solve_settings.tol == 1e-10 and m.solve_settings.method == "anderson"
    assert m.backward_settings.max_iter == 2000
    with pytest.raises(ValueError, match="unknown solver setting 'tolerance'"):
        cls(solve={"tolerance": 1e-3})


def test_wrong_input_shapes_are_clear_errors():
    m = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")()
    with pytest.raises(fpidsl.LayerInputError, match=r"input 'a' is declared \[B, 10\]: dimension 1 must be 10"):
        m(torch.randn(3, 11))
    assert issubclass(fpidsl.LayerInputError, ValueError)
    with pytest.raises(ValueError, match="missing input"):
        m()
    with pytest.raises(ValueError, match="no input named 'b'"):
        m(b=torch.randn(3, 10))


def test_params_are_ordinary_modules():
    m = fpidsl.load("specs/denoise.fpi")()
    assert isinstance(m.conv1, torch.nn.Conv2d) and isinstance(m, torch.nn.Module)
    assert set(m.state_dict()) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}


def test_closed_form_energy_minimiser_to_third_order(tmp_path):
    """E = 0.5 |x - a W^T|^2 + 0.5 lam |x|^2 has minimiser x = a W^T / (1 + lam); descend reaches it."""
    spec = tmp_path / "quad.fpi"
    spec.write_text(
        "layer Quad {\n  input a : [B, 3]\n  state x : [B, 2]\n  param W : tensor [2, 3] = normal(0, 0.5)\n"
        "  const lam = 0.5\n"
        "  energy E = 0.5 * sum(square(x - a @ transpose(W, 0, 1)), dim=-1) + 0.5 * lam * sum(square(x), dim=-1)\n"
        "  descend x on E step 0.4\n}\n"
    )
    m = fpidsl.load(str(spec))(solve=TIGHT, backward=TIGHT).double()
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    closed = lambda a, W: a @ W.T / 1.5  # noqa: E731
    assert torch.allclose(m(a), closed(a, m.W), atol=1e-10)
    params = [a, m.W]
    w = torch.randn(4, 2, dtype=torch.float64)

    def orders(fn):
        g1 = torch.autograd.grad((fn() * w).sum(), params, create_graph=True)
        g2 = torch.autograd.grad(sum((g ** 2).sum() for g in g1), params, create_graph=True)
        g3 = torch.autograd.grad(sum((g ** 3).sum() for g in g2), params)
        return [*g1, *g2, *g3]

    for ours, ref in zip(orders(lambda: m(a)), orders(lambda: closed(a, m.W))):
        assert torch.allclose(ours, ref, rtol=1e-8, atol=1e-10)


def test_fpi_and_yaml_twins_give_identical_layers():
    torch.manual_seed(3)
    a = fpidsl.load("specs/denoise.fpi")(solve=TIGHT).double()
    torch.manual_seed(3)
    b = fpidsl.load("specs/denoise.yaml")(solve=TIGHT).double()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    z = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert torch.equal(a(z), b(z))


def test_a_map_that_mixes_samples_is_solved_jointly(tmp_path):
    """update x = a * x + mean(a, dim=0): finished samples must not be dropped from the work."""
    spec = tmp_path / "mix.fpi"
    spec.write_text("layer Mix {\n  input a : [B, 1]\n  state x : [B, 1]\n  update x = a * x + mean(a, dim=0)\n}\n")
    cls = fpidsl.load(str(spec))
    assert cls.SAMPLEWISE is False
    m = cls(solve={"tol": 1e-12, "max_iter": 5000}).double()
    a = torch.tensor([[0.1], [0.9]], dtype=torch.float64)
    assert torch.allclose(m(a), 0.5 / (1 - a), atol=1e-9)
    assert fpidsl.load("specs/denoise.fpi").SAMPLEWISE is True


@pytest.mark.parametrize("spec,name", [("bibtex.fpi", "BibtexNN"), ("bibtex.fpi", "BibtexGD"),
                                       ("denoise.fpi", "DenoiseNN")])
def test_vjp_args_computes_only_the_gradients_asked_for(spec, name):
    m = layer(spec, name)
    cls = type(m)
    shapes = {"B": 2, "H": 6, "W": 6}
    z = torch.randn(*[shapes.get(d, d) for d in next(iter(m.INPUTS.values()))], dtype=torch.float64)
    x = torch.randn(*[shapes.get(d, d) for d in next(iter(m.STATES.values()))], dtype=torch.float64)
    args = (z, *[p.detach() for p in m.parameter_tensors()])
    saved = cls.adjoint.prepare((x,), args)
    c = (torch.randn_like(x),)
    full = cls.adjoint.vjp_args(saved, c)
    needs = (False,) + (True,) * (len(args) - 1)
    some = cls.adjoint.vjp_args(saved, c, needs)
    assert some[0] is None and full[0] is not None
    for a, b in zip(full[1:], some[1:]):
        assert torch.equal(a, b)
    only_input = cls.adjoint.vjp_args(saved, c, (True,) + (False,) * (len(args) - 1))
    assert torch.equal(only_input[0], full[0]) and all(g is None for g in only_input[1:])


def test_an_energy_scaled_by_a_number_runs_and_has_the_closed_form_minimiser(tmp_path):
    """`0.5 * sum(...)` in an energy: the gradient of the sum is a number broadcast to the state's shape, which the
    emitted code used to write as `expand_as(0.5, ...)` (checked clean, then failed at the first call)."""
    spec = tmp_path / "scaled.fpi"
    spec.write_text("""
layer Scaled {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param W : tensor [4, 4] = normal(0, 0.1)
  energy E = 0.5 * sum(square(x)) + 0.5 * sum(x * (x @ W)) - sum(a * x)
  descend x on E step 0.5
}
""")
    m = fpidsl.load(str(spec))(solve=TIGHT, backward=TIGHT).double()
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = m.W.detach()
    want = torch.linalg.solve((torch.eye(4, dtype=torch.float64) + 0.5 * (W + W.T)).T, a.detach().T).T
    torch.testing.assert_close(m(a), want, rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(m, (a,))
