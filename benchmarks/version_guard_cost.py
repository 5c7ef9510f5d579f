"""What the version guard (fpidsl/runtime/capture.py ``VersionGuard``) costs on the autograd path: a call of
``fixed_point(..., trace=False, per_sample=True)`` with its backward, on a map that reads three tensors that do not
require grad (a closure tensor, a module buffer, a dict entry), with the guard, without it, and without it nor the
capture check's recording of what the map reads; side by side in one process (CPU, float32, one thread).

    .venv/bin/python benchmarks/version_guard_cost.py
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fpidsl.runtime import capture, fixed_point  # noqa: E402


class Cell(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.register_buffer("scale", torch.full((width,), 0.5))
        self.config = {"shift": torch.zeros(width)}

    def forward(self, x, z):
        return self.scale * torch.tanh(self.lin(x)) + z + self.config["shift"]


@contextmanager
def variant(name: str):
    saved_guard, saved_mode = capture.Captured.version_guard, capture._Births.__torch_function__
    if name != "guard":
        capture.Captured.version_guard = lambda self: None
    if name == "neither":
        def plain(self, func, types, args=(), kwargs=None):  # the mode as it was before the guard
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.refs[id(t)] = __import__("weakref").ref(t)
            return out
        capture._Births.__torch_function__ = plain
    try:
        yield
    finally:
        capture.Captured.version_guard, capture._Births.__torch_function__ = saved_guard, saved_mode


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    cell = Cell(64)
    with torch.no_grad():
        cell.lin.weight.mul_(0.5)
    z = torch.randn(32, 64)
    outer = torch.zeros(64)  # the closure tensor

    def g(x, z):
        return cell(x, z) + outer

    for rounds in range(2):
        for name in ("guard", "no guard", "neither"):
            with variant(name):
                for _ in range(20):
                    fixed_point(g, torch.zeros_like(z), z, trace=False, per_sample=True).sum().backward()
                start = time.perf_counter()
                for _ in range(300):
                    fixed_point(g, torch.zeros_like(z), z, trace=False, per_sample=True).sum().backward()
                us = (time.perf_counter() - start) / 300 * 1e6
            print(f"round {rounds + 1}, {name:8s}: {us:7.1f} us a call with its backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
