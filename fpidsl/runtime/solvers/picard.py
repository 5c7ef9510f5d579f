"""Picard iteration: x_{n+1} = g(x_n), the paper's forward and backward solver; damped with ``beta < 1``:
x_{n+1} = (1 - beta) x_n + beta g(x_n)."""
from __future__ import annotations

from torch import Tensor


class Picard:
    """The plain (or damped) fixed-point step. It keeps no state."""

    def __init__(self, beta: float = 1.0):
        self.beta = beta

    def init(self, x: Tensor) -> None:
        return None

    def step(self, x: Tensor, g: Tensor, state: None, f: Tensor | None = None) -> tuple[Tensor, None]:
        if self.beta == 1.0:
            return g, None
        return x + self.beta * (g - x if f is None else f), None

    def select(self, state: None, keep: Tensor) -> None:
        return None
