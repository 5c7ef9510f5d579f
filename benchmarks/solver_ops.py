"""The solver loop's own work an iteration, counted (not timed): aten operations of fixed_point's loop.

    .venv/bin/python benchmarks/solver_ops.py

Counts the aten operations dispatched by a forced-length solve of the cheap map ``0.5 x + z`` at the conv
workloads' state size (8 samples of 4096 values) and takes the difference of 40 and 20 iterations: what one
more iteration costs, set-up and bookkeeping left out. Per method: all operations, those that are not views
(each a kernel), and those that read or write a tensor of the state's size or larger (a pass over the state or
the history, what costs time at large states; the map itself is 2 of them). Counts do not depend on the machine's
load, which makes them the figure to compare across commits on a shared machine (times: run.py's table 6).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpidsl.runtime import fixed_point  # noqa: E402

VIEWS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "select", "slice", "alias", "diagonal",
         "as_strided", "expand", "t", "permute", "detach"}
BATCH, DIM = 8, 4096


class OpCount(TorchDispatchMode):
    """Counts dispatched aten operations: all, non-view, and those touching at least ``large`` elements."""

    def __init__(self, large: int):
        super().__init__()
        self.large = large
        self.all = self.kernels = self.passes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all += 1
        if func.overloadpacket.__name__ not in VIEWS:
            self.kernels += 1
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            self.passes += any(t.numel() >= self.large for t in tensors)
        return func(*args, **(kwargs or {}))


def count(method: str, iterations: int) -> tuple[int, int, int]:
    z = torch.randn(BATCH, DIM)
    extra = {"m": 6} if method != "picard" else {}
    with OpCount(BATCH * DIM) as c:
        fixed_point(lambda x, z: 0.5 * x + z, torch.zeros_like(z), z, method=method, min_iter=iterations,
                    max_iter=iterations, on_fail="ignore", **extra)
    return c.all, c.kernels, c.passes


def main() -> int:
    print(f"aten operations an iteration, state {BATCH} x {DIM}, m = 6 (40 minus 20 forced iterations, / 20):\n")
    print("| method | all | kernels (non-view) | passes over state-sized tensors |")
    print("|---|---|---|---|")
    for method in ("picard", "anderson", "broyden"):
        few, many = count(method, 20), count(method, 40)
        print(f"| {method} | " + " | ".join(f"{(b - a) / 20:.1f}" for a, b in zip(few, many)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
