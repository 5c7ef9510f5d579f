"""The DEQ toolkit against torchdeq 0.1.0: the solvers, and a training step with each gradient mode.

    .venv/bin/python benchmarks/toolkit.py            # the run docs/BENCHMARKS.md "The DEQ toolkit" reports
    .venv/bin/python benchmarks/toolkit.py --quick    # tiny sizes, a few repeats (seconds)

Same conventions as ``run.py``: one process, float32 (the hard linear map: float64), CPU, one intra-op thread,
the same map (the workload's hand-written ``g``), weights, inputs, start (zeros), tolerance and criterion
(absolute, torchdeq's ``stop_mode='abs'``); contenders alternate run by run after a warm-up, medians reported.

1. Solvers, a forward solve without autograd: fpidsl's Picard, Anderson (m=6) and Broyden against torchdeq's
   ``fixed_point_iter``, ``anderson`` (m=6) and ``broyden`` (its default memory: every iteration, ``max_iter``) on
   the conv and Bibtex workloads and the hard linear map (W = 0.99 orthogonal, dimension 128, batch 16, tol 1e-8);
   iterations are the most any sample took.
2. A training step (solve, loss, ``backward()``) with each gradient mode, Anderson forward on both sides, fpidsl
   the compiled layer (its emitted backward map), torchdeq the hand-written map:
   ``implicit`` against torchdeq ``ift=True``; ``jfb`` against ``grad=1``; ``phantom(k=5, tau=0.5)`` against
   ``grad=5, tau=0.5``; ``unrolled(k=20)`` against plain autograd through 20 Picard steps (torchdeq has no such
   mode). torchdeq's phantom output is ``z_k`` (k steps past the solve), fpidsl's the fixed point itself.
3. Broyden's limited memory on the hard linear map: fpidsl's m (restart when full) against torchdeq's
   ``LBFGS_thres`` (the oldest update overwritten), iterations and whether the result is finite and accurate.
   ``--only memory`` runs this table alone.
4. A regularised training step, Anderson forward, implicit backward on both sides: the loss plus the Jacobian
   penalty (one Hutchinson vector: fpidsl ``layer.jacobian_penalty(samples=1)``, torchdeq
   ``jac_reg(f(z*), z*, vecs=1)`` on its attached fixed point), and fixed-point correction over 3 states with
   γ = 0.8 (fpidsl ``layer.correction_outputs(z, n_states=3)`` + ``correction_loss``, torchdeq
   ``get_deq(n_states=3, ift=True)`` + ``fp_correction``): both sides give the intermediate states a one-step
   phantom gradient and the last the implicit one. The correction's forward runs exactly ``CORRECTION_ITERS``
   iterations on both sides (states at 4, 8 and 12): torchdeq samples its states at fixed iteration numbers of
   ``f_max_iter`` and returns only those the solve reached, so with early stopping it would return the fixed
   point alone and time no correction at all. ``--only regularised`` runs this table alone.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import alternate, ms, table  # noqa: E402
from workloads import make_workloads  # noqa: E402

from fpidsl.runtime import fixed_point  # noqa: E402

TARGET = 0.8
CORRECTION_ITERS = 12
MODES = {  # fpidsl backward settings, torchdeq get_deq options
    "implicit": ({}, {"ift": True}),
    "jfb": ({"mode": "jfb"}, {"ift": False, "grad": 1, "tau": 1.0}),
    "phantom(k=5, tau=0.5)": ({"mode": "phantom", "k": 5, "tau": 0.5}, {"ift": False, "grad": 5, "tau": 0.5}),
}


def hard_map(quick: bool):
    n, batch = (32, 4) if quick else (128, 16)
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    W = 0.99 * Q
    b = torch.randn(batch, n, dtype=torch.float64, generator=g)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - W, b.T).T
    return (lambda x: x @ W.T + b), torch.zeros(batch, n, dtype=torch.float64), 1e-8, exact


def solver_rows(problems, repeats: int) -> list[list[str]]:
    from torchdeq.solver import get_solver

    rows = []
    for name, (g, x0, tol, max_iter) in problems.items():
        iters: dict[str, int] = {}
        reached: dict[str, bool] = {}

        def ours(method, **extra):
            def run():
                with torch.no_grad():
                    _, stats = fixed_point(lambda x: g(x), x0, method=method, tol=tol, criterion="absolute",
                                           max_iter=max_iter, on_fail="ignore", return_stats=True, **extra)
                iters[f"fpidsl {method}"] = stats.forward.max_iterations
                reached[f"fpidsl {method}"] = bool(stats.forward.converged.all())
            return run

        def theirs(solver, **extra):
            def run():
                with torch.no_grad():
                    _, _, info = get_solver(solver)(g, x0, max_iter=max_iter, tol=tol, stop_mode="abs", **extra)
                iters[f"torchdeq {solver}"] = int(info["nstep"].max())
                reached[f"torchdeq {solver}"] = bool(info["abs_lowest"].max() < tol)
            return run

        contenders = {
            "fpidsl picard": ours("picard"), "torchdeq fixed_point_iter": theirs("fixed_point_iter"),
            "fpidsl anderson": ours("anderson", m=6), "torchdeq anderson": theirs("anderson", m=6),
            "fpidsl broyden": ours("broyden", m=min(max_iter, 300)), "torchdeq broyden": theirs("broyden"),
        }
        times = alternate(contenders, repeats)
        for ours_name, theirs_name in (("fpidsl picard", "torchdeq fixed_point_iter"),
                                       ("fpidsl anderson", "torchdeq anderson"),
                                       ("fpidsl broyden", "torchdeq broyden")):
            rows.append([name, ours_name.split()[1], f"{iters[ours_name]}", ms(times[ours_name]),
                         "yes" if reached[ours_name] else "**NO**", f"{iters[theirs_name]}", ms(times[theirs_name]),
                         "yes" if reached[theirs_name] else "**NO**", f"{times[ours_name] / times[theirs_name]:.2f}"])
    return rows


def torchdeq_anderson(w, **options):
    """torchdeq's DEQ on workload ``w`` with Anderson forward and backward at the workload's budget and
    tolerances (absolute), in training mode; ``options`` go over them (``ift``, ``grad``, ``n_states`` ...)."""
    from torchdeq import get_deq

    settings = dict(core="indexing", f_solver="anderson", b_solver="anderson", f_max_iter=w.max_iter,
                    b_max_iter=w.max_iter, f_tol=w.tol, b_tol=w.b_tol, f_stop_mode="abs", b_stop_mode="abs")
    deq = get_deq(**{**settings, **options})
    deq.train()
    return deq


def mode_rows(workloads, repeats: int) -> list[list[str]]:
    rows = []
    for w in workloads:
        forward, backward = w.settings("anderson")
        params = w.params
        layer = w.layer
        layer.solve_settings = layer.solve_settings.merged(forward)
        base = layer.backward_settings.merged(backward)

        def zero():
            for p in params:
                p.grad = None

        def ours(mode_settings):
            settings = base.merged(mode_settings)

            def run():
                zero()
                layer.backward_settings = settings
                w.loss(layer(w.z), w.target).backward()
            return run

        def theirs(options):
            deq = torchdeq_anderson(w, **options)

            def run():
                zero()
                z_out, _ = deq(lambda x: w.hand(x, w.z, *params), w.x0())
                w.loss(w.output(z_out[-1]), w.target).backward()
            return run

        for mode, (mine, their_options) in MODES.items():
            t = alternate({"fpidsl": ours(mine), "torchdeq": theirs(their_options)}, repeats)
            rows.append([w.name, mode, ms(t["fpidsl"]), ms(t["torchdeq"]), f"{t['fpidsl'] / t['torchdeq']:.2f}",
                         "met" if t["fpidsl"] / t["torchdeq"] <= TARGET else "**not met**"])

        unrolled = base.merged({"mode": "unrolled", "k": 20})

        def unrolled_ours():
            zero()
            layer.backward_settings = unrolled
            w.loss(layer(w.z), w.target).backward()

        def unrolled_plain():
            zero()
            x = w.x0()
            for _ in range(20):
                x = w.hand(x, w.z, *params)
            w.loss(w.output(x), w.target).backward()

        t = alternate({"fpidsl": unrolled_ours, "plain": unrolled_plain}, repeats)
        rows.append([w.name, "unrolled(k=20)", ms(t["fpidsl"]), f"{ms(t['plain'])} (plain autograd)",
                     f"{t['fpidsl'] / t['plain']:.2f}", "met" if t["fpidsl"] / t["plain"] <= 1.05 else "(1.05x)"])
    return rows


def regularised_rows(workloads, repeats: int) -> list[list[str]]:
    from torchdeq.loss import fp_correction, jac_reg

    from fpidsl.runtime.correction import correction_loss

    rows = []
    for w in workloads:
        forward, backward = w.settings("anderson")
        params, layer = w.params, w.layer
        layer.solve_settings = layer.solve_settings.merged(forward)
        layer.backward_settings = layer.backward_settings.merged(backward)
        f = lambda x: w.hand(x, w.z, *params)  # noqa: E731

        def zero():
            for p in params:
                p.grad = None

        def jacobian_ours():
            zero()
            (w.loss(layer(w.z), w.target) + layer.jacobian_penalty(samples=1)).backward()

        jac_deq = torchdeq_anderson(w, ift=True)

        def jacobian_theirs():
            zero()
            z_out, _ = jac_deq(f, w.x0())
            z = z_out[-1]
            (w.loss(w.output(z), w.target) + jac_reg(f(z), z, vecs=1)).backward()

        fixed_budget, _ = w.settings("anderson", iterations=CORRECTION_ITERS)

        def correction_ours():
            zero()
            layer.solve_settings = layer.solve_settings.merged(fixed_budget)
            outs = layer.correction_outputs(w.z, n_states=3)
            layer.solve_settings = layer.solve_settings.merged(forward)
            correction_loss([w.loss(o, w.target) for o in outs], gamma=0.8).backward()

        corr_deq = torchdeq_anderson(w, ift=True, n_states=3, f_max_iter=CORRECTION_ITERS,
                                     f_tol=1e-30)  # every iteration runs

        def correction_theirs():
            zero()
            z_out, _ = corr_deq(f, w.x0())
            loss, _ = fp_correction(w.loss, ([w.output(z) for z in z_out], w.target), gamma=0.8,
                                    return_loss_values=True)
            loss.backward()

        for name, ours, theirs in (("Jacobian penalty (1 vector)", jacobian_ours, jacobian_theirs),
                                   ("fixed-point correction (3 states)", correction_ours, correction_theirs)):
            t = alternate({"fpidsl": ours, "torchdeq": theirs}, repeats)
            ratio = t["fpidsl"] / t["torchdeq"]
            rows.append([w.name, name, ms(t["fpidsl"]), ms(t["torchdeq"]), f"{ratio:.2f}",
                         "met" if ratio <= TARGET else "**not met**"])
    return rows


def memory_rows(quick: bool) -> list[list[str]]:
    from torchdeq.solver import get_solver

    g, x0, tol, exact = hard_map(quick)
    rows = []
    for m in (30, 100, 300):
        with torch.no_grad():
            ours, stats = fixed_point(g, x0, method="broyden", m=m, tol=tol, criterion="absolute", max_iter=3000,
                                      on_fail="ignore", return_stats=True)
            theirs, _, info = get_solver("broyden")(g, x0, max_iter=3000, tol=tol, stop_mode="abs", LBFGS_thres=m)

        def err(x):
            e = float((x - exact).norm() / exact.norm())
            return f"{e:.1e}" if e == e else "NaN"

        rows.append([str(m), str(stats.forward.max_iterations), err(ours), str(int(info["nstep"].max())),
                     err(theirs)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", choices=["memory", "regularised"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    repeats = args.repeats or (2 if args.quick else 5)
    regularised_title = f"## 4. Regularised training step, Anderson forward (target: at most {TARGET}x torchdeq)\n"
    regularised_head = ["workload", "loss", "fpidsl ms", "torchdeq ms", "ratio", "target"]
    if args.only == "regularised":
        print(regularised_title)
        print(table(regularised_head, regularised_rows(
            [w for w in make_workloads(args.quick) if w.name in ("conv16-slow", "bibtex-nn")], repeats)))
        return 0
    memory_table = table(["m", "fpidsl iters", "fpidsl rel. error", "torchdeq iters", "torchdeq rel. error"],
                         memory_rows(args.quick))
    if args.only == "memory":
        print("## 3. Broyden's limited memory, hard linear map\n")
        print(memory_table)
        return 0
    all_workloads = make_workloads(args.quick)
    chosen = [w for w in all_workloads if w.name in ("conv16-slow", "bibtex-nn", "bibtex-gd")]
    problems = {w.name: ((lambda x, w=w: w.hand(x, w.z, *[p.detach() for p in w.params])), w.x0(), w.tol,
                         w.max_iter) for w in chosen}
    g, x0, tol, _ = hard_map(args.quick)
    problems["hard linear (float64)"] = (g, x0, tol, 3000)
    print("## 1. Solvers: forward solve, no autograd (iterations: the most any sample took)\n")
    print(table(["workload", "solver", "fpidsl iters", "fpidsl ms", "tol reached", "torchdeq iters", "torchdeq ms",
                 "tol reached", "time ratio"], solver_rows(problems, repeats)))
    print(f"\n## 2. Training step by gradient mode, Anderson forward (target: at most {TARGET}x torchdeq)\n")
    print(table(["workload", "mode", "fpidsl ms", "torchdeq ms", "ratio", "target"],
                mode_rows([w for w in chosen if w.name != "bibtex-gd"], repeats)))
    print("\n## 3. Broyden's limited memory, hard linear map\n")
    print(memory_table)
    print("\n" + regularised_title)
    print(table(regularised_head, regularised_rows([w for w in chosen if w.name != "bibtex-gd"], repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
