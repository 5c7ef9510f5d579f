"""Convergence pictures from a layer's stats."""
from __future__ import annotations

import builtins

import pytest
import torch

import fpidsl


def test_plot_convergence_writes_a_png(tmp_path):
    layer = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")(history=True)
    layer(torch.randn(4, 10)).sum().backward()
    assert layer.stats.forward.history is not None and layer.stats.backward.history is not None
    path = tmp_path / "conv.png"
    fpidsl.plot_convergence(layer.stats, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_without_history_the_error_says_how(tmp_path):
    layer = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")()
    layer(torch.randn(2, 10))
    with pytest.raises(ValueError, match="history=True"):
        fpidsl.plot_convergence(layer.stats, str(tmp_path / "x.png"))


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"pip install 'fpidsl\[plot\]'"):
        fpidsl.plot_convergence(None, str(tmp_path / "x.png"))
