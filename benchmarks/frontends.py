"""The ways into fpidsl side by side: the same map as a spec, as an nn.Module traced, as an nn.Module on the
autograd path, and torchdeq on the same module; a training step on every workload.

    .venv/bin/python benchmarks/frontends.py                 # the run docs/BENCHMARKS.md "Front-ends" reports
    .venv/bin/python benchmarks/frontends.py --quick         # tiny sizes, a few repeats (seconds)
    .venv/bin/python benchmarks/frontends.py --device cuda   # on a GPU
    .venv/bin/python benchmarks/frontends.py --workloads conv16-fast --methods picard   # one row

Contenders, all on the same weights, inputs, start, tolerances and criterion as benchmarks/run.py, Picard and
Anderson (m = 6) forward and backward:

- ``spec``: the compiled layer of the workload's spec;
- ``traced``: ``fpidsl.fixed_point(module, x0, z)`` on the map written as an ``nn.Module``
  (benchmarks/workloads.py), which traces the module into the same compiler (:mod:`fpidsl.tracing.auto`);
- ``plain``: the same call with ``trace=False``: the autograd path (``f`` evaluated as written, its VJPs by
  autograd over a graph recorded once);
- ``torchdeq``: torchdeq 0.1.0 ``get_deq(ift=True)`` on the same module.

Targets (issue 18): traced within 1.05x of the spec, traced at most 0.6x of torchdeq. The contenders alternate run
by run in this one process; times are medians of the repeats, ratios the medians of the ratios within a round
(:func:`run.round_ratio`). Only the ratios are claims; the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from run import (Outcome, _grads, _record, _zero, alternate_runs, fpidsl_step, ms, relative_error,  # noqa: E402
                 round_ratio, table)
from workloads import FULL, Workload, make_workloads  # noqa: E402

from fpidsl.runtime import fixed_point  # noqa: E402

TARGET_SPEC = 1.05
TARGET_TORCHDEQ = 0.6


def module_step(w: Workload, module, method: str, out: Outcome, trace: bool):
    """A training step of ``fixed_point`` on the module (traced, or the autograd path)."""
    forward, backward = w.settings(method)
    params = tuple(module.parameters())

    def step() -> None:
        _zero(params)
        x_hat, stats = fixed_point(module, w.x0(), w.z, backward=backward, return_stats=True, trace=trace, **forward)
        w.loss(w.output(x_hat), w.target).backward()
        out.grads = _grads(params)
        _record(out, stats)

    return step


def torchdeq_module_step(w: Workload, module, method: str, out: Outcome):
    """torchdeq's training step on the module (benchmarks/run.py's settings)."""
    from torchdeq import get_deq

    solver = {"picard": "fixed_point_iter", "anderson": "anderson"}[method]
    deq = get_deq(core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=w.max_iter,
                  b_max_iter=w.max_iter, f_tol=w.tol, b_tol=w.b_tol, f_stop_mode="abs", b_stop_mode="abs")
    deq.train()
    params = tuple(module.parameters())
    info_back: dict = {}

    def step() -> None:
        _zero(params)
        z_out, info = deq(lambda x: module(x, w.z), w.x0(), backward_writer=info_back.update)
        w.loss(w.output(z_out[-1]), w.target).backward()
        out.grads = _grads(params)
        out.forward_ok = bool(info["abs_lowest"].max() < w.tol)
        out.backward_ok = bool(info_back["abs_lowest"].max() < w.b_tol)
        out.forward_iters = int(info["nstep"].max())
        out.backward_iters = int(info_back["nstep"].max())

    return step


def traces(w: Workload, module) -> bool:
    """Whether ``fixed_point`` solves the module with a traced plan (else it falls back to the autograd path)."""
    from fpidsl.tracing.auto import traced_plan

    return traced_plan(module, w.x0(), (w.z,), None, True) is not None


def rows(workloads: list[Workload], repeats: int, methods: tuple[str, ...] = ("picard", "anderson")
         ) -> tuple[list[list[str]], list[list[str]]]:
    speed, checks = [], []
    for w in workloads:
        module = w.module()
        traced = traces(w, module)
        for method in methods:
            print(f"timing {w.name} {method}", file=sys.stderr, flush=True)
            outs = {name: Outcome() for name in ("spec", "traced", "plain", "torchdeq")}
            contenders = {
                "spec": fpidsl_step(w, method, outs["spec"]),
                "traced": module_step(w, module, method, outs["traced"], trace=True),
                "plain": module_step(w, module, method, outs["plain"], trace=False),
                "torchdeq": torchdeq_module_step(w, module, method, outs["torchdeq"]),
            }
            runs = alternate_runs(contenders, repeats)
            t = {name: statistics.median(times) for name, times in runs.items()}
            ratio_spec, ratio_deq = round_ratio(runs, "traced", "spec"), round_ratio(runs, "traced", "torchdeq")
            speed.append([w.name, method, "yes" if traced else "**no** (autograd path)", ms(t["spec"]),
                          ms(t["traced"]), ms(t["plain"]), ms(t["torchdeq"]),
                          f"{ratio_spec:.2f}", "met" if ratio_spec <= TARGET_SPEC else "**not met**",
                          f"{ratio_deq:.2f}", "met" if ratio_deq <= TARGET_TORCHDEQ else "**not met**",
                          f"{round_ratio(runs, 'plain', 'torchdeq'):.2f}", f"{round_ratio(runs, 'spec', 'torchdeq'):.2f}"])
            s = outs["spec"]
            checks.append([w.name, method] + [f"{o.forward_iters} / {o.backward_iters}" for o in outs.values()]
                          + [run.ok(all(o.forward_ok and o.backward_ok for o in outs.values()))]
                          + [f"{relative_error(outs[n].grads, s.grads):.1e}" for n in ("traced", "plain", "torchdeq")])
    return speed, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5, quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--workloads", nargs="+", choices=sorted(FULL), help="only these (default: every workload)")
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson"], choices=["picard", "anderson"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run.steady_allocator()
    run.DEVICE = torch.device(args.device)
    warnings.simplefilter("ignore")
    repeats = args.repeats or (3 if args.quick else 5)
    load_before = os.getloadavg()
    speed, checks = rows([w.to(run.DEVICE) for w in make_workloads(args.quick, args.workloads)], repeats,
                         tuple(args.methods))
    load_after = os.getloadavg()
    command = "python benchmarks/frontends.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"`{command.strip()}`: {repeats} timed runs per contender, {run.device_name()}, float32, one thread; "
          f"load average (1, 5, 15 min) {'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
          f"{'/'.join(f'{x:.2f}' for x in load_after)} at the end, on {os.cpu_count()} cores\n")
    print(table(["workload", "method", "traces", "spec ms", "traced ms", "plain ms", "torchdeq ms",
                 "traced / spec", f"target {TARGET_SPEC}x", "traced / torchdeq", f"target {TARGET_TORCHDEQ}x",
                 "plain / torchdeq", "spec / torchdeq"], speed))
    print()
    print(table(["workload", "method", "spec iters", "traced iters", "plain iters", "torchdeq iters",
                 "all reach tol", "grad rel. diff traced", "grad rel. diff plain", "grad rel. diff torchdeq"],
                checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
