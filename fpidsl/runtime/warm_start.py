"""Where a solve starts, and with which budget: warm starts and the eval-time settings of a layer.

- A call-time start (``layer(x, init=previous)``): one tensor per state (a tensor for a one-state layer, a tuple
  in declaration order, or a mapping by state name), each of the shape, dtype and device of the declared start.
- ``warm_start=True`` on a layer: each call starts from the fixed point of the previous call whose start had the
  same shapes (DEQ-Flow, video frames, online training); other shapes start from the declared start. The kept
  points are detached (a start gets no gradient) and at most ``WARM_SLOTS`` shapes are remembered. A sample whose
  solve diverged is not remembered: its row starts from the declared start (a diverged point, such as a last finite
  iterate of 1e200, made an easy sample at that row of the next call fail at once).
- ``eval_solve``: settings over the training ones that apply in eval mode (``layer.eval()``), so inference can
  trade accuracy for time (a smaller ``max_iter``, a looser ``tol``).

Only where the iteration starts changes: the fixed point, and so the gradient, are the same (to the tolerance).
Two exceptions keep that promise: a call-time ``init`` wins over the remembered point (the caller asked for that
start), and the ``unrolled`` gradient mode never warm-starts (its output is ``k`` steps from the start, so a
remembered point would make a call's output depend on the calls before it).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .settings import SolverSettings

WARM_SLOTS = 8


def eval_settings(train: SolverSettings, overrides: SolverSettings | Mapping[str, Any] | None) -> SolverSettings:
    """The settings of an eval-mode solve: ``overrides`` over ``train`` (``train`` itself without overrides)."""
    if overrides is None:
        return train
    if isinstance(overrides, SolverSettings):
        return overrides
    return train.merged(overrides)


class EvalDerivation:
    """How a module's eval-mode settings come from its solve settings: the spec's ``eval`` block (``block``) over
    them, ``eval_solve`` (``overrides``) over that. :meth:`settings` derives them again where the module's
    ``solve_settings`` was replaced after construction (the eval solve kept the construction's tolerance); an
    ``eval_settings`` the user assigned is kept. Plain data: a module holding it pickles."""

    def __init__(self, solve: SolverSettings, overrides: SolverSettings | Mapping[str, Any] | None = None,
                 block: Mapping[str, Any] | None = None):
        self.overrides, self.block = overrides, block
        self.base, self.derived = solve, self._derive(solve)

    def _derive(self, solve: SolverSettings) -> SolverSettings:
        return eval_settings(solve.merged(self.block) if self.block else solve, self.overrides)

    def settings(self, solve: SolverSettings, current: SolverSettings) -> SolverSettings:
        """The eval settings for a module whose settings are now ``solve`` and ``current`` (its eval_settings)."""
        if current is self.derived and solve is not self.base:
            self.base, self.derived = solve, self._derive(solve)
            return self.derived
        return current


def _key(states: Sequence[Tensor]) -> tuple:
    return tuple((tuple(s.shape), s.dtype, s.device) for s in states)


class WarmStart:
    """The fixed points of earlier calls, by the shapes of their start; ``start`` picks, ``remember`` keeps."""

    def __init__(self, enabled: bool = False):
        self.enabled = bool(enabled)
        self.points: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()

    def start(self, x0: Tensor | Sequence[Tensor], backward: SolverSettings) -> Tensor | tuple[Tensor, ...]:
        """``x0``, or the remembered fixed point of the same shapes (in ``x0``'s structure); always ``x0`` when the
        ``backward`` settings' mode is ``unrolled`` (see the module's doc)."""
        if not self.enabled or backward.mode == "unrolled":
            return x0
        states = (x0,) if isinstance(x0, Tensor) else tuple(x0)
        found = self.points.get(_key(states))
        if found is None:
            return x0
        points, usable = found
        if usable is not None:  # rows whose solve diverged start where a cold call starts
            points = tuple(torch.where(usable.view(-1, *[1] * (p.dim() - 1)), p, s) for p, s in zip(points, states))
        return points[0] if isinstance(x0, Tensor) else points

    def remember(self, x_hat: Tensor | Sequence[Tensor], diverged: Tensor | None = None) -> None:
        """Keep ``x_hat`` for the next call of its shapes, but not the rows ``diverged`` (per sample, the forward
        solve's; one entry for a solve of the whole batch, which is then not kept at all)."""
        if not self.enabled:
            return
        states = (x_hat,) if isinstance(x_hat, Tensor) else tuple(x_hat)
        key = _key(states)
        self.points.pop(key, None)
        usable = None
        if diverged is not None and bool(diverged.any()):
            rows = states[0].shape[0] if states[0].dim() else 1
            if diverged.numel() != rows or diverged.numel() == 1:
                return
            usable = ~diverged.to(states[0].device)
        self.points[key] = (tuple(s.detach() for s in states), usable)
        while len(self.points) > WARM_SLOTS:
            self.points.popitem(last=False)

    def clear(self) -> None:
        self.points.clear()


def given_start(init: Any, declared: tuple[Tensor, ...], names: Sequence[str], where: str) -> tuple[Tensor, ...]:
    """A call-time start checked against the declared start ``declared`` (one tensor per state, ``names``)."""
    from .layer import LayerInputError

    if isinstance(init, Tensor):
        given = (init,)
    elif isinstance(init, Mapping):
        unknown = [k for k in init if k not in names]
        if unknown:
            raise LayerInputError(f"{where}: init names no state {unknown[0]!r}; states: {', '.join(names)}")
        missing = [n for n in names if n not in init]
        if missing:
            raise LayerInputError(f"{where}: init is missing the state(s) {', '.join(missing)}")
        given = tuple(init[n] for n in names)
    elif isinstance(init, (tuple, list)):
        given = tuple(init)
    else:
        raise LayerInputError(f"{where}: init must be a tensor, a tuple of tensors (one per state) or a mapping "
                              f"by state name, got {type(init).__name__}")
    if len(given) != len(declared):
        raise LayerInputError(f"{where}: init has {len(given)} entries for {len(declared)} state(s) "
                              f"({', '.join(names)})")
    for name, g, d in zip(names, given, declared):
        if not isinstance(g, Tensor):
            raise LayerInputError(f"{where}: init for state {name!r} must be a tensor, got {type(g).__name__}")
        if g.shape != d.shape:
            raise LayerInputError(f"{where}: init for state {name!r} has shape {list(g.shape)}; the state's start "
                                  f"has shape {list(d.shape)}")
    return tuple(g.detach().to(dtype=d.dtype, device=d.device) for g, d in zip(given, declared))
