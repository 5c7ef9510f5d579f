"""Helpers shared by the example scripts (examples/*.py): seeding, output folder, JSON, progress bars, plots.

The API is small on purpose; every example script imports what it needs from here:

``parser(description, experiment)``
    an ``argparse.ArgumentParser`` with the options every example has: ``--quick`` (a tiny run, for tests),
    ``--out`` (default ``out/<experiment>``), ``--seed`` (default 0), ``--threads`` (torch intra-op threads,
    default 1) and ``--no-progress``. Add the script's own options to it.
``setup(args) -> Path``
    applies ``--threads`` and ``--seed`` (:func:`seed_everything`) and creates ``--out``; returns it as a Path.
``seed_everything(seed)``
    seeds ``random``, numpy and torch.
``progress(iterable, desc, **kw)``
    a tqdm progress bar on stderr (``disable=True`` hides it; :func:`setup` stores ``--no-progress``).
``write_json(path, obj)``
    writes ``obj`` as indented JSON; numpy and torch scalars/arrays become plain numbers/lists, and a
    non-finite float is written as ``null`` (strict JSON) — a test can treat ``null`` as "not finite".
``plot_curves(path, panels, title=None)``
    one PNG (matplotlib, Agg backend) with one panel per entry of ``panels``; a panel is a dict with keys
    ``title``, ``xlabel``, ``ylabel``, ``series`` (``{label: list of y}`` or ``{label: (xs, ys)}``) and optional
    ``logy`` (bool).
``Stopwatch``
    ``with Stopwatch() as sw: ...`` then ``sw.seconds`` (wall time).

Nothing here imports fpidsl; the scripts load their layers with ``fpidsl.load`` themselves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

_PROGRESS = {"disable": False}


def parser(description: str, experiment: str, out: Path | None = None) -> argparse.ArgumentParser:
    """The common command-line options of an example (see the module docstring); ``out``: the default of
    ``--out`` when it is not ``out/<experiment>``."""
    out = Path("out") / experiment if out is None else out
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds): smaller data, fewer epochs")
    p.add_argument("--out", type=Path, default=out, help=f"folder for the results JSON and the plot (default {out})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(args: argparse.Namespace) -> Path:
    """Apply ``--threads``, ``--seed`` and ``--no-progress``; create ``--out`` and return it."""
    torch.set_num_threads(max(1, int(args.threads)))
    seed_everything(args.seed)
    _PROGRESS["disable"] = bool(getattr(args, "no_progress", False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def progress(iterable: Iterable, desc: str = "", **kw: Any):
    """A tqdm progress bar (on stderr; ``--no-progress`` or ``disable=True`` hides it)."""
    from tqdm import tqdm

    kw.setdefault("disable", _PROGRESS["disable"])
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, file=sys.stderr, **kw)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return _plain(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (non-finite floats become ``null``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")
    return path


def plot_curves(path: str | os.PathLike, panels: Sequence[Mapping[str, Any]], title: str | None = None,
                dpi: int = 90) -> Path:
    """Write a PNG with one panel per entry of ``panels`` (see the module docstring); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, ys in panel["series"].items():
            if isinstance(ys, tuple) and len(ys) == 2:
                xs, ys = ys
            else:
                xs = list(range(len(ys)))
            ax.plot(list(xs), [float("nan") if y is None else y for y in ys], label=label, lw=1.5)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


class Stopwatch:
    """``with Stopwatch() as sw: ...``; ``sw.seconds`` is the wall time (also readable inside the block)."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self._end: float | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self._end if self._end is not None else time.perf_counter()) - self.start
