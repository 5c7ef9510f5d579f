"""Per-sample convergence, min_iter, the precision floor, divergence and non-convergence under each on_fail."""
import contextlib
import math

import pytest
import torch

from fpidsl.runtime import ConvergenceError, ConvergenceWarning, Stats, fixed_point, native

from .helpers import DTYPE, generator, max_rel_err


def scaled_tanh(x, W, z, a):
    """Per-sample contraction factor a: g = tanh(a * W x + z), |W|_2 = 1."""
    return torch.tanh(a[:, None] * (x @ W.T) + z)


def mixed_batch(n=6):
    gen = generator(11)
    W = torch.randn(n, n, generator=gen, dtype=DTYPE)
    W = W / torch.linalg.matrix_norm(W, ord=2)
    z = torch.randn(4, n, generator=gen, dtype=DTYPE)
    a = torch.tensor([0.1, 0.97, 0.5, 0.9], dtype=DTYPE)  # easy, hard, medium, hard
    return W, z, a


SOLVE_MODES = {
    "picard": {},
    "anderson": {"method": "anderson", "m": 3},
    "picard-compacting": {"batched": (False, True, True)},
    "anderson-compacting": {"method": "anderson", "m": 3, "batched": (False, True, True)},
    # memories that are not full when the first samples leave: the selected rows keep only the filled slots
    "anderson-long-memory": {"method": "anderson", "m": 40},
    "broyden": {"method": "broyden"},
    "broyden-compacting": {"method": "broyden", "batched": (False, True, True)},
}


@pytest.mark.parametrize("code", ["native", "tensor"])
@pytest.mark.parametrize("mode", SOLVE_MODES)
def test_each_sample_gets_the_result_it_gets_alone(mode, code):
    W, z, a = mixed_batch()
    settings = {"tol": 1e-10, **SOLVE_MODES[mode]}
    with contextlib.nullcontext() if code == "native" else native.turned_off():
        _each_sample_alone(W, z, a, settings)


def _each_sample_alone(W, z, a, settings):
    x, stats = fixed_point(scaled_tanh, torch.zeros_like(z), W, z, a, return_stats=True, **settings)
    iterations = stats.forward.iterations
    assert stats.forward.converged.all()
    assert iterations[0] < iterations[1]  # the easy sample stopped first ...
    for i in range(z.shape[0]):
        xi, si = fixed_point(scaled_tanh, torch.zeros_like(z[i : i + 1]), W, z[i : i + 1], a[i : i + 1],
                             return_stats=True, **settings)
        assert si.forward.iterations.item() == iterations[i].item()  # ... and was not iterated further
        assert max_rel_err([x[i]], [xi[0]]) <= 1e-13


def test_per_sample_gradients_match_solving_alone():
    W, z, a = mixed_batch()
    z = z.clone().requires_grad_()
    x = fixed_point(scaled_tanh, torch.zeros_like(z), W, z, a, tol=1e-12, backward={"tol": 1e-12})
    (grad,) = torch.autograd.grad(torch.sin(x).sum(), [z])
    for i in range(z.shape[0]):
        zi = z[i : i + 1].detach().requires_grad_()
        xi = fixed_point(scaled_tanh, torch.zeros_like(zi), W, zi, a[i : i + 1], tol=1e-12, backward={"tol": 1e-12})
        (gi,) = torch.autograd.grad(torch.sin(xi).sum(), [zi])
        assert max_rel_err([grad[i]], [gi[0]]) <= 1e-10


@pytest.mark.parametrize("mode", ["picard", "picard-compacting"])
def test_a_diverging_sample_does_not_disturb_the_others(mode):
    W, z, a = mixed_batch()
    a = a.clone()
    a[2] = float("nan")  # sample 2 produces NaN from its first step
    x, stats = fixed_point(scaled_tanh, torch.zeros_like(z), W, z, a, tol=1e-10, on_fail="ignore",
                           return_stats=True, **SOLVE_MODES[mode])
    assert stats.forward.diverged.tolist() == [False, False, True, False]
    assert stats.forward.iterations[2] == 1
    for i in (0, 1, 3):
        xi = fixed_point(scaled_tanh, torch.zeros_like(z[i : i + 1]), W, z[i : i + 1], a[i : i + 1], tol=1e-10)
        assert max_rel_err([x[i]], [xi[0]]) <= 1e-13


def test_min_iter_forces_iterations():
    def constant(x, c):
        return c.expand_as(x)

    c = torch.ones(1, 3, dtype=DTYPE)
    _, stats = fixed_point(constant, torch.zeros(2, 3, dtype=DTYPE), c, min_iter=7, return_stats=True)
    assert stats.forward.iterations.tolist() == [7, 7]
    _, stats = fixed_point(constant, torch.zeros(2, 3, dtype=DTYPE), c, return_stats=True)
    assert stats.forward.iterations.tolist() == [2, 2]


@pytest.mark.parametrize("criterion", ["relative", "absolute"])
def test_criteria_measure_the_step(criterion):
    # g(x) = 0.5 x + 10: from x0 = 0 the steps are 10, 5, 2.5, ...; |x_n| -> 20.
    def affine(x):
        return 0.5 * x + 10

    tol = 1e-3
    _, stats = fixed_point(affine, torch.zeros(1, 1, dtype=DTYPE), tol=tol, criterion=criterion, history=True,
                           return_stats=True)
    s = stats.forward
    n = int(s.iterations)
    # iterate by hand: the residual of evaluation k is |g(x_k) - x_k| (/|x_k|), x_0 = 0
    x, expected = 0.0, []
    for _ in range(n):
        step = abs(0.5 * x + 10 - x)
        expected.append(step if criterion == "absolute" else (math.inf if x == 0 else step / abs(x)))
        x = 0.5 * x + 10
    assert s.history[:, 0].tolist() == pytest.approx(expected)
    assert expected[-1] < tol <= expected[-2]
    assert s.residual.item() == pytest.approx(expected[-1])


def test_precision_floor_float32_stops_early_and_says_so():
    gen = generator(3)
    W = 0.6 * torch.randn(32, 32, generator=gen) / 32**0.5
    z = torch.randn(8, 32, generator=gen)
    x, stats = fixed_point(lambda x, W, z: torch.tanh(x @ W.T + z), torch.zeros(8, 32), W, z, tol=1e-10,
                           return_stats=True)  # no warning: pytest turns warnings into errors
    s = stats.forward
    assert s.max_iterations < 100  # not max_iter (500)
    assert s.all_ok
    assert s.stopped_at_floor.any()
    assert (s.converged | s.stopped_at_floor).all()
    assert (s.residual[s.stopped_at_floor] > 1e-10).all()
    assert (s.residual < 1e-5).all()
    assert "stopped at the precision floor" in s.summary()
    assert x.dtype == torch.float32


def test_slow_steady_convergence_is_not_taken_for_the_precision_floor():
    """x = 0.9995 x + 1 in float32: the relative residual falls by only 0.05% a step, below 1e3 eps from step
    ~3300 on, 2000 times the error away from the answer; it must keep going to tol, not stop 'at the floor'."""
    z = torch.ones(2, 1)
    x, stats = fixed_point(lambda x, z: 0.9995 * x + z, torch.zeros(2, 1), z, tol=1e-6, max_iter=20000,
                           return_stats=True)
    s = stats.forward
    assert s.converged.all() and not s.stopped_at_floor.any()
    assert s.max_iterations > 10000
    assert torch.allclose(x, torch.full_like(x, 2000.0), rtol=1e-2)


def ill_conditioned_quadratic(n=60, batch=8):
    """H (n x n, eigenvalues 1 ... 1e-3, float64) and a batch of right-hand sides b: E(x) = x.Hx/2 - b.x."""
    gen = generator(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    H = (Q * torch.logspace(0, -3, n, dtype=torch.float64)) @ Q.T
    return H, torch.randn(batch, n, generator=gen, dtype=torch.float64)


def gradient_step(x, H, b):
    return x - 0.02 * (x @ H.T - b)


def test_an_anderson_stall_far_above_rounding_is_not_taken_for_the_precision_floor():
    """Gradient steps x - 0.02 (Hx - b) on a quadratic with condition number 1e3, Anderson in float32: the residual
    stalls for tens of iterations at 100-1000 eps and then falls again. The floor rule used to stop there (factor
    1e3) and count the samples as done far from the minimiser; now they go on to tol = 1e-6."""
    H, b = ill_conditioned_quadratic()
    minimiser = torch.linalg.solve(H, b.T).T
    x, stats = fixed_point(gradient_step, torch.zeros_like(b, dtype=torch.float32), H.float(), b.float(),
                           method="anderson", m=5, tol=1e-6, max_iter=3000, return_stats=True)
    s = stats.forward
    assert s.all_ok and x.dtype == torch.float32
    assert (s.residual < 10 * torch.finfo(torch.float32).eps).all()
    error = (x.double() - minimiser).norm(dim=1) / minimiser.norm(dim=1)
    assert (error < 0.06).all(), error  # the conditioning's share: 1e3 x the residual


def test_a_failure_near_rounding_says_so_and_anderson_is_not_advised_to_anderson():
    H, b = (t.float() for t in ill_conditioned_quadratic())
    with pytest.raises(ConvergenceError) as info:
        fixed_point(gradient_step, torch.zeros_like(b), H, b, method="anderson", m=5, tol=1e-6, max_iter=400,
                    on_fail="raise")
    message = str(info.value)
    assert "In float32 that residual is" in message and "machine epsilons" in message
    assert "method='anderson'" not in message
    with pytest.raises(ConvergenceError) as info:  # Picard far from rounding: Anderson advised, no rounding note
        fixed_point(gradient_step, torch.zeros_like(b), H, b, tol=1e-6, max_iter=50, on_fail="raise")
    message = str(info.value)
    assert "use method='anderson'" in message and "machine epsilons" not in message


def test_history_records_every_iteration_per_sample():
    W, z, a = mixed_batch()
    _, stats = fixed_point(scaled_tanh, torch.zeros_like(z), W, z, a, tol=1e-8, history=True, return_stats=True)
    s = stats.forward
    assert s.history.shape == (s.max_iterations, 4)
    for i, n in enumerate(s.iterations.tolist()):
        assert torch.isfinite(s.history[1:n, i]).all()
        assert torch.isnan(s.history[n:, i]).all()
        assert s.history[n - 1, i] == s.residual[i]


# ---------------------------------------------------------------------------------------------------------------
# Failure: divergence and non-convergence, forward and backward


def lipschitz_two(x):
    """|2|x| + 1| has Lipschitz constant 2 and no fixed point: Picard runs away."""
    return 2 * x.abs() + 1


DIVERGED_TEXT = [
    "fixed-point forward diverged for 3 of 3 samples (samples 0, 1, 2)",
    "the step |g(x)-x| grew far above the smallest seen",
    "against tol=1e-05",
    "The map is not a contraction",
    "smaller init_scale, norm=spectral",
    "method='anderson'",
]


def test_divergence_warns_by_default():
    with pytest.warns(ConvergenceWarning) as record:
        _, stats = fixed_point(lipschitz_two, torch.zeros(3, 2, dtype=DTYPE), return_stats=True)
    (message,) = [str(w.message) for w in record]
    for text in DIVERGED_TEXT:
        assert text in message
    assert stats.forward.diverged.all()
    assert stats.forward.max_iterations < 30  # detected early, not at max_iter


def test_divergence_raises():
    with pytest.raises(ConvergenceError) as info:
        fixed_point(lipschitz_two, torch.zeros(3, 2, dtype=DTYPE), on_fail="raise")
    for text in DIVERGED_TEXT:
        assert text in str(info.value)
    assert info.value.stats.diverged.all()
    assert isinstance(info.value, RuntimeError)


def test_divergence_ignored():
    x, stats = fixed_point(lipschitz_two, torch.zeros(3, 2, dtype=DTYPE), on_fail="ignore", return_stats=True)
    assert stats.forward.diverged.all() and not stats.forward.converged.any()
    assert torch.isfinite(x).all()


def test_nan_is_divergence():
    def poisoned(x):
        return x * float("nan")

    with pytest.raises(ConvergenceError, match="the iterate became NaN or Inf"):
        fixed_point(poisoned, torch.ones(2, 2, dtype=DTYPE), on_fail="raise")


def test_one_message_names_the_diverged_samples_and_those_out_of_iterations():
    """The message named only the diverged sample when others ran out of max_iter (the stats were right)."""
    a = torch.randn(3, 4, dtype=DTYPE, generator=generator(3))
    a[0, 0] = float("nan")
    s = torch.tensor([[0.5], [1.0], [0.5]], dtype=DTYPE)
    with pytest.raises(ConvergenceError) as info:
        fixed_point(lambda x, a, s: s * torch.tanh(x) + a, torch.zeros(3, 4, dtype=DTYPE), a, s, max_iter=8,
                    trace=False, on_fail="raise")
    message = str(info.value)
    assert info.value.stats.failed == [0, 1, 2]
    assert "diverged for 1 of 3 samples (sample 0) after 1 iterations: the iterate became NaN or Inf" in message
    assert "did not converge for 2 of 3 samples (samples 1, 2)" in message and "raise max_iter (now 8)" in message


def test_not_converged_message_names_samples_residual_and_settings():
    W, z, a = mixed_batch()
    with pytest.raises(ConvergenceError) as info:
        fixed_point(scaled_tanh, torch.zeros_like(z), W, z, a, tol=1e-10, max_iter=12, on_fail="raise")
    message = str(info.value)
    stats = info.value.stats
    failed = stats.failed
    assert 0 not in failed and 1 in failed  # the easy sample converged in 12 iterations, the hard one did not
    assert f"did not converge for {len(failed)} of 4 samples (samples {', '.join(map(str, failed))})" in message
    assert f"reached {stats.residual[failed].max().item():.3g}" in message
    assert "against tol=1e-10 after 12 iterations" in message
    for text in ["raise max_iter (now 12)", "loosen tol", "method='anderson'", "smaller init_scale",
                 "norm=spectral"]:
        assert text in message


def test_backward_divergence_is_reported():
    # g(x) = 2x + b: Anderson solves the forward exactly (x = -b), but c = 2c + g runs away under Picard.
    b = torch.ones(2, 3, dtype=DTYPE, requires_grad=True)
    stats = Stats()
    x = fixed_point(lambda x, b: 2 * x + b, torch.zeros(2, 3, dtype=DTYPE), b, method="anderson", tol=1e-12,
                    stats=stats, backward={"on_fail": "raise"})
    assert torch.allclose(x, -b)
    with pytest.raises(ConvergenceError) as info:
        x.sum().backward()
    message = str(info.value)
    assert message.startswith("fixed-point backward diverged for 2 of 2 samples (samples 0, 1)")
    assert "in x at the fixed point" in message
    assert "backward={'method': 'anderson'}" in message
    assert "the gradient computed from this solve is wrong" in message
    assert stats.backward is info.value.stats and stats.backward.diverged.all()

    x = fixed_point(lambda x, b: 2 * x + b, torch.zeros(2, 3, dtype=DTYPE), b, method="anderson", tol=1e-12,
                    backward={"method": "anderson", "tol": 1e-12})
    (grad,) = torch.autograd.grad(x.sum(), [b])  # Anderson solves the linear adjoint too: d(-b)/db = -1
    assert torch.allclose(grad, -torch.ones_like(b))


def test_backward_not_converged_warns():
    b = torch.ones(2, 3, dtype=DTYPE, requires_grad=True)
    x = fixed_point(lambda x, b: 0.99 * torch.tanh(x) + b, torch.zeros(2, 3, dtype=DTYPE), b,
                    backward={"max_iter": 3})
    with pytest.warns(ConvergenceWarning) as record:
        x.sum().backward()
    (message,) = [str(w.message) for w in record]
    assert message.startswith("fixed-point backward did not converge for 2 of 2 samples (samples 0, 1)")
    assert "after 3 iterations" in message
    assert "raise the backward max_iter (now 3, e.g. backward={'max_iter': 6})" in message
    assert "the gradient computed from this solve is not accurate" in message


def test_a_stalled_forward_is_named_in_the_message():
    z = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ConvergenceError) as info:
        fixed_point(lambda x, z: x - 1e-4 * (x - z), torch.zeros_like(z), z, tol=1e-10, max_iter=200,
                    on_fail="raise")
    message = str(info.value)
    assert "nearly stalled" in message and "2 of them" in message
    assert "singular" not in message  # the backward note only
    assert info.value.stats.halfway is not None and torch.isfinite(info.value.stats.halfway).all()


def test_a_slow_but_steady_forward_is_not_called_stalled():
    z = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ConvergenceError) as info:
        fixed_point(lambda x, z: 0.8 * x + z, torch.zeros_like(z), z, tol=1e-30, max_iter=60, on_fail="raise")
    assert "did not converge" in str(info.value) and "stalled" not in str(info.value)


def test_a_backward_with_an_eigenvalue_one_is_diagnosed():
    """g(x) = x - 0.5 (w.x - a) w: the fixed points form a hyperplane, the forward converges (along w), but
    I - dg/dx is singular: the backward iterate grows linearly and its relative residual falls like 1/n."""
    w = torch.tensor([[0.6, 0.8, 0.0]], dtype=torch.float64)
    a = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    x = fixed_point(lambda x, a: x - 0.5 * ((x * w).sum(-1, keepdim=True) - a) * w, torch.zeros(1, 3,
                    dtype=torch.float64), a, tol=1e-12, backward={"tol": 1e-8, "max_iter": 200, "on_fail": "raise"})
    with pytest.raises(ConvergenceError) as info:
        x.sum().backward()
    message = str(info.value)
    assert "nearly stalled" in message and "singular" in message
