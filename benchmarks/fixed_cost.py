"""The fixed cost of a training step: what fpidsl's Python and PyTorch's dispatch cost around the solves.

    .venv/bin/python benchmarks/fixed_cost.py
    .venv/bin/python benchmarks/fixed_cost.py --repeats 9 --steps 100

A small layer (``benchmarks/specs/small.fpi``: the Bibtex FPI_NN map at 12 features, 16 hidden, 4 labels, batch
4), whose arithmetic costs next to nothing, trained with run.py's step (solve, loss, ``backward()``) and each
method's settings of the benchmark's workloads. Per method: the Python function calls a step makes (cProfile's
count: the same on every machine and run, the figure to compare across commits), the fastest of ``--repeats``
timings of ``--steps`` steps (this thread's CPU time, one thread) and the cost floor of run.py's table 3 (the
map's evaluations, VJPs and once-a-step work, timed alone) beside it. On the benchmark's real workloads this cost
is what a bibtex-size step pays over its floor.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from workloads import Workload, bibtex_nn_map  # noqa: E402

from fpidsl.loader import load  # noqa: E402

SPEC = HERE / "specs" / "small.fpi"


def small_workload(batch: int = 4) -> Workload:
    torch.manual_seed(0)
    layer = load(str(SPEC), "SmallNN")()
    x = (torch.rand(batch, 12) < 0.3).float()
    target = (torch.rand(batch, 4) < 0.3).float()
    return Workload(name="small", description="SmallNN, batch 4, 12 -> 16 -> 4", layer=layer, hand=bibtex_nn_map,
                    z=x, target=target, tol=1e-5, b_tol=1e-6, max_iter=3000)


def calls_a_step(step: run.Step, steps: int) -> float:
    """Python function calls a step (cProfile's count, builtins included)."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        step()
    profile.disable()
    return sum(entry[1] for entry in pstats.Stats(profile).stats.values()) / steps


def fastest(fn, steps: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(steps):
            fn()
        times.append((time.thread_time() - start) / steps)
    return min(times)


def rows(methods: list[str], steps: int, repeats: int) -> list[list[str]]:
    w = small_workload()
    out = []
    for method in methods:
        outcome = run.Outcome()
        step = run.fpidsl_step(w, method, outcome)
        for _ in range(20):
            step()
        calls = calls_a_step(step, steps)
        step_s = fastest(step, steps, repeats)
        g, vjp, once = (fastest(fn, steps, repeats) for fn in run.floor_part_fns(w)[0][:3])
        floor = run._floor(outcome, g, vjp, once)
        out.append([method, f"{outcome.forward_iters} / {outcome.backward_iters}", f"{calls:.0f}",
                    f"{step_s * 1e3:.3f}", f"{floor * 1e3:.3f}", f"{(step_s - floor) * 1e3:.3f}"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson", "broyden"],
                        choices=["picard", "anderson", "broyden"])
    parser.add_argument("--steps", type=int, default=100, help="steps a timing (default 100)")
    parser.add_argument("--repeats", type=int, default=9, help="timings, the fastest kept (default 9)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run.steady_allocator()
    warnings.simplefilter("ignore")
    table = rows(args.methods, args.steps, args.repeats)
    command = "python benchmarks/fixed_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command.strip()}`: SmallNN (benchmarks/specs/small.fpi), batch 4, float32, one thread, this thread's "
          f"CPU time, the fastest of {args.repeats} timings of {args.steps} steps\n")
    print(run.table(["method", "iterations fwd / bwd", "Python calls a step", "step ms", "floor ms",
                     "step - floor ms"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
