"""The kernel-level measurements behind the choices in fpidsl/runtime/ops.py, fpidsl/passes/hoist.py and
fpidsl/runtime/solvers/anderson.py: each pair computes the same numbers two ways, timed back to back.

    .venv/bin/python benchmarks/kernels.py          # float32, one thread, batch 8 of 64x64 (about a minute)

Prints one line a pair: the median time of each form in ms and their ratio.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fpidsl.runtime import ops  # noqa: E402
from run import median_time, steady_allocator  # noqa: E402


def median_ms(fn) -> float:
    return median_time(fn, repeats=7, inner=15) * 1e3


def pair(label: str, first, second, names=("torch", "fpidsl")) -> None:
    a, b = median_ms(first), median_ms(second)
    print(f"{label:58s} {names[0]} {a:7.3f} ms   {names[1]} {b:7.3f} ms   ratio {b / a:5.2f}")


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steady_allocator()
    n, size = 8, 64
    for c in (16, 32):  # a convolution to one output channel: conv2d against depthwise + sum (ops.conv2d)
        x, w, b = torch.randn(n, c, size, size), torch.randn(1, c, 3, 3), torch.randn(1)
        pair(f"conv2d {c} -> 1 channels", lambda: F.conv2d(x, w, b, 1, 1),
             lambda: ops.conv2d(x, w, b, padding=(1, 1)))
    for cout, cin in ((1, 16), (16, 1), (16, 2)):  # input gradients: transposed conv against ops' choice
        w = torch.randn(cout, cin, 3, 3)
        ct, like = torch.randn(n, cout, size, size), torch.randn(n, cin, size, size)
        pair(f"input grad of conv2d, weight {cout}x{cin}", lambda: F.conv_transpose2d(ct, w, None, 1, 1),
             lambda: ops.conv2d_input_grad(ct, w, like, padding=(1, 1)), ("transposed", "fpidsl"))
    for c in (2, 4):  # hoist.py's CONV_SPLIT_SHARE: one conv of c channels against 1 channel + a hoisted sum
        x, w, rest = torch.randn(n, c, size, size), torch.randn(16, c, 3, 3), torch.randn(n, 16, size, size)
        pair(f"conv2d {c} -> 16 channels, whole or split 1 + {c - 1}", lambda: F.conv2d(x, w, None, 1, 1),
             lambda: F.conv2d(x[:, :1], w[:, :1], None, 1, 1) + rest, ("whole", "split"))
    batch, m, dim = 8, 6, 4096  # Anderson's history products (anderson.py)
    buf, f = torch.randn(batch, m, dim), torch.randn(batch, dim)
    pair("Anderson dF f: bmm(buffer, column) / bmm(row, buffer^T)",
         lambda: torch.bmm(buf, f.unsqueeze(-1)), lambda: torch.bmm(f.unsqueeze(1), buf.transpose(1, 2)),
         ("column", "row"))
    u, x, grid = torch.randn(n, 16, 32, 32), torch.randn(n, 16, 32, 32), torch.rand(n, 32, 32, 2) * 2 - 1
    with torch.no_grad():  # grid_sample's grid gradient (ops.grid_sample_vjp): aten's backward, as a primitive
        pair("grid gradient of grid_sample [8, 16, 32, 32]",
             lambda: torch.ops.aten.grid_sampler_2d_backward(u, x, grid, 0, 0, False, [False, True])[1],
             lambda: ops.grid_sample_vjp(u, x, grid, path=(1,)), ("aten", "fpidsl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
