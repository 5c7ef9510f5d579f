"""Time per training step against batch size and state size, fpidsl (the compiled conv spec) and torchdeq.

    .venv/bin/python benchmarks/scale.py                  # the run docs/BENCHMARKS.md "Scale" reports
    .venv/bin/python benchmarks/scale.py --quick          # tiny sizes, a few repeats (seconds)
    .venv/bin/python benchmarks/scale.py --device cuda    # on a GPU (docs/img/scale_cuda.png)

The map is the conv workload's (benchmarks/workloads.py: ``conv2(relu(conv1(cat([x, z]))))``, 16 channels,
weights made contractive once at a small size and kept for every size). Both contenders run exactly
``--iterations`` forward and backward iterations (fpidsl: ``min_iter = max_iter``; torchdeq: ``tol = 0``), so
every size does the same number of map evaluations and the ratio measures the per-iteration and per-step costs
around them, not the solvers' convergence. Sweeps: the batch (1 to 256) at 32x32 images, the image side (16 to
128) at batch 8. fpidsl and torchdeq alternate run by run in one process; the table gives the medians of the times
and of the ratios within a round (:func:`run.round_ratio`), the plot (``--plot``, default docs/img/scale.png) both.
The claim is the ratio's trend, not the times.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run  # noqa: E402
from run import alternate_runs, ms, round_ratio, table  # noqa: E402
from workloads import Workload, _conv  # noqa: E402

BATCHES, SIDES = (1, 4, 16, 64, 256), (16, 32, 64, 128)
QUICK_BATCHES, QUICK_SIDES = (1, 4), (8, 16)


def sized(base: Workload, batch: int, side: int) -> Workload:
    """The base workload's layer (same weights) on a new batch of ``batch`` images of ``side`` x ``side``."""
    g = torch.Generator().manual_seed(batch * 1000 + side)
    z = torch.randn(batch, 1, side, side, generator=g).to(run.DEVICE)
    target = torch.randn(batch, 1, side, side, generator=g).to(run.DEVICE)
    return Workload(**{**base.__dict__, "z": z, "target": target})


def steps(w: Workload, method: str, iterations: int) -> dict[str, run.Step]:
    """fpidsl's and torchdeq's training steps, both forced to ``iterations`` forward and backward iterations."""
    from torchdeq import get_deq

    forward, backward = w.settings(method, iterations)
    layer = w.layer
    layer.solve_settings = layer.solve_settings.merged(forward)
    layer.backward_settings = layer.backward_settings.merged(backward)
    module = w.module()
    solver = {"picard": "fixed_point_iter", "anderson": "anderson"}[method]
    deq = get_deq(core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=iterations,
                  b_max_iter=iterations, f_tol=0.0, b_tol=0.0, f_stop_mode="abs", b_stop_mode="abs")
    deq.train()
    ours, theirs = w.params, tuple(module.parameters())

    def fpidsl() -> None:
        run._zero(ours)
        w.loss(layer(w.z), w.target).backward()

    def torchdeq() -> None:
        run._zero(theirs)
        z_out, _ = deq(lambda x: module(x, w.z), w.x0())
        w.loss(w.output(z_out[-1]), w.target).backward()

    return {"fpidsl": fpidsl, "torchdeq": torchdeq}


def sweep(base: Workload, method: str, points: list[tuple[int, int]], iterations: int, repeats: int):
    out = []
    for batch, side in points:
        print(f"{method} batch {batch} side {side}", file=sys.stderr, flush=True)
        runs = alternate_runs(steps(sized(base, batch, side), method, iterations), repeats)
        out.append((batch, side, statistics.median(runs["fpidsl"]), statistics.median(runs["torchdeq"]),
                    round_ratio(runs, "fpidsl", "torchdeq")))
    return out


def plot(results: dict[str, dict[str, list]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (axis_name, key) in enumerate((("batch size (32x32 images)", 0), ("image side (batch 8)", 1))):
        top, bottom = axes[0][col], axes[1][col]
        for method, sweeps in results.items():
            rows = sweeps["batch" if key == 0 else "side"]
            xs = [r[key] for r in rows]
            top.loglog(xs, [r[2] * 1e3 for r in rows], "o-", label=f"fpidsl {method}")
            top.loglog(xs, [r[3] * 1e3 for r in rows], "s--", label=f"torchdeq {method}")
            bottom.semilogx(xs, [r[4] for r in rows], "o-", label=method)
        top.set_ylabel("ms per training step")
        bottom.set_ylabel("fpidsl / torchdeq")
        bottom.set_xlabel(axis_name)
        bottom.axhline(1.0, color="gray", lw=0.5)
        bottom.set_ylim(bottom=0)
        bottom.set_xticks(xs, [str(x) for x in xs])
        bottom.minorticks_off()
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 130), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 iterations, 2 repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 3, quick 2)")
    parser.add_argument("--iterations", type=int, default=None, help="forward and backward (default 10, quick 3)")
    parser.add_argument("--methods", nargs="+", default=["picard", "anderson"], choices=["picard", "anderson"])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--plot", type=Path, default=None, help="default docs/img/scale.png (scale_cuda.png on GPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run.steady_allocator()
    run.DEVICE = torch.device(args.device)
    warnings.simplefilter("ignore")
    repeats = args.repeats or (2 if args.quick else 3)
    iterations = args.iterations or (3 if args.quick else 10)
    batches, sides = (QUICK_BATCHES, QUICK_SIDES) if args.quick else (BATCHES, SIDES)
    side0, batch0 = (sides[-1], batches[-1]) if args.quick else (32, 8)
    base = _conv(16, "fast", batch=2, size=16, seed=0).to(run.DEVICE)  # contractive weights, made once
    load_before = os.getloadavg()
    results = {m: {"batch": sweep(base, m, [(b, side0) for b in batches], iterations, repeats),
                   "side": sweep(base, m, [(batch0, s) for s in sides], iterations, repeats)} for m in args.methods}
    load_after = os.getloadavg()
    command = "python benchmarks/scale.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"`{command}`: {iterations} forward and {iterations} backward iterations a step, {repeats} timed "
              f"runs per contender, {run.device_name()}, float32, one thread; load average (1, 5, 15 min) "
              f"{'/'.join(f'{x:.2f}' for x in load_before)} at the start, "
              f"{'/'.join(f'{x:.2f}' for x in load_after)} at the end, on {os.cpu_count()} cores")
    print(header + "\n")
    body = [[m, str(b), f"{s}x{s}", ms(a), ms(d), f"{ratio:.2f}"]
            for m, sw in results.items() for b, s, a, d, ratio in sw["batch"] + sw["side"]]
    print(table(["method", "batch", "image", "fpidsl ms", "torchdeq ms", "fpidsl / torchdeq"], body))
    suffix = "" if run.DEVICE.type == "cpu" else f"_{run.DEVICE.type}"
    path = args.plot or HERE.parent / "docs" / "img" / f"scale{suffix}.png"
    plot(results, path, header.replace("`", ""))
    print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
