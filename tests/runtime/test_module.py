"""The module form, nn.Module maps with parameters, stats, no_grad, dtypes and states as tuples."""
import pytest
import torch
from torch import nn

from fpidsl.runtime import FixedPoint, SettingsError, SolveStats, Stats, fixed_point

from .helpers import (
    DTYPE,
    TIGHT,
    TIGHT_BACKWARD,
    assert_orders_close,
    derivatives,
    generator,
    max_rel_err,
    smooth_loss,
    unrolled,
)


class TanhCell(nn.Module):
    """g(x, z) = tanh(W x + U z + b), parameters W (Linear with bias) and U."""

    def __init__(self, n=4, k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.W = nn.Linear(n, n).to(DTYPE)
        self.U = nn.Linear(k, n, bias=False).to(DTYPE)
        with torch.no_grad():
            self.W.weight.mul_(0.5)

    def forward(self, x, z):
        return torch.tanh(self.W(x) + self.U(z))


def explicit(x, weight, bias, u, z):
    return torch.tanh(x @ weight.T + bias + z @ u.T)


def test_module_parameters_get_exact_gradients_to_order_3():
    cell = TanhCell()
    z = torch.randn(2, 3, generator=generator(1), dtype=DTYPE, requires_grad=True)
    layer = FixedPoint(cell, solve=TIGHT, backward=TIGHT_BACKWARD)
    params = [cell.W.weight, cell.W.bias, cell.U.weight, z]
    x0 = torch.zeros(2, 4, dtype=DTYPE)
    got = derivatives(lambda: smooth_loss(layer(x0, z)), params, order=3)
    want = derivatives(lambda: smooth_loss(unrolled(explicit, x0, params, 150)), params, order=3)
    assert_orders_close(got, want, rtol=1e-8)


def test_module_backward_fills_parameter_grads_and_stats():
    cell = TanhCell()
    layer = FixedPoint(cell, solve={"tol": 1e-12}, backward={"tol": 1e-12, "method": "anderson"})
    z = torch.randn(5, 3, generator=generator(2), dtype=DTYPE)
    x = layer(torch.zeros(5, 4, dtype=DTYPE), z)
    stats = layer.stats
    assert isinstance(stats.forward, SolveStats) and stats.backward is None
    assert stats.forward.converged.all() and stats.forward.iterations.shape == (5,)
    smooth_loss(x).backward()
    assert isinstance(stats.backward, SolveStats) and stats.backward.phase == "backward"
    assert stats.backward.converged.all() and stats.backward.settings.method == "anderson"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    # the same gradients as the functional form with the parameters passed explicitly
    w, b, u = (p.detach().requires_grad_() for p in (cell.W.weight, cell.W.bias, cell.U.weight))
    y = fixed_point(explicit, torch.zeros(5, 4, dtype=DTYPE), w, b, u, z, tol=1e-12, backward={"tol": 1e-12})
    grads = torch.autograd.grad(smooth_loss(y), [w, b, u])
    assert max_rel_err([cell.W.weight.grad, cell.W.bias.grad, cell.U.weight.grad], grads) <= 1e-9
    # a new call replaces the stats
    layer(torch.zeros(5, 4, dtype=DTYPE), z)
    assert layer.stats is not stats and layer.stats.backward is None


def test_settings_are_validated_and_merged():
    layer = FixedPoint(TanhCell(), solve={"method": "anderson", "m": 3}, backward={"max_iter": 50})
    assert layer.solve_settings.method == "anderson" and layer.solve_settings.m == 3
    assert layer.solve_settings.tol == 1e-5
    assert layer.backward_settings.max_iter == 50 and layer.backward_settings.tol == 1e-6
    with pytest.raises(SettingsError, match="unknown solver setting 'tolerance'; known: method, m, beta"):
        FixedPoint(TanhCell(), solve={"tolerance": 1e-3})
    with pytest.raises(SettingsError, match="criterion must be 'relative' or 'absolute', got 'rel'"):
        FixedPoint(TanhCell(), backward={"criterion": "rel"})
    with pytest.raises(SettingsError, match="unknown solver setting 'tolerance'"):
        fixed_point(torch.tanh, torch.zeros(1, 2), tolerance=1e-3)
    assert "method='anderson'" in repr(layer) and "max_iter=50" in repr(layer)


def test_no_grad_sets_up_nothing():
    cell = TanhCell()
    layer = FixedPoint(cell)
    z = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    with torch.no_grad():
        x = layer(torch.zeros(2, 4, dtype=DTYPE), z)
    assert not x.requires_grad and x.grad_fn is None
    assert layer.stats.forward.converged.all()
    x = layer(torch.zeros(2, 4, dtype=DTYPE), z)
    assert x.requires_grad and x.grad_fn is not None


def test_dtype_and_device_follow_the_inputs():
    cell = TanhCell().float()
    z = torch.randn(2, 3)
    x = FixedPoint(cell)(torch.zeros(2, 4), z)
    assert x.dtype == torch.float32 and x.device == z.device
    assert FixedPoint(cell).stats is None


def test_tuple_state_returns_a_tuple_and_differentiates():
    def pair(xy, a):
        x, y = xy
        return 0.5 * torch.tanh(y) + a, 0.5 * torch.sin(x)

    a = torch.randn(3, 2, generator=generator(4), dtype=DTYPE, requires_grad=True)
    out = fixed_point(pair, (torch.zeros(3, 2, dtype=DTYPE), torch.zeros(3, 2, dtype=DTYPE)), a, **TIGHT,
                      backward=TIGHT_BACKWARD)
    assert isinstance(out, tuple) and len(out) == 2
    ref = unrolled(pair, (torch.zeros(3, 2, dtype=DTYPE), torch.zeros(3, 2, dtype=DTYPE)), [a], 100)
    assert max_rel_err(out, ref) <= 1e-12
    g = torch.autograd.grad(smooth_loss(out), [a])
    g_ref = torch.autograd.grad(smooth_loss(ref), [a])
    assert max_rel_err(g, g_ref) <= 1e-10


def test_functional_stats_object_and_return_stats():
    stats = Stats()
    z = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    x = fixed_point(lambda x, z: 0.5 * torch.tanh(x) + z, torch.zeros(2, 3, dtype=DTYPE), z, stats=stats)
    assert stats.forward is not None and stats.backward is None
    x.sum().backward()
    assert stats.backward is not None and stats.backward.converged.all()
    assert "forward (picard)" in repr(stats) and "backward (picard)" in repr(stats)
    y, s2 = fixed_point(lambda x, z: 0.5 * torch.tanh(x) + z, torch.zeros(2, 3, dtype=DTYPE), z, return_stats=True)
    assert isinstance(s2, Stats) and torch.allclose(x, y)


def test_unbatched_state_is_one_sample():
    A = torch.tensor([[0.5, 0.2], [0.1, 0.3]], dtype=DTYPE)
    b = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    x, stats = fixed_point(lambda x, b: A @ x + b, torch.zeros(2, dtype=DTYPE), b, per_sample=False,
                           return_stats=True, **TIGHT)
    want = torch.linalg.solve(torch.eye(2, dtype=DTYPE) - A, b)
    assert max_rel_err([x], [want]) <= 1e-12 and stats.forward.iterations.shape == (1,)
    with pytest.raises(ValueError, match="leading batch dimension"):
        fixed_point(lambda x: x, torch.tensor(1.0))


def test_bad_maps_and_arguments_are_explained():
    with pytest.raises(ValueError, match=r"the map returned state 0 with shape \(2, 3\)"):
        fixed_point(lambda x: x[:, :3], torch.zeros(2, 4))
    def in_place(x, a):
        x.mul_(0.5)  # the solver's iterate: it failed to converge and the warning blamed the Jacobian
        return torch.tanh(x + a)

    for method in ("picard", "anderson", "broyden"):
        with pytest.raises(ValueError, match="the map changed its state argument in place"):
            fixed_point(in_place, torch.zeros(3, 4), torch.ones(3, 4), method=method)
    for trace in (True, False):  # fewer samples: the map's own next step failed inside it (a torch traceback)
        with pytest.raises(ValueError, match=r"the map returned 2 samples \(dimension 0\) for a state of 3"):
            fixed_point(lambda x, a: torch.tanh(x + a)[:2], torch.zeros(3), torch.ones(3), trace=trace)
    with pytest.raises(TypeError, match="must return a tuple of tensors like x0"):
        fixed_point(lambda xy: xy[0], (torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="argument 0 is marked batched"):
        fixed_point(lambda x, w: x * w, torch.zeros(2, 4), torch.ones(4), batched=(True,))


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_inference_mode_solves_as_no_grad_does(method):
    """An inference tensor has no version counter: the check that the map leaves its state alone raised
    "Inference tensors do not track version counter" at every call under torch.inference_mode."""
    import fpidsl

    W = 0.3 * torch.randn(6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    a = torch.randn(4, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    cell = nn.Linear(6, 6, dtype=DTYPE)
    layer = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")(solve={"method": method}).double()
    calls = [lambda: fixed_point(lambda x, a: torch.tanh(x @ W.T + a), torch.zeros_like(a), a, method=method,
                                 trace=trace) for trace in (True, False)]
    calls += [lambda: fixed_point(lambda x, a: torch.tanh(cell(x) + a), torch.zeros_like(a), a, method=method),
              lambda: layer(torch.randn(4, 10, dtype=DTYPE, generator=torch.Generator().manual_seed(2)))]
    for call in calls:
        with torch.no_grad():
            want = call()
        with torch.inference_mode():
            got = call()
        assert got.is_inference() and torch.equal(got, want)


def test_stats_of_higher_orders_are_nested():
    stats = Stats()
    z = torch.randn(2, 3, dtype=DTYPE, requires_grad=True)
    x = fixed_point(lambda x, z: 0.5 * torch.tanh(x) + z, torch.zeros(2, 3, dtype=DTYPE), z, stats=stats)
    (g,) = torch.autograd.grad(smooth_loss(x), [z], create_graph=True)
    first = stats.adjoint
    assert first.forward is stats.backward and stats.backward.converged.all()
    assert first.backward is None  # the adjoint solve has not been differentiated yet
    (g.sum()).backward()  # second order: differentiates the adjoint solve (and re-solves the first adjoint)
    assert first.backward is not None and first.backward.converged.all()
    assert z.grad is not None
    assert stats.adjoint is first  # the re-solve did not replace the first backward's stats
    assert len(stats.later_adjoints) == 1 and stats.later_adjoints[0].forward.converged.all()
