"""Experiment 3 of the FPI paper: Gaussian denoising of gray images, FPI_NN vs the feedforward net of the same structure.

The FPI layer is ``DenoiseNN`` from ``specs/denoise.fpi``: x = conv2(relu(conv1(cat([x, z])))), two 3x3 convs with
32 channels, init_scale 0.1, tol 1e-7; its output is the fixed point. The feedforward baseline is the same map g
applied once from x = 0 (``type(layer).step(0, z, *params)`` of a second ``DenoiseNN`` that starts from the same
weights). Both are trained with MSE, Adam (one-cycle schedule) and gradient-norm clipping 0.1 on random patches of
the training crops with fresh noise each step, then evaluated on the 24 full 180x180 test crops of DATA.md's split
(images.py), with TV denoising (Chambolle, weight tuned on the same crops) as the classical reference.

``--layer DenoiseResNN`` runs the residual variant of specs/denoise_residual.fpi instead, x = z - g(x, z) with the
same g (not the paper's form; its feedforward baseline is z - g(0, z)).

    python examples/denoise.py                 # full run (sigma = 15, 25, 50)
    python examples/denoise.py --layer DenoiseResNN
    python examples/denoise.py --quick         # seconds: a smoke test of the whole pipeline

Writes ``results.json``, ``denoise.png`` (noisy / FPI / feedforward / clean for one test crop per sigma) and
``training.png`` (training-patch PSNR per step) into ``--out``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fpidsl
from common import Stopwatch, parser, plot_curves, progress, setup, write_json
from images import TEST_IMAGES, TRAIN_IMAGES, test_crops, train_crops

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"DenoiseNN": ROOT / "specs" / "denoise.fpi", "DenoiseResNN": ROOT / "specs" / "denoise_residual.fpi"}

# DATA.md: mean PSNR (dB) on exactly these 24 test crops.
REFERENCE = {
    15: {"noisy": 24.61, "tv": 31.72, "wavelet": 30.41, "nlmeans": 32.40, "bm3d": 33.66},
    25: {"noisy": 20.17, "tv": 29.07, "wavelet": 27.83, "nlmeans": 29.73, "bm3d": 31.10},
    50: {"noisy": 14.15, "tv": 25.91, "wavelet": 24.80, "nlmeans": 25.92, "bm3d": 27.72},
}


def psnr(estimate: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """PSNR (peak 1.0) of each image of a batch (B, 1, H, W)."""
    mse = ((estimate.double() - clean.double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse)


class FeedForward(nn.Module):
    """The FPI layer's map g applied once from x = 0 (conv2(relu(conv1(cat([0, z])))) for DenoiseNN), with its own
    weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.g = layer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return type(self.g).step(torch.zeros_like(z), z, *self.g.parameter_tensors())


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def patches(crops: torch.Tensor, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random ``size`` x ``size`` patches of random crops, (n, 1, size, size)."""
    k = torch.randint(len(crops), (n,), generator=gen)
    top = torch.randint(crops.shape[-2] - size + 1, (n,), generator=gen)
    left = torch.randint(crops.shape[-1] - size + 1, (n,), generator=gen)
    return torch.stack([crops[i, t:t + size, l:l + size] for i, t, l in zip(k.tolist(), top.tolist(), left.tolist())])[:, None]


def train(model: nn.Module, crops: torch.Tensor, sigma: float, args, desc: str, fpi: nn.Module | None) -> dict:
    """Adam + one-cycle lr + clipping; the data stream (patches and noise) depends only on the seed and sigma."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + int(sigma))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    curve, window, fwd_its, bwd_its, failed = [], [], [], [], 0
    model.train()
    with Stopwatch() as sw:
        bar = progress(range(args.steps), desc=desc)
        for step in bar:
            x = patches(crops, args.batch, args.patch, gen)
            z = x + sigma / 255.0 * torch.randn(x.shape, generator=gen)
            out = model(z)
            loss = torch.mean((out - x) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            sched.step()
            window.append(float(psnr(out.detach(), x).mean()))
            if fpi is not None:
                st = fpi.stats
                fwd_its.append(st.forward.max_iterations)
                bwd_its.append(st.backward.max_iterations)
                failed += len(st.forward.failed) + len(st.backward.failed)
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                curve.append((step + 1, float(np.mean(window))))
                window = []
                bar.set_postfix(train_psnr=f"{curve[-1][1]:.2f}")
    out = {"seconds": sw.seconds, "seconds_per_step": sw.seconds / args.steps, "curve": curve}
    if fpi is not None:
        out.update(forward_iterations_mean=float(np.mean(fwd_its)), forward_iterations_max=int(max(fwd_its)),
                   backward_iterations_mean=float(np.mean(bwd_its)), backward_iterations_max=int(max(bwd_its)),
                   failed_samples=failed)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, noisy: torch.Tensor, clean: torch.Tensor, chunk: int, fpi: nn.Module | None):
    """Mean PSNR over the test crops, the denoised crops, seconds, and (FPI) the solver's iterations."""
    model.eval()
    outs, its, failed = [], [], 0
    with Stopwatch() as sw:
        for i in range(0, len(noisy), chunk):
            outs.append(model(noisy[i:i + chunk]))
            if fpi is not None:
                its.append(fpi.stats.forward.max_iterations)
                failed += len(fpi.stats.forward.failed)
    out = torch.cat(outs)
    info = {"psnr": float(psnr(out, clean).mean()), "seconds": sw.seconds}
    if fpi is not None:
        info.update(forward_iterations_max=int(max(its)), failed_samples=failed)
    return out, info


def tv_reference(noisy: np.ndarray, clean: np.ndarray, weights: np.ndarray) -> dict:
    """TV denoising (Chambolle) with the weight that gives the best mean PSNR on these crops (an oracle tuning)."""
    from skimage.restoration import denoise_tv_chambolle

    def mean_psnr(w: float) -> float:
        den = np.stack([denoise_tv_chambolle(y, weight=w) for y in noisy])
        return float(np.mean(10 * np.log10(1.0 / np.mean((den - clean) ** 2, axis=(1, 2)))))

    scores = {float(w): mean_psnr(float(w)) for w in weights}
    best = max(scores, key=scores.get)
    return {"psnr": scores[best], "weight": best, "grid": scores}


def figure(path: Path, rows: list[dict], crop_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("noisy", "fpi", "ff", "clean")
    titles = {"noisy": "noisy", "fpi": "FPI_NN", "ff": "feedforward", "clean": "clean"}
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.2, 2.45 * len(rows) + 0.3), squeeze=False)
    for r, row in enumerate(rows):
        for c, key in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(np.clip(row[key], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[key], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"σ = {row['sigma']:g}", fontsize=9)
            ax.set_xlabel(f"{row['psnr'][key]:.2f} dB" if key in row["psnr"] else "", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"test crop {crop_name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "denoise")
    p.add_argument("--sigmas", type=float, nargs="+", default=[15, 25, 50], help="noise levels (of 255)")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model and sigma")
    p.add_argument("--batch", type=int, default=16, help="patches per step")
    p.add_argument("--patch", type=int, default=48, help="training patch size (test crops are 180x180)")
    p.add_argument("--train-per-image", type=int, default=4, help="random 180x180 training crops per image")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (one-cycle schedule)")
    p.add_argument("--clip", type=float, default=0.1, help="gradient-norm clipping")
    p.add_argument("--method", choices=("anderson", "picard"), default="anderson",
                   help="FPI solver, forward and backward (the spec's default is picard; tol stays the spec's)")
    p.add_argument("--layer", choices=sorted(LAYERS), default="DenoiseNN",
                   help="DenoiseNN (specs/denoise.fpi, the paper's form) or DenoiseResNN (specs/denoise_residual.fpi, "
                        "the residual variant x = z - g(x, z))")
    p.add_argument("--test-crops", type=int, default=24, help="use the first N test crops (24: all)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--show", type=int, default=0, help="index of the test crop shown in the figure")
    args = p.parse_args()
    if args.quick:
        args.sigmas, args.steps, args.batch, args.patch = [15, 50], 6, 4, 32
        args.train_per_image, args.test_crops, args.log_every = 1, 4, 3
    out_dir = setup(args)

    clean_np = test_crops()[: args.test_crops]
    clean = torch.from_numpy(clean_np)[:, None]
    crops = torch.from_numpy(train_crops(args.train_per_image, seed=args.seed))
    crop_names = [f"{n}[{k}]" for n in TEST_IMAGES for k in range(4)][: args.test_crops]
    cls = fpidsl.load(LAYERS[args.layer])
    settings = {"method": args.method, "on_fail": "ignore"}  # failures are counted in the results instead
    tv_grid = np.geomspace(0.02, 0.3, 5) if args.quick else np.geomspace(0.01, 0.4, 33)

    results, rows = {}, []
    for sigma in args.sigmas:
        gen = torch.Generator().manual_seed(10_000 + int(sigma))
        noisy = clean + sigma / 255.0 * torch.randn(clean.shape, generator=gen)
        noisy_psnr = float(psnr(noisy, clean).mean())
        tv = tv_reference(noisy[:, 0].double().numpy(), clean_np.astype(np.float64), tv_grid)

        torch.manual_seed(args.seed)
        fpi = cls(solve=settings, backward=settings)
        ff = FeedForward(copy.deepcopy(fpi))
        log_ff = train(ff, crops, sigma, args, f"σ={sigma:g} feedforward", None)
        log_fpi = train(fpi, crops, sigma, args, f"σ={sigma:g} FPI_NN", fpi)
        den_ff, ev_ff = evaluate(ff, noisy, clean, 8, None)
        den_fpi, ev_fpi = evaluate(fpi, noisy, clean, 8, fpi)
        ref = REFERENCE.get(int(sigma), {})
        results[f"{sigma:g}"] = {
            "noisy_psnr": noisy_psnr, "noisy_psnr_reference": ref.get("noisy"),
            "tv_psnr": tv["psnr"], "tv_weight": tv["weight"], "tv_psnr_reference": ref.get("tv"),
            "ff_psnr": ev_ff["psnr"], "fpi_psnr": ev_fpi["psnr"],
            "fpi_minus_ff": ev_fpi["psnr"] - ev_ff["psnr"], "fpi_minus_tv": ev_fpi["psnr"] - tv["psnr"],
            "references": ref, "ff_train": log_ff, "fpi_train": log_fpi, "ff_eval": ev_ff, "fpi_eval": ev_fpi,
            "fpi_stats_last_eval": str(fpi.stats),
        }
        s = args.show
        rows.append({"sigma": sigma, "noisy": noisy[s, 0].numpy(), "fpi": den_fpi[s, 0].numpy(),
                     "ff": den_ff[s, 0].numpy(), "clean": clean_np[s],
                     "psnr": {"noisy": float(psnr(noisy[s:s + 1], clean[s:s + 1])),
                              "fpi": float(psnr(den_fpi[s:s + 1], clean[s:s + 1])),
                              "ff": float(psnr(den_ff[s:s + 1], clean[s:s + 1]))}})
        print(f"σ={sigma:g}: noisy {noisy_psnr:.2f} (DATA.md {ref.get('noisy')}), TV {tv['psnr']:.2f} "
              f"(DATA.md {ref.get('tv')}), feedforward {ev_ff['psnr']:.2f}, FPI_NN {ev_fpi['psnr']:.2f}; "
              f"train {log_ff['seconds']:.0f}s / {log_fpi['seconds']:.0f}s; {fpi.stats}", flush=True)

    figure(out_dir / "denoise.png", rows, crop_names[args.show])
    plot_curves(out_dir / "training.png", [
        {"title": f"σ={sig}", "xlabel": "step", "ylabel": "training-patch PSNR (dB)",
         "series": {"FPI_NN": tuple(zip(*r["fpi_train"]["curve"])), "feedforward": tuple(zip(*r["ff_train"]["curve"]))}}
        for sig, r in results.items()])
    summary = {
        "experiment": "denoise",
        "command": " ".join(["python", *sys.argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fpi_settings": {"solve": fpi.solve_settings.as_dict(), "backward": fpi.backward_settings.as_dict()},
        "split": {"test_images": TEST_IMAGES, "test_crops": len(clean), "train_images": TRAIN_IMAGES,
                  "train_crops": len(crops), "crop": 180},
        "parameters": {"fpi": count(fpi), "ff": count(ff)},
        "results": results,
        "table": [{"sigma": k, **{m: v[f"{m}_psnr"] for m in ("noisy", "tv", "ff", "fpi")}} for k, v in results.items()],
    }
    write_json(out_dir / "results.json", summary)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'denoise.png'}, {out_dir / 'training.png'}")


if __name__ == "__main__":
    main()
