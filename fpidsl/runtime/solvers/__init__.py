"""Fixed-point solvers: small interchangeable pieces with one signature.

A solver works on the flattened states of the samples still running, ``x`` of shape ``(batch, dim)``
(one row a sample), and never on a sample's neighbours: every sample follows its own trajectory. It provides

- ``init(x) -> state``: its state for the iteration that starts at ``x``;
- ``step(x, g, state, f=None) -> (x_next, state)``: the next iterate, given ``g = g(x)`` (and the residual
  ``f = g - x``, which the driver has computed already; a solver computes it where it is not given);
- ``select(state, keep) -> state``: the state of the samples ``keep`` (row indices, a long tensor), once others
  finished (:func:`keep_rows` selects a history buffer's filled slots).

Rows are selected with ``index_select``, not indexing (``t[keep]``): the same values, and on the CPU 4x faster
for a state of 8 x 4096 and 5x for an ``(8, 6, 4096)`` buffer (14 against 3.6 µs, 72 against 14 µs, one thread,
``timeit`` medians of five of eight rows kept).

The driver (:mod:`fpidsl.runtime.driver`) evaluates the map, measures residuals, decides convergence and drops
finished samples; the solver only proposes the next iterate. All of it runs without autograd recording.
"""
from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from ..settings import AndersonMethod, BroydenMethod, PicardMethod, SolverSettings
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .history import keep_rows as keep_rows
from .picard import Picard as Picard


class Solver(Protocol):
    def init(self, x: Tensor) -> Any: ...

    def step(self, x: Tensor, g: Tensor, state: Any, f: Tensor | None = None) -> tuple[Tensor, Any]: ...

    def select(self, state: Any, keep: Tensor) -> Any: ...


def make_solver(settings: SolverSettings) -> Solver:
    """The solver that ``settings.method`` names, configured from ``settings`` (GMRES is not an iteration of this
    kind: :mod:`fpidsl.runtime.solvers.gmres` solves the backward's linear system on its own)."""
    method = settings.solver_method
    if isinstance(method, AndersonMethod):
        return Anderson(m=method.m, beta=method.beta, lam=method.lam)
    if isinstance(method, BroydenMethod):
        return Broyden(m=method.m)
    if isinstance(method, PicardMethod):
        return Picard(beta=method.beta)
    raise ValueError(f"{settings.method} is not a fixed-point iteration solver")
