"""The map's evaluations inside fpidsl's solver loops against the same evaluations alone (table 3's floor parts).

    .venv/bin/python benchmarks/eval_in_loop.py conv16-slow --methods picard anderson broyden --rounds 3

Table 3 (``benchmarks/floor.py``) times one evaluation of g and one VJP back to back, with hot caches; inside a
solve, each evaluation follows the solver's own step, whose history (Anderson's ``2 m`` rows, Broyden's up to
``2 x 50``) passes through the caches in between. This script wraps the evaluations of a real training step
(:func:`run.fpidsl_step`) and prints, per round, the mean thread CPU time of an evaluation in the forward and in
the backward loop, restricted to the evaluations on the whole batch (samples that finish leave the batch), next to
the floor's evaluation timed alone (back to back) and alone after writing a 32 MB buffer (caches cold). Each round
times the step and then the parts, so that the machine's drift moves them together.
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

import run  # noqa: E402
from workloads import FULL, make_workloads  # noqa: E402

from fpidsl.runtime import driver  # noqa: E402

CLOCK = time.thread_time
FLUSH_FLOATS = 8 << 20  # 32 MB: the L3 share of this machine and more


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", choices=sorted(FULL))
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson", "broyden"],
                        choices=["picard", "anderson", "broyden"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run.steady_allocator()
    (w,) = make_workloads(False, [args.workload])
    (g_alone, vjp_alone, *_), _ = run.floor_part_fns(w)
    flush = torch.empty(FLUSH_FLOATS)
    loops: list[list[tuple[int, float]]] = []  # one list per loop of the step: (batch, seconds) per evaluation
    original = driver._loop

    class Timed:
        """The loop's evaluator, timing each call."""

        def __init__(self, evaluate, calls):
            self.evaluate, self.calls = evaluate, calls

        def __call__(self, x):
            start = CLOCK()
            y = self.evaluate(x)
            self.calls.append((x.shape[0], CLOCK() - start))
            return y

        def restrict(self, index):
            self.evaluate.restrict(index)

    def timed_loop(evaluate, *rest):
        loops.append([])
        return original(Timed(evaluate, loops[-1]), *rest)

    def alone(fn, cold: bool, n: int = 10) -> float:
        times = []
        for _ in range(n):
            if cold:
                flush.fill_(1.0)
            start = CLOCK()
            fn()
            times.append(CLOCK() - start)
        return statistics.median(times)

    batch = w.z.shape[0]
    print(f"{w.name}: ms per evaluation (thread CPU time), the whole batch of {batch}; forward g | backward VJP")
    print("| method | round | in the loop | alone | alone, cold | in the loop / alone |")
    print("|---|---|---|---|---|---|")
    driver._loop = timed_loop
    try:
        for method in args.methods:
            out = run.Outcome()
            step = run.fpidsl_step(w, method, out)
            step()
            step()
            for r in range(args.rounds):
                loops.clear()
                step()
                forward, backward = ([t for b, t in calls if b == batch] for calls in loops[:2])
                cells = []
                for ts, fn in ((forward, g_alone), (backward, vjp_alone)):
                    hot, cold = alone(fn, False), alone(fn, True)
                    cells.append((statistics.mean(ts), hot, cold))
                print(f"| {method} | {r} | " + " | ".join(
                    " / ".join(f"{c[i] * 1e3:.2f}" for c in cells) for i in range(3))
                    + " | " + " / ".join(f"{c[0] / c[1]:.2f}" for c in cells) + " |")
    finally:
        driver._loop = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
