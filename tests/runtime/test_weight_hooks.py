"""A compiled layer reads its modules' weights without calling them: torch.nn.utils.spectral_norm and weight_norm
(the hook-based forms, which recompute ``weight`` in a forward pre-hook) were silently ignored (the layer ran with a
stale weight, ``weight_orig`` got no gradient: 1.0 relative off); they run once a call now, and any other hook of
such a module is refused (a helper's probe)."""
from __future__ import annotations

import pytest
import torch

import fpidsl

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 1000}


@pytest.fixture(scope="module")
def layer_class():
    return fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")


def unrolled(layer, a, steps=600):
    """The map iterated with its modules called (their hooks run): the oracle."""
    x = torch.zeros_like(a)
    for _ in range(steps):
        x = layer.fc2(torch.relu(layer.fc1(torch.cat([x, a], -1))))
    return x


def test_a_hook_based_spectral_norm_is_followed(layer_class):
    torch.manual_seed(0)
    layer = layer_class(solve=TIGHT, backward=TIGHT).double()
    torch.nn.utils.spectral_norm(layer.fc2)
    layer.eval()  # no power iteration: the oracle sees the same u, v
    a = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = layer(a)
    want = unrolled(layer, a)
    assert torch.allclose(y.detach(), want.detach(), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(y.square().sum(), layer.fc2.weight_orig)
    (g_want,) = torch.autograd.grad(want.square().sum(), layer.fc2.weight_orig)
    assert torch.allclose(g, g_want, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_hook_based_weight_norm_is_followed(layer_class):
    torch.manual_seed(0)
    layer = layer_class(solve=TIGHT, backward=TIGHT).double()
    torch.nn.utils.weight_norm(layer.fc2)
    a = torch.randn(4, 10, dtype=DT, generator=torch.Generator().manual_seed(2))
    before = layer(a).detach()
    with torch.no_grad():
        layer.fc2.weight_g.mul_(0.5)  # the effective weight halves: the layer saw the old one
    y = layer(a)
    assert not torch.allclose(y.detach(), before)
    assert torch.allclose(y.detach(), unrolled(layer, a).detach(), rtol=0, atol=1e-10)
    (g,) = torch.autograd.grad(y.sum(), layer.fc2.weight_g)
    assert float(g.abs().sum()) > 0


def test_other_hooks_of_its_modules_are_refused(layer_class):
    layer = layer_class().double()
    a = torch.randn(2, 10, dtype=DT)
    handle = layer.fc1.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(RuntimeError, match="the module 'fc1' has a forward hook, which the compiled layer does not run"):
        layer(a)
    handle.remove()
    handle = layer.fc2.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(RuntimeError, match="the module 'fc2' has a forward pre-hook.*torch.nn.utils.parametrizations"):
        layer(a)
    handle.remove()
    layer(a)  # no hooks: runs


# ---------------------------------------------------------------------------------------------------------------
# fixed_point on a module with a hook-based norm (a helper's probe of a torchdeq user's port)


class _Cell(torch.nn.Module):
    def __init__(self, d: int = 6):
        super().__init__()
        self.fc, self.inj = torch.nn.Linear(d, d).double(), torch.nn.Linear(d, d).double()

    def forward(self, z, x):
        return torch.tanh(0.5 * self.fc(z) + self.inj(x))


def _normed_cell(norm):
    """A cell whose fc has the hook-based ``norm``, and an input (seeded)."""
    torch.manual_seed(0)
    cell = _Cell()
    norm(cell.fc)
    return cell, torch.randn(4, 6, dtype=DT)


def _unrolled_cell(cell, x, steps=300):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = cell(z, x)
    return z


@pytest.mark.filterwarnings("ignore::fpidsl.tracing.auto.TraceMismatchWarning")  # the power iteration: not traced
@pytest.mark.parametrize("trace", [True, False])
def test_training_a_map_with_a_hook_based_spectral_norm(trace):
    """The second step's backward raised "modified by an inplace operation": the `weight` left on the module by the
    first call (computed from a detached copy inside fpidsl) was taken as a tensor the map reads, and the backward
    ran into the first call's graph after the optimizer changed weight_orig."""
    torch.manual_seed(0)
    cell = _Cell()
    torch.nn.utils.spectral_norm(cell.fc)
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    for _ in range(3):
        x = torch.randn(4, 6, dtype=DT)
        opt.zero_grad()
        z = fpidsl.fixed_point(cell, torch.zeros(4, 6, dtype=DT), x, tol=1e-10, trace=trace)
        z.square().sum().backward()
        assert cell.fc.weight_orig.grad is not None and torch.isfinite(cell.fc.weight_orig.grad).all()
        opt.step()
    assert cell.fc.weight.grad_fn is not None  # the module's weight follows weight_orig, as after a plain call


@pytest.mark.filterwarnings("ignore::fpidsl.tracing.auto.TraceMismatchWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("trace", [True, False])
def test_a_weight_read_after_the_solve_follows_a_hook_based_weight_norm(trace):
    """A readout tied to the cell's weight (`fc.weight`, read after the solve without calling fc) lost the path to
    weight_g and weight_v: the module was left holding a weight computed from fpidsl's detached copies (0.95 and
    0.84 relative off)."""
    def run(solve):
        cell, x = _normed_cell(torch.nn.utils.weight_norm)
        z = solve(cell, x)
        (z @ cell.fc.weight.T).square().sum().backward()
        return cell.fc.weight_g.grad, cell.fc.weight_v.grad

    want = run(_unrolled_cell)
    got = run(lambda cell, x: fpidsl.fixed_point(cell, torch.zeros_like(x), x, trace=trace, tol=1e-13,
                                                 backward={"tol": 1e-13}))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.filterwarnings("ignore::fpidsl.tracing.auto.TraceMismatchWarning")
@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("then", ["one more step", "a second solve"])
def test_a_tied_readout_then_another_call_with_a_hook_based_spectral_norm(trace, then):
    """The refreshed weight read the spectral norm's vectors u, v themselves; the next call's power iteration wrote
    them in place and the backward raised "modified by an inplace operation" (a review's attack): the gradient is
    plain PyTorch's now."""
    def run(solve):
        cell, x = _normed_cell(torch.nn.utils.spectral_norm)
        z = solve(cell, x)
        extra = cell(z, x) if then == "one more step" else solve(cell, 2 * x)
        ((z @ cell.fc.weight.T).square().sum() + extra.square().sum()).backward()
        return cell.fc.weight_orig.grad

    want = run(lambda cell, x: _unrolled_cell(cell, x, 100))
    got = run(lambda cell, x: fpidsl.fixed_point(cell, torch.zeros_like(x), x, trace=trace, tol=1e-12))
    # the power iteration runs at every evaluation of the map (100 here, the solves' count there): u and v, so the
    # map, differ by a little
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
