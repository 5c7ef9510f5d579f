"""The native Broyden step alone against the least work of a Broyden iteration, with hot and with cold caches.

    .venv/bin/python benchmarks/broyden_kernel.py
    .venv/bin/python benchmarks/broyden_kernel.py --batch 8 --dim 4096 --held 9 18 36 48 --repeats 60

At the conv16 state (batch 8, 4096 values, memory m = 50) and a few numbers ``k`` of held updates, one call of
``fpidsl.runtime.native.broyden_step`` (an update and a proposal) is timed against the least history work of any
limited-memory Broyden iteration (``floor.broyden_least_work``: each of its two ``k``-row histories read once, as
one ``bmm`` of two rows with the steps and one ``baddbmm`` of two rows of coefficients with the updates).
"Cold" writes a buffer larger than the last-level cache before each call, as the map's work between two calls of
a training step does; "hot" calls back to back. Medians of ``--repeats`` calls, alternating the two contenders, this thread's CPU
time, one thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from floor import broyden_least_work  # noqa: E402

from fpidsl.runtime import native  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--held", type=int, nargs="+", default=[9, 18, 36, 48])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--evict-mb", type=int, default=64, help="the buffer written before a cold call (MB)")
    args = parser.parse_args(argv)
    lib = native.library()
    if lib is None:
        print(native.status())
        return 1
    if max(args.held) >= args.m:
        parser.error("every --held must be below --m")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, D, m = args.batch, args.dim, args.m
    x, g, f, x_prev, f_prev = (torch.randn(B, D) for _ in range(5))
    U, S = 0.01 * torch.randn(B, m, D), 0.01 * torch.randn(B, m, D)
    R = 0.01 * torch.randn(B, m, m).tril()
    out, rows, coefficients = torch.empty(B, D), torch.randn(B, 2, D), torch.randn(B, 2, m)
    evict = torch.empty(args.evict_mb * (1 << 20) // 4)

    def kernel(k: int) -> None:
        native.broyden_step(lib, k, x, g, f, x_prev, f_prev, U, S, R, out)

    def least(k: int) -> None:
        broyden_least_work(rows, coefficients, S, U, k)

    command = " ".join(["python benchmarks/broyden_kernel.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"`{command}`: batch {B}, {D} values, m = {m}, float32, medians of {args.repeats} calls, thread CPU "
          "time, one thread\n")
    print("| held k | caches | kernel ms | least history work ms | ratio |")
    print("|---|---|---|---|---|")
    for k in args.held:
        for cold in (False, True):
            times: dict[str, list[float]] = {"kernel": [], "least": []}
            for _ in range(args.repeats):
                for name, fn in (("kernel", kernel), ("least", least)):
                    if cold:
                        evict.fill_(1.0)
                    start = time.thread_time()
                    fn(k)
                    times[name].append(time.thread_time() - start)
            a, b = statistics.median(times["kernel"]), statistics.median(times["least"])
            print(f"| {k} | {'cold' if cold else 'hot'} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
