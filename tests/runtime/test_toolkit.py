"""The DEQ training toolkit around a solve: the Jacobian penalty, warm starts, the best iterate on failure,
eval-time budgets, the relative criterion's large-step warning, and the positioned errors of the new settings."""
import math
import textwrap
import warnings

import pytest
import torch

import fpidsl
from fpidsl.errors import FpiError, SettingsErr
from fpidsl.runtime import ConvergenceWarning, FixedPoint, fixed_point
from fpidsl.runtime.jacobian import jacobian_penalty

from .helpers import DTYPE

N = 5


def f(x, W, c):
    return torch.tanh(x @ W.T + c)


def _map(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    W = (0.8 * torch.randn(N, N, dtype=DTYPE, generator=g) / N**0.5).requires_grad_()
    c = torch.randn(batch, N, dtype=DTYPE, generator=g).requires_grad_()
    return W, c


def _dense_frobenius(x_hat, W, c):
    """|df/dx|_F^2 per sample, from the dense Jacobian."""
    out = []
    for s in range(x_hat.shape[0]):
        J = torch.autograd.functional.jacobian(lambda z: f(z[None], W, c[s : s + 1])[0], x_hat[s].detach())
        out.append(J.pow(2).sum())
    return torch.stack(out)


def test_jacobian_penalty_expectation_matches_the_dense_frobenius_norm():
    W, c = _map()
    x = fixed_point(f, torch.zeros_like(c), W, c, tol=1e-12, max_iter=2000)
    dense = _dense_frobenius(x, W, c).detach()
    samples = 2000
    gen = torch.Generator().manual_seed(1)
    estimate = jacobian_penalty(f, x, W, c, samples=samples, reduction="none", generator=gen).detach()
    # Var |v^T J|^2 = 2 |J J^T|_F^2 for Gaussian v: the standard error of the mean of `samples` draws
    se = torch.stack([
        (2 * (J @ J.T).pow(2).sum() / samples).sqrt() for J in (
            torch.autograd.functional.jacobian(lambda z: f(z[None], W, c[s : s + 1])[0], x[s].detach())
            for s in range(x.shape[0]))]).detach()
    assert ((estimate - dense).abs() < 4 * se).all(), (estimate, dense, se)
    mean = jacobian_penalty(f, x, W, c, samples=samples, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mean, estimate.mean())


def test_jacobian_penalty_gradient_is_right_through_the_fixed_point():
    W, c = _map(2)

    def penalty(W, c):
        x = fixed_point(f, torch.zeros_like(c), W, c, tol=1e-14, max_iter=2000,
                        backward={"tol": 1e-14, "max_iter": 2000})
        return jacobian_penalty(f, x, W, c, samples=3, generator=torch.Generator().manual_seed(0))

    assert torch.autograd.gradcheck(penalty, (W, c))


SPEC = textwrap.dedent("""\
    layer Warm {
      input a : [B, 5]
      state x : [B, 5]
      param W : Linear(5, 5)
      update x = tanh(W(x) + a)
      solve { tol = 1e-10, max_iter = 400 }
    }
""")


@pytest.fixture
def layer_class(tmp_path):
    path = tmp_path / "warm.fpi"
    path.write_text(SPEC)
    return fpidsl.load(str(path))


def test_layer_jacobian_penalty_after_a_forward_is_differentiable(layer_class):
    torch.manual_seed(0)
    layer = layer_class().double()
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        layer.jacobian_penalty()
    a = torch.randn(3, N, dtype=DTYPE)
    x = layer(a)
    ours = layer.jacobian_penalty(samples=4, generator=torch.Generator().manual_seed(3))
    params = dict(layer.named_parameters())
    weight, bias = params["W.weight"], params["W.bias"]
    reference = jacobian_penalty(lambda z, a: torch.tanh(z @ weight.T + bias + a), x, a, samples=4,
                                 generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, reference, rtol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, weight, retain_graph=True)
    (g_ref,) = torch.autograd.grad(reference, weight)
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    assert g_ours.abs().sum() > 0


def test_the_penalty_after_correction_outputs_is_at_their_fixed_point(layer_class):
    """``correction_loss(layer.correction_outputs(a2)) + gamma * layer.jacobian_penalty()``: the penalty was
    measured at the previous forward's fixed point (1.64 where a2's gives 3.54, a helper's probe)."""
    torch.manual_seed(0)
    layer = layer_class().double()
    a, a2 = torch.randn(3, N, dtype=DTYPE), 3 * torch.randn(3, N, dtype=DTYPE)
    layer(a)
    outputs = layer.correction_outputs(a2, n_states=2)
    ours = layer.jacobian_penalty(samples=4, generator=torch.Generator().manual_seed(3))
    params = dict(layer.named_parameters())
    weight, bias = params["W.weight"], params["W.bias"]
    reference = jacobian_penalty(lambda z, a: torch.tanh(z @ weight.T + bias + a), outputs[-1].detach(), a2,
                                 samples=4, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours, reference, rtol=1e-12)


def test_the_penalty_of_a_layer_that_mixes_samples_is_of_its_one_jacobian(tmp_path):
    """A layer whose samples are one problem (a batch mean) was penalised per row: ``reduction="none"`` gave per-row
    column blocks of the whole Jacobian, not the samples' (``contraction`` already took the batch as one)."""
    path = tmp_path / "joint.fpi"
    path.write_text("layer Joint {\n  input a : [B, 6]\n  state x : [B, 6] = zeros\n  param W : Linear(6, 6, "
                    "init_scale=0.5)\n  update x = tanh(W(x) + a + 0.3 * mean(x, dim=0, keepdim=true))\n"
                    "  solve { tol = 1e-12, max_iter = 3000 }\n}\n")
    cls = fpidsl.load(str(path))
    assert not cls.SAMPLEWISE
    torch.manual_seed(5)
    layer = cls().double()
    a = torch.randn(4, 6, dtype=DTYPE)
    x = layer(a).detach()
    step = lambda v: type(layer).step(v.view(4, 6), a, *layer.parameter_tensors()).reshape(-1)  # noqa: E731
    exact = float(torch.autograd.functional.jacobian(step, x.reshape(-1)).detach().square().sum())
    assert layer.jacobian_penalty(reduction="none").shape == (1,)
    estimate = float(layer.jacobian_penalty(samples=20000, generator=torch.Generator().manual_seed(0)).detach())
    assert abs(estimate - exact) < 0.02 * exact  # the whole problem's |J|_F^2, not a quarter of it


def test_warm_starts_reduce_iterations_and_give_the_same_fixed_point(layer_class):
    torch.manual_seed(1)
    layer = layer_class().double()
    a = torch.randn(4, N, dtype=DTYPE)
    cold = layer(a).detach()
    cold_iterations = layer.stats.forward.max_iterations
    near = layer(a + 1e-3, init=cold)  # a call-time start near the new fixed point
    warm_iterations = layer.stats.forward.max_iterations
    fresh = layer(a + 1e-3).detach()
    assert warm_iterations < layer.stats.forward.max_iterations
    assert torch.allclose(near, fresh, rtol=0, atol=1e-9)
    assert cold_iterations > 1
    layer(a, init={"x": cold})  # by state name
    assert layer.stats.forward.max_iterations <= 2
    with pytest.raises(fpidsl.LayerInputError, match=r"init for state 'x' has shape \[2, 5\]"):
        layer(a, init=cold[:2])
    with pytest.raises(fpidsl.LayerInputError, match="init names no state 'y'"):
        layer(a, init={"y": cold})
    reuse = layer_class(warm_start=True).double()
    reuse.load_state_dict(layer.state_dict())
    first = reuse(a).detach()
    first_iterations = reuse.stats.forward.max_iterations
    second = reuse(a + 1e-3)
    assert reuse.stats.forward.max_iterations < first_iterations
    assert torch.allclose(second, fresh, rtol=0, atol=1e-9)
    reuse(torch.randn(2, N, dtype=DTYPE))  # another batch shape starts cold
    assert reuse.stats.forward.max_iterations > 2
    assert torch.allclose(first, cold, atol=1e-12)


def test_fixed_point_module_warm_start_and_eval_budget():
    W, c = _map(3, batch=4)
    W, c = W.detach(), c.detach()
    module = FixedPoint(f, solve={"tol": 1e-10}, eval_solve={"max_iter": 3, "on_fail": "ignore"}, warm_start=True)
    x = module(torch.zeros_like(c), W, c)
    cold = module.stats.forward.max_iterations
    module(torch.zeros_like(c), W, c + 1e-4)
    assert module.stats.forward.max_iterations < cold
    module.eval()
    module.warm.clear()
    module(torch.zeros_like(c), W, c)
    assert module.stats.forward.settings.max_iter == 3 and module.stats.forward.max_iterations == 3
    assert module.stats.forward.settings.tol == 1e-10  # eval settings apply over the training ones
    assert x.shape == c.shape


def test_compiled_layer_eval_budget(layer_class):
    layer = layer_class(eval_solve={"max_iter": 4, "tol": 1e-3, "on_fail": "ignore"}).double()
    a = torch.randn(2, N, dtype=DTYPE)
    layer(a)
    assert layer.stats.forward.settings.max_iter == 400
    layer.eval()
    with torch.no_grad():
        layer(a)
    assert layer.stats.forward.settings.max_iter == 4 and layer.stats.forward.max_iterations <= 4
    with pytest.raises(fpidsl.SettingsError, match="eval_solve|unknown solver setting 'maxiter'"):
        layer_class(eval_solve={"maxiter": 4})


def test_best_iterate_is_the_minimum_residual_iterate_of_a_failing_map():
    """x <- A x + b with eigenvalues 0.5 and 1.2: the residual first falls, then grows."""
    A = torch.diag(torch.tensor([0.5, 1.2], dtype=DTYPE))
    b = torch.tensor([[1.0, 1e-4], [2.0, 1e-5]], dtype=DTYPE)
    g = lambda x: x @ A.T + b  # noqa: E731
    x0 = torch.zeros_like(b)
    out, stats = fixed_point(g, x0, tol=1e-12, max_iter=60, criterion="absolute", on_fail="ignore",
                             history=True, return_stats=True)
    s = stats.forward
    assert not s.ok.any() and s.best_iterate.all()
    x, iterates, residuals = x0, [], []
    for _ in range(60):
        y = g(x)
        iterates.append(y)
        residuals.append(torch.linalg.vector_norm(y - x, dim=1))
        x = y
    residuals = torch.stack(residuals)
    best = residuals.argmin(dim=0)
    for sample in range(2):
        n = int(best[sample])
        assert int(s.best_at[sample]) == n + 1
        assert 0 < n < 59
        assert torch.allclose(out[sample], iterates[n][sample], rtol=1e-14)
        assert math.isclose(float(s.best_residual[sample]), float(residuals[n, sample]), rel_tol=1e-12)
        assert float(s.residual[sample]) > float(s.best_residual[sample])  # the last residual stays recorded
    with pytest.warns(ConvergenceWarning, match=r"return their lowest-residual iterate"):
        fixed_point(g, x0, tol=1e-12, max_iter=60, criterion="absolute")


def test_relative_criterion_warns_when_a_large_step_passes_without_contraction():
    x0 = torch.full((1, 1), 1e6, dtype=DTYPE)
    with pytest.warns(ConvergenceWarning, match=r"accepted by the relative criterion .* absolute step \|g\(x\)-x\| "
                      r"of up to 1: "):
        out, stats = fixed_point(lambda x: x + 1, x0, return_stats=True)
    assert stats.forward.all_ok and stats.forward.max_iterations == 1  # documented: the criterion accepts it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point(lambda x: x + 1, x0, on_fail="ignore")
        fixed_point(lambda x: 0.5 * x + 1e150, torch.zeros(2, 3, dtype=DTYPE), tol=1e-12)  # contracting: no warning
    with pytest.raises(fpidsl.ConvergenceError):
        fixed_point(lambda x: x + 1, x0, criterion="absolute", max_iter=20, on_fail="raise")


def test_gmres_backward_warns_when_a_singular_system_passes_the_relative_criterion():
    """x -> D x with an eigenvalue 1: (I - J^T) c = gbar has no solution. GMRES found a huge c (|c| ~ 5e16) whose
    relative residual met the tolerance with an absolute residual of 3, larger than the first step's 1.41, and
    said nothing (Picard and Broyden warn "not converged", Anderson gets this warning): GMRES never said whether
    its residual shrank."""
    D = torch.diag(torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5], dtype=DTYPE))
    W = torch.nn.Parameter(torch.eye(5, dtype=DTYPE))
    a = torch.zeros(2, 5, dtype=DTYPE, requires_grad=True)
    x = fixed_point(lambda x, a: (x @ D.T) @ W.T + a, torch.zeros(2, 5, dtype=DTYPE), a, trace=False,
                    backward={"method": "gmres"})
    with pytest.warns(ConvergenceWarning, match=r"backward: 2 of 2 samples \(0, 1\) were accepted by the relative"):
        x.sum().backward()
    # a regular system: its residual shrinks, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = fixed_point(lambda x, a: 0.5 * x @ W.T + a, torch.zeros(2, 5, dtype=DTYPE), a, trace=False,
                        backward={"method": "gmres"})
        (g,) = torch.autograd.grad(y.sum(), a)
    assert torch.allclose(g, torch.full_like(g, 2.0), rtol=1e-10)


def _error(text: str):
    from tests.ir.helpers import errors

    (only,) = errors(text)
    return only


def _at(text: str, anchor: str) -> tuple[int, int]:
    from tests.ir.helpers import locate

    return locate(text, anchor)


LAYER = "layer L {{\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n  {}\n}}\n"
BAD = [
    ("solve { method = anderson(m=1000000000) }", "1000000000", "m must be an integer >= 1 and <= 1000"),
    ("solve { method = broyden(m=0) }", "0)", "m must be an integer >= 1 and <= 1000"),
    ("solve { method = gmres }", "gmres", "gmres solves the linear system of the backward"),
    ("solve { mode = jfb }", "mode", "mode is a backward setting"),
    ("backward { mode = phantom(k=0) }", "0)", "k must be an integer >= 1 and <= 10000"),
    ("backward { mode = phantom(k=3, tau=1.5) }", "1.5", "tau must be a number in (0, 1]"),
    ("backward { mode = jfb(k=3) }", "jfb(", "jfb takes no options"),
    ("backward { mode = adjoint }", "adjoint", "unknown mode adjoint"),
    ("backward { mode = jfb, k = 3 }", "k = 3", "k applies to mode = phantom or unrolled, but the mode is jfb"),
    ("backward { method = gmres, beta = 0.5 }", "beta = 0.5", "beta applies to method = picard or anderson"),
    ("solve { method = broyden(lam=1) }", "lam", "broyden has no option lam"),
]


@pytest.mark.parametrize("block, anchor, message", BAD, ids=[b[0] for b in BAD])
def test_bad_toolkit_settings_are_positioned_errors(block, anchor, message):
    text = LAYER.format(block)
    error = _error(text)
    assert isinstance(error, SettingsErr)
    assert message in error.message
    assert (error.span.line, error.span.col) == _at(text, anchor)


@pytest.mark.parametrize("block, anchor", [("solve { tol = 1e999 }", "1e999"),
                                           ("backward { lam = 1e999, method = anderson }", "1e999")])
def test_infinite_settings_are_refused_at_check_time_with_a_position(block, anchor):
    text = LAYER.format(block)
    error = _error(text)
    assert isinstance(error, FpiError)
    assert (error.span.line, error.span.col) == _at(text, anchor)


def test_good_toolkit_settings_check_and_reach_the_layer(tmp_path):
    text = LAYER.format("solve { method = picard(beta=0.5), tol = 1e-9 }\n  "
                        "backward { method = gmres(m=8), mode = implicit, tol = 1e-9 }")
    path = tmp_path / "ok.fpi"
    path.write_text(text)
    layer = fpidsl.load(str(path))().double()
    a = torch.randn(2, 4, dtype=DTYPE, requires_grad=True)
    x = layer(a)
    x.sum().backward()
    assert layer.stats.forward.settings.beta == 0.5
    assert layer.stats.backward.settings.method == "gmres" and layer.stats.backward.all_ok
    assert torch.isfinite(a.grad).all()


# ------------------------------------------------------------------------------------- fixed-point correction


def test_correction_states_are_the_iterates_with_phantom_gradients_and_the_fixed_point():
    from fpidsl.runtime.correction import correction_loss, fixed_point_states, uniform_indexing

    W, c = _map(5, batch=3)
    x0 = torch.zeros_like(c)
    states, stats = fixed_point_states(f, x0, W, c, indexing=(2, 5), k=2, tau=0.5, tol=1e-12, return_stats=True)
    assert len(states) == 3 and stats.forward.all_ok and stats.forward.max_iterations > 5
    iterates = [x0]
    for _ in range(5):
        iterates.append(f(iterates[-1], W, c).detach())
    for state, n in zip(states[:2], (2, 5)):
        z = iterates[n]  # Picard: g at iteration n is f^n(x0)
        for _ in range(2):
            z = 0.5 * z + 0.5 * f(z, W, c)
        assert torch.allclose(state, z, rtol=1e-14, atol=1e-15)
        ours = torch.autograd.grad(state.sum(), (W, c))
        ref = torch.autograd.grad(z.sum(), (W, c))
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    exact = fixed_point(f, x0, W, c, tol=1e-12)
    assert torch.allclose(states[-1], exact, atol=1e-11)
    ours = torch.autograd.grad(states[-1].sum(), W)[0]
    ref = torch.autograd.grad(exact.sum(), W)[0]
    assert torch.allclose(ours, ref, rtol=1e-5)  # both the implicit gradient, to the backward's tol
    assert stats.backward is not None
    loss = correction_loss([s.pow(2).sum() for s in states], gamma=0.5)
    assert torch.allclose(loss, 0.25 * states[0].pow(2).sum() + 0.5 * states[1].pow(2).sum()
                          + states[2].pow(2).sum())
    assert uniform_indexing(3, 30) == (10, 20)
    # an index past a sample's convergence gives its fixed point there
    late = fixed_point_states(f, x0, W, c, indexing=(400,), tol=1e-12)
    assert torch.allclose(late[0], late[1], atol=1e-11)
    with pytest.raises(ValueError, match="indexing must hold iteration numbers in 1..500"):
        fixed_point_states(f, x0, W, c, indexing=(0,))


def test_layer_correction_outputs(layer_class):
    torch.manual_seed(2)
    layer = layer_class(solve={"max_iter": 30, "tol": 1e-10, "on_fail": "ignore"}).double()
    a = torch.randn(3, N, dtype=DTYPE)
    outputs = layer.correction_outputs(a, n_states=3)
    assert len(outputs) == 3
    assert torch.allclose(outputs[-1], layer(a), atol=1e-9)
    from fpidsl.runtime.correction import correction_loss

    correction_loss([o.pow(2).mean() for o in outputs]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_correction_outputs_in_half_precision(layer_class, dtype):
    """The solve runs in float32 there; the intermediate states come back in the layer's dtype, near float32's."""
    torch.manual_seed(2)
    settings = {"max_iter": 30, "tol": 1e-4, "on_fail": "ignore"}
    full = layer_class(solve=settings)
    half = layer_class(solve=settings).to(dtype)
    half.load_state_dict(full.state_dict())
    a = torch.randn(3, N)
    want = full.correction_outputs(a, n_states=3)
    got = half.correction_outputs(a.to(dtype), n_states=3)
    assert [o.dtype for o in got] == [dtype] * 3
    for g, w in zip(got, want):
        assert float((g.float() - w).detach().abs().max()) < 0.05


def test_a_call_time_init_wins_over_the_warm_start(layer_class):
    torch.manual_seed(4)
    cold = layer_class().double()
    warm = layer_class(warm_start=True).double()
    warm.load_state_dict(cold.state_dict())
    a, b = torch.randn(4, N, dtype=DTYPE), torch.randn(4, N, dtype=DTYPE)
    with torch.no_grad():
        x_b = cold(b)
        warm(a)  # remembers a's fixed point, of the same shapes
        warm(b, init=x_b)
    assert warm.stats.forward.max_iterations <= 2  # started at b's fixed point, not at a's


@pytest.mark.parametrize("make", ["layer", "module"])
def test_a_diverged_sample_is_not_warm_started_from(tmp_path, make):
    """A diverged sample's result was remembered: the easy sample at its row in the next call started there. Here
    the first call's sample 0 has a state of 1e160, whose norm overflows in float64 (judged diverged); the next
    call's easy sample 0 started at 1e160 and was judged diverged at once, its result 0.68 from the cold one."""
    tight = {"tol": 1e-12, "max_iter": 500}
    if make == "layer":
        path = tmp_path / "huge.fpi"
        path.write_text("layer Huge {\n  input a : [B, 4]\n  state x : [B, 4]\n  update x = 0.5 * tanh(x) + a\n}\n")
        cls = fpidsl.load(str(path))
        cold, warm = cls(solve=tight).double(), cls(solve=tight, warm_start=True).double()
        call = lambda layer, a: layer(a)  # noqa: E731
    else:
        f = lambda x, a: 0.5 * torch.tanh(x) + a  # noqa: E731
        cold, warm = FixedPoint(f, solve=tight), FixedPoint(f, solve=tight, warm_start=True)
        call = lambda layer, a: layer(torch.zeros_like(a), a)  # noqa: E731
    a, bad = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE)
    bad[0] = 1e160
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(warm, bad)
    assert warm.stats.forward.diverged.tolist() == [True, False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call(warm, a)
    assert torch.allclose(out, call(cold, a), rtol=0, atol=1e-9)


@pytest.mark.parametrize("make", ["layer", "module"])
def test_the_unrolled_mode_never_warm_starts(layer_class, make):
    """Its output is k steps from the start: a remembered point would make a call depend on the calls before."""
    torch.manual_seed(5)
    mode = {"mode": "unrolled", "k": 3}
    if make == "layer":
        cold, warm = layer_class(backward=mode).double(), layer_class(backward=mode, warm_start=True).double()
        warm.load_state_dict(cold.state_dict())
        call = lambda layer, a: layer(a)  # noqa: E731
    else:
        W = (0.5 * torch.randn(N, N, dtype=DTYPE)).requires_grad_()
        cold, warm = (FixedPoint(lambda x, a: torch.tanh(x @ W.T + a), backward=mode, warm_start=w) for w in (0, 1))
        call = lambda layer, a: layer(torch.zeros_like(a), a)  # noqa: E731
    a = torch.randn(4, N, dtype=DTYPE)
    with torch.inference_mode():
        call(warm, torch.randn(4, N, dtype=DTYPE))  # an inference tensor would be unusable as a training start
    out = call(warm, a)
    assert torch.equal(out, call(cold, a))
    out.sum().backward()


def test_jacobian_penalty_of_an_empty_batch():
    W = (0.1 * torch.randn(N, N, dtype=DTYPE)).requires_grad_()
    f = lambda x, a: torch.tanh(x @ W.T + a)  # noqa: E731
    a = torch.zeros(0, N, dtype=DTYPE)
    x = fixed_point(f, torch.zeros_like(a), a)
    assert jacobian_penalty(f, x, a, reduction="none").shape == (0,)
    assert float(jacobian_penalty(f, x, a, reduction="sum").detach()) == 0.0
    assert math.isnan(float(jacobian_penalty(f, x, a, reduction="mean").detach()))  # torch's mean of nothing
