"""The denoising and optical-flow examples (experiments 3 and 4): each script's --quick mode runs end to end and
writes a results JSON with the expected keys and finite numbers, and its pictures; the image split is DATA.md's."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_quick(script: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", "--no-progress", "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads((out / "results.json").read_text())


def assert_finite(value, where: str) -> None:
    assert value is not None and isinstance(value, (int, float)) and math.isfinite(value), f"{where} = {value!r}"


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["DenoiseNN", "DenoiseResNN"])
def test_denoise_quick(tmp_path: Path, layer: str) -> None:
    res = run_quick("denoise.py", tmp_path, "--layer", layer)
    assert res["experiment"] == "denoise" and res["config"]["layer"] == layer
    assert res["split"]["test_crops"] == 4 and res["split"]["train_crops"] == len(res["split"]["train_images"])
    assert res["parameters"]["fpi"] == res["parameters"]["ff"] == 2 * 32 * 9 + 32 + 32 * 9 + 1
    assert set(res["results"]) == {"15", "50"}
    for sigma, r in res["results"].items():
        for key in ("noisy_psnr", "tv_psnr", "tv_weight", "ff_psnr", "fpi_psnr", "fpi_minus_ff", "fpi_minus_tv"):
            assert_finite(r[key], f"results[{sigma}][{key}]")
        # unclipped Gaussian noise: the noisy PSNR is close to 20 log10(255 / sigma)
        assert abs(r["noisy_psnr"] - 20 * math.log10(255 / float(sigma))) < 0.2
        assert r["noisy_psnr_reference"] == {"15": 24.61, "50": 14.15}[sigma]
        for key in ("seconds", "forward_iterations_max", "backward_iterations_max"):
            assert_finite(r["fpi_train"][key], f"fpi_train[{key}]")
        assert_finite(r["fpi_eval"]["forward_iterations_max"], "fpi_eval iterations")
    assert [row["sigma"] for row in res["table"]] == ["15", "50"]
    for name in ("denoise.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.slow
def test_optical_flow_quick(tmp_path: Path) -> None:
    res = run_quick("optical_flow.py", tmp_path)
    assert res["experiment"] == "optical_flow"
    assert set(res["comparison"]) == {"base", "ff", "fpi"}
    for name, c in res["comparison"].items():
        for key in ("val_epe", "val_epe_vs_base", "parameters", "seconds_per_epoch", "time_vs_base", "motorcycle_epe"):
            assert_finite(c[key], f"comparison[{name}][{key}]")
    # the refinement adds the FlowRefineNN parameters only: down 4*4*9+4, up 4*2*4*4+2
    assert res["comparison"]["ff"]["extra_parameters"] == res["comparison"]["fpi"]["extra_parameters"] == 278
    for name, r in res["results"].items():
        assert len(r["val_epe"]) == res["config"]["epochs"] + 1  # before training, then after every epoch
        for i, v in enumerate(r["val_epe"] + r["train_epe"] + r["epoch_seconds"]):
            assert_finite(v, f"results[{name}] entry {i}")
    assert res["fpi_settings"]["dtype"] == "float64" and res["fpi_settings"]["solve"]["tol"] == 1e-13
    # the ground truth is consistent with the frames: warping frame 2 back with it matches frame 1 better than no flow
    for check in (res["data_check"], res["motorcycle_check"]):
        assert check["photometric_error_gt_warp"] < 0.6 * check["photometric_error_zero_flow"]
    for name in ("epe.png", "flow.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_denoise_split() -> None:
    """DATA.md's split: 24 test crops of 180x180 from six images, on the 8-bit grid; seeded training crops."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import images
    finally:
        sys.path.remove(str(EXAMPLES))
    test = images.test_crops()
    assert test.shape == (24, 180, 180) and test.min() >= 0 and test.max() <= 1
    assert abs(test * 255 - (test * 255).round()).max() < 1e-4
    assert set(images.TEST_IMAGES).isdisjoint(images.TRAIN_IMAGES)
    assert len(images.TEST_IMAGES) + len(images.TRAIN_IMAGES) == len(images.ALL_IMAGES) == 24
    a, b = images.train_crops(1, seed=3, images=("moon", "aero")), images.train_crops(1, seed=3, images=("moon", "aero"))
    assert a.shape == (2, 180, 180) and (a == b).all()
