"""Two ways a trace silently kept what the map no longer computes (a helper's probe), now refused (the map is
solved as it is, by autograd) with the reason in ``trace_status``:

- a Python number read from a real tensor by the map (``SCALE.item()``, ``float(self.t)``, ``if t > 0:``): fx ran
  the read once and the trace kept the number, however the tensor changed later (a fixed point 0.41 off);
- a float computed from the batch size (``x.shape[0] / 8``): ``fpidsl.trace`` fixed it at the example's batch,
  and the layer, which runs at any batch size, was another map at the others (0.37 off at batch 5);
- an augmented assignment (``h += a``) that the eager map makes in place, on a view or on a value read again
  through another name: fx records ``h + a`` out of place, and the trace's agreement check, run at the first call's
  arguments, passed where those were zero (1.3-1.8 off at the next call's).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.tracing import trace_status

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 500}
W = 0.4 * torch.randn(6, 6, dtype=DT, generator=torch.Generator().manual_seed(0)) / 6 ** 0.5
SCALE = torch.tensor(0.3, dtype=DT)


def reads_a_global(x, z):
    return SCALE.item() * torch.tanh(x @ W) + z


class ReadsAnAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = torch.tensor(0.3, dtype=DT)  # a plain attribute, not a buffer

    def forward(self, x, z):
        scale = float(self.t) if self.t > 0 else 0.0
        return scale * torch.tanh(x @ W) + z


def view_updated(x, z, ctx):
    h = torch.tanh(x @ W) + z
    head = h[:, :3]
    head += ctx  # changes h
    return 0.5 * h


def alias_updated(x, z, ctx):
    h = 0.5 * torch.tanh(x @ W)
    skip = h
    h += ctx  # skip is h
    return skip + z


def privately_updated(x, z, ctx):
    h = 0.5 * torch.tanh(x @ W)
    h += z
    h *= 1.0
    return h + 0.1 * ctx


def solve_both(f, z, *args):
    z = z.clone().requires_grad_()
    out = []
    for trace in (True, False):
        x = fpidsl.fixed_point(f, torch.zeros_like(z), z, *args, trace=trace, **TIGHT)
        out.append((x.detach(), torch.autograd.grad(x.square().sum(), z)[0]))
    return out


def test_a_number_read_from_a_global_tensor_is_not_kept_by_a_trace():
    z = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    status = trace_status(reads_a_global, torch.zeros(4, 6, dtype=DT), z)[1]
    assert status.startswith("not traced: the map reads a Python value from a tensor (Tensor.item")
    try:
        for value in (0.3, 0.9):
            SCALE.fill_(value)
            (x, g), (x_ref, g_ref) = solve_both(reads_a_global, z)
            assert torch.allclose(x, x_ref, rtol=0, atol=1e-12) and torch.allclose(g, g_ref, rtol=0, atol=1e-10)
            assert torch.allclose(x, value * torch.tanh(x @ W) + z, rtol=0, atol=1e-10)
    finally:
        SCALE.fill_(0.3)


def test_a_number_read_from_a_tensor_attribute_is_not_kept_by_a_trace():
    cell = ReadsAnAttribute()
    z = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert "Tensor.__bool__" in trace_status(cell, torch.zeros(4, 6, dtype=DT), z)[1]
    for change in (lambda: cell.t.fill_(0.9), lambda: setattr(cell, "t", torch.tensor(0.2, dtype=DT))):
        change()
        (x, _), (x_ref, _) = solve_both(cell, z)
        assert torch.allclose(x, x_ref, rtol=0, atol=1e-12)
        assert torch.allclose(x, float(cell.t) * torch.tanh(x @ W) + z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("f, why", [(view_updated, "a view of another value"),
                                    (alias_updated, "a value read again after it")])
def test_an_in_place_augmented_assignment_on_a_shared_value_is_not_traced(f, why):
    z = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(3))
    zero = torch.zeros(4, 3 if f is view_updated else 6, dtype=DT)
    ctx = torch.randn(zero.shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    status = trace_status(f, torch.zeros(4, 6, dtype=DT), z, zero)[1]
    assert status.startswith(f"not traced: the map changes {why}") and "in place with an augmented assignment" in status
    fpidsl.fixed_point(f, torch.zeros_like(z), z, zero, **TIGHT)  # the first call, where ctx = 0 hid the fault
    (x, g), (x_ref, g_ref) = solve_both(f, z, ctx)
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-12) and torch.allclose(g, g_ref, rtol=0, atol=1e-10)
    unrolled = torch.zeros_like(z)
    for _ in range(200):
        unrolled = f(unrolled, z, ctx)
    assert torch.allclose(x, unrolled, rtol=0, atol=1e-10)


def test_an_augmented_assignment_on_a_private_value_still_traces():
    z = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(5))
    ctx = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(6))
    assert trace_status(privately_updated, torch.zeros(4, 6, dtype=DT), z, ctx)[1].startswith("traced")
    (x, g), (x_ref, g_ref) = solve_both(privately_updated, z, ctx)
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-12) and torch.allclose(g, g_ref, rtol=0, atol=1e-10)


def test_torch_reads_its_own_values_while_a_map_is_traced():
    """A module's own checks (MultiheadAttention reads truth values of its masks) run as usual: it still traces."""
    attention = nn.MultiheadAttention(6, 2, batch_first=True, dtype=DT)

    def attend(x, z):
        out, _ = attention(x, x, x, need_weights=False)
        return 0.3 * torch.tanh(out) + z

    z = torch.randn(2, 3, 6, dtype=DT, generator=torch.Generator().manual_seed(7))
    assert trace_status(attend, torch.zeros_like(z), z)[1].startswith("traced")


def scaled_by_the_batch(x, z):
    return torch.tanh(x @ W + z) * (x.shape[0] / 8)


def test_a_float_computed_from_the_batch_size_is_not_traced():
    z = torch.randn(8, 6, dtype=DT, generator=torch.Generator().manual_seed(8))
    with pytest.raises(fpidsl.UntraceableError, match=r"a number computed from the batch size \(1.0 at batch 8, "
                       r"1.125 at 9: x.shape\[0\] / 8, say\) would be fixed at the example's batch"):
        fpidsl.trace(scaled_by_the_batch, torch.zeros_like(z), z)
    (x, g), (x_ref, g_ref) = solve_both(scaled_by_the_batch, z[:5])
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-12) and torch.allclose(g, g_ref, rtol=0, atol=1e-10)


def test_the_agreement_check_also_perturbs_the_arguments(monkeypatch):
    """A safety net behind the refusals above: with the augmented-assignment check turned off, the trace's check
    at the first call's arguments (ctx = 0) passed; at perturbed arguments it sees the lost in-place effect."""
    from fpidsl.tracing import fx_capture

    monkeypatch.setattr(fx_capture, "_check_augmented", lambda graph, pairs: None)
    z = torch.randn(4, 6, dtype=DT, generator=torch.Generator().manual_seed(9))
    with pytest.raises(fpidsl.UntraceableError, match="the traced map differs from the map by"):
        fpidsl.trace(view_updated, torch.zeros_like(z), z, torch.zeros(4, 3, dtype=DT))


def test_a_map_that_raises_at_the_perturbed_check_is_not_traced_and_says_why():
    """The trace check compares the traced map with the map at a perturbed state; a map that raises there (a lookup
    past its table) is not traced, with that reason (it read "the tracer failed ...; this is a bug in fpidsl")."""
    table = torch.linspace(0.0, 0.5, 10, dtype=torch.float64)

    def lut(x, a):
        return 0.5 * table[(x * 10).long()] + a

    a = 0.1 * torch.rand(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traced, why = trace_status(lut, torch.zeros_like(a), a)
    assert traced is None and "raised at the trace check's perturbed state (IndexError" in why
    assert "bug in fpidsl" not in why
    x = fpidsl.fixed_point(lut, torch.zeros_like(a), a, tol=1e-12)
    torch.testing.assert_close(x, 0.5 * table[(x * 10).long()] + a, rtol=0, atol=1e-12)
