"""Profile fpidsl's training step on one benchmark workload: where the time goes.

    .venv/bin/python benchmarks/profile_step.py conv16-slow anderson       # torch.profiler, then cProfile
    .venv/bin/python benchmarks/profile_step.py bibtex-nn picard --steps 100
    .venv/bin/python benchmarks/profile_step.py bibtex-nn picard --shapes     # aten ops grouped by input shapes

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
    parser.add_argument("method", choices=["picard", "anderson"])
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (default 20)")
    parser.add_argument("--rows", type=int, default=20, help="rows of each table (default 20)")
    parser.add_argument("--quick", action="store_true", help="the quick workloads' tiny sizes (seconds)")
    parser.add_argument("--shapes", action="store_true",
                        help="group the aten ops by their input shapes (which product of the step is the slow one)")
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


if __name__ == "__main__":
    sys.exit(main())
