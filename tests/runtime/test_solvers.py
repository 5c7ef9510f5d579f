"""The solvers on their own: Picard's step, Anderson's mix, and Anderson's fallback on a bad least-squares system."""
import torch

from fpidsl.runtime import Anderson, Picard, fixed_point

from .helpers import DTYPE, generator, max_rel_err


def test_picard_step_is_the_map():
    x, g = torch.randn(3, 4), torch.randn(3, 4)
    solver = Picard()
    assert torch.equal(solver.step(x, g, solver.init(x))[0], g)


def test_anderson_solves_a_linear_map_in_few_steps():
    # On g(x) = A x + b, Anderson(m) is a Krylov method: with m >= n it finds the fixed point in about n+1 steps.
    gen = generator(0)
    n = 4
    A = 0.9 * torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))[0]  # |A| = 0.9: Picard is slow
    b = torch.randn(2, n, generator=gen, dtype=DTYPE)
    x_a, s_a = fixed_point(lambda x: x @ A.T + b, torch.zeros(2, n, dtype=DTYPE), method="anderson", m=n,
                           lam=0.0, tol=1e-12, return_stats=True)
    x_p, s_p = fixed_point(lambda x: x @ A.T + b, torch.zeros(2, n, dtype=DTYPE), tol=1e-12, return_stats=True)
    want = torch.linalg.solve(torch.eye(n, dtype=DTYPE) - A, b.T).T
    assert max_rel_err([x_a, x_p], [want, want]) <= 1e-10
    assert s_a.forward.max_iterations <= n + 3 < s_p.forward.max_iterations


def test_anderson_falls_back_to_the_plain_step_on_a_singular_system():
    solver = Anderson(m=3, beta=0.5, lam=0.0)
    x = torch.zeros(2, 3, dtype=DTYPE)
    state = solver.init(x)
    g = torch.ones(2, 3, dtype=DTYPE)
    x1, state = solver.step(x, g, state)  # no history yet: the plain (damped) step
    assert torch.equal(x1, 0.5 * g)
    # same residual again: the difference dF is zero, the Gram matrix is singular (lam=0): plain step, no crash
    x2, state = solver.step(x1, x1 + (g - x), state)
    assert torch.isfinite(x2).all()
    assert torch.allclose(x2, x1 + 0.5 * (g - x))


def test_anderson_bad_sample_does_not_touch_the_good_one():
    solver = Anderson(m=2, lam=0.0)
    x = torch.zeros(2, 2, dtype=DTYPE)
    state = solver.init(x)
    g0 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DTYPE)
    x1, state = solver.step(x, g0, state)
    g1 = torch.tensor([[1.5, 1.25], [float("inf"), 1.0]], dtype=DTYPE)  # sample 1 blows up
    x2, _ = solver.step(x1, g1, state)
    alone = Anderson(m=2, lam=0.0)
    s = alone.init(x[:1])
    y1, s = alone.step(x[:1], g0[:1], s)
    y2, _ = alone.step(y1, g1[:1], s)
    assert torch.equal(x2[0], y2[0])


def test_anderson_never_crashes_on_degenerate_problems():
    cases = [
        (lambda x: 0.5 * x + 1, torch.zeros(3, 1, dtype=DTYPE)),  # one dimension: every history is collinear
        (lambda x: torch.cos(x), torch.zeros(3, 1, dtype=DTYPE)),
        (lambda x: 0.5 * x + 1e150, torch.zeros(2, 3, dtype=DTYPE)),  # huge scale
        (lambda x: 0.5 * x + 1e-150, torch.zeros(2, 3, dtype=DTYPE)),  # tiny scale
        (lambda x: 0.5 * x, torch.zeros(2, 3, dtype=DTYPE)),  # exact fixed point at the start
    ]
    for lam in (0.0, 1e-4):
        for f, x0 in cases:
            _, stats = fixed_point(f, x0, method="anderson", m=5, lam=lam, tol=1e-12, return_stats=True)
            assert stats.forward.all_ok, stats.forward
            assert stats.forward.max_iterations < 40
