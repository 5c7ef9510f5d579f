"""Profile fpidsl's training step on one benchmark workload: where the time goes.

    .venv/bin/python benchmarks/profile_step.py conv16-slow anderson       # torch.profiler, then cProfile
    .venv/bin/python benchmarks/profile_step.py bibtex-nn picard --steps 100
    .venv/bin/python benchmarks/profile_step.py bibtex-nn picard --shapes     # aten ops grouped by input shapes
    .venv/bin/python benchmarks/profile_step.py conv16-fast anderson --parts  # the step's time by part, no profiler

Same set-up as benchmarks/run.py (one thread, the allocator kept steady, the workload's settings). Prints the
median step time, the aten ops by self time (torch.profiler) and the Python functions by own time (cProfile).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import Outcome, fpidsl_step, steady_allocator  # noqa: E402
from workloads import make_workloads  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workload", help="a workload name of benchmarks/workloads.py, e.g. conv16-slow")
    parser.add_argument("method", choices=["picard", "anderson", "broyden"])
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    parser.add_argument("--rows", type=int, default=20, help="rows of each table (default 20)")
    parser.add_argument("--quick", action="store_true", help="the quick workloads' tiny sizes (seconds)")
    parser.add_argument("--shapes", action="store_true",
                        help="group the aten ops by their input shapes (which product of the step is the slow one)")
    parser.add_argument("--parts", action="store_true",
                        help="only the step's thread CPU time by part (the map's evaluations, the solver's steps, the "
                             "judgement, the rest of the loops, outside them), timed by wrapping them: no profiler")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steady_allocator()
    workloads = {w.name: w for w in make_workloads(quick=args.quick)}
    if args.workload not in workloads:
        parser.error(f"unknown workload {args.workload!r}; known: {', '.join(workloads)}")
    w = workloads[args.workload]
    out = Outcome()
    step = fpidsl_step(w, args.method, out)
    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(f"{w.name} {args.method}: median step {statistics.median(times) * 1e3:.2f} ms, "
          f"{out.forward_iters} forward / {out.backward_iters} backward iterations")

    if args.parts:
        print(parts_report(step, out, args.steps))
        return 0

    from torch.profiler import profile

    with profile(record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages(group_by_input_shape=args.shapes).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=30, max_shapes_column_width=70))

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())
    return 0


def parts_report(step, out: Outcome, steps: int) -> str:
    """The step's thread CPU time split into the map's evaluations (forward g and backward VJP), the solver's
    steps, the driver's judgement (the tensor code's or the native one's, with its recording of finished samples),
    the rest of the iteration loops and what runs outside them, per step and per
    iteration: each part timed by wrapping it for the duration of the measurement."""
    from fpidsl.runtime import driver
    from fpidsl.runtime.solvers import anderson, broyden, picard

    clock, spent = time.thread_time, {}

    def timed(fn, key):
        def wrapper(*a, **k):
            start = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + clock() - start
        return wrapper

    class Timed:
        def __init__(self, evaluate):
            self.evaluate, self.call = evaluate, timed(evaluate, "evaluations")

        def __call__(self, x):
            return self.call(x)

        def restrict(self, index):
            self.evaluate.restrict(index)

    saved = [(driver, "_judge"), (driver, "_loop"), (driver._NativeJudge, "__call__"), (driver._NativeJudge, "finish")
             ] + [(c, "step") for c in (anderson.Anderson, broyden.Broyden, picard.Picard)]
    originals = [getattr(owner, name) for owner, name in saved]
    loop = driver._loop
    driver._judge = timed(driver._judge, "judgement")  # the tensor code's; the native judge's (and its finish) below
    driver._NativeJudge.__call__ = timed(driver._NativeJudge.__call__, "judgement")
    driver._NativeJudge.finish = timed(driver._NativeJudge.finish, "judgement")
    driver._loop = timed(lambda evaluate, *a: loop(Timed(evaluate), *a), "loops")
    for cls in (anderson.Anderson, broyden.Broyden, picard.Picard):
        cls.step = timed(cls.step, "solver steps")
    try:
        step()
        spent.clear()
        start = clock()
        for _ in range(steps):
            step()
        total = (clock() - start) / steps * 1e3
    finally:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, fn)
    per = {k: v / steps * 1e3 for k, v in spent.items()}
    iterations = out.forward_iters + out.backward_iters
    rest = per["loops"] - per["evaluations"] - per.get("solver steps", 0.0) - per.get("judgement", 0.0)
    rows = [("evaluations (g, VJP)", per["evaluations"]), ("solver steps", per.get("solver steps", 0.0)),
            ("judgement", per.get("judgement", 0.0)), ("rest of the loops", rest),
            ("outside the loops", total - per["loops"]), ("step", total)]
    lines = [f"thread CPU time, mean of {steps} steps, {out.forward_iters} + {out.backward_iters} iterations",
             "", "| part | ms a step | ms an iteration |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / iterations:.3f} |" for name, ms in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
