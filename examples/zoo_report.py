"""The model zoo's convergence report (docs/ZOO.md): for each model of examples/zoo_models.py, one forward solve
and one backward solve on a batch of toy inputs with the settings its spec writes; prints the iteration table
(markdown) and writes one convergence plot per model (the residual of every sample at every iteration, forward
and backward) to ``--out`` (default docs/img/zoo).

    .venv/bin/python examples/zoo_report.py            # the table in docs/ZOO.md and docs/img/zoo/*.png
"""
from __future__ import annotations

from pathlib import Path

import torch

import fpidsl
from fpidsl.runtime.contraction import contraction_factor
from common import parser, plot_curves, setup
from zoo_models import MODELS, ZooModel, requiring_grad


def weighted_loss(outputs, gen: torch.Generator) -> torch.Tensor:
    """A loss whose gradient is not special at the fixed point: fixed random weights on every output."""
    return sum((torch.randn(o.shape, generator=gen, dtype=o.dtype) * o).sum() for o in outputs)


def contraction(layer, inputs) -> torch.Tensor:
    """|dg/dx|_2 at the fixed point per sample; for a layer solved as one problem (its map mixes the samples, as
    spmm mixes a graph's nodes) one value, of the whole state as one sample (``layer.contraction`` assumes a
    samplewise map)."""
    if type(layer).SAMPLEWISE:
        return layer.contraction(*inputs)
    layer(*inputs)
    states = tuple(s[None] for s in layer._last_states)

    def whole(x, *values):
        xs = x if isinstance(x, tuple) else (x,)
        out = type(layer).step(tuple(s[0] for s in xs) if len(xs) > 1 else xs[0][0], *values)
        return tuple(o[None] for o in out) if isinstance(out, tuple) else out[None]

    return contraction_factor(whole, states if len(states) > 1 else states[0], *inputs, *layer.parameter_tensors())


def solve_once(model: ZooModel, batch: int, seed: int) -> dict:
    """One forward and one backward solve of ``model``; its iteration counts, residual histories and the
    contraction factor |dg/dx|_2 at the fixed point (power iteration), per sample."""
    torch.manual_seed(seed)
    layer = fpidsl.load(model.path, name=model.layer)(history=True).double()
    inputs = requiring_grad(model.inputs(torch.Generator().manual_seed(seed), batch))
    out = layer(*inputs)
    weighted_loss(out if isinstance(out, tuple) else (out,), torch.Generator().manual_seed(seed)).backward()
    forward, backward = layer.stats.forward, layer.stats.backward
    return {
        "forward": forward.iterations, "backward": backward.iterations,
        "forward_history": forward.history, "backward_history": backward.history,
        "converged": bool(forward.converged.all() and backward.converged.all()),
        "contraction": contraction(layer, tuple(t.detach() for t in inputs)),
        "tol": forward.settings.tol,
    }


def per_sample(history: torch.Tensor) -> dict:
    """``{sample i: (iterations, residuals)}`` from a ``(iterations, batch)`` history, counting evaluations of the
    map from 1; the non-finite entries left out (after a sample stopped; the relative residual of a zero start)."""
    series = {}
    for i in range(history.shape[1]):
        kept = [(k, float(r)) for k, r in enumerate(history[:, i].tolist(), start=1) if torch.isfinite(torch.tensor(r))]
        series[f"sample {i}"] = ([k for k, _ in kept], [r for _, r in kept])
    return series


def plot(model: ZooModel, result: dict, out: Path) -> Path:
    panels = [{"title": f"{phase} solve", "xlabel": "iteration", "ylabel": "relative residual", "logy": True,
               "series": per_sample(result[f"{phase}_history"])} for phase in ("forward", "backward")]
    return plot_curves(out / f"{model.key}.png", panels, title=f"{model.layer} ({model.spec})")


def report(out: Path, batch: int = 4, seed: int = 0) -> list[str]:
    """Solve every model once, write its plot to ``out``; the lines of the markdown iteration table."""
    lines = ["| model | layer | forward iterations (mean / max) | backward iterations (mean / max) "
             "| max \\|dg/dx\\|₂ at the fixed point |", "|---|---|---|---|---|"]
    for model in MODELS:
        result = solve_once(model, batch, seed)
        if not result["converged"]:
            raise RuntimeError(f"{model.key}: a solve did not converge")
        plot(model, result, out)
        fwd, bwd = result["forward"].double(), result["backward"].double()
        lines.append(f"| {model.key} | `{model.layer}` ({model.spec}) | {fwd.mean():.1f} / {int(fwd.max())} "
                     f"| {bwd.mean():.1f} / {int(bwd.max())} | {float(result['contraction'].max()):.2f} |")
    return lines


def main() -> None:
    args = parser(__doc__.splitlines()[0], "zoo", out=Path("docs") / "img" / "zoo").parse_args()
    out = setup(args)
    batch = 2 if args.quick else 4
    print("\n".join(report(out, batch, args.seed)))
    print(f"\n{batch} samples each (seed {args.seed}), with the solve and backward settings of each spec; plots in {out}")


if __name__ == "__main__":
    main()
