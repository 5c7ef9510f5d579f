"""Real images from installed packages, and the denoising split of /work/shared/DATA.md.

Every image here ships inside a package, so nothing is fetched at run time except sporco's wheel (once):

=====================  ==============================================================================
package                images
=====================  ==============================================================================
scikit-image           ``skimage.data``: camera, moon, coins, clock, brick, grass, gravel (gray);
                       astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry,
                       stereo_motorcycle (RGB; the left frame)
PyWavelets             ``pywt.data``: ascent, aero
sporco                 ``sporco/data/*.png``: barbara, kodim23, monarch, sail, tulips — read from the wheel
                       (``pip download --no-deps``, never installed), cached in ``~/.cache/fpidsl/images/``
matplotlib             sample data: grace_hopper
scikit-learn           ``load_sample_image``: china, flower
=====================  ==============================================================================

``load(name)`` returns the image as uint8 (H, W) or (H, W, 3); ``gray(name)`` as float64 in [0, 1] on the 8-bit
grid (``rgb2gray``, rounded to 8-bit levels, / 255). ``test_crops()`` and ``train_crops(n, seed)`` are the
denoising split: test = a 2x2 grid of 180x180 crops from the centre 360x360 of each of ``TEST_IMAGES`` (24 crops),
train = seeded random 180x180 crops of the other images. A missing package raises :class:`ImageSourceError`
naming it.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

SKIMAGE_GRAY = ("camera", "moon", "coins", "clock", "brick", "grass", "gravel")
SKIMAGE_RGB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "stereo_motorcycle")
PYWT = ("ascent", "aero")
SPORCO = ("barbara", "kodim23", "monarch", "sail", "tulips")
MATPLOTLIB = ("grace_hopper",)
SKLEARN = ("china", "flower")

ALL_IMAGES: tuple[str, ...] = SKIMAGE_GRAY + SKIMAGE_RGB + PYWT + SPORCO + MATPLOTLIB + SKLEARN
TEST_IMAGES: tuple[str, ...] = ("camera", "astronaut", "coffee", "ascent", "kodim23", "monarch")
TRAIN_IMAGES: tuple[str, ...] = tuple(n for n in ALL_IMAGES if n not in TEST_IMAGES)

CROP = 180
SPORCO_REQUIREMENT = "sporco==0.2.2.post1"  # only its wheel is downloaded; the PNGs are read from the zip
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fpidsl" / "images"


class ImageSourceError(RuntimeError):
    """An image's package is missing (or sporco's wheel could not be fetched); the message names the package."""


def _need(module: str, package: str, image: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImageSourceError(
            f"image {image!r} comes from the package {package!r}, which is not installed ({exc}); "
            f"install it (pip install {package}) or use another image"
        ) from None


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def sporco_wheel() -> Path:
    """sporco's wheel in the cache, downloaded once with ``pip download --no-deps`` (never installed)."""
    wheels = sorted(CACHE.glob("sporco-*.whl"))
    if wheels:
        return wheels[-1]
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           SPORCO_REQUIREMENT, "-d", str(CACHE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(CACHE.glob("sporco-*.whl"))
    if proc.returncode or not wheels:
        raise ImageSourceError(
            f"the images {', '.join(SPORCO)} come from the package 'sporco' (its wheel's sporco/data/*.png), and "
            f"downloading the wheel failed: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
        )
    return wheels[-1]


def _sporco(name: str) -> np.ndarray:
    png = CACHE / f"{name}.png"
    if not png.exists():
        with zipfile.ZipFile(sporco_wheel()) as whl:
            data = whl.read(f"sporco/data/{name}.png")
        tmp = png.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(png)  # atomic: concurrent runs never see half a file
    return _decode(png.read_bytes())


@lru_cache(maxsize=None)
def _load(name: str) -> np.ndarray:
    if name in SKIMAGE_GRAY or name in SKIMAGE_RGB:
        data = _need("skimage.data", "scikit-image", name)
        img = getattr(data, name)()
        return img[0] if name == "stereo_motorcycle" else img
    if name in PYWT:
        return getattr(_need("pywt.data", "PyWavelets", name), name)()
    if name in SPORCO:
        return _sporco(name)
    if name in MATPLOTLIB:
        cbook = _need("matplotlib.cbook", "matplotlib", name)
        with cbook.get_sample_data(f"{name}.jpg") as f:
            return _decode(f.read())
    if name in SKLEARN:
        datasets = _need("sklearn.datasets", "scikit-learn", name)
        return datasets.load_sample_image(f"{name}.jpg")
    raise KeyError(f"unknown image {name!r}; known: {', '.join(ALL_IMAGES)}")


def load(name: str) -> np.ndarray:
    """The image ``name`` as shipped: uint8, (H, W) or (H, W, 3). A read-only array (cached)."""
    img = np.asarray(_load(name))
    if img.dtype != np.uint8:
        raise ImageSourceError(f"image {name!r} is {img.dtype}, expected uint8")
    img.flags.writeable = False
    return img


def gray(name: str) -> np.ndarray:
    """``name`` in gray, float64 in [0, 1] on the 8-bit grid: ``round(255 * rgb2gray(rgb)) / 255``."""
    img = load(name)
    if img.ndim == 2:
        return img.astype(np.float64) / 255.0
    from skimage.color import rgb2gray

    return np.round(rgb2gray(img) * 255.0) / 255.0


def rgb(name: str) -> np.ndarray:
    """``name`` as float64 RGB in [0, 1] (a gray image repeated in three channels)."""
    img = load(name).astype(np.float64) / 255.0
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img


def centre_grid(img: np.ndarray, size: int = CROP, grid: int = 2) -> list[np.ndarray]:
    """The ``grid x grid`` crops of ``size`` that tile the centre ``grid*size`` square of ``img``, row by row."""
    h, w = img.shape[:2]
    side = grid * size
    if h < side or w < side:
        raise ValueError(f"image of {h}x{w} is smaller than the {side}x{side} centre region")
    top, left = (h - side) // 2, (w - side) // 2
    return [img[top + i * size: top + (i + 1) * size, left + j * size: left + (j + 1) * size]
            for i in range(grid) for j in range(grid)]


def test_crops() -> np.ndarray:
    """The 24 test crops (6 images x 2x2 centre grid), float32, shape (24, 180, 180), in TEST_IMAGES order."""
    return np.stack([c for n in TEST_IMAGES for c in centre_grid(gray(n))]).astype(np.float32)


def train_crops(per_image: int, seed: int = 0, images: tuple[str, ...] = TRAIN_IMAGES) -> np.ndarray:
    """``per_image`` random 180x180 crops of each training image (seeded), float32, (N, 180, 180)."""
    rng = np.random.default_rng(seed)
    crops = []
    for name in images:
        img = gray(name)
        h, w = img.shape
        for _ in range(per_image):
            top, left = rng.integers(0, h - CROP + 1), rng.integers(0, w - CROP + 1)
            crops.append(img[top: top + CROP, left: left + CROP])
    return np.stack(crops).astype(np.float32)


if __name__ == "__main__":  # list every image: python examples/images.py
    for n in ALL_IMAGES:
        im = load(n)
        split = "test" if n in TEST_IMAGES else "train"
        print(f"{n:22s} {str(im.shape):16s} {split}")
