"""Experiment 4 of the FPI paper: optical flow with and without an FPI refinement layer, on Flying-Chairs-like pairs.

Data (DATA.md's recipe, made here): a background texture moved by a random near-identity affine map and an elliptical
textured foreground patch moved by a stronger one; frame 2 by inverse warping (``scipy.ndimage.map_coordinates``);
the ground-truth flow at each frame-1 pixel is the motion of whichever layer covers it. Textures are the package
images of images.py: the training pairs use the denoising split's training images, the held-out pairs its test
images. A small FlowNetS-style CNN (encoder-decoder on the two stacked RGB frames, flow predicted at 1/8, 1/4 and
1/2 resolution, each scale fed to the next, bilinearly upsampled to full size) is trained three ways from the same
initial weights and batch order:

- ``base``: the network alone;
- ``fpi``: flow + FlowRefineNN(flow) (``specs/optical_flow.fpi``, in float64 as the spec's tol 1e-13 assumes),
  trained end to end;
- ``ff``: flow + g(0, flow): the same refinement map applied once from x = 0 (a second FlowRefineNN's ``step``).

Loss: average end-point error (EPE) at full resolution plus 0.5 / 0.25 of it at the two coarser predictions; Adam
with cosine decay, the refinement layer's parameters at a 10x lower learning rate (``--refine-lr``: at the network's
rate the FPI map stopped being a contraction within three epochs, see docs/RESULTS_denoise_flow.md).
Reported: held-out EPE per epoch, parameter counts, time per epoch. Two sanity checks of the data and of the flow
convention: warping frame 2 back with the ground truth reproduces frame 1, and on skimage's real stereo pair
(``stereo_motorcycle``, flow u = -disparity, v = 0) the same warp reproduces the left view; the trained networks are
also scored on that pair (downscaled), out of distribution.

    python examples/optical_flow.py            # full run
    python examples/optical_flow.py --quick    # seconds: a smoke test

Writes ``results.json``, ``epe.png`` (held-out EPE per epoch) and ``flow.png`` (one held-out pair) into ``--out``.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from torch import nn
from torch.nn import functional as F

import fpidsl
from common import Stopwatch, parser, plot_curves, progress, setup, write_json
from images import TEST_IMAGES, TRAIN_IMAGES, rgb

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "optical_flow.fpi"
VARIANTS = ("base", "ff", "fpi")
LABELS = {"base": "network alone", "ff": "+ feedforward refinement", "fpi": "+ FPI refinement"}


# ------------------------------------------------------------------------------------------------ synthetic pairs


def _affine(rng: np.random.Generator, rot_deg: float, scale: float, shear: float) -> np.ndarray:
    """A random 2x2 matrix (row, col coordinates) near the identity: rotation, isotropic scale, small shear."""
    a = math.radians(rng.uniform(-rot_deg, rot_deg))
    s = math.exp(rng.uniform(-math.log(scale), math.log(scale)))
    h = rng.uniform(-shear, shear)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return s * rot @ np.array([[1.0, h], [0.0, 1.0]])


def _sample(tex: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of an RGB texture at (rows, cols), (H, W, 3)."""
    return np.stack([map_coordinates(tex[..., c], [rows, cols], order=1, mode="reflect") for c in range(3)], -1)


class Texture:
    """A view of an image: frame pixel p shows image point ``offset + zoom * p`` (zoom > 1 shows more detail)."""

    def __init__(self, img: np.ndarray, size: int, rng: np.random.Generator):
        self.img = img
        self.zoom = rng.uniform(1.0, 2.0)
        h, w = img.shape[:2]
        span = self.zoom * size
        self.offset = np.array([rng.uniform(0, max(h - span, 1)), rng.uniform(0, max(w - span, 1))])

    def at(self, p: np.ndarray) -> np.ndarray:  # p: (2, H, W) frame coordinates (row, col)
        q = self.offset[:, None, None] + self.zoom * p
        return _sample(self.img, q[0], q[1])


def make_pair(textures: list[np.ndarray], size: int, rng: np.random.Generator):
    """One Flying-Chairs-like pair: frames (2, H, W, 3) in [0, 1] and the flow at frame 1 (2, H, W) as (u, v) =
    (column, row) displacement in pixels, frame 1 -> frame 2."""
    i, j = rng.choice(len(textures), 2, replace=len(textures) < 2)
    back, fore = Texture(textures[i], size, rng), Texture(textures[j], size, rng)
    grid = np.mgrid[0:size, 0:size].astype(np.float64)  # (2, H, W): row, col
    centre = np.full(2, (size - 1) / 2.0)

    # background: near-identity affine about the centre plus a small translation
    a_b, t_b = _affine(rng, 3.0, 1.04, 0.02), rng.uniform(-3, 3, 2)
    # foreground: an ellipse with a stronger affine motion about its own centre
    e_c = rng.uniform(0.3 * size, 0.7 * size, 2)
    axes = rng.uniform(0.15 * size, 0.3 * size, 2)
    ang = rng.uniform(0, math.pi)
    a_f, t_f = _affine(rng, 15.0, 1.15, 0.05), rng.uniform(-6, 6, 2)

    def inside(p: np.ndarray) -> np.ndarray:
        d = p - e_c[:, None, None]
        c, s = math.cos(ang), math.sin(ang)
        r0, r1 = c * d[0] + s * d[1], -s * d[0] + c * d[1]
        return (r0 / axes[0]) ** 2 + (r1 / axes[1]) ** 2 <= 1.0

    def move(p: np.ndarray, a: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jhw->ihw", a, p - c[:, None, None]) + (c + t)[:, None, None]

    def unmove(q: np.ndarray, a: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jhw->ihw", np.linalg.inv(a), q - (c + t)[:, None, None]) + c[:, None, None]

    m1 = inside(grid)[..., None]
    frame1 = np.where(m1, fore.at(grid), back.at(grid))
    src_b, src_f = unmove(grid, a_b, t_b, centre), unmove(grid, a_f, t_f, e_c)  # frame-2 pixel -> frame-1 point
    m2 = inside(src_f)[..., None]
    frame2 = np.where(m2, fore.at(src_f), back.at(src_b))
    disp = np.where(m1[None, ..., 0], move(grid, a_f, t_f, e_c), move(grid, a_b, t_b, centre)) - grid
    flow = np.stack([disp[1], disp[0]])  # (u, v)
    return np.stack([frame1, frame2]).astype(np.float32), flow.astype(np.float32)


def make_set(names: tuple[str, ...], n: int, size: int, seed: int, desc: str):
    rng = np.random.default_rng(seed)
    textures = [rgb(name) for name in names]
    frames, flows = zip(*(make_pair(textures, size, rng) for _ in progress(range(n), desc=desc)))
    x = torch.from_numpy(np.stack(frames))  # (N, 2, H, W, 3)
    x = x.permute(0, 1, 4, 2, 3).reshape(n, 6, size, size)  # frame 1 RGB, frame 2 RGB
    return x.contiguous(), torch.from_numpy(np.stack(flows))


def warp_back(frame2: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """frame2 sampled at p + flow(p) for every frame-1 pixel p: (H, W) gray."""
    h, w = frame2.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    return map_coordinates(frame2, [rows + flow[1], cols + flow[0]], order=1, mode="nearest")


# ------------------------------------------------------------------------------------------------ the networks


def conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.LeakyReLU(0.1))


def deconv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.LeakyReLU(0.1))


class FlowNetS(nn.Module):
    """A small FlowNetS: encoder to 1/8, decoder back to 1/2 with skip connections and a flow at every scale;
    flows are in full-resolution pixels. Returns the full-size flow and the coarser predictions (upsampled)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.conv1, self.conv2 = conv(6, c, 2, 7), conv(c, 2 * c, 2, 5)  # FlowNetS's 7x7 and 5x5 kernels
        self.conv3, self.conv3_1 = conv(2 * c, 4 * c, 2, 5), conv(4 * c, 4 * c)
        self.pred3 = nn.Conv2d(4 * c, 2, 3, 1, 1)
        self.deconv3 = deconv(4 * c, 2 * c)
        self.pred2 = nn.Conv2d(4 * c + 2, 2, 3, 1, 1)
        self.deconv2 = deconv(4 * c + 2, c)
        self.pred1 = nn.Conv2d(2 * c + 2, 2, 3, 1, 1)

    @staticmethod
    def up(flow: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(flow, size=size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor):
        e1 = self.conv1(x - 0.5)
        e2 = self.conv2(e1)
        e3 = self.conv3_1(self.conv3(e2))
        f3 = self.pred3(e3)
        c2 = torch.cat([e2, self.deconv3(e3), self.up(f3, e2.shape[-2:])], 1)
        f2 = self.pred2(c2)
        c1 = torch.cat([e1, self.deconv2(c2), self.up(f2, e1.shape[-2:])], 1)
        f1 = self.pred1(c1)
        size = x.shape[-2:]
        return self.up(f1, size), (self.up(f2, size), self.up(f3, size))


class Refined(nn.Module):
    """``flow + refine(flow)``: refine is the FPI layer (fixed point, in float64) or the same map applied once."""

    def __init__(self, net: FlowNetS, layer: nn.Module | None, mode: str):
        super().__init__()
        self.net, self.layer, self.mode = net, layer, mode

    def forward(self, x: torch.Tensor):
        flow, coarse = self.net(x)
        if self.mode == "fpi":
            dtype = self.layer.parameter_tensors()[0].dtype
            flow = flow + self.layer(flow.to(dtype)).to(flow.dtype)
        elif self.mode == "ff":
            flow = flow + type(self.layer).step(torch.zeros_like(flow), flow, *self.layer.parameter_tensors())
        return flow, coarse


def epe(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """End-point error per sample: the mean over pixels of |pred - gt|_2, (B,)."""
    return torch.linalg.vector_norm(pred - gt, dim=1).mean(dim=(1, 2))


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def evaluate(model: Refined, x: torch.Tensor, gt: torch.Tensor, batch: int) -> float:
    model.eval()
    errs = [epe(model(x[i:i + batch])[0], gt[i:i + batch]) for i in range(0, len(x), batch)]
    return float(torch.cat(errs).mean())


def motorcycle(size: tuple[int, int]):
    """skimage's real stereo pair, downscaled to ``size``: frames (1, 6, h, w), flow (1, 2, h, w) with u = -disp
    (in downscaled pixels), v = 0, and a mask of pixels with a finite disparity; plus the full-resolution warp check."""
    from skimage.data import stereo_motorcycle

    left, right, disp = stereo_motorcycle()
    lg, rg = left.mean(-1) / 255.0, right.mean(-1) / 255.0
    ok = np.isfinite(disp)
    flow_full = np.stack([-np.nan_to_num(disp, posinf=0.0), np.zeros_like(disp)])
    check = {"photometric_error_gt_warp": float(np.abs(warp_back(rg, flow_full) - lg)[ok].mean()),
             "photometric_error_zero_flow": float(np.abs(rg - lg)[ok].mean())}
    h, w = size
    sx = w / left.shape[1]
    frames = torch.from_numpy(np.concatenate([left, right], -1).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    frames = F.interpolate(frames, size=size, mode="area")
    d = torch.from_numpy(np.where(ok, disp, np.nan).astype(np.float32))[None, None]
    d_small = F.interpolate(torch.nan_to_num(d, nan=0.0), size=size, mode="area")
    valid = F.interpolate(torch.isfinite(d).float(), size=size, mode="area") > 0.999
    flow = torch.cat([-sx * d_small, torch.zeros_like(d_small)], 1)
    return frames, flow, valid[:, 0], check


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = parser(__doc__.splitlines()[0], "optical_flow")
    p.add_argument("--size", type=int, default=64, help="frame size (a multiple of 8)")
    p.add_argument("--train-pairs", type=int, default=5000)
    p.add_argument("--val-pairs", type=int, default=300, help="held-out pairs (textures from the test images)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to 0)")
    p.add_argument("--width", type=int, default=16, help="channels of FlowNetS's first layer")
    p.add_argument("--fpi-dtype", choices=("float64", "float32"), default="float64",
                   help="dtype of the FPI layer (float64 with the spec's tol 1e-13; float32 needs --fpi-tol)")
    p.add_argument("--refine-lr", type=float, default=3e-4,
                   help="learning rate of the refinement layer's parameters (FPI and feedforward alike)")
    p.add_argument("--clip", type=float, default=None, help="gradient-norm clipping (default none)")
    p.add_argument("--fpi-method", choices=("picard", "anderson"), default=None,
                   help="override the spec's solver (picard) for the FPI layer, forward and backward")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which of the three to train (all three for the comparison)")
    p.add_argument("--fpi-tol", type=float, default=None, help="override the spec's solve/backward tol")
    args = p.parse_args()
    if args.quick:
        args.train_pairs, args.val_pairs, args.epochs, args.batch, args.size = 64, 16, 2, 16, 32
    out_dir = setup(args)

    train_x, train_y = make_set(TRAIN_IMAGES, args.train_pairs, args.size, args.seed, "train pairs")
    val_x, val_y = make_set(TEST_IMAGES, args.val_pairs, args.size, args.seed + 1, "held-out pairs")
    f1, f2 = val_x[:, :3].mean(1).numpy(), val_x[:, 3:].mean(1).numpy()  # gray frames
    check = {
        "photometric_error_gt_warp": float(np.mean([np.abs(warp_back(b, fl.numpy()) - a).mean()
                                                    for a, b, fl in zip(f1, f2, val_y)])),
        "photometric_error_zero_flow": float(np.mean(np.abs(f2 - f1))),
        "mean_flow_magnitude": float(torch.linalg.vector_norm(val_y, dim=1).mean()),
        "zero_flow_epe": float(epe(torch.zeros_like(val_y), val_y).mean()),
    }
    moto_x, moto_y, moto_valid, moto_check = motorcycle((64, 96))
    print(f"data: {args.train_pairs} train / {args.val_pairs} held-out pairs of {args.size}x{args.size}; "
          f"warp check {check}; motorcycle warp check {moto_check}", flush=True)

    settings = {"on_fail": "ignore"} | ({"tol": args.fpi_tol} if args.fpi_tol is not None else {})
    settings |= {"method": args.fpi_method} if args.fpi_method else {}
    cls = fpidsl.load(SPEC)
    fpi_dtype = getattr(torch, args.fpi_dtype)
    torch.manual_seed(args.seed)
    net0 = FlowNetS(args.width)
    torch.manual_seed(args.seed + 1)
    layer0 = cls(solve=settings, backward=settings)
    models = {
        "base": Refined(copy.deepcopy(net0), None, "base"),
        "ff": Refined(copy.deepcopy(net0), copy.deepcopy(layer0), "ff"),
        "fpi": Refined(copy.deepcopy(net0), copy.deepcopy(layer0).to(fpi_dtype), "fpi"),
    }
    steps_per_epoch = math.ceil(args.train_pairs / args.batch)
    results = {}
    models = {name: models[name] for name in args.variants}
    for name, model in models.items():
        gen = torch.Generator().manual_seed(args.seed + 2)  # the same batch order for every variant
        groups = [{"params": model.net.parameters(), "lr": args.lr}]
        if model.layer is not None:
            groups.append({"params": model.layer.parameters(), "lr": args.refine_lr})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
        log = {"val_epe": [evaluate(model, val_x, val_y, 64)], "train_epe": [], "epoch_seconds": [],
               "fwd_iterations": [], "bwd_iterations": [], "failed_samples": 0}
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(args.train_pairs, generator=gen)
            errs, its_f, its_b = [], [], []
            with Stopwatch() as sw:
                for k in progress(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{args.epochs}"):
                    idx = order[k * args.batch:(k + 1) * args.batch]
                    x, y = train_x[idx], train_y[idx]
                    flow, (c2, c3) = model(x)
                    err = epe(flow, y).mean()
                    loss = err + 0.5 * epe(c2, y).mean() + 0.25 * epe(c3, y).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if args.clip is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                    opt.step()
                    sched.step()
                    errs.append(float(err.detach()))
                    if name == "fpi":
                        st = model.layer.stats
                        its_f.append(st.forward.max_iterations)
                        its_b.append(st.backward.max_iterations)
                        log["failed_samples"] += len(st.forward.failed) + len(st.backward.failed)
            log["epoch_seconds"].append(sw.seconds)
            log["train_epe"].append(float(np.mean(errs)))
            log["val_epe"].append(evaluate(model, val_x, val_y, 64))
            if its_f:
                log["fwd_iterations"].append(float(np.mean(its_f)))
                log["bwd_iterations"].append(float(np.mean(its_b)))
            print(f"{name} epoch {epoch + 1}: train EPE {log['train_epe'][-1]:.4f}, held-out EPE "
                  f"{log['val_epe'][-1]:.4f}, {sw.seconds:.1f}s" + (f", FPI iterations fwd {log['fwd_iterations'][-1]:.1f}"
                  f" bwd {log['bwd_iterations'][-1]:.1f}" if its_f else ""), flush=True)
        with torch.no_grad():
            model.eval()
            moto = torch.linalg.vector_norm(model(moto_x)[0] - moto_y, dim=1)[moto_valid]
        log.update(
            final_val_epe=log["val_epe"][-1], best_val_epe=min(log["val_epe"][1:]),
            seconds_per_epoch=float(np.mean(log["epoch_seconds"])),
            parameters=count(model), refinement_parameters=count(model.layer),
            motorcycle_epe=float(moto.mean()),
        )
        if name == "fpi":
            log["fpi_stats_last"] = str(model.layer.stats)
        results[name] = log

    base = results.get("base", next(iter(results.values())))
    comparison = {
        name: {"val_epe": r["final_val_epe"], "val_epe_vs_base": r["final_val_epe"] - base["final_val_epe"],
               "parameters": r["parameters"], "extra_parameters": r["parameters"] - base["parameters"],
               "seconds_per_epoch": r["seconds_per_epoch"],
               "time_vs_base": r["seconds_per_epoch"] / base["seconds_per_epoch"],
               "motorcycle_epe": r["motorcycle_epe"]}
        for name, r in results.items()
    }
    plot_curves(out_dir / "epe.png", [
        {"title": "held-out EPE", "xlabel": "epoch", "ylabel": "average end-point error (px)",
         "series": {LABELS[n]: r["val_epe"] for n, r in results.items()}},
        {"title": "training EPE", "xlabel": "epoch", "ylabel": "average end-point error (px)",
         "series": {LABELS[n]: (list(range(1, args.epochs + 1)), r["train_epe"]) for n, r in results.items()}},
    ], title=f"synthetic Flying-Chairs-like pairs, {args.size}x{args.size}")
    flow_figure(out_dir / "flow.png", models, val_x[:1], val_y[:1])
    write_json(out_dir / "results.json", {
        "experiment": "optical_flow",
        "command": " ".join(["python", *sys.argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "fpi_settings": {"dtype": args.fpi_dtype, "solve": models["fpi"].layer.solve_settings.as_dict(),
                         "backward": models["fpi"].layer.backward_settings.as_dict()},
        "data_check": check, "motorcycle_check": moto_check,
        "comparison": comparison, "results": results,
    })
    for name, c in comparison.items():
        print(f"{LABELS[name]:26s} held-out EPE {c['val_epe']:.4f}  params {c['parameters']} (+{c['extra_parameters']})"
              f"  {c['seconds_per_epoch']:.1f} s/epoch (x{c['time_vs_base']:.2f})  motorcycle EPE {c['motorcycle_epe']:.3f}")
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'epe.png'}, {out_dir / 'flow.png'}")


def flow_colour(flow: np.ndarray, scale: float) -> np.ndarray:
    """(2, H, W) flow as an RGB image: hue = direction, saturation = magnitude / scale."""
    from matplotlib.colors import hsv_to_rgb

    u, v = flow
    hue = (np.arctan2(-v, -u) / (2 * np.pi) + 0.5) % 1.0
    sat = np.clip(np.hypot(u, v) / scale, 0, 1)
    return hsv_to_rgb(np.stack([hue, sat, np.ones_like(hue)], -1))


@torch.no_grad()
def flow_figure(path: Path, models: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = float(torch.linalg.vector_norm(y, dim=1).max()) + 1e-6
    panels = [("frame 1", x[0, :3].permute(1, 2, 0).numpy()), ("frame 2", x[0, 3:].permute(1, 2, 0).numpy()),
              ("ground truth", flow_colour(y[0].numpy(), scale))]
    for name, model in models.items():
        model.eval()
        pred = model(x)[0]
        panels.append((f"{LABELS[name]}\nEPE {float(epe(pred, y)):.3f}", flow_colour(pred[0].numpy(), scale)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.5))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
