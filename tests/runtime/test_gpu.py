"""The runtime on a CUDA device: results, dtypes and devices follow the inputs, and the GPU's numbers agree with
the CPU's. Marked ``gpu``: skipped without CUDA (the ``device`` fixture), run by ``benchmarks/gpu_tables.sh``.

The CPU tests of the same contracts run everywhere; these add what only a device can show: no tensor of the
solve is made on the CPU by mistake (a mixed-device operation raises), and the host waits once an iteration
(``torch.cuda.set_sync_debug_mode``, the device's own count of the reads tests/runtime/test_host_syncs.py counts
on the CPU).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fpidsl.loader import load
from fpidsl.runtime import fixed_point

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
METHODS = [("picard", {}), ("anderson", {"m": 5}), ("broyden", {"m": 20})]


def _map(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    W = 0.6 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0]
    b = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    return W.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,extra", METHODS)
def test_a_solve_and_its_gradient_stay_on_the_device_and_agree_with_the_cpu(device, method, extra, dtype):
    results = []
    for where in ("cpu", device):
        W, b = (t.to(where) for t in _map(dtype))
        b.requires_grad_()
        x, stats = fixed_point(lambda x, b: torch.tanh(x @ W.T + b), torch.zeros(4, 8, dtype=dtype, device=where), b,
                               method=method, tol=1e-5 if dtype == torch.float32 else 1e-11, return_stats=True,
                               backward={"method": method, **extra}, trace=False, **extra)
        x.square().sum().backward()
        assert x.device.type == torch.device(where).type and x.dtype == dtype
        assert b.grad.device == x.device and stats.forward.iterations.device == x.device
        assert stats.forward.all_ok and stats.backward.all_ok
        results.append((x.detach().cpu(), b.grad.cpu()))
    (x_cpu, g_cpu), (x_gpu, g_gpu) = results
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(x_gpu, x_cpu, rtol=tol, atol=tol) and torch.allclose(g_gpu, g_cpu, rtol=tol, atol=tol)


def test_gmres_backward_on_the_device(device):
    W, b = (t.to(device) for t in _map(torch.float64))
    b.requires_grad_()
    x = fixed_point(lambda x, b: x @ W.T + b, torch.zeros(4, 8, dtype=torch.float64, device=device), b, tol=1e-12,
                    backward={"method": "gmres", "tol": 1e-12}, trace=False)
    x.sum().backward()
    eye = torch.eye(8, dtype=torch.float64, device=device)
    want = torch.linalg.solve(eye - W.T, torch.ones(8, dtype=torch.float64, device=device))  # (I - W)^-T 1
    assert torch.allclose(b.grad, want.expand(4, 8), atol=1e-9)


def test_a_compiled_layer_moved_to_the_device_matches_the_cpu(device):
    torch.manual_seed(0)
    cpu_layer = load(str(ROOT / "benchmarks" / "specs" / "conv.fpi"), "ConvMap16")()
    with torch.no_grad():
        cpu_layer.conv2.weight.mul_(0.3)  # contractive
    gpu_layer = load(str(ROOT / "benchmarks" / "specs" / "conv.fpi"), "ConvMap16")().to(device)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    z = torch.randn(2, 1, 12, 12)
    grads = []
    for layer, zz in ((cpu_layer, z), (gpu_layer, z.to(device))):
        out = layer(zz)
        assert out.device == zz.device
        out.square().sum().backward()
        grads.append([p.grad.cpu() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_a_traced_module_on_the_device(device):
    class Map(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            with torch.no_grad():
                self.lin.weight.mul_(0.3)

        def forward(self, x, z):
            return torch.tanh(self.lin(x) + z)

    torch.manual_seed(0)
    f = Map().to(device)
    z = torch.randn(4, 8, device=device, requires_grad=True)
    x = fixed_point(f, torch.zeros(4, 8, device=device), z, tol=1e-6)
    x.sum().backward()
    traced_grad = z.grad.clone()
    z.grad = None
    fixed_point(f, torch.zeros(4, 8, device=device), z, tol=1e-6, trace=False).sum().backward()
    assert x.device == z.device and torch.allclose(traced_grad, z.grad, atol=1e-5)


def _syncs(device, method: str, iterations: int, check_every: int = 1) -> int:
    W, b = (t.to(device) for t in _map(torch.float32))
    forced = {"min_iter": iterations, "max_iter": iterations, "on_fail": "ignore", "tol": 1e-30,
              "check_every": check_every}
    fixed_point(lambda x: torch.tanh(x @ W.T + b), torch.zeros(4, 8, device=device), method=method, trace=False,
                **forced)  # warm-up: the first call loads kernels and libraries, which may synchronise
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fixed_point(lambda x: torch.tanh(x @ W.T + b), torch.zeros(4, 8, device=device), method=method,
                        trace=False, **forced)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_the_device_waits_for_the_host_once_an_iteration(device, method):
    assert _syncs(device, method, 16) - _syncs(device, method, 8) == 8


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_with_a_check_interval_the_device_waits_once_a_check(device, method):
    assert _syncs(device, method, 32, check_every=4) - _syncs(device, method, 16, check_every=4) == 4


@pytest.mark.parametrize("method, extra", METHODS, ids=[m for m, _ in METHODS])
def test_a_check_interval_gives_the_results_and_records_of_a_check_every_iteration(device, method, extra):
    W, b = (t.to(device) for t in _map(torch.float64))
    scale = torch.tensor([[0.2], [0.9], [0.5], [1.6]], dtype=torch.float64, device=device)  # the last drifts
    runs = [fixed_point(lambda x: scale * torch.tanh(x @ W.T + b) + (scale > 1) * x, torch.zeros_like(b),
                        method=method, check_every=k, tol=1e-10, max_iter=80, on_fail="ignore", trace=False,
                        return_stats=True, **extra) for k in (1, 4)]
    (x1, s1), (x4, s4) = runs
    assert len(set(s1.forward.iterations.tolist())) >= 3
    torch.testing.assert_close(x4, x1, rtol=0, atol=1e-12, equal_nan=True)
    for name in ("iterations", "converged", "diverged", "stopped_at_floor", "best_iterate", "best_at", "residual"):
        torch.testing.assert_close(getattr(s4.forward, name), getattr(s1.forward, name), rtol=0, atol=0,
                                   equal_nan=True, msg=name)
