"""The solver loop asks the host one question an iteration (how many samples finished), and nothing else.

On a GPU every value read by the host (``.item()``, ``int(t)``, ``bool(t)``, boolean-mask indexing, ``nonzero``)
waits for the device to finish its queue. These tests count such reads on the CPU with a dispatch mode (the
same aten operations run on either device) and compare a solve of N forced iterations with one of 2N: the
difference is what an iteration costs, whatever the set-up and the final bookkeeping read. The GPU counterpart
(``torch.cuda.set_sync_debug_mode``) is in tests/runtime/test_gpu.py. The counts are of the tensor code, the code a
GPU runs (``native.turned_off()``); on the CPU the native judge returns the count of finished samples from C, and
reads nothing (the last test).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fpidsl.runtime import fixed_point, native

from .helpers import DTYPE, generator

# aten operations after which the host holds a value computed on the device
_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: scalar reads and data-dependent shapes."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _READS or (name.startswith("index") and _has_bool_index(args)):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _problem():
    gen = generator(0)
    W = 0.5 * torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DTYPE))[0]
    b = torch.randn(3, 6, generator=gen, dtype=DTYPE, requires_grad=True)
    return (lambda x, b: torch.tanh(x @ W.T + b)), b


def _reads(method: str, iterations: int, train: bool, tensor_code: bool = True) -> int:
    f, b = _problem()
    forced = {"min_iter": iterations, "max_iter": iterations, "on_fail": "ignore", "tol": 1e-30}
    extra = {"m": 4} if method in ("anderson", "broyden") else {}
    with native.turned_off() if tensor_code else contextlib.nullcontext(), HostReads() as reads:
        x = fixed_point(f, torch.zeros(3, 6, dtype=DTYPE), b, method=method, backward={**forced, "method": method},
                        trace=False, **forced, **extra)
        if train:
            x.sum().backward()
    return reads.count


def test_the_counter_sees_the_reads_a_gpu_would_wait_for():
    t = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as reads:
        int((t > 0).sum())
        bool(t.any())
        float(t[0])
        t[t > 0]
        torch.nonzero(t)
        t * 2 + 1  # not a read
        t[torch.tensor([0, 2])]  # integer indices: not a read
    assert reads.count == 5


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_a_forward_iteration_reads_the_host_once(method):
    assert _reads(method, 16, train=False) - _reads(method, 8, train=False) == 8


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_a_training_step_reads_the_host_once_an_iteration_forward_and_backward(method):
    assert _reads(method, 16, train=True) - _reads(method, 8, train=True) == 2 * 8


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_with_the_native_judge_an_iteration_reads_nothing_on_the_cpu(method):
    if native.library() is None:
        pytest.skip(native.status())
    assert _reads(method, 16, train=True, tensor_code=False) - _reads(method, 8, train=True, tensor_code=False) == 0
