"""The measurements behind the precision floor's factor (fpidsl/runtime/driver.py, ``FLOOR_FACTOR``) and the
Bibtex FPI_GD accuracy figures of docs/RESULTS_box_bibtex.md, in float32 on one thread.

    .venv/bin/python benchmarks/precision_floor.py                       # the shipped conv layers only (seconds)
    .venv/bin/python benchmarks/precision_floor.py --checkpoint out/bibtex_sig_gd_lr3e-4/FPI_GD.pt \\
        --checkpoint out/bibtex/FPI_GD.pt                                # + trained BibtexGD checkpoints (minutes)

1. Rounding floor: the relative residual |g(x) - x| / |x| each shipped conv layer settles at when nothing stops it
   (floor test off, tol 1e-15), in machine epsilons, with its weights scaled up so the map is far from trivial.
2. ``--low-precision``: the same for the zoo's layers (examples/zoo_models.py, batch 8) in bfloat16 and float16
   and as float32 layers under ``torch.autocast("cpu", dtype=torch.bfloat16)``, Picard and Anderson, in eps of
   the low dtype: the samples that reach an exact fixed point of the rounded map (residual 0, below the tolerance
   of 1e-15: nothing else stops a sample before its 200 iterations) are counted, the others give the median and the largest residual of their last 50 of 200 iterations (the floor test sees single
   iterations). The measurement behind ``LOW_PRECISION_FLOOR_FACTOR``.
3. For each BibtexGD checkpoint (``examples/bibtex.py --save-checkpoints`` writes one) on the first ``--rows``
   training rows: the relative error of the training loss's parameter gradient against a float64 reference
   (BibtexNN with the same weights, solved to 1e-12: with this spec both layers have the same fixed points and
   implicit gradients, which the script checks too) under the old floor (1000 eps) and the current one, with the
   solves' counts; the longest stall (iterations without a new smallest residual while below 1000 eps) of the 24
   hardest rows solved one at a time to 1e-6 relative, floor test off; and the test F1 of the checkpoint with
   max_iter 20,000. Where the two float64 references disagree (a checkpoint on which some rows do not converge
   even in float64, or land on other fixed points), the gradient errors against them mean little.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import fpidsl  # noqa: E402
import fpidsl.runtime.driver as driver  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
CONV_LAYERS = [("specs/denoise.fpi", (4, 1, 48, 48)), ("specs/denoise_residual.fpi", (4, 1, 48, 48)),
               ("specs/optical_flow.fpi", (4, 2, 32, 32))]


@contextmanager
def floor_factors(factor: float, low_precision: float | None = None) -> Iterator[None]:
    """The driver's floor factors (float32/64, and bfloat16/float16: ``low_precision``, unchanged if None) for the
    block; 0 turns the floor test off (nothing stops a sample but tol, unreachable, or max_iter)."""
    saved = driver.FLOOR_FACTOR, driver.LOW_PRECISION_FLOOR_FACTOR
    driver.FLOOR_FACTOR = factor
    if low_precision is not None:
        driver.LOW_PRECISION_FLOOR_FACTOR = low_precision
    try:
        yield
    finally:
        driver.FLOOR_FACTOR, driver.LOW_PRECISION_FLOOR_FACTOR = saved


def rounding_floors() -> None:
    with floor_factors(0.0):
        _rounding_floors()


def _rounding_floors() -> None:
    for spec, shape in CONV_LAYERS:
        for scale in (3.0, 9.0):
            torch.manual_seed(0)
            layer = fpidsl.load(ROOT / spec)(solve={"method": "anderson", "tol": 1e-15, "max_iter": 600,
                                                    "on_fail": "ignore"})
            with torch.no_grad():
                for p in layer.parameters():
                    p.mul_(scale)
                layer(torch.rand(shape))
            r = layer.stats.forward.residual
            print(f"{Path(spec).stem:18s} weights x{scale:g}: relative residual where it settles (600 Anderson steps at most) "
                  f"{float(r.median()) / EPS32:.2f} eps (median), {float(r.max()) / EPS32:.2f} eps (max)")


def low_precision_floors() -> None:
    with floor_factors(0.0, 0.0):
        _low_precision_floors()


def _low_precision_floors() -> None:
    from zoo_models import MODELS  # noqa: PLC0415  (examples/zoo_models.py)

    modes = {"bfloat16": (torch.bfloat16, False), "float16": (torch.float16, False),
             "float32 + autocast bf16": (torch.float32, True)}
    worst = 0.0
    print("layer, dtype, method: rows at an exact fixed point of the rounded map / 8; the others' residual over "
          "their last 50 of 200 iterations, in eps of the low dtype: median (largest)")
    for model in MODELS:
        for mode, (dtype, autocast) in modes.items():
            for method in ("picard", "anderson"):
                torch.manual_seed(0)
                layer = fpidsl.load(model.path, model.layer)(
                    solve={"method": method, "tol": 1e-15, "max_iter": 200, "on_fail": "ignore",
                           "criterion": "relative"}, history=True).to(dtype)
                xs = tuple(x.to(dtype) if x.is_floating_point() else x
                           for x in model.inputs(torch.Generator().manual_seed(0), 8))
                eps = torch.finfo(torch.bfloat16 if autocast else dtype).eps
                try:
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        layer(*xs)
                except (NotImplementedError, RuntimeError) as e:  # sparse products have no half kernels
                    print(f"{model.key:16s} {mode:24s} {method:8s} not run: {str(e).splitlines()[0][:70]}")
                    continue
                stats = layer.stats.forward
                exact, other, tails = int(stats.converged.sum()), 0, []  # converged: a residual below 1e-15, i.e. 0
                for column, ran in zip(stats.history.double().T, stats.iterations.tolist()):
                    if ran == 200:
                        tails.append(column[-50:] / eps)
                    elif column[ran - 1] != 0:
                        other += 1  # stopped early other than at 0 (diverged)
                text = ", ".join(f"{float(t.median()):.2f} ({float(t.max()):.2f})" for t in tails)
                worst = max([worst] + [float(t.max()) for t in tails])
                print(f"{model.key:16s} {mode:24s} {method:8s} exact {exact}/8; {text or '-'}"
                      + (f"; {other} stopped otherwise" if other else ""))
    print(f"largest residual of a settled row's last 50 iterations: {worst:.2f} eps")


def bibtex_gd(checkpoint: Path, rows: int) -> None:
    import bibtex  # noqa: PLC0415  (examples/bibtex.py: the data loader, the loss and the metric)

    raw = bibtex.load_bibtex(bibtex.DEFAULT_CACHE)
    x = torch.from_numpy(raw["x_train"]).float()[:rows]
    y = torch.from_numpy(raw["y_train"]).float()[:rows]
    weights = torch.load(checkpoint)

    def gradient(name: str, settings: dict, dtype: torch.dtype):
        layer = fpidsl.load(bibtex.SPEC, name=name)(solve=settings, backward=settings).to(dtype)
        layer.load_state_dict(weights)
        bibtex.bce(layer(x.to(dtype)), y.to(dtype)).backward()
        return torch.cat([p.grad.flatten().double() for p in layer.parameters()]), layer.stats.forward

    tight = {"method": "anderson", "tol": 1e-12, "max_iter": 5000, "on_fail": "ignore"}
    reference, _ = gradient("BibtexNN", tight, torch.float64)
    gd64, _ = gradient("BibtexGD", tight, torch.float64)
    print(f"{checkpoint}: {rows} rows; float64 BibtexGD vs BibtexNN gradient, relative difference "
          f"{float((gd64 - reference).norm() / reference.norm()):.1e}")
    for factor, max_iter in ((1e3, 500), (driver.FLOOR_FACTOR, 500), (driver.FLOOR_FACTOR, 2000)):
        with floor_factors(factor):
            g, fwd = gradient("BibtexGD", {"method": "anderson", "max_iter": max_iter, "on_fail": "ignore"},
                              torch.float32)
        print(f"  floor {factor:g} eps, max_iter {max_iter}: gradient relative error "
              f"{float((g - reference).norm() / reference.norm()):.3f}; forward not converged {len(fwd.failed)}, "
              f"at the floor {int(fwd.stopped_at_floor.sum())}")
    longest_stalls(x, weights, bibtex)
    settings = {"method": "anderson", "max_iter": 20000, "on_fail": "ignore"}
    layer = fpidsl.load(bibtex.SPEC, name="BibtexGD")(solve=settings, backward=settings)
    layer.load_state_dict(weights)
    layer.eval()
    prob, record = bibtex.predict(layer, torch.from_numpy(raw["x_test"]).float())
    target = torch.from_numpy(raw["y_test"]).float()
    print("  test F1 with max_iter 20000 at thresholds 0.08 / 0.09 / 0.10: "
          + " / ".join(f"{bibtex.example_f1(prob, target, t):.4f}" for t in (0.08, 0.09, 0.10))
          + f"; not converged {record['not_converged']} of {len(target)}")


def longest_stalls(x: torch.Tensor, weights: dict, bibtex) -> None:
    """Solve the 24 rows that take the most iterations one at a time to a relative residual of 1e-6 (about 8 eps;
    the spec's absolute 1e-4 is about 15 eps at these states), floor test off, and report the longest run of
    iterations without a new smallest relative residual while that residual is below 1000 eps."""
    settings = {"method": "anderson", "max_iter": 3000, "on_fail": "ignore", "criterion": "relative", "tol": 1e-6}
    layer = fpidsl.load(bibtex.SPEC, name="BibtexGD")(solve=settings)
    layer.load_state_dict(weights)
    with torch.no_grad():
        layer(x)
    hardest = torch.argsort(layer.stats.forward.iterations, descending=True)[:24].tolist()
    stalls = []
    with floor_factors(0.0):
        for i in hardest:
            with torch.no_grad():
                layer.history = True
                layer(x[i:i + 1])
            history = layer.stats.forward.history[:, 0].tolist()
            best, run, longest = math.inf, 0, 0
            for r in history:
                best, run = (r, 0) if r < best else (best, run + 1)
                if r <= 1e3 * EPS32:
                    longest = max(longest, run)
            stalls.append((longest, history[-1] / EPS32))
    stalls.sort(reverse=True)
    print("  longest stalls below 1000 eps (iterations, final residual in eps), hardest 24 rows one at a time: "
          + ", ".join(f"{n} ({end:.1f})" for n, end in stalls[:6]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, action="append", default=[], help="a BibtexGD state_dict (repeatable)")
    p.add_argument("--rows", type=int, default=256, help="training rows for the gradient comparison")
    p.add_argument("--low-precision", action="store_true", help="also the zoo in bfloat16, float16 and autocast")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", fpidsl.ConvergenceWarning)
    rounding_floors()
    if args.low_precision:
        low_precision_floors()
    for checkpoint in args.checkpoint:
        bibtex_gd(checkpoint, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
