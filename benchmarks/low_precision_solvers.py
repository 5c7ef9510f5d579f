"""The three solvers on docs/PYTORCH.md's mixed-precision map (a contraction of factor 0.9, 4 samples of 16,
``tol=1e-9``): under autocast bfloat16, and in bfloat16 and float16 states; per sample the iterations and whether
it stopped at the precision floor, and the relative distance to the float64 fixed point (``tol=1e-13``).

    .venv/bin/python benchmarks/low_precision_solvers.py
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fpidsl.runtime import fixed_point  # noqa: E402


def main() -> int:
    warnings.simplefilter("ignore")
    gen = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    a = 0.1 * torch.randn(4, 16, generator=gen)

    def g(x, a, W):
        return 0.9 * torch.tanh(x @ W.T) + a

    ref = fixed_point(g, torch.zeros_like(a).double(), a.double(), W.double(), tol=1e-13, max_iter=5000).float()
    for method in ("picard", "anderson", "broyden"):
        settings = {"method": method, "tol": 1e-9, "max_iter": 2000, "on_fail": "ignore", "return_stats": True}
        for name, dtype in (("autocast bfloat16", torch.float32), ("bfloat16 states", torch.bfloat16),
                            ("float16 states", torch.float16)):
            with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.float32):
                x, stats = fixed_point(g, torch.zeros_like(a).to(dtype), a.to(dtype), W.to(dtype), **settings)
            s = stats.forward
            print(f"{method:8s} {name:18s} iterations {s.iterations.tolist()} at the floor "
                  f"{s.stopped_at_floor.tolist()} relative error {float((x.float() - ref).norm() / ref.norm()):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
