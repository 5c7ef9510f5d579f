"""What finding the tensors a fixed-point map reads costs (docs/PYTORCH.md, "Costs and limits").

    python benchmarks/capture_cost.py [--repeats 30]

Prints the time of `fpidsl.runtime.capture.discover` for a lambda capturing one nn.Linear and for an
nn.Sequential of 20 Linear+Tanh blocks, and a training step (solve, loss, backward) of the lambda's map with
`capture="auto"` (discovery and the after-solve check) and `capture="explicit"` (neither), the two alternating
run by run; one thread, float32.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import median_time  # noqa: E402

import fpidsl  # noqa: E402
from fpidsl.runtime.capture import discover  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    small = lambda x, a: torch.tanh(lin(x) + a)  # noqa: E731
    deep = torch.nn.Sequential(*[m for _ in range(20) for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())])
    print(f"discover, a lambda capturing one Linear: {median_time(lambda: discover(small), args.repeats, 20) * 1e6:.0f} us")
    print(f"discover, a Sequential of 20 Linear+Tanh: {median_time(lambda: discover(deep), args.repeats, 5) * 1e3:.2f} ms")

    a = torch.randn(256, 64, requires_grad=True)
    x0 = torch.zeros(256, 64)

    def step(capture: str):
        def run():
            if capture == "auto":
                x = fpidsl.fixed_point(small, x0, a, tol=1e-5, capture="auto", trace=False)  # the autograd path
            else:
                x = fpidsl.fixed_point(lambda x, a, w, b: torch.tanh(torch.nn.functional.linear(x, w, b) + a),
                                       x0, a, lin.weight, lin.bias, tol=1e-5, capture="explicit", trace=False)
            x.square().sum().backward()
        return run

    times = {"auto": [], "explicit": []}
    for mode in times:
        step(mode)()  # warm-up
    for _ in range(args.repeats):
        for mode in times:
            start = time.perf_counter()
            step(mode)()
            times[mode].append(time.perf_counter() - start)
    auto, explicit = (statistics.median(times[m]) * 1e3 for m in ("auto", "explicit"))
    print(f"training step (batch 256, width 64, tol 1e-5): capture='auto' {auto:.1f} ms, "
          f"capture='explicit' (parameters passed as arguments) {explicit:.1f} ms, ratio {auto / explicit:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
