"""Box-constrained projection (appendix C of the FPI paper): learn t = clamp(a, -1, 1) for a in R^10.

Models: FPI_NN (``BoxProjectionNN``) and FPI_GD (``BoxProjectionGD``) from specs/box_projection.fpi, and a
feedforward network with the structure of FPI_NN's map g, on the input alone:
Linear(10, 32) - ReLU - Linear(32, 10) (PyTorch's default initialisation).
Data: a ~ N(0, 2^2 I) for training (10,000 samples), N(0, 1 I) for testing (1,000); batch 100, Adam 1e-3, MSE,
40 epochs. Per epoch: MSE on the whole training and test sets (evaluated after the epoch; epoch 0 = untrained).

FPI_GD's energy is a squared scalar, so its Hessian in x is rank one at a minimiser: its fixed points form a
manifold and neither the forward (step 0.01) nor the backward iteration (c = J^T c + dL/dx, J having 9
eigenvalues equal to 1) converges to the spec's tolerances. The script therefore runs FPI_GD with
``on_fail="ignore"``, a fixed iteration budget for both solves (``--gd-forward-iters``, ``--gd-backward-iters``;
the backward is then a truncated Neumann series) and records the solver statistics per epoch in the results.
``--gd-converged`` adds a fourth model: FPI_GD with an Anderson forward that does reach a fixed point.

    python examples/box_projection.py [--quick] [--out out/box_projection] [--epochs 40]
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

import fpidsl
from common import Stopwatch, parser, plot_curves, progress, setup, write_json

SPEC = "specs/box_projection.fpi"
DIM = 10


def make_data(n: int, sigma: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = sigma * torch.randn(n, DIM, generator=gen)
    return a, a.clamp(-1.0, 1.0)


class SolveLog:
    """Per-epoch solver statistics of a fixed-point layer (from ``layer.stats`` after each training batch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.fwd_iters = self.fwd_ok = self.bwd_iters = self.bwd_ok = 0.0
        self.fwd_res: list[float] = []
        self.bwd_res: list[float] = []
        self.warnings = 0

    def add(self, layer: nn.Module) -> None:
        stats = getattr(layer, "stats", None)
        if stats is None or stats.forward is None:
            return
        f, b = stats.forward, stats.backward
        self.n += f.batch
        self.fwd_iters += float(f.iterations.float().sum())
        self.fwd_ok += float(f.ok.float().sum())
        self.fwd_res.append(float(f.residual.median()))
        if b is not None:
            self.bwd_iters += float(b.iterations.float().sum())
            self.bwd_ok += float(b.ok.float().sum())
            self.bwd_res.append(float(b.residual.median()))

    def summary(self) -> dict:
        if not self.n:
            return {}
        med = lambda xs: float(torch.tensor(xs).median()) if xs else None  # noqa: E731
        return {
            "forward_mean_iterations": self.fwd_iters / self.n,
            "forward_fraction_ok": self.fwd_ok / self.n,
            "forward_median_residual": med(self.fwd_res),
            "backward_mean_iterations": self.bwd_iters / self.n,
            "backward_fraction_ok": self.bwd_ok / self.n,
            "backward_median_residual": med(self.bwd_res),
            "convergence_warnings": self.warnings,
        }


@torch.no_grad()
def mse(model: nn.Module, a: torch.Tensor, t: torch.Tensor, batch: int = 1000) -> float:
    total = 0.0
    for i in range(0, a.shape[0], batch):
        total += float(((model(a[i:i + batch]) - t[i:i + batch]) ** 2).sum())
    return total / t.numel()


def build_models(args) -> dict[str, nn.Module]:
    nn_cls = fpidsl.load(SPEC, name="BoxProjectionNN")
    gd_cls = fpidsl.load(SPEC, name="BoxProjectionGD")
    gd_backward = {"max_iter": args.gd_backward_iters, "on_fail": "ignore"}
    models = {
        "FPI_NN": nn_cls(),  # the spec's settings: Anderson forward, Picard backward, tol 1e-6, on_fail=warn
        "FPI_GD": gd_cls(solve={"method": "picard", "max_iter": args.gd_forward_iters, "on_fail": "ignore"},
                         backward=gd_backward),
        "Feedforward": nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, DIM)),
    }
    if args.gd_converged:
        models["FPI_GD (Anderson forward)"] = gd_cls(
            solve={"method": "anderson", "max_iter": 500, "on_fail": "ignore"}, backward=gd_backward)
    return models


def settings_of(model: nn.Module) -> dict | None:
    if hasattr(model, "solve_settings"):
        return {"solve": model.solve_settings.as_dict(), "backward": model.backward_settings.as_dict()}
    return None


def main() -> None:
    p = parser(__doc__.splitlines()[0], "box_projection")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=1_000)
    p.add_argument("--gd-forward-iters", type=int, default=500, help="FPI_GD forward max_iter (spec: 500)")
    p.add_argument("--gd-backward-iters", type=int, default=500, help="FPI_GD backward max_iter (default 500)")
    p.add_argument("--gd-converged", action="store_true",
                   help="also train FPI_GD with an Anderson forward that reaches a fixed point")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.n_train, args.n_test = min(args.epochs, 2), 500, 200
    out = setup(args)

    gen = torch.Generator().manual_seed(args.seed)
    a_train, t_train = make_data(args.n_train, 2.0, gen)
    a_test, t_test = make_data(args.n_test, 1.0, gen)

    models = build_models(args)
    results: dict = {
        "experiment": "box_projection",
        "spec": SPEC,
        "config": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "feedforward": "Linear(10,32)-ReLU-Linear(32,10) on a alone, PyTorch default init",
        "models": {},
    }
    for name, model in models.items():
        torch.manual_seed(args.seed)  # same batch order for every model
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        hist = {"train_mse": [mse(model, a_train, t_train)], "test_mse": [mse(model, a_test, t_test)],
                "batch_loss": [], "solver": [], "epoch_seconds": []}
        log = SolveLog()
        last_stats = None
        bar = progress(range(1, args.epochs + 1), desc=name)
        with Stopwatch() as total:
            for epoch in bar:
                log.reset()
                perm = torch.randperm(args.n_train)
                running = 0.0
                with Stopwatch() as sw, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", fpidsl.ConvergenceWarning)
                    for i in progress(range(0, args.n_train, args.batch), desc=f"{name} epoch {epoch}"):
                        idx = perm[i:i + args.batch]
                        loss = ((model(a_train[idx]) - t_train[idx]) ** 2).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        log.add(model)
                        last_stats = getattr(model, "stats", None)
                        running += float(loss.detach()) * idx.numel()
                log.warnings = sum(issubclass(w.category, fpidsl.ConvergenceWarning) for w in caught)
                hist["epoch_seconds"].append(sw.seconds)
                hist["batch_loss"].append(running / args.n_train)
                hist["train_mse"].append(mse(model, a_train, t_train))
                hist["test_mse"].append(mse(model, a_test, t_test))
                hist["solver"].append(log.summary())
                bar.set_postfix(train=f"{hist['train_mse'][-1]:.4f}", test=f"{hist['test_mse'][-1]:.4f}")
        hist["seconds"] = total.seconds
        hist["final_train_mse"], hist["final_test_mse"] = hist["train_mse"][-1], hist["test_mse"][-1]
        hist["settings"] = settings_of(model)
        if last_stats is not None:
            hist["last_stats"] = str(last_stats)  # the last training batch's solves, forward and backward
        results["models"][name] = hist
        print(f"{name:28s} train MSE {hist['final_train_mse']:.5f}  test MSE {hist['final_test_mse']:.5f}  "
              f"({total.seconds:.1f} s)" + (f"  last batch: {hist['last_stats']}" if "last_stats" in hist else ""),
              flush=True)

    ff = results["models"]["Feedforward"]["final_test_mse"]
    results["claim_fpi_below_feedforward"] = {
        name: results["models"][name]["final_test_mse"] < ff for name in results["models"] if name != "Feedforward"
    }
    write_json(out / "results.json", results)
    series = lambda key: {n: h[key] for n, h in results["models"].items()}  # noqa: E731
    plot_curves(out / "box_projection.png", [
        {"title": "training MSE (σ=2)", "xlabel": "epoch", "ylabel": "MSE", "series": series("train_mse"),
         "logy": True},
        {"title": "test MSE (σ=1)", "xlabel": "epoch", "ylabel": "MSE", "series": series("test_mse"), "logy": True},
    ], title="Box-constrained projection")
    print(f"wrote {out / 'results.json'} and {out / 'box_projection.png'}")


if __name__ == "__main__":
    main()
