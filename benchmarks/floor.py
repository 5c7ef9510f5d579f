"""Table 3 of benchmarks/run.py (fpidsl's training step against its cost floor) for chosen workloads and methods.

    .venv/bin/python benchmarks/floor.py conv16-fast bibtex-nn --methods anderson
    .venv/bin/python benchmarks/floor.py conv16-fast --clock cpu     # this thread's CPU time, not wall time

The floor and its parts are run.py's (:func:`run.floor_row`): forward steps x one evaluation of g + backward steps x
one VJP + the once-a-step work, each timed alone, against the step; each round times the step and then every part,
and the ratio is the median over rounds of the step over that round's floor (:func:`run.floor_times`); the last
column gives the lowest and the highest round's ratio, the spread the machine put on it. ``--clock cpu``
times with this thread's CPU time (``time.thread_time``; every contender runs on one intra-op thread), which on a
machine shared with other jobs leaves out the time the process waited for a core; it does not leave out their
effect on the caches. The ratio, not the milliseconds, is the claim.

For the Anderson rows a second table adds to the floor the least history work of an Anderson iteration (one product
with the history, one mix; :func:`anderson_history_row`), which the floor leaves out: what no Anderson can save, so
that the rest of the gap is what an implementation could. For the Broyden rows a third table does the same with
Broyden's least history work (each of its two histories read once an iteration; :func:`broyden_history_row`).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from workloads import FULL, make_workloads  # noqa: E402

from fpidsl.runtime.solvers import Broyden  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workloads", nargs="+", choices=sorted(FULL), help="workloads of benchmarks/workloads.py")
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson"], choices=["picard", "anderson", "broyden"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run.steady_allocator()
    warnings.simplefilter("ignore")
    if args.clock == "cpu":
        run.time = type(sys)("cpu_clock")  # run.py's timers read run.time.perf_counter
        run.time.perf_counter = time.thread_time
    load_before = os.getloadavg()
    rows, history_rows, broyden_rows = [], [], []
    for w in make_workloads(False, args.workloads):
        for method in args.methods:
            out = run.Outcome()
            step = run.fpidsl_step(w, method, out)
            step()
            times = run.floor_times(w, step, out, args.repeats)
            rows.append([*run.floor_row(w, method, step, out, args.repeats, times),
                         "{:.2f}-{:.2f}".format(*times.ratio_range)])
            if method == "anderson":
                history_rows.append(anderson_history_row(w, out, times.floor, times.alone, args.repeats))
            if method == "broyden":
                broyden_rows.append(broyden_history_row(w, out, times.floor, times.alone, args.repeats))
    load_after = os.getloadavg()
    command = "python benchmarks/floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{command}`: {args.repeats} timed runs, {args.clock} clock, float32, CPU, one thread; load average "
          f"(1, 5, 15 min) {'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
          f"{'/'.join(f'{x:.2f}' for x in load_after)} at the end, on {os.cpu_count()} cores\n")
    print(run.table(["workload", "method", "forward (steps x ms)", "backward (steps x ms)", "once ms", "floor ms",
                     "fpidsl ms (alone)", "ratio", f"target {run.TARGET_FLOOR}x", "hand g / VJP ms",
                     "ratio, lowest-highest round"], rows))
    if history_rows:
        print("\nAnderson's least history work (not in the floor above): per iteration after the first, one product "
              "of a state-sized row with the m-row history (the workloads' m) and one mix of the history, timed "
              "alone at the state's size\n")
        print(run.table(["workload", "state", "iterations x ms", "floor + history ms", "fpidsl ms (alone)",
                         "ratio"], history_rows))
    if broyden_rows:
        print("\nBroyden's least history work (not in the floor above): per iteration holding k updates, one product "
              "of two state-sized rows with the k steps and one of two rows of coefficients with the k updates "
              "(each history read once), timed alone at the state's size for every k the solves went through\n")
        print(run.table(["workload", "state", "history ms (forward + backward)", "floor + history ms",
                         "fpidsl ms (alone)", "ratio"], broyden_rows))
    return 0


def anderson_history_row(w, out: run.Outcome, floor: float, alone: float, repeats: int) -> list[str]:
    """The least work any type-II Anderson iteration does with a full history beyond evaluating the map: read the
    history once for the new Gram entries / ``dF f`` (one ``bmm`` of a row with it) and once for the mix (one
    ``baddbmm``), timed alone on the workload's state size; added to the floor for the forward and backward
    iterations that take an Anderson step (all but each solve's first)."""
    batch, dim = w.target.shape[0], w.target[0].numel()
    m = w.settings("anderson")[0]["m"]
    history = torch.randn(batch, m, dim)
    row, gamma = torch.randn(batch, 1, dim), torch.randn(batch, 1, m)

    def least() -> None:
        torch.bmm(row, history.transpose(1, 2))
        torch.baddbmm(row, gamma, history, alpha=-1)

    t_least = run.median_time(least, repeats, 3 if batch * dim > 100_000 else 20)
    steps = max(out.forward_iters - 1, 0) + max(out.backward_iters - 1, 0)
    total = floor + steps * t_least
    return [w.name, f"{batch} x {dim}", f"{steps} x {run.ms(t_least)}", run.ms(total), run.ms(alone),
            f"{alone / total:.2f}"]


def broyden_least_work(rows: torch.Tensor, coefficients: torch.Tensor, S: torch.Tensor, U: torch.Tensor,
                       k: int) -> None:
    """The least history work of a limited-memory Broyden iteration holding ``k`` updates: its ``k`` steps (or
    ``v`` vectors) read once for their products with two rows (``df`` and ``f``: one ``bmm``) and its ``k`` updates
    read once for the new update and the proposal (two rows of coefficients: one ``baddbmm``)."""
    torch.bmm(rows, S[:, :k].transpose(1, 2))
    torch.baddbmm(rows, coefficients[:, :, :k], U[:, :k], alpha=-1)


def broyden_history_row(w, out: run.Outcome, floor: float, alone: float, repeats: int) -> list[str]:
    """:func:`broyden_least_work` timed alone on the workload's state size for every ``k`` its solves held:
    iteration ``n`` of a solve (from 1) holds ``(n - 2) mod m`` updates (the first two read none; a full memory
    restarts); summed over the forward and backward iterations."""
    batch, dim = w.target.shape[0], w.target[0].numel()
    m = w.settings("broyden")[0].get("m", Broyden().m)
    S, U = torch.randn(batch, m, dim), torch.randn(batch, m, dim)
    rows, coefficients = torch.randn(batch, 2, dim), torch.randn(batch, 2, m)
    held = [(n - 2) % m for iters in (out.forward_iters, out.backward_iters) for n in range(3, iters + 1)]
    inner = 3 if batch * dim > 100_000 else 20
    cost = {k: run.median_time(functools.partial(broyden_least_work, rows, coefficients, S, U, k), repeats, inner)
            for k in sorted(set(held)) if k}
    history = sum(cost.get(k, 0.0) for k in held)
    total = floor + history
    return [w.name, f"{batch} x {dim}", run.ms(history), run.ms(total), run.ms(alone), f"{alone / total:.2f}"]

if __name__ == "__main__":
    sys.exit(main())
