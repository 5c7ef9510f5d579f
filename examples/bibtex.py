"""Multi-label classification on Bibtex (appendix B of the FPI paper): 1,836 binary features, 159 labels.

Models: FPI_NN (``BibtexNN``) and FPI_GD (``BibtexGD``) from specs/bibtex.fpi. Loss: binary cross-entropy on the
layer's outputs (both output probabilities). Adam, batch 32, lr 1e-3; FPI_NN for 30 epochs, FPI_GD for 8 (its
solves grow to hundreds of iterations a sample as training sharpens the energy; its validation F1 peaked at epoch 6).
With this spec FPI_GD's fixed points are FPI_NN's in logit space (y = fc2(...) at a minimiser of E), so with
accurate solves the two train alike. The paper's values are not known to us; these were picked on the validation
rows (docs/RESULTS_box_bibtex.md).

Solver: ``--solver anderson`` (default) keeps the spec's tolerances but solves the forward and the backward with
Anderson acceleration (m=5): with the spec's Picard iteration, FPI_NN's forward stops converging for hundreds of
samples per epoch once training starts (and the gradients of those samples explode), and FPI_GD's forward does
not reach tol=1e-4 within 500 iterations; FPI_GD gets ``max_iter`` 2000 (``--gd-max-iter``), forward and
backward. ``--solver spec`` runs the spec's settings unchanged.
``--prior-bias`` (default on) starts fc2's bias at the log-odds of each label's frequency in the training rows,
so that the untrained layer predicts the label marginals (for FPI_GD, whose labels are sigmoid(y) with y the
fixed point of y = fc2(...), this saves thousands of Adam steps of moving the bias to about -4.5).

Data: the standard split (Katakis et al. 2008; 4,880 train / 2,515 test rows), read from the sparse ARFF files
inside the Windows wheel of the PyPI package ``structured-predictions==0.1.2`` (the wheel is a zip; no Linux
wheel exists). The wheel and the parsed arrays are cached in ``~/.cache/fpidsl/bibtex/`` (``--data-dir``).

Metric: example-based F1, averaged over examples: per example 2|y ∩ ŷ| / (|y| + |ŷ|), with 0/0 := 1 (an example
with no true and no predicted label). ŷ = (output >= threshold). The last 10% of the training rows (in file
order) are held out for validation; the threshold (grid 0.01, 0.02, ..., 0.95) and the epoch are chosen on
that validation F1, never on the test set; the test F1 is measured once, for the chosen epoch and threshold.

    python examples/bibtex.py [--quick] [--out out/bibtex] [--epochs 30] [--gd-epochs 8] [--models FPI_NN FPI_GD]
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import shlex
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fpidsl
from common import Stopwatch, parser, plot_curves, progress, setup, write_json

SPEC = "specs/bibtex.fpi"
PACKAGE = "structured-predictions==0.1.2"
WHEEL_DIR = "stpredictions/datasets/bibtex/"
N_FEATURES, N_LABELS = 1836, 159
THRESHOLDS = np.round(np.arange(0.01, 0.951, 0.01), 2)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fpidsl" / "bibtex"


# ------------------------------------------------------------------------------------------------ sparse ARFF


class ArffError(ValueError):
    pass


def _split_name(rest: str, lineno: int) -> tuple[str, str]:
    """``NAME TYPE`` of an ``@attribute`` line; NAME may be quoted with ' or "."""
    rest = rest.strip()
    if rest[:1] in "'\"":
        quote = rest[0]
        end = rest.find(quote, 1)
        while end != -1 and rest[end - 1] == "\\":
            end = rest.find(quote, end + 1)
        if end == -1:
            raise ArffError(f"line {lineno}: unterminated quoted attribute name")
        return rest[1:end].replace("\\" + quote, quote), rest[end + 1:].strip()
    parts = rest.split(None, 1)
    if len(parts) != 2:
        raise ArffError(f"line {lineno}: @attribute needs a name and a type")
    return parts[0], parts[1].strip()


def parse_arff(text: str) -> tuple[list[str], np.ndarray]:
    """Parse an ARFF file of numeric/binary attributes, sparse (``{i v, ...}``) or dense rows.

    Returns the attribute names and a float32 array (rows x attributes); a sparse row's omitted values are 0.
    Nominal attributes must have numeric values (as Bibtex's ``{0,1}``); ``?`` (missing) is an error.
    """
    names: list[str] = []
    rows: list[np.ndarray] = []
    in_data = False
    for lineno, raw in enumerate(io.StringIO(text), start=1):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        if not in_data:
            key = line.split(None, 1)[0].lower()
            if key == "@relation":
                continue
            if key == "@attribute":
                name, _type = _split_name(line.split(None, 1)[1], lineno)
                names.append(name)
                continue
            if key == "@data":
                in_data = True
                continue
            raise ArffError(f"line {lineno}: unexpected header line {line[:40]!r}")
        row = np.zeros(len(names), dtype=np.float32)
        if line.startswith("{"):
            if not line.endswith("}"):
                raise ArffError(f"line {lineno}: sparse row without closing brace")
            body = line[1:-1].strip()
            for item in filter(None, (s.strip() for s in body.split(","))):
                try:
                    index, value = item.split()
                    i = int(index)
                    row[i] = float(value)
                except (ValueError, IndexError):
                    raise ArffError(f"line {lineno}: bad sparse entry {item!r}") from None
        else:
            values = [v.strip() for v in line.split(",")]
            if len(values) != len(names):
                raise ArffError(f"line {lineno}: {len(values)} values for {len(names)} attributes")
            try:
                row[:] = [float(v) for v in values]
            except ValueError:
                raise ArffError(f"line {lineno}: non-numeric value in a dense row") from None
        rows.append(row)
    if not in_data:
        raise ArffError("no @data section")
    return names, np.stack(rows) if rows else np.zeros((0, len(names)), np.float32)


def split_features_labels(names: list[str], data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of Bibtex: the labels are the last 159 attributes, all named ``TAG_*``."""
    label_cols = [i for i, n in enumerate(names) if n.startswith("TAG_")]
    if label_cols != list(range(len(names) - N_LABELS, len(names))) or len(names) != N_FEATURES + N_LABELS:
        raise ArffError(f"expected {N_FEATURES} features then {N_LABELS} TAG_* labels, got {len(names)} "
                        f"attributes with {len(label_cols)} TAG_* ones")
    return data[:, :N_FEATURES].astype(np.uint8), data[:, N_FEATURES:].astype(np.uint8)


# ------------------------------------------------------------------------------------------------ the data


def _download_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("structured_predictions-0.1.2-*.whl"))
    if wheels:
        return wheels[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform", "win_amd64",
           "--python-version", "3.11", "-d", str(cache), PACKAGE]
    print("downloading the Bibtex data:", shlex.join(cmd), file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        ok = done.returncode == 0
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, [str(exc)]
    wheels = sorted(cache.glob("structured_predictions-0.1.2-*.whl"))
    if not ok or not wheels:
        raise SystemExit(
            "error: could not download the Bibtex data (the Windows wheel of structured-predictions 0.1.2).\n"
            f"  command: {shlex.join(cmd)}\n  " + "\n  ".join(detail) + "\n"
            f"Run that command yourself (or put the .whl file in {cache}) and start again.")
    return wheels[0]


def load_bibtex(cache: Path = DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """``{"x_train", "y_train", "x_test", "y_test"}`` (uint8), from the cache or the wheel."""
    cache.mkdir(parents=True, exist_ok=True)
    arrays = cache / "bibtex.npz"
    if arrays.exists():
        with np.load(arrays) as z:
            return {k: z[k] for k in z.files}
    wheel = _download_wheel(cache)
    out = {}
    with zipfile.ZipFile(wheel) as zf:
        for part in ("train", "test"):
            text = zf.read(f"{WHEEL_DIR}bibtex-{part}.arff").decode("utf-8")
            out[f"x_{part}"], out[f"y_{part}"] = split_features_labels(*parse_arff(text))
    if (len(out["x_train"]), len(out["x_test"])) != (4880, 2515):
        raise SystemExit(f"error: unexpected Bibtex sizes {len(out['x_train'])}/{len(out['x_test'])} in {wheel}")
    tmp = cache / "bibtex.tmp.npz"
    np.savez_compressed(tmp, **out)
    tmp.replace(arrays)
    return out


# ------------------------------------------------------------------------------------------------ metric


def example_f1(prob: torch.Tensor, target: torch.Tensor, threshold: float) -> float:
    """Mean over examples of 2|y ∩ ŷ| / (|y| + |ŷ|), ŷ = prob >= threshold, 0/0 := 1."""
    pred = (prob >= threshold).float()
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    f1 = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
    return float(f1.mean())


def best_threshold(prob: torch.Tensor, target: torch.Tensor) -> tuple[float, float, list[float]]:
    """The threshold of the grid with the highest F1 (the lowest on ties), that F1, and the F1 per threshold."""
    scores = [example_f1(prob, target, float(t)) for t in THRESHOLDS]
    i = int(np.argmax(scores))
    return float(THRESHOLDS[i]), scores[i], scores


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, dict]:
    """Probabilities, and the forward solves' record: iterations per sample, samples not converged."""
    probs, iters, failed = [], [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fpidsl.ConvergenceWarning)  # counted below instead
        for i in range(0, x.shape[0], batch):
            probs.append(model(x[i:i + batch]))
            iters += model.stats.forward.iterations.tolist()
            failed += len(model.stats.forward.failed)
    return torch.cat(probs), {"iterations": iters, "not_converged": failed}


# ------------------------------------------------------------------------------------------------ training


def bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    eps = 1e-6  # the outputs are probabilities; keep log() finite where a sigmoid saturates in float32
    return F.binary_cross_entropy(prob.clamp(eps, 1 - eps), target)


def train_one(name: str, model: torch.nn.Module, data: dict, args, lr: float, epochs: int, schedule: str) -> dict:
    torch.manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    xtr, ytr, xva, yva = data["x_tr"], data["y_tr"], data["x_va"], data["y_va"]
    n = xtr.shape[0]
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-n // args.batch))  # steps in all
             if schedule == "cosine" else None)
    hist = {"train_loss": [], "val_f1": [], "val_threshold": [], "val_loss": [], "epoch_seconds": [],
            "forward_mean_iterations": [], "forward_max_iterations": [], "backward_mean_iterations": [],
            "backward_max_iterations": [], "forward_fraction_ok": [], "backward_fraction_ok": [],
            "convergence_warnings": [], "val_not_converged": []}
    best = {"val_f1": -1.0}
    bar = progress(range(1, epochs + 1), desc=name)
    with Stopwatch() as total:
        for epoch in bar:
            perm = torch.randperm(n)
            run_loss, f_it, b_it, f_ok, b_ok, f_max, b_max = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
            model.train()
            with Stopwatch() as sw, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", fpidsl.ConvergenceWarning)
                for i in progress(range(0, n, args.batch), desc=f"{name} epoch {epoch}"):
                    idx = perm[i:i + args.batch]
                    loss = bce(model(xtr[idx]), ytr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    st = model.stats
                    run_loss += float(loss.detach()) * idx.numel()
                    f_it += float(st.forward.iterations.float().sum())
                    f_ok += float(st.forward.ok.float().sum())
                    f_max = max(f_max, st.forward.max_iterations)
                    if st.backward is not None:
                        b_it += float(st.backward.iterations.float().sum())
                        b_ok += float(st.backward.ok.float().sum())
                        b_max = max(b_max, st.backward.max_iterations)
            model.eval()
            prob, rec = predict(model, xva)
            hist["val_not_converged"].append(rec["not_converged"])
            thr, f1, _ = best_threshold(prob, yva)
            hist["train_loss"].append(run_loss / n)
            hist["val_loss"].append(float(bce(prob, yva)))
            hist["val_f1"].append(f1)
            hist["val_threshold"].append(thr)
            hist["epoch_seconds"].append(sw.seconds)
            hist["forward_mean_iterations"].append(f_it / n)
            hist["forward_max_iterations"].append(f_max)
            hist["backward_mean_iterations"].append(b_it / n)
            hist["backward_max_iterations"].append(b_max)
            hist["forward_fraction_ok"].append(f_ok / n)
            hist["backward_fraction_ok"].append(b_ok / n)
            hist["convergence_warnings"].append(
                sum(issubclass(w.category, fpidsl.ConvergenceWarning) for w in caught))
            if f1 > best["val_f1"]:
                best = {"val_f1": f1, "epoch": epoch, "threshold": thr, "state": copy.deepcopy(model.state_dict())}
            bar.set_postfix(loss=f"{run_loss / n:.4f}", val_f1=f"{f1:.4f}", thr=thr)
            print(f"{name} epoch {epoch:3d}: train BCE {run_loss / n:.5f}  val BCE {hist['val_loss'][-1]:.5f}  "
                  f"val F1 {f1:.4f} (threshold {thr:.2f})  fwd it {f_it / n:.1f} (max {f_max})  "
                  f"bwd it {b_it / n:.1f} (max {b_max})  {sw.seconds:.1f} s", flush=True)
    hist["seconds"] = total.seconds

    # The test set, once per model: at the final epoch, and at the epoch/threshold chosen on validation.
    prob_last, _ = predict(model, data["x_te"])
    hist["test_f1_last_epoch"] = example_f1(prob_last, data["y_te"], hist["val_threshold"][-1])
    model.load_state_dict(best["state"])
    prob, rec = predict(model, data["x_te"])
    iters = rec["iterations"]
    hist.update({
        "chosen_epoch": best["epoch"], "chosen_threshold": best["threshold"], "chosen_val_f1": best["val_f1"],
        "test_f1": example_f1(prob, data["y_te"], best["threshold"]),
        "test_bce": float(bce(prob, data["y_te"])),
        "test_forward_mean_iterations": float(np.mean(iters)), "test_forward_max_iterations": int(max(iters)),
        "test_forward_not_converged": rec["not_converged"], "lr": lr, "epochs": epochs,
        "solve": model.solve_settings.as_dict(), "backward": model.backward_settings.as_dict(),
    })
    print(f"{name}: chosen epoch {best['epoch']} threshold {best['threshold']:.2f} (val F1 {best['val_f1']:.4f}) "
          f"-> test F1 {hist['test_f1']:.4f}; last epoch test F1 {hist['test_f1_last_epoch']:.4f}; "
          f"{total.seconds:.0f} s", flush=True)
    if args.save_checkpoints:
        torch.save(best["state"], Path(args.out) / f"{name}.pt")
    return hist


def main() -> None:
    p = parser(__doc__.splitlines()[0], "bibtex")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="FPI_NN's Adam learning rate")
    p.add_argument("--gd-epochs", type=int, default=8, help="FPI_GD's epochs (its solves cost 5-100x FPI_NN's)")
    p.add_argument("--gd-lr", type=float, default=1e-3, help="FPI_GD's Adam learning rate")
    p.add_argument("--gd-schedule", choices=["constant", "cosine"], default="constant",
                   help="FPI_GD's learning rate: constant, or cosine-annealed to 0 over its epochs")
    p.add_argument("--solver", choices=["anderson", "spec"], default="anderson",
                   help="anderson: the spec's settings with method=anderson forward and backward; spec: unchanged")
    p.add_argument("--gd-max-iter", type=int, default=2000,
                   help="FPI_GD's max_iter, forward and backward (the spec's default: 500)")
    p.add_argument("--prior-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="start fc2.bias at the label log-odds of the training rows")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="last rows of the training file held out")
    p.add_argument("--models", nargs="+", default=["FPI_NN", "FPI_GD"], choices=["FPI_NN", "FPI_GD"])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--save-checkpoints", action="store_true", help="save the chosen state_dicts in --out")
    args = p.parse_args()
    out = setup(args)

    raw = load_bibtex(args.data_dir)
    x_train = torch.from_numpy(raw["x_train"]).float()
    y_train = torch.from_numpy(raw["y_train"]).float()
    n_val = int(round(args.val_fraction * x_train.shape[0]))
    n_fit = x_train.shape[0] - n_val
    data = {"x_tr": x_train[:n_fit], "y_tr": y_train[:n_fit], "x_va": x_train[n_fit:], "y_va": y_train[n_fit:],
            "x_te": torch.from_numpy(raw["x_test"]).float(), "y_te": torch.from_numpy(raw["y_test"]).float()}
    if args.quick:
        args.epochs, args.gd_epochs = min(args.epochs, 1), min(args.gd_epochs, 1)
        data.update(x_tr=data["x_tr"][:256], y_tr=data["y_tr"][:256], x_va=data["x_va"][:128],
                    y_va=data["y_va"][:128], x_te=data["x_te"][:256], y_te=data["y_te"][:256])
    sizes = {k: int(v.shape[0]) for k, v in data.items() if k.startswith("x_")}
    print(f"Bibtex: train {sizes['x_tr']}, validation {sizes['x_va']}, test {sizes['x_te']} rows; "
          f"{N_FEATURES} features, {N_LABELS} labels; labels per row {float(y_train.sum(1).mean()):.2f}", flush=True)

    classes = {"FPI_NN": "BibtexNN", "FPI_GD": "BibtexGD"}
    results = {
        "experiment": "bibtex", "spec": SPEC,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {**sizes, "source": f"{PACKAGE} (win_amd64 wheel), {WHEEL_DIR}bibtex-{{train,test}}.arff",
                 "validation": f"the last {n_val} rows of bibtex-train.arff",
                 "rows_without_labels_test": int((data["y_te"].sum(1) == 0).sum())},
        "metric": "example-based F1 averaged over examples, 2|y∩ŷ|/(|y|+|ŷ|), 0/0 := 1; threshold on a 0.01..0.95 "
                  "grid and epoch chosen by validation F1",
        "references": {"FPI_NN": 0.434, "FPI_GD": 0.432},
        "models": {},
    }
    overrides = {"method": "anderson"} if args.solver == "anderson" else {}
    per_model = {"FPI_NN": overrides, "FPI_GD": {**overrides, "max_iter": args.gd_max_iter}}
    results["solver_overrides"] = {n: {"solve": per_model[n], "backward": per_model[n]} for n in args.models}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = fpidsl.load(SPEC, name=classes[name])(solve=per_model[name], backward=per_model[name])
        if args.prior_bias:
            freq = data["y_tr"].mean(0).clamp(1e-3, 1 - 1e-3)
            with torch.no_grad():
                model.fc2.bias.copy_(torch.log(freq / (1 - freq)))
        lr, epochs, schedule = ((args.gd_lr, args.gd_epochs, args.gd_schedule) if name == "FPI_GD"
                                else (args.lr, args.epochs, "constant"))
        results["models"][name] = train_one(name, model, data, args, lr, epochs, schedule)
        write_json(out / "results.json", results)  # after every model, so a long run leaves partial results

    write_json(out / "results.json", results)
    models = results["models"]
    plot_curves(out / "bibtex.png", [
        {"title": "training BCE", "xlabel": "epoch", "ylabel": "BCE",
         "series": {n: (range(1, len(h["train_loss"]) + 1), h["train_loss"]) for n, h in models.items()},
         "logy": True},
        {"title": "validation F1 (threshold chosen per epoch)", "xlabel": "epoch", "ylabel": "example F1",
         "series": {n: (range(1, len(h["val_f1"]) + 1), h["val_f1"]) for n, h in models.items()}},
    ], title="Bibtex multi-label classification")
    print(f"wrote {out / 'results.json'} and {out / 'bibtex.png'}")


if __name__ == "__main__":
    main()
