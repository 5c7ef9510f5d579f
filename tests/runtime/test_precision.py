"""Mixed precision on CPU: autocast(bfloat16) and bfloat16/float16 layers solve with Picard and Anderson, stop at
the compute dtype's precision floor, and match the float32 solution to that dtype's precision."""
import pytest
import torch

import fpidsl
from fpidsl.runtime import ConvergenceError, fixed_point
from fpidsl.runtime.precision import compute_eps, floor_eps, solver_dtype


def slow_map(x, a, W):
    """A contraction of factor about 0.9: Picard needs ~170 iterations for 1e-8 in float32."""
    return 0.9 * torch.tanh(x @ W.T) + a


def slow_problem():
    gen = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]  # orthogonal: ||0.9 W|| = 0.9
    a = 0.1 * torch.randn(4, 16, generator=gen)
    return a, W


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_autocast_bfloat16_stops_at_the_bfloat16_floor(method):
    a, W = slow_problem()
    settings = {"method": method, "tol": 1e-9, "max_iter": 2000, "on_fail": "raise"}
    ref = fixed_point(slow_map, torch.zeros_like(a), a, W, **settings)
    with torch.autocast("cpu", torch.bfloat16):
        x, stats = fixed_point(slow_map, torch.zeros_like(a), a, W, return_stats=True, **settings)
    s = stats.forward
    assert x.dtype == torch.float32  # the states' dtype
    assert bool((s.converged | s.stopped_at_floor).all())  # done (on_fail="raise" did not raise)
    assert bool(s.stopped_at_floor.any()) and int(s.iterations.max()) < 400  # not all max_iter
    assert float((x - ref).norm() / ref.norm()) < 2e-2  # bfloat16: eps 2**-8


def test_floor_and_solver_dtypes():
    x = torch.zeros(2, 3)
    assert solver_dtype(torch.bfloat16) == torch.float32 and solver_dtype(torch.float64) == torch.float64
    assert compute_eps(x) == torch.finfo(torch.float32).eps
    assert compute_eps(x.bfloat16()) == torch.finfo(torch.bfloat16).eps
    with torch.autocast("cpu", torch.bfloat16):
        assert compute_eps(x) == torch.finfo(torch.bfloat16).eps
        assert compute_eps(x.double()) == torch.finfo(torch.float64).eps  # autocast casts no float64 tensor
    assert floor_eps(torch.float64) == torch.finfo(torch.float64).eps  # outside a solve: the dtype's own


@pytest.mark.parametrize("case", ["float64 under autocast", "bfloat16 states"])
def test_an_iteration_stuck_at_a_few_percent_is_not_at_the_floor(case):
    """Picard on g(x) = 2a - x oscillates forever at a 4.1% relative residual. The floor took it as done: in
    float64 under autocast (the bfloat16 floor, though autocast leaves float64 alone) and in bfloat16 states
    (ten of bfloat16's epsilons are 7.8%): stopped_at_floor, no warning, on_fail="raise" did not raise."""
    dtype = torch.float64 if case.startswith("float64") else torch.bfloat16
    a = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=dtype)
    with torch.autocast("cpu", torch.bfloat16, enabled=case.endswith("autocast")):
        with pytest.raises(ConvergenceError, match="did not converge"):
            fixed_point(lambda x, a: 2 * a - x, 0.98 * a, a, method="picard", tol=1e-6, max_iter=300,
                        on_fail="raise")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_low_precision_compiled_layer_forward_and_backward(dtype, method):
    cls = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")
    torch.manual_seed(0)
    ref_layer = cls(solve={"method": method, "tol": 1e-6})
    low = cls(solve={"method": method, "tol": 1e-6})
    low.load_state_dict(ref_layer.state_dict())
    low = low.to(dtype)
    a = torch.randn(8, 10)
    ref = ref_layer(a)
    ref.square().sum().backward()
    out = low(a.to(dtype))
    ref = ref.detach()
    assert out.dtype == dtype and bool(low.stats.forward.converged.all())
    assert float((out.detach().float() - ref).norm() / ref.norm()) < 2e-2
    out.float().square().sum().backward()
    g, g_ref = low.fc2.weight.grad.float(), ref_layer.fc2.weight.grad
    assert float((g - g_ref).norm() / g_ref.norm()) < 5e-2


def test_autocast_compiled_layer_backward_outside_autocast():
    cls = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")
    torch.manual_seed(1)
    layer = cls(solve={"method": "anderson"})
    a = torch.randn(8, 10)
    ref = layer(a)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), layer.fc1.weight)
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(a)
        loss = out.square().sum()
    (g,) = torch.autograd.grad(loss, layer.fc1.weight)
    out, ref = out.detach(), ref.detach()
    assert out.dtype == torch.float32 and float((out - ref).norm() / ref.norm()) < 2e-2
    assert float((g - g_ref).norm() / g_ref.norm()) < 5e-2


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_a_low_precision_argument_does_not_lower_the_floor(low):
    """A bfloat16 argument of a float64 map is promoted: the map computes in float64. Its dtype lowered the floor to
    10 eps(bfloat16) (8% relative; float16: 1%), and an iteration stuck at 0.2% (Picard on ``a - x``, eigenvalue -1) was reported
    done at the floor, with no warning."""
    a = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(low)
    x0 = a.double() / 2 * 1.001  # 0.1% from the fixed point a / 2: a residual below both floors
    with pytest.warns(fpidsl.ConvergenceWarning, match="not converge"):
        x, stats = fixed_point(lambda x, a: a - x, x0, a, tol=1e-6, max_iter=50, trace=False, return_stats=True)
    s = stats.forward
    assert not bool(s.stopped_at_floor.any()) and not s.all_ok
    assert x.dtype == torch.float64 and s.iterations.tolist() == [50] * 4
