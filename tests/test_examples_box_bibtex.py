"""The --quick modes of examples/box_projection.py and examples/bibtex.py run and write sane results.

Each script runs in a subprocess with the venv's python (this interpreter), cwd = the repository root and one
thread. No timing asserts. The Bibtex test needs the data (the cached arrays in ~/.cache/fpidsl/bibtex/, or the
package registry to download them); without either it is skipped, saying why.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(script: str, out: Path, *extra: str, timeout: float = 300) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(EXAMPLES / script), "--quick", "--no-progress", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    path = out / "results.json"
    assert path.is_file(), f"no results.json in {out}"
    return json.loads(path.read_text())


def finite(values) -> bool:
    values = values if isinstance(values, list) else [values]
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def check_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


@pytest.mark.slow
def test_box_projection_quick(tmp_path):
    res = run_example("box_projection.py", tmp_path, "--gd-converged")
    assert res["experiment"] == "box_projection"
    models = res["models"]
    assert set(models) == {"FPI_NN", "FPI_GD", "Feedforward", "FPI_GD (Anderson forward)"}
    epochs = res["config"]["epochs"]
    for name, hist in models.items():
        for key in ("train_mse", "test_mse"):
            assert len(hist[key]) == epochs + 1, (name, key)  # epoch 0 = untrained
            assert finite(hist[key]), (name, key, hist[key])
        assert finite(hist["batch_loss"]) and len(hist["batch_loss"]) == epochs
        assert finite([hist["final_train_mse"], hist["final_test_mse"]])
    for name in ("FPI_NN", "FPI_GD"):
        solver = models[name]["solver"]
        assert len(solver) == epochs
        for entry in solver:
            assert finite([entry["forward_mean_iterations"], entry["backward_mean_iterations"],
                           entry["forward_fraction_ok"], entry["backward_fraction_ok"]])
        assert models[name]["settings"]["solve"]["method"] in ("picard", "anderson")
    assert set(res["claim_fpi_below_feedforward"]) == set(models) - {"Feedforward"}
    check_png(tmp_path / "box_projection.png")


# ------------------------------------------------------------------------------------------------ Bibtex


def bibtex_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import bibtex  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    return bibtex


def test_sparse_arff_parser():
    bib = bibtex_module()
    text = """% a comment
@relation toy
@attribute 'a b' {0,1}
@attribute c numeric
@ATTRIBUTE TAG_x {0,1}

@data
{0 1,2 1}
{}
0,2.5,1
{1 3}
"""
    names, data = bib.parse_arff(text)
    assert names == ["a b", "c", "TAG_x"]
    np.testing.assert_array_equal(data, [[1, 0, 1], [0, 0, 0], [0, 2.5, 1], [0, 3, 0]])
    with pytest.raises(bib.ArffError):
        bib.parse_arff("@relation r\n@attribute a numeric\n@data\n{0 1\n")
    with pytest.raises(bib.ArffError):
        bib.parse_arff("@relation r\n@attribute a numeric\n@attribute b numeric\n@data\n1\n")


def test_example_f1():
    import torch

    bib = bibtex_module()
    target = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    prob = torch.tensor([[0.9, 0.2, 0.8, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.1]])
    # row 0: |y|=2, |ŷ|=2, ∩=1 -> 0.5; row 1: 1.0; row 2: 0/0 := 1
    assert bib.example_f1(prob, target, 0.5) == pytest.approx((0.5 + 1 + 1) / 3)
    thr, f1, scores = bib.best_threshold(prob, target)
    assert len(scores) == 95 and f1 == max(scores)
    # thresholds in (0.1, 0.2] add label 1 to row 0 (F1 0.8) and keep row 2 empty; the grid's lowest such is 0.11
    assert thr == 0.11 and f1 == pytest.approx((0.8 + 1 + 1) / 3)


def _bibtex_data_available() -> str | None:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fpidsl" / "bibtex"
    if (cache / "bibtex.npz").exists() or list(cache.glob("structured_predictions-0.1.2-*.whl")):
        return None
    return f"the Bibtex data is not in {cache}; run examples/bibtex.py once with network access to the registry"


@pytest.mark.slow
def test_bibtex_quick(tmp_path):
    reason = _bibtex_data_available()
    if reason:
        pytest.skip(reason)
    res = run_example("bibtex.py", tmp_path, "--gd-schedule", "cosine", "--gd-max-iter", "700")
    assert res["experiment"] == "bibtex"
    assert res["config"]["gd_schedule"] == "cosine"
    assert res["models"]["FPI_GD"]["solve"]["max_iter"] == res["models"]["FPI_GD"]["backward"]["max_iter"] == 700
    assert res["models"]["FPI_NN"]["solve"]["max_iter"] == 500  # the runtime's default, unchanged
    assert set(res["models"]) == {"FPI_NN", "FPI_GD"}
    for name, hist in res["models"].items():
        epochs = hist["epochs"]
        for key in ("train_loss", "val_f1", "val_threshold", "val_loss", "forward_mean_iterations",
                    "backward_mean_iterations"):
            assert len(hist[key]) == epochs and finite(hist[key]), (name, key, hist[key])
        for key in ("test_f1", "test_f1_last_epoch", "chosen_val_f1", "chosen_threshold", "test_bce", "lr"):
            assert finite(hist[key]), (name, key, hist[key])
        assert 0.0 <= hist["test_f1"] <= 1.0
        assert 0.01 <= hist["chosen_threshold"] <= 0.95
        assert 1 <= hist["chosen_epoch"] <= epochs
    assert res["references"] == {"FPI_NN": 0.434, "FPI_GD": 0.432}
    check_png(tmp_path / "bibtex.png")
