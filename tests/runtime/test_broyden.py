"""Broyden, damped Picard and GMRES: closed forms, a dense reference iteration, per-sample independence, the hard
linear map's iteration counts, and GMRES on an adjoint that the fixed-point iteration cannot solve."""
import pytest
import torch

from fpidsl.runtime import ConvergenceError, fixed_point
from fpidsl.runtime.solvers import Broyden, Picard

from .helpers import DTYPE, rel_err

torch.manual_seed(0)


def _linear(n, radius, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=DTYPE, generator=g)
    A = radius * A / torch.linalg.eigvals(A).abs().max()
    b = torch.randn(batch, n, dtype=DTYPE, generator=g)
    exact = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A, b.T).T
    return A, b, exact


def test_broyden_finds_the_closed_form_of_an_affine_map_within_2n_steps():
    n = 8
    A, b, exact = _linear(n, 0.9)
    x, stats = fixed_point(lambda x, b: x @ A.T + b, torch.zeros_like(b), b, method="broyden", m=2 * n + 2,
                           tol=1e-12, return_stats=True)
    assert rel_err(x, exact) < 1e-10
    assert stats.forward.all_ok
    assert stats.forward.max_iterations <= 2 * n + 1  # Gay's theorem: 2n Broyden steps, plus the last evaluation


def _dense_broyden(f, x, steps):
    """Good Broyden on one sample with an explicit inverse Jacobian H of F(x) = f(x) - x: the oracle."""
    H = -torch.eye(x.numel(), dtype=x.dtype)
    F = f(x) - x
    iterates = [x]
    for _ in range(steps):
        x_new = x - H @ F
        F_new = f(x_new) - x_new
        dx, dF = x_new - x, F_new - F
        H = H + torch.outer(dx - H @ dF, dx @ H) / (dx @ H @ dF)
        x, F = x_new, F_new
        iterates.append(x)
    return iterates


def test_broyden_iterates_equal_a_dense_reference_on_a_nonlinear_map_per_sample():
    n, batch, steps = 5, 3, 12
    W = 0.8 * torch.randn(n, n, dtype=DTYPE) / n**0.5
    c = torch.randn(batch, n, dtype=DTYPE)
    solver = Broyden(m=steps + 1)
    x = torch.zeros(batch, n, dtype=DTYPE)
    state = solver.init(x)
    ours = [x]
    for _ in range(steps):
        x, state = solver.step(x, torch.tanh(x @ W.T + c), state)
        ours.append(x)
    for s in range(batch):
        reference = _dense_broyden(lambda z: torch.tanh(W @ z + c[s]), torch.zeros(n, dtype=DTYPE), steps)
        for mine, theirs in zip(ours, reference):
            assert torch.allclose(mine[s], theirs, rtol=1e-9, atol=1e-12)


def test_broyden_samples_converge_on_their_own():
    n = 6
    A, b, exact = _linear(n, 0.95, batch=5)
    b = b * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0], dtype=DTYPE)[:, None]
    f = lambda x, b: torch.tanh(x @ A.T) + b  # noqa: E731
    x, stats = fixed_point(f, torch.zeros_like(b), b, batched=[True], method="broyden", tol=1e-11,
                           return_stats=True)
    assert stats.forward.all_ok
    assert len(set(stats.forward.iterations.tolist())) > 1  # finished at different iterations
    for s in range(5):
        alone = fixed_point(f, torch.zeros_like(b[s : s + 1]), b[s : s + 1], method="broyden", tol=1e-11)
        assert torch.allclose(alone, x[s : s + 1], rtol=1e-12, atol=1e-14)


def test_hard_linear_map_iteration_counts_broyden_below_anderson_below_picard(capsys):
    """W = 0.99 * orthogonal, dimension 128, batch 16, tol 1e-8 (the issue's hard map)."""
    n, batch = 128, 16
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DTYPE, generator=g))
    W = 0.99 * Q
    b = torch.randn(batch, n, dtype=DTYPE, generator=g)
    exact = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - W, b.T).T
    counts = {}
    for name, settings in {"picard": {}, "anderson(m=20)": {"method": "anderson", "m": 20},
                           "broyden(m=300)": {"method": "broyden", "m": 300}}.items():
        x, stats = fixed_point(lambda x, b: x @ W.T + b, torch.zeros_like(b), b, tol=1e-8, max_iter=3000,
                               return_stats=True, **settings)
        assert stats.forward.all_ok, name
        assert rel_err(x, exact) < 1e-6, name
        counts[name] = stats.forward.max_iterations
    with capsys.disabled():
        print(f"\nhard linear map iterations: {counts}")
    assert counts["broyden(m=300)"] < counts["anderson(m=20)"] < counts["picard"]
    assert counts["broyden(m=300)"] <= 2 * n + 1


def test_broyden_restarts_when_its_memory_is_full_and_still_converges():
    n = 16
    A, b, exact = _linear(n, 0.9)
    x, stats = fixed_point(lambda x, b: x @ A.T + b, torch.zeros_like(b), b, method="broyden", m=4, tol=1e-10,
                           max_iter=2000, return_stats=True)
    assert stats.forward.all_ok and rel_err(x, exact) < 1e-8


def test_picard_beta_damps_the_step():
    x = torch.tensor([[0.0, 4.0]], dtype=DTYPE)
    g = torch.tensor([[2.0, 2.0]], dtype=DTYPE)
    step, _ = Picard(beta=0.25).step(x, g, None)
    assert torch.equal(step, torch.tensor([[0.5, 3.5]], dtype=DTYPE))
    # x <- 2 - x cycles 0, 2, 0, ... undamped; beta = 0.5 lands on the fixed point 1 in one step
    x0 = torch.zeros(1, 1, dtype=DTYPE)
    _, undamped = fixed_point(lambda x: 2 - x, x0, max_iter=50, on_fail="ignore", return_stats=True)
    assert not undamped.forward.all_ok
    x, damped = fixed_point(lambda x: 2 - x, x0, beta=0.5, return_stats=True)
    assert damped.forward.all_ok and damped.forward.max_iterations == 2 and float(x) == 1.0


# ------------------------------------------------------------------------------------------------- GMRES


def test_gmres_backward_equals_the_fixed_point_backward_on_a_contractive_map():
    n = 7
    W = (0.7 * torch.randn(n, n, dtype=DTYPE) / n**0.5).requires_grad_()
    c = torch.randn(3, n, dtype=DTYPE, requires_grad=True)
    f = lambda x, W, c: torch.tanh(x @ W.T + c)  # noqa: E731
    grads = {}
    for method in ("picard", "gmres", "broyden"):  # Broyden on the adjoint too
        x, stats = fixed_point(f, torch.zeros_like(c), W, c, tol=1e-13, return_stats=True,
                               backward={"method": method, "tol": 1e-13, "on_fail": "raise"})
        grads[method] = torch.autograd.grad((x * torch.linspace(-1, 1, n, dtype=DTYPE)).sum(), (W, c))
        assert stats.backward.all_ok and stats.backward.settings.method == method
    for other in ("gmres", "broyden"):
        for a, b in zip(grads["picard"], grads[other]):
            assert rel_err(b, a) < 1e-10


def test_gmres_solves_an_adjoint_of_spectral_radius_1_05_where_the_iteration_diverges():
    n = 8
    A, b, exact = _linear(n, 1.05)
    b = b.clone().requires_grad_()
    w = torch.randn(n, dtype=DTYPE)
    f = lambda x, b: x @ A.T + b  # noqa: E731
    forward = {"method": "broyden", "m": 2 * n + 2, "tol": 1e-12}
    x = fixed_point(f, torch.zeros_like(b), b, backward={"on_fail": "raise"}, **forward)
    assert rel_err(x, exact) < 1e-9
    with pytest.raises(ConvergenceError, match="diverged"):
        torch.autograd.grad((x @ w).sum(), b)
    x, stats = fixed_point(f, torch.zeros_like(b), b, backward={"method": "gmres", "tol": 1e-12, "on_fail": "raise"},
                           return_stats=True, **forward)
    (grad,) = torch.autograd.grad((x @ w).sum(), b)
    closed = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A.T, w).expand_as(grad)  # (I - A)^-T w per sample
    assert rel_err(grad, closed) < 1e-9
    assert stats.backward.all_ok and stats.backward.max_iterations <= n + 3


@pytest.mark.parametrize("backward", [{"method": "gmres", "m": 3}, {"method": "broyden"}])
def test_gmres_and_broyden_backward_are_exact_to_second_order(backward):
    n = 4
    W = 0.6 * torch.randn(n, n, dtype=DTYPE) / n**0.5
    c = torch.randn(2, n, dtype=DTYPE, requires_grad=True)

    def fp(c):
        return fixed_point(lambda x, c: torch.tanh(x @ W.T + c), torch.zeros_like(c), c, tol=1e-14,
                           max_iter=2000, method="broyden", backward={**backward, "tol": 1e-14, "max_iter": 2000})

    assert torch.autograd.gradcheck(fp, (c,))
    assert torch.autograd.gradgradcheck(fp, (c,))


def test_gmres_per_sample_and_restarts():
    n = 12
    A, b, exact = _linear(n, 0.99, batch=3)
    b = (b * torch.tensor([1.0, 1e4, 1e-4], dtype=DTYPE)[:, None]).requires_grad_()
    w = torch.randn(3, n, dtype=DTYPE)
    closed = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A.T, w.T).T
    x, stats = fixed_point(lambda x, b: x @ A.T + b, torch.zeros_like(b), b, method="broyden", m=30, tol=1e-12,
                           backward={"method": "gmres", "m": 4, "tol": 1e-12}, return_stats=True)
    (grad,) = torch.autograd.grad((x * w).sum(), b)
    for s in range(3):  # every sample to its own relative tolerance, whatever its scale
        assert rel_err(grad[s], closed[s]) < 1e-9
    assert stats.backward.all_ok and stats.backward.max_iterations > 6  # restarted (m = 4)


def test_gmres_stops_at_the_precision_floor_instead_of_burning_max_iter():
    n = 30
    W = 0.9 * torch.randn(n, n, dtype=DTYPE) / n**0.5
    b = torch.randn(3, n, dtype=DTYPE, requires_grad=True)
    x, stats = fixed_point(lambda x, b: torch.tanh(x @ W.T + b), torch.zeros_like(b), b, tol=1e-13,
                           backward={"method": "gmres", "m": 5, "tol": 1e-30, "max_iter": 5000}, return_stats=True)
    torch.autograd.grad(x.sum(), b)
    s = stats.backward
    assert s.all_ok and bool(s.stopped_at_floor.any()) and s.max_iterations < 1000, s
