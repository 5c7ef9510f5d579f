"""The workloads of the benchmarks: each is a compiled spec, the same map written by hand, inputs, weights and a loss.

A workload gives every contender the same thing: the map g (the compiled layer's ``step``, and a hand-written
``hand(x, z, *params)`` computing the same numbers), the same parameter tensors, the same input batch and target,
the same start (zeros) and the same tolerance and stopping criterion (``absolute``: ``|g(x) - x|`` per sample,
which torchdeq's ``stop_mode='abs'`` computes identically).

- ``conv{16,32}-{slow,fast}``: ``g = conv2(relu(conv1(cat([x, z]))))`` on batch 8 of 1x64x64 images
  (benchmarks/specs/conv.fpi), conv2's weight rescaled (a few damped steps) until Picard from zero needs about
  100 steps to the tolerance (slow: asymptotic rate about 0.9) or about 20 (fast: about 0.55);
- ``bibtex-nn``: FPI_NN of specs/bibtex.fpi, batch 32, 1836 -> 512 -> 159 (sigmoid output);
- ``bibtex-gd``: FPI_GD of specs/bibtex.fpi (one gradient step on a learned energy), same sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fpidsl.loader import load

ROOT = Path(__file__).resolve().parents[1]
CONV_SPEC = ROOT / "benchmarks" / "specs" / "conv.fpi"
BIBTEX_SPEC = ROOT / "specs" / "bibtex.fpi"


@dataclass
class Workload:
    name: str
    description: str
    layer: torch.nn.Module  # the compiled layer (its parameters are the weights every contender uses)
    hand: Callable[..., torch.Tensor]  # hand(x, z, *params): the same map, written by hand
    z: torch.Tensor
    target: torch.Tensor
    tol: float  # forward tolerance (absolute criterion)
    b_tol: float  # backward tolerance (absolute criterion)
    max_iter: int = 1000
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(default=None)

    def __post_init__(self) -> None:
        if self.loss is None:
            self.loss = lambda out, target: 0.5 * (out - target).square().sum() / out.shape[0]

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.layer.parameter_tensors())

    def x0(self) -> torch.Tensor:
        return torch.zeros_like(self.target)

    def module(self) -> nn.Module:
        """The map as a hand-written ``nn.Module`` ``m(x, z)`` (what a torchdeq user has), holding copies of the
        workload's weights."""
        kind = {"conv": ConvModule, "bibtex-nn": BibtexNNModule, "bibtex-gd": BibtexGDModule}[
            "conv" if self.name.startswith("conv") else self.name]
        w1 = self.params[0]
        module = kind(w1.shape[1] - 1, w1.shape[0]) if kind is ConvModule else kind(self.target.shape[1],
                                                                                    self.z.shape[1], w1.shape[0])
        with torch.no_grad():
            for mine, theirs in zip(module.parameters(), self.params):
                mine.copy_(theirs)
        return module.to(w1.device)

    def to(self, device: torch.device | str) -> "Workload":
        """The workload on ``device`` (its layer moved, the same weights and inputs)."""
        self.layer.to(device)
        self.z, self.target = self.z.to(device), self.target.to(device)
        return self

    def output(self, x_hat: torch.Tensor) -> torch.Tensor:
        """What the loss sees: the layer's output computed from the fixed point (hand-written contenders)."""
        return torch.sigmoid(x_hat) if self.name == "bibtex-gd" else x_hat

    def settings(self, method: str, iterations: int | None = None) -> tuple[dict, dict]:
        """fpidsl's forward and backward settings for ``method``; ``iterations`` forces exactly that many."""
        common = {"method": method, "criterion": "absolute", "on_fail": "warn", "min_iter": 0}
        if method == "anderson":
            common.update(m=6, beta=1.0, lam=1e-4)  # torchdeq's defaults (m=6, tau=1)
        forward = {**common, "tol": self.tol, "max_iter": self.max_iter}
        backward = {**common, "tol": self.b_tol, "max_iter": self.max_iter}
        if iterations is not None:
            for s in (forward, backward):
                s.update(min_iter=iterations, max_iter=iterations, on_fail="ignore")
        return forward, backward


# ---------------------------------------------------------------------------------------------- hand-written maps


def conv_map(x, z, w1, b1, w2, b2):
    return F.conv2d(F.relu(F.conv2d(torch.cat([x, z], dim=1), w1, b1, padding=1)), w2, b2, padding=1)


def bibtex_nn_map(y, x, w1, b1, w2, b2):
    return torch.sigmoid(F.linear(F.relu(F.linear(torch.cat([y, x], dim=-1), w1, b1)), w2, b2))


def bibtex_gd_map(y, x, w1, b1, w2, b2):
    """``y - grad_y E`` with ``E = mean((y - fc2(relu(fc1([sigmoid(y), x]))))^2)``, the gradient written out."""
    p = torch.sigmoid(y)
    pre = F.linear(torch.cat([p, x], dim=-1), w1, b1)
    r = y - F.linear(F.relu(pre), w2, b2)
    dr = r * (2.0 / y.shape[-1])  # dE/dr
    back = ((-dr) @ w2) * (pre > 0).to(y.dtype)
    grad = dr + (back @ w1)[:, : y.shape[-1]] * (p * (1 - p))
    return y - grad


class ConvModule(nn.Module):
    """:func:`conv_map` as a module: ``conv2(relu(conv1(cat([x, z]))))``."""

    def __init__(self, z_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1 + z_channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x, z):
        return self.conv2(F.relu(self.conv1(torch.cat([x, z], dim=1))))


class BibtexNNModule(nn.Module):
    """:func:`bibtex_nn_map` as a module."""

    def __init__(self, labels: int, features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(labels + features, hidden)
        self.fc2 = nn.Linear(hidden, labels)

    def forward(self, y, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([y, x], dim=-1)))))


class BibtexGDModule(BibtexNNModule):
    """:func:`bibtex_gd_map` as a module (one gradient step on the energy, the gradient written out), the number
    of labels a Python number (``fpidsl.trace`` does not trace arithmetic on ``y.shape``)."""

    def forward(self, y, x):
        labels = self.fc2.out_features
        p = torch.sigmoid(y)
        pre = self.fc1(torch.cat([p, x], dim=-1))
        dr = (y - self.fc2(F.relu(pre))) * (2.0 / labels)  # dE/dr
        back = ((-dr) @ self.fc2.weight) * (pre > 0)
        return y - (dr + (back @ self.fc1.weight)[:, :labels] * (p * (1 - p)))


# ---------------------------------------------------------------------------------------------- construction


def _rate(layer, z) -> tuple[float, int]:
    """The asymptotic convergence rate of Picard from zero (geometric mean of the residual ratios over the
    second half of the run) and the number of steps to the tolerance."""
    layer.history = True
    with torch.no_grad():
        layer(z)
    layer.history = False
    hist = layer.stats.forward.history.nan_to_num(0).max(dim=1).values
    n = int(layer.stats.forward.iterations.max())
    lo = max(1, n // 2)
    rate = float((hist[n - 1] / hist[lo - 1]) ** (1.0 / max(1, n - lo)))
    return rate, n


def _conv(channels: int, speed: str, batch: int, size: int, seed: int) -> Workload:
    torch.manual_seed(seed)
    cls = load(str(CONV_SPEC), f"ConvMap{channels}")
    layer = cls()
    z = torch.randn(batch, 1, size, size)
    target = torch.randn(batch, 1, size, size)
    want = 100 if speed == "slow" else 20  # Picard steps to tol from zero
    tol = 1e-4
    layer.solve_settings = layer.solve_settings.merged({"tol": tol, "criterion": "absolute", "max_iter": 5000})
    for _ in range(7):  # the Jacobian scales with conv2's weight: rescale it (damped) to the wanted step count
        rate, n = _rate(layer, z)
        with torch.no_grad():
            layer.conv2.weight.mul_(rate ** (0.6 * (n / want - 1.0)))
    rate, _ = _rate(layer, z)
    layer = _reset_settings(layer)
    return Workload(
        name=f"conv{channels}-{speed}",
        description=f"conv, batch {batch}, 1x{size}x{size}, {channels} channels, Picard rate {rate:.2f}",
        layer=layer, hand=conv_map, z=z, target=target, tol=tol, b_tol=1e-4,
    )


def _reset_settings(layer):
    from fpidsl.runtime.settings import BACKWARD_DEFAULTS, FORWARD_DEFAULTS

    layer.solve_settings = FORWARD_DEFAULTS.merged(layer.SOLVE)
    layer.backward_settings = BACKWARD_DEFAULTS.merged(layer.BACKWARD)
    return layer


def _bibtex(kind: str, batch: int, seed: int) -> Workload:
    torch.manual_seed(seed)
    name = {"nn": "BibtexNN", "gd": "BibtexGD"}[kind]
    layer = load(str(BIBTEX_SPEC), name)()
    x = (torch.rand(batch, 1836) < 0.05).float()  # sparse binary features, like Bibtex's
    target = (torch.rand(batch, 159) < 0.1).float()
    hand = bibtex_nn_map if kind == "nn" else bibtex_gd_map
    description = {"nn": f"FPI_NN Bibtex, batch {batch}, 1836 -> 512 -> 159",
                   "gd": f"FPI_GD Bibtex, batch {batch}, energy 1836 -> 512 -> 159, step 1.0"}[kind]
    return Workload(name=f"bibtex-{kind}", description=description, layer=layer, hand=hand, z=x, target=target,
                    tol=1e-5 if kind == "nn" else 1e-4, b_tol=1e-6 if kind == "nn" else 1e-5, max_iter=3000)


FULL = {
    "conv16-slow": lambda: _conv(16, "slow", batch=8, size=64, seed=0),
    "conv32-slow": lambda: _conv(32, "slow", batch=8, size=64, seed=1),
    "conv16-fast": lambda: _conv(16, "fast", batch=8, size=64, seed=0),
    "conv32-fast": lambda: _conv(32, "fast", batch=8, size=64, seed=1),
    "bibtex-nn": lambda: _bibtex("nn", batch=32, seed=2),
    "bibtex-gd": lambda: _bibtex("gd", batch=32, seed=3),
}
QUICK = {
    "conv16-slow": lambda: _conv(16, "slow", batch=2, size=12, seed=0),
    "bibtex-nn": lambda: _bibtex("nn", batch=4, seed=2),
}


def make_workloads(quick: bool, names: list[str] | None = None) -> list[Workload]:
    """The workloads (all, or those ``names``), full size or ``quick``'s tiny ones."""
    builders = QUICK if quick else FULL
    unknown = sorted(set(names or ()) - set(builders))
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; known: {', '.join(builders)}")
    return [build() for name, build in builders.items() if names is None or name in names]
