"""The native kernels (fpidsl/runtime/native: the loop's judgement, Anderson's and Broyden's step) against the tensor
code, in one process.

    .venv/bin/python benchmarks/native_kernels.py                      # every workload, and the cheap map
    .venv/bin/python benchmarks/native_kernels.py conv16-fast --repeats 15
    .venv/bin/python benchmarks/native_kernels.py --quick                # tiny sizes: that it runs

Two contenders alternate round by round on the same workload and method: fpidsl's training step as it runs (the
kernels), and the same step inside ``fpidsl.runtime.native.turned_off()`` (the tensor code). Iteration counts and parameter gradients of the two are compared. The ratio is the
median over rounds of the two times in the same round (:func:`run.round_ratio`), on this thread's CPU clock, one
intra-op thread. The second table is table 6's cost per iteration (the cheap map ``0.5 x + z``, forced iteration
count) both ways for each method: the driver's (Picard) and, beyond it, the solver's.
"""
from __future__ import annotations

import argparse
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

from fpidsl.runtime import native  # noqa: E402

CHEAP_SHAPES = ((4, 8), (32, 159), (8, 1, 64, 64), (8, 1, 128, 128), (64, 1, 64, 64), (8, 16, 64, 64))


def _turned_off(step):
    def off() -> None:
        with native.turned_off():
            step()
    return off


def workload_rows(names: list[str], methods: list[str], repeats: int, quick: bool) -> list[list[str]]:
    rows = []
    for w, method in ((w, method) for w in make_workloads(quick, names) for method in methods):
        fast, slow = run.Outcome(), run.Outcome()
        contenders = {"kernel": run.fpidsl_step(w, method, fast),
                      "tensor code": _turned_off(run.fpidsl_step(w, method, slow))}
        times = run.alternate_runs(contenders, repeats)
        same = (fast.forward_iters, fast.backward_iters) == (slow.forward_iters, slow.backward_iters)
        grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                        for a, b in zip(fast.grads, slow.grads))
        rows.append([w.name, method, f"{fast.forward_iters} / {fast.backward_iters}",
                     f"{slow.forward_iters} / {slow.backward_iters}" + ("" if same else " (differ)"),
                     run.ms(min(times["kernel"])), run.ms(min(times["tensor code"])),
                     f"{run.round_ratio(times, 'kernel', 'tensor code'):.2f}", f"{grad_diff:.1e}"])
    return rows


def cheap_rows(repeats: int, iterations: int, shapes: tuple[tuple[int, ...], ...]) -> list[list[str]]:
    rows = []
    for shape in shapes:
        z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        contenders = {"bare": run.bare_loop(z, iterations), "picard": run.forced_solve(z, iterations)}
        contenders["picard tensor code"] = _turned_off(contenders["picard"])
        for method in ("anderson", "broyden"):
            contenders[method] = run.forced_solve(z, iterations, method=method, m=6)
            contenders[method + " tensor code"] = _turned_off(contenders[method])
        times = run.alternate_runs(contenders, repeats)
        per = {name: min(t) / iterations * 1e6 - (0 if name == "bare" else min(times["bare"]) / iterations * 1e6)
               for name, t in times.items()}
        rows.append(["x".join(map(str, shape))] + [f"{per[name]:.1f}" for name in (
            "picard", "picard tensor code", "anderson", "anderson tensor code", "broyden", "broyden tensor code",
            "bare")])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workloads", nargs="*", help=f"of {', '.join(sorted(FULL))} (default: every one)")
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson", "broyden"],
                        choices=["picard", "anderson", "broyden"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=100, help="forced iterations of the cheap map")
    parser.add_argument("--quick", action="store_true", help="the quick workloads' tiny sizes, two rounds (seconds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's intra-op threads (default 1); above 1 the kernel is called at every state size "
                             "(native.ONE_THREAD_VALUES lifted), to see where the threaded tensor code overtakes it")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.iterations = 2, 10
    args.workloads = args.workloads or sorted(FULL)
    if args.threads > 1:
        native.ONE_THREAD_VALUES = float("inf")
    unknown = sorted(set(args.workloads) - set(FULL))
    if unknown:
        parser.error(f"unknown workloads {unknown}: choose from {sorted(FULL)}")
    torch.set_num_threads(args.threads)
    run.steady_allocator()
    warnings.simplefilter("ignore")
    run.time = type(sys)("cpu_clock")  # run.py's timers read run.time.perf_counter
    run.time.perf_counter = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"{native.status()}; load average {os.getloadavg()[0]:.2f} at the start")
    command = "python benchmarks/native_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    clock = "this thread's CPU time, one thread" if args.threads == 1 else (
        f"wall time, {args.threads} threads, the kernel at "
        "every size")
    lines = [f"`{command}`: {args.repeats} alternating rounds, {clock}, float32", "",
             "| workload | method | iterations fwd / bwd (kernels) | (tensor code) | kernels ms | tensor code ms | "
             "ratio (median of rounds) | grad rel. diff |", "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in workload_rows(args.workloads, args.methods, args.repeats, args.quick)]
    lines += ["", f"The cost per iteration (m = 6), the cheap map `0.5 x + z`, {args.iterations} forced "
              "iterations, less the bare loop's (fastest round): Picard's is the driver's, what is left over it the "
              "solver's own", "",
              "| state | Picard, kernels µs | Picard, tensor code µs | Anderson, kernels µs | Anderson, tensor code µs "
              "| Broyden, kernels µs | Broyden, tensor code µs | bare loop µs |", "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in cheap_rows(args.repeats, args.iterations, CHEAP_SHAPES[:1] if args.quick else CHEAP_SHAPES)]
    lines.append(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
