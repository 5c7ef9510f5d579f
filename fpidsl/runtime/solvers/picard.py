"""Picard iteration: x_{n+1} = g(x_n), the paper's forward and backward solver."""
from __future__ import annotations

from torch import Tensor


class Picard:
    """The plain fixed-point step. It keeps no state; ``m``, ``beta`` and ``lam`` do not apply."""

    def init(self, x: Tensor) -> None:
        return None

    def step(self, x: Tensor, g: Tensor, state: None) -> tuple[Tensor, None]:
        return g, None

    def select(self, state: None, keep: Tensor) -> None:
        return None
