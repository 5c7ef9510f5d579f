"""fixed_point called from several threads at once (a helper's probe): each thread gets the numbers a serial call
with its inputs gives, and the process is left as it was.

- On the autograd path (``trace=False``) the captured tensors (a module's parameters, a global tensor) are swapped
  in place while the backward evaluates the map; two threads doing so at once put each other's detached values
  back as the originals, and the module kept plain tensors instead of its parameters (their gradients lost in
  every later call) or a thread's gradient missed contributions.
- Two first calls tracing at once restored each other's torch.fx patch of ``nn.Module.__call__``: it stayed in
  place, every module call in the process returned an fx Proxy, and the map was cached as untraceable.
"""
from __future__ import annotations

import sys
import threading

import torch
from torch import nn

import fpidsl
from fpidsl.tracing import trace_status

DT = torch.float64
THREADS = 4


class Cell(nn.Module):
    def __init__(self, seed: int = 0, d: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, d, dtype=DT)
        with torch.no_grad():
            self.lin.weight.copy_(0.3 * torch.randn(d, d, generator=gen, dtype=DT) / d ** 0.5)
            self.lin.bias.copy_(0.1 * torch.randn(d, generator=gen, dtype=DT))

    def forward(self, x, z):
        return torch.tanh(self.lin(x) + z)


def in_threads(calls):
    """Run ``calls`` at once (a barrier starts them together); their results, or the exceptions they raised."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i):
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    return results


def solve_and_grad(cell, z, trace, params=None):
    """The fixed point and the gradients with respect to ``z`` and ``params`` (the cell's, read before: while
    another thread's backward runs on the autograd path, the module's attributes hold its substitutes)."""
    z = z.clone().requires_grad_()
    x = fpidsl.fixed_point(cell, torch.zeros_like(z), z, tol=1e-12, trace=trace)
    return (x.detach(), *torch.autograd.grad((x ** 2).sum(), [z, *(params or cell.parameters())]))


def test_concurrent_calls_on_the_autograd_path_keep_the_parameters_and_their_gradients():
    torch.set_num_threads(1)
    cell = Cell()
    weight, bias = cell.lin.weight, cell.lin.bias
    zs = [(1 + i) * torch.randn(5, 8, dtype=DT, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    want = [solve_and_grad(cell, z, False) for z in zs]

    def repeatedly(z):
        return [solve_and_grad(cell, z, False, [weight, bias]) for _ in range(15)]

    for got, expected in zip(in_threads([lambda z=z: repeatedly(z) for z in zs]), want):
        assert not isinstance(got, BaseException), repr(got)
        for call in got:
            for a, b in zip(call, expected):
                assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert cell.lin.weight is weight and cell.lin.bias is bias  # still the module's parameters
    weight.grad = None
    solve_and_grad(cell, zs[0], False)
    z = zs[0].clone().requires_grad_()
    fpidsl.fixed_point(cell, torch.zeros_like(z), z, trace=False).sum().backward()
    assert weight.grad is not None


TARGET = torch.randn(8, 8, dtype=DT, generator=torch.Generator().manual_seed(7)).mul_(0.05).requires_grad_()


def global_map(x, z):
    return torch.tanh(x @ TARGET + z)


def test_concurrent_calls_accumulate_every_gradient_of_a_global_tensor():
    torch.set_num_threads(1)
    zs = [torch.randn(5, 8, dtype=DT, generator=torch.Generator().manual_seed(10 + i)) for i in range(THREADS)]
    rounds = 10

    def calls(z):
        for _ in range(rounds):
            fpidsl.fixed_point(global_map, torch.zeros_like(z), z, tol=1e-12, trace=False).square().sum().backward()

    TARGET.grad = None
    for z in zs:
        calls(z)
    want = TARGET.grad.clone()
    TARGET.grad = None
    assert all(r is None for r in in_threads([lambda z=z: calls(z) for z in zs]))
    assert torch.allclose(TARGET.grad, want, rtol=1e-11, atol=0)


def test_concurrent_first_calls_trace_one_at_a_time_and_leave_torch_unpatched():
    torch.set_num_threads(1)
    call = nn.Module.__call__
    for attempt in range(4):
        cells = [Cell(seed=attempt)] * THREADS  # one module, traced at its first call by whichever thread is first
        zs = [torch.randn(5, 8, dtype=DT, generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
        want = [solve_and_grad(Cell(seed=attempt), z, False) for z in zs]
        params = list(cells[0].parameters())
        got = in_threads([lambda c=c, z=z: solve_and_grad(c, z, True, params) for c, z in zip(cells, zs)])
        assert nn.Module.__call__ is call
        for g, w in zip(got, want):
            assert not isinstance(g, BaseException), repr(g)
            for a, b in zip(g, w):
                assert torch.allclose(a, b, rtol=0, atol=1e-9)
        assert trace_status(cells[0], torch.zeros(5, 8, dtype=DT), zs[0])[1].startswith("traced")


def test_a_dropout_layer_called_from_threads_with_different_batches_draws_each_call_its_own_seeds():
    """The call's sizes and dropout seeds were kept on the layer: a thread's batch of 3 met another's seeds for 2
    ("argument 11 is marked batched but is (3,); a batched argument has the batch size 2")."""
    torch.set_num_threads(1)
    cls = fpidsl.load("specs/zoo/mdeq.fpi", name="MDEQCell")
    torch.manual_seed(0)
    layer = cls(solve={"max_iter": 30, "on_fail": "ignore"}).double().train()

    def calls(batch):
        gen = torch.Generator().manual_seed(batch)
        return [layer(torch.randn(batch, 4, 4, 4, dtype=DT, generator=gen)).shape[0] for _ in range(80)]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the window between binding and reading is short
    try:
        results = in_threads([lambda b=b: calls(b) for b in (2, 3, 4, 5)])
    finally:
        sys.setswitchinterval(interval)
    for batch, got in zip((2, 3, 4, 5), results):
        assert got == [batch] * 80, got if isinstance(got, BaseException) else None
