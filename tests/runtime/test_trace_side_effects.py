"""The trace's side effects on the traced module (fpidsl/tracing/api.py, extern_op.py): a module in training mode
has its buffers updated as on the autograd path, and ``Layer.from_module`` keeps tied weights tied."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.tracing import trace_status

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 500}


class Normed(nn.Module):
    """A map with a BatchNorm1d (an extern of the traced layer) that updates its running statistics in training."""

    def __init__(self, n=8):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.norm = nn.BatchNorm1d(n)

    def forward(self, x, z):
        return 0.5 * torch.tanh(self.norm(self.fc(x))) + z


class Tied(nn.Module):
    """Two Linear layers with one weight (``b.weight is a.weight``)."""

    def __init__(self, n=8):
        super().__init__()
        self.a = nn.Linear(n, n)
        self.b = nn.Linear(n, n)
        self.b.weight = self.a.weight
        with torch.no_grad():
            self.a.weight.mul_(0.5)

    def forward(self, x, z):
        return 0.2 * torch.tanh(self.a(x)) + 0.2 * torch.tanh(self.b(torch.sin(x))) + z


def _buffers(module):
    return {k: b.clone() for k, b in module.named_buffers()}


def _assert_same_buffers(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_call(module, z, trace):
    x = fpidsl.fixed_point(module, torch.zeros_like(z), z, trace=trace, backward=TIGHT, **TIGHT)
    x.sum().backward()
    return x


def test_batchnorm_running_stats_are_those_of_the_autograd_path():
    """One update per solver evaluation and one at the backward's point, traced or not (the trace's records and
    check, the extern's VJPs and the capture check after a solve leave the buffers)."""
    torch.manual_seed(0)
    traced = Normed().to(DT).train()
    plain = copy.deepcopy(traced)
    z = torch.randn(6, 8, dtype=DT, requires_grad=True)
    for _ in range(2):  # the first call traces, the second uses the cached trace
        before = int(traced.norm.num_batches_tracked)
        x_traced, x_plain = _train_call(traced, z, True), _train_call(plain, z, False)
        assert torch.equal(x_traced, x_plain)
        assert int(traced.norm.num_batches_tracked) > before
        _assert_same_buffers(_buffers(traced), _buffers(plain))
    assert trace_status(traced, torch.zeros_like(z), z)[0] is not None  # the traced path was the one used


def test_tracing_leaves_the_buffers():
    torch.manual_seed(0)
    module = Normed().to(DT).train()
    before = _buffers(module)
    layer = fpidsl.trace(module, torch.randn(6, 8, dtype=DT), torch.randn(6, 8, dtype=DT))
    assert layer.TRACED.spec.externs  # the BatchNorm is an extern, run at the trace's records and check
    _assert_same_buffers(before, _buffers(module))


def test_tracing_a_function_leaves_the_buffers_of_the_modules_it_reads():
    torch.manual_seed(0)
    fc, norm = nn.Linear(8, 8).to(DT), nn.BatchNorm1d(8).to(DT).train()
    before = _buffers(norm)

    def f(x, z):
        return 0.5 * torch.tanh(norm(fc(x))) + z

    fpidsl.trace(f, torch.randn(6, 8, dtype=DT), torch.randn(6, 8, dtype=DT))
    _assert_same_buffers(before, _buffers(norm))


@pytest.mark.parametrize("how", ["fixed_point", "from_module"])
def test_the_backward_of_an_extern_leaves_its_buffers(how):
    """The extern's VJPs evaluate it again, on clones of its buffers (fpidsl.runtime.extern, replay)."""
    torch.manual_seed(0)
    module = Normed().to(DT).train()
    z = torch.randn(6, 8, dtype=DT, requires_grad=True)
    if how == "fixed_point":
        x = fpidsl.fixed_point(module, torch.zeros_like(z), z, backward=TIGHT, **TIGHT)
        norm = module.norm
    else:
        layer = fpidsl.trace(module, z.detach(), z.detach()).from_module(module, solve=TIGHT, backward=TIGHT)
        x, norm = layer(z), layer.norm_fn.op  # the extern: a TracedOp around a copy of the BatchNorm
    iterations = int(layer.stats.forward.max_iterations) if how == "from_module" else None
    after_forward = int(norm.num_batches_tracked)
    if iterations is not None:
        assert after_forward == iterations
    x.sum().backward()
    assert int(norm.num_batches_tracked) == after_forward + 1  # the backward's one evaluation at the point


def _tied_layer():
    torch.manual_seed(0)
    module = Tied().to(DT)
    layer_class = fpidsl.trace(module, torch.randn(4, 8, dtype=DT), torch.randn(4, 8, dtype=DT))
    return module, layer_class.from_module(module, solve=TIGHT, backward=TIGHT)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_from_module_keeps_tied_weights():
    module, layer = _tied_layer()
    assert layer.a.weight is layer.b.weight
    assert layer.a.weight is not module.a.weight  # a copy
    assert _count(layer) == _count(module) == 80


def test_from_module_tied_weights_train_as_the_module():
    module, layer = _tied_layer()
    z = torch.randn(4, 8, dtype=DT)

    def solve():
        return fpidsl.fixed_point(module, torch.zeros_like(z), z, trace=False, backward=TIGHT, **TIGHT)

    for model, out in ((layer, layer(z)), (module, solve())):
        opt = torch.optim.SGD(model.parameters(), 0.05)
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()
    torch.testing.assert_close(layer.a.weight, module.a.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(z), solve(), rtol=0, atol=1e-10)
