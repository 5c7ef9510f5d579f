"""What a solve did, per sample, and what happens when it did not converge.

:class:`SolveStats` is the record of one solve (the forward solve, or the backward fixed-point iteration);
:class:`Stats` pairs the forward record with the record of the adjoint solve that the backward ran, so that a
module's ``.stats`` answers both. :func:`enforce` applies the ``on_fail`` policy: a warning
(:class:`ConvergenceWarning`), an exception (:class:`ConvergenceError`) or nothing. The messages are written once,
below, and name the setting to change.
"""
from __future__ import annotations

from typing import Any

import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .settings import SolverSettings

# How many failing sample indices a message lists before it says "and N more".
MAX_LISTED_SAMPLES = 8

NOT_CONVERGED = (
    "fixed-point {phase} did not converge for {count} of {batch} samples ({samples}): the {criterion} residual "
    "reached {worst:.3g} (best sample {best:.3g}) against tol={tol:.3g} after {iterations} iterations. "
    "To fix: {advice}"
)
DIVERGED = (
    "fixed-point {phase} diverged for {count} of {batch} samples ({samples}) after {iterations} iterations: "
    "{how} (the {criterion} residual reached {worst:.3g} against tol={tol:.3g}). "
    "The map is not a contraction{where}. To fix: {advice}"
)
DIVERGED_HOW_NONFINITE = "the iterate became NaN or Inf"
DIVERGED_HOW_GROWTH = "the step |g(x)-x| grew far above the smallest seen"
DIVERGED_HOW_BOTH = "iterates became NaN or Inf, or the step |g(x)-x| grew far above the smallest seen"

FORWARD_ADVICE_SLOW = (
    "raise max_iter (now {max_iter}), loosen tol, {anderson}or make the map more contractive "
    "(smaller init_scale, norm=spectral)"
)
FORWARD_ANDERSON = "use method='anderson', "
FORWARD_ADVICE_DIVERGED = (
    "make the map contractive (smaller init_scale, norm=spectral), or try method='anderson' with a smaller beta"
)
BACKWARD_ADVICE_SLOW = (
    "raise the backward max_iter (now {max_iter}, e.g. backward={{'max_iter': {double}}}), loosen the backward tol, "
    "{anderson}or make the map more contractive in x at the fixed point "
    "(smaller init_scale, norm=spectral); the gradient computed from this solve is not accurate"
)
BACKWARD_ANDERSON = "use backward={'method': 'anderson'}, "
BACKWARD_ADVICE_DIVERGED = (
    "make the map contractive in x at the fixed point (smaller init_scale, norm=spectral), or use "
    "backward={'method': 'anderson'}; the gradient computed from this solve is wrong"
)
BACKWARD_WHERE = " in x at the fixed point (the backward iteration c = J^T c + g needs spectral radius < 1)"
# A sample that ran out of iterations with its residual still above this share of the one at max_iter // 2 is
# reported as stalled (a geometric rate of 0.9945 per step over 250 steps gives 0.25; 1/n gives 0.5).
STALLED_SHARE = 0.25
STALLED = (
    ". The residual of {stalled} of them fell only from {halfway:.3g} to {last:.3g} over the last {steps} "
    "iterations: the iteration is nearly stalled, so more iterations will help little. The map's Jacobian has an "
    "eigenvalue at or near 1 at the fixed point{backward_note}."
)
# A relative residual within this many machine epsilons may be the map's own rounding noise.
NEAR_ROUNDING_EPS = 1000
NEAR_ROUNDING = (
    " In {dtype} that residual is {eps:.0f} machine epsilons: if it is the map's rounding noise, loosen tol or "
    "use float64; if not (Anderson can stall there for hundreds of iterations on an ill-conditioned map and then "
    "converge), raise max_iter."
)
STALLED_BACKWARD_NOTE = (
    "; if the residual falls like 1/n, I - dg/dx is singular there (fixed points that are not isolated, as for an "
    "energy whose minimisers form a surface), the gradient is not defined, and a larger max_iter only scales it"
)


class ConvergenceError(RuntimeError):
    """A fixed-point solve (forward or backward) did not converge and ``on_fail='raise'``.

    ``stats`` is the :class:`SolveStats` of the failed solve.
    """

    def __init__(self, message: str, stats: "SolveStats"):
        super().__init__(message)
        self.stats = stats


class ConvergenceWarning(RuntimeWarning):
    """A fixed-point solve (forward or backward) did not converge and ``on_fail='warn'`` (the default)."""


@dataclass
class SolveStats:
    """The record of one solve, one entry per sample (dimension 0 of the states).

    ``iterations``: evaluations of the map each sample took; ``residual``: its last residual, measured with
    ``settings.criterion``; ``converged``: residual below ``tol``; ``diverged``: NaN/Inf or runaway growth;
    ``stopped_at_floor``: the residual stopped falling at the precision the dtype can resolve, above ``tol``
    (the result is as accurate as the dtype allows; this is not a failure). ``history``: with ``history=True``,
    the residual of every iteration, shape ``(iterations, batch)``, NaN where a sample had already stopped.
    ``halfway``: the residual at iteration ``max_iter // 2`` (NaN where the sample had stopped), which tells a
    stalled iteration from a slow one when a sample runs out of iterations. ``best_iterate``: per sample, the
    result is not the last iterate but the one of lowest residual (a sample that failed); ``best_residual`` and
    ``best_at`` are the residual and iteration of the iterate each result comes from.
    """

    phase: str
    settings: SolverSettings
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor
    stopped_at_floor: Tensor
    history: Tensor | None = None
    halfway: Tensor | None = None
    best_iterate: Tensor | None = None  # per sample: the result is an earlier iterate of lower residual (a failure)
    best_at: Tensor | None = None  # per sample: the iteration the result comes from
    best_residual: Tensor | None = None  # per sample: the residual of the iterate the result comes from

    @property
    def batch(self) -> int:
        return int(self.iterations.shape[0])

    @property
    def ok(self) -> Tensor:
        """Per sample: converged, or stopped at the precision floor."""
        return self.converged | self.stopped_at_floor

    @property
    def all_ok(self) -> bool:
        return bool(self.ok.all())

    @property
    def failed(self) -> list[int]:
        """Indices of the samples that neither converged nor stopped at the floor."""
        return torch.nonzero(~self.ok).flatten().tolist()

    @property
    def max_iterations(self) -> int:
        return int(self.iterations.max()) if self.batch else 0

    def summary(self) -> str:
        """One line: iterations, worst residual, how many samples converged."""
        n_ok = int(self.ok.sum())
        worst = float(self.residual.max()) if self.batch else 0.0
        floor = int(self.stopped_at_floor.sum())
        return (
            f"{self.phase} ({self.settings.method}): {n_ok}/{self.batch} samples done in at most "
            f"{self.max_iterations} iterations, worst {self.settings.criterion} residual {worst:.3g} "
            f"(tol {self.settings.tol:.3g})" + (f", {floor} stopped at the precision floor" if floor else "")
        )

    def __repr__(self) -> str:
        return f"SolveStats({self.summary()})"


@dataclass
class Stats:
    """The stats of the last call: ``forward`` (the solve) and ``backward`` (the first adjoint solve).

    ``adjoint`` is the :class:`Stats` of the first backward fixed-point iteration through this fixed point, seen as
    a fixed point of its own: its ``forward`` is this object's ``backward``, and its ``backward`` is filled when a
    second-order derivative differentiates through the adjoint solve (and so on for higher orders). A later
    backward through the same fixed point (``retain_graph``, or the re-solve a second-order derivative makes) is
    appended to ``later_adjoints`` and does not replace it.
    """

    forward: SolveStats | None = None
    adjoint: "Stats | None" = field(default=None, repr=False)
    contraction: Any = field(default=None, repr=False)  # per-sample ‖∂g/∂x‖ at x̂, when asked for
    later_adjoints: "list[Stats]" = field(default_factory=list, repr=False)

    def record_adjoint(self, stats: "Stats") -> "Stats":
        """Keep the stats of a backward solve through this fixed point (the first as ``adjoint``)."""
        if self.adjoint is None:
            self.adjoint = stats
        else:
            self.later_adjoints.append(stats)
        return stats

    @property
    def backward(self) -> SolveStats | None:
        return None if self.adjoint is None else self.adjoint.forward

    def __repr__(self) -> str:
        parts = [s.summary() for s in (self.forward, self.backward) if s is not None]
        return "Stats(" + "; ".join(parts) + ")"


def _listed(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED_SAMPLES])
    more = len(indices) - MAX_LISTED_SAMPLES
    return f"sample{'s' if len(indices) > 1 else ''} {shown}" + (f" and {more} more" if more > 0 else "")


def failure_message(stats: SolveStats) -> str | None:
    """The message for a solve with failed samples (``None`` when every sample is fine)."""
    if bool(stats.converged.all()):  # the usual case, in one operation
        return None
    failed_mask = ~stats.ok
    if not bool(failed_mask.any()):
        return None
    s = stats.settings
    backward = stats.phase == "backward"
    diverged = stats.diverged & failed_mask
    parts = []  # the diverged samples, then the others that failed (each named: one message lists them all)
    if bool(diverged.any()):
        idx = torch.nonzero(diverged).flatten().tolist()
        nonfinite = ~torch.isfinite(stats.residual[diverged])
        how = (
            DIVERGED_HOW_NONFINITE
            if bool(nonfinite.all())
            else DIVERGED_HOW_GROWTH if not bool(nonfinite.any()) else DIVERGED_HOW_BOTH
        )
        parts.append(DIVERGED.format(
            phase=stats.phase,
            count=len(idx),
            batch=stats.batch,
            samples=_listed(idx),
            iterations=int(stats.iterations[diverged].max()),
            how=how,
            criterion=s.criterion,
            worst=float(stats.residual[diverged].max()),
            tol=s.tol,
            where=BACKWARD_WHERE if backward else "",
            advice=BACKWARD_ADVICE_DIVERGED if backward else FORWARD_ADVICE_DIVERGED,
        ))
    slow = failed_mask & ~diverged
    if bool(slow.any()):
        idx = torch.nonzero(slow).flatten().tolist()
        residuals = stats.residual[slow]
        advice = BACKWARD_ADVICE_SLOW if backward else FORWARD_ADVICE_SLOW
        parts.append(NOT_CONVERGED.format(
            phase=stats.phase,
            count=len(idx),
            batch=stats.batch,
            samples=_listed(idx),
            criterion=s.criterion,
            worst=float(residuals.max()),
            best=float(residuals.min()),
            tol=s.tol,
            iterations=int(stats.iterations[slow].max()),
            advice=advice.format(max_iter=s.max_iter, double=2 * s.max_iter, anderson=_anderson_advice(s, backward)),
        ) + _stalled_note(stats, slow, backward) + _rounding_note(stats, residuals))
    message = " ".join(parts)
    return message + _best_note(stats, message)


BEST_ITERATE = (" {count} of them return their lowest-residual iterate (residual down to {best:.3g}), not the last "
                "(stats.best_iterate).")


def _best_note(stats: SolveStats, message: str) -> str:
    """A sentence when failed samples return an earlier iterate of lower residual."""
    if stats.best_iterate is None or not bool(stats.best_iterate.any()):
        return ""
    chosen = stats.best_iterate
    return ("" if message.endswith(".") else ".") + BEST_ITERATE.format(
        count=int(chosen.sum()), best=float(stats.best_residual[chosen].min()))


def _anderson_advice(s: SolverSettings, backward: bool) -> str:
    """Suggest Anderson only to a solve that does not use it already."""
    if s.method == "anderson":
        return ""
    return BACKWARD_ANDERSON if backward else FORWARD_ANDERSON


def _rounding_note(stats: SolveStats, residuals: Tensor) -> str:
    """A sentence when the failed samples' relative residuals are within ``NEAR_ROUNDING_EPS`` epsilons."""
    if stats.settings.criterion != "relative":
        return ""
    eps = torch.finfo(residuals.dtype).eps
    worst = float(residuals.max())
    if not worst <= NEAR_ROUNDING_EPS * eps:
        return ""
    return NEAR_ROUNDING.format(dtype=str(residuals.dtype).removeprefix("torch."), eps=worst / eps)


def _stalled_note(stats: SolveStats, failed_mask: Tensor, backward: bool) -> str:
    """A sentence on the failed samples whose residual barely fell over the second half of the iterations."""
    if stats.halfway is None or stats.settings.max_iter < 20:
        return ""
    ran_out = failed_mask & (stats.iterations == stats.settings.max_iter)
    stalled = ran_out & (stats.residual > STALLED_SHARE * stats.halfway)
    if not bool(stalled.any()):
        return ""
    worst = int(torch.nonzero(stalled).flatten()[stats.residual[stalled].argmax()])
    return STALLED.format(stalled=int(stalled.sum()), halfway=float(stats.halfway[worst]),
                          last=float(stats.residual[worst]), steps=stats.settings.max_iter - stats.settings.max_iter // 2,
                          backward_note=STALLED_BACKWARD_NOTE if backward else "")


def enforce(stats: SolveStats) -> None:
    """Apply ``stats.settings.on_fail`` to a finished solve: warn, raise :class:`ConvergenceError`, or nothing."""
    policy = stats.settings.on_fail
    if policy == "ignore":
        return
    message = failure_message(stats)
    if message is None:
        return
    if policy == "raise":
        raise ConvergenceError(message, stats)
    warnings.warn(message, ConvergenceWarning, stacklevel=_user_stacklevel())


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning issued in :func:`enforce` to the first caller outside the
    runtime and torch (the user's line that called the layer, or ``.backward()``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level
