"""What the mixing probe (fpidsl/runtime/mixing.py) costs on the autograd path: ``fixed_point(..., trace=False)``
with its default ``per_sample=None`` (probed) against ``per_sample=True`` (not), a call and its backward, on a
64-wide tanh layer at batch 32 (CPU, float32, one thread), side by side in one process.

    .venv/bin/python benchmarks/mixing_probe.py
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fpidsl.runtime import fixed_point  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    with torch.no_grad():
        net[0].weight.mul_(0.5)
    z = torch.randn(32, 64)

    def g(x, z):
        return net(x) + z

    for rounds in range(2):
        for per_sample in (True, None):
            for _ in range(20):
                fixed_point(g, torch.zeros_like(z), z, trace=False, per_sample=per_sample)
            start = time.perf_counter()
            for _ in range(200):
                x, stats = fixed_point(g, torch.zeros_like(z), z, trace=False, per_sample=per_sample,
                                       return_stats=True)
                x.sum().backward()
            ms = (time.perf_counter() - start) / 200 * 1e3
            print(f"round {rounds + 1}, per_sample={per_sample}: {ms:.3f} ms a call with its backward "
                  f"({int(stats.forward.iterations.max())} forward iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
