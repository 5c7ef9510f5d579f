"""The iteration loop: evaluate the map, judge every sample, drop the finished ones, ask the solver for a step.

Per sample (a row of the flattened state), with ``r = g(x) - x``:

- ``converged``: the residual (``|r|`` or ``|r| / |x|``, by ``criterion``) is below ``tol``, at or after ``min_iter``;
- ``diverged``: ``r`` is not finite, or ``|r|`` grew ``DIVERGENCE_GROWTH`` times above the smallest step seen
  while being a sizeable fraction of ``|x|`` (not rounding noise);
- ``stopped_at_floor``: the relative residual is within ``FLOOR_FACTOR`` machine epsilons and no iteration of the
  last ``FLOOR_PATIENCE`` went below the smallest seen before (tested every ``FLOOR_PATIENCE`` iterations): the
  residual is rounding noise, the dtype cannot resolve ``tol``, more iterations would only burn time. (A slow but
  steady iteration sets a new smallest residual every step and is never taken for one at the floor.) The factor
  is small on purpose: Anderson on an ill-conditioned map can stall below 1000 eps for hundreds of iterations
  and then converge (BibtexGD in float32; ``tests/runtime/test_convergence.py``), while the shipped conv layers
  settle below 1 eps (both measured by ``benchmarks/precision_floor.py``); a map noisier than ``FLOOR_FACTOR``
  eps fails loudly (not converged) instead of passing an unconverged sample as a success. In bfloat16 and
  float16 the factor is ``LOW_PRECISION_FLOOR_FACTOR`` (:func:`floor_threshold`): ten of their epsilons are 8%
  and 1% relative.

A converged sample's result is ``g(x)`` (its last, most accurate value; ``x`` if ``g(x)`` is not finite). A sample
that fails (diverged, or out of iterations) gets its best iterate instead: ``g(x)`` at the iteration of its lowest
residual (locuslab/deq's ``lowest_xest``); ``stats.best_iterate`` flags it, ``stats.best_residual`` and
``stats.best_at`` give that residual and iteration (``stats.residual`` stays the last one).
A finished sample leaves the working set: the solver's state, the trackers and, when the evaluator can (see
:class:`Evaluator`), the map's own work shrink to the running samples. Finished samples are never touched again,
so a sample's result does not depend on the rest of the batch. The loop asks the host one question per check
(how many samples finished; the samples leaving are then split off on the device, no further read), every
``check_every`` iterations (and at ``max_iter``). Between two checks a sample found done is frozen, on the
device: its ``x`` is held, its best iterate is no longer updated, and its record (iteration, outcome, residuals,
best iterate, result) is gathered at the next check, where it leaves the working set, from the tensors of the
iteration that found it done (:class:`_Window`). Every sample gets the record and the result it gets with
``check_every = 1`` (each solver works on each row alone, so a held row changes no other row's step); what it
costs is four small operations an iteration and the frozen rows' evaluations until the check (up to
``check_every - 1`` iterations more for the last samples of a batch).

On the CPU, where the native kernels are in use (:mod:`fpidsl.runtime.native`), one C call per iteration makes
``r = g(x) - x``, the judgement, the best-value tracking and the count of finished samples (:class:`_NativeJudge`,
``judge_step.c``; the norms' sums of squares in double), and one more records and splits off the samples that
leave (in :func:`_loop`): about 5 aten operations an iteration instead of about 25
(``benchmarks/solver_ops.py``). The tensor code (:func:`_judge`, :meth:`_Record.finish`) computes the same record
and runs everywhere else (a GPU, a torch.func transform, torch.compile, a strided ``g``, a large state where torch
may use more than one thread); ``tests/runtime/test_native_judge.py`` holds the two to the same records.

``method = gmres`` (backward only: the adjoint map is affine) runs :func:`fpidsl.runtime.solvers.gmres.gmres`
instead of this loop, with the same settings and the same record.

The relative criterion cannot tell a small step of a large state from convergence: ``x <- x + 1`` from
``x = 1e6`` has a relative residual of ``1e-6`` and passes ``tol = 1e-5`` after one iteration although it has no
fixed point. A sample accepted by the relative criterion with an absolute step ``|g(x) - x|`` of at least
``LARGE_ABSOLUTE_STEP`` that is no smaller than every step before it (no sign of contraction: the first step, or
a constant one) gets a :class:`~fpidsl.runtime.stats.ConvergenceWarning` saying so (unless ``on_fail`` is
``ignore``); a contracting iteration on a large state (steps shrinking to the tolerance) is not warned about.
"""
from __future__ import annotations

import math
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from . import native
from .precision import floor_eps
from .settings import SolverSettings
from .solvers import make_solver
from .solvers.gmres import gmres
from .stats import ConvergenceWarning, SolveStats

DIVERGENCE_GROWTH = 1e4
DIVERGENCE_MIN_RELATIVE_STEP = 1e-3
FLOOR_FACTOR = 10.0
LOW_PRECISION_FLOOR_FACTOR = 3.0
FLOOR_PATIENCE = 10
LARGE_ABSOLUTE_STEP = 1.0
LARGE_STEP_WARNING = (
    "fixed-point {phase}: {count} of {batch} samples ({samples}) were accepted by the relative criterion "
    "(|g(x)-x|/|x| < tol={tol:.3g}) with an absolute step |g(x)-x| of up to {step:.3g}: the state's norm (up to "
    "{norm:.3g}) makes a large step look small. If the map does not contract there (x <- x + 1 from x = 1e6 is "
    "accepted after one iteration), this is not a fixed point. To check: use criterion='absolute', or "
    "min_iter > 1, or rescale the state"
)


# Iteration numbers -> the batch's value at them, filled by the forward solves run while it is set (the
# fixed-point correction's intermediate states, fpidsl.runtime.correction): a running sample's g(x) at that
# iteration, a finished sample's result.
SNAPSHOTS: ContextVar[dict[int, Tensor | None] | None] = ContextVar("fpidsl_snapshots", default=None)


class Evaluator(Protocol):
    """Evaluates the flattened map on the running samples.

    ``__call__(x)`` returns ``g(x)`` for ``x`` of shape ``(running, dim)``; ``restrict(index)`` tells it which
    samples of the batch (a long tensor of batch indices, in row order) are running from now on.
    """

    def __call__(self, x: Tensor) -> Tensor: ...

    def restrict(self, index: Tensor) -> None: ...


@dataclass
class _Tracker:
    """Per running sample: the smallest relative residual and the smallest step seen, and the smallest relative
    residual as it was at the last precision-floor check (``FLOOR_PATIENCE`` iterations before the next)."""

    best_rel: Tensor
    best_step: Tensor
    checked_rel: Tensor
    best_value: Tensor  # g(x) at the iteration of best_residual, (rows, dim)
    best_at: Tensor  # that iteration
    shrank: Tensor  # the last step was smaller than every step before it (False at the first)
    relative: bool  # the solve's criterion is the relative residual

    @property
    def best_residual(self) -> Tensor:
        """The smallest residual by the solve's criterion (the smallest relative residual or step: ``fmin`` keeps
        exactly the minimum that ignores NaN)."""
        return self.best_rel if self.relative else self.best_step

    @staticmethod
    def start(rows: int, like: Tensor, relative: bool) -> "_Tracker":
        best_rel, best_step, checked_rel = torch.full((3, rows), float("inf"), dtype=like.dtype,
                                                      device=like.device).unbind()  # rows of one tensor
        return _Tracker(best_rel, best_step, checked_rel, like.clone(),
                        torch.zeros(rows, dtype=torch.long, device=like.device),
                        torch.zeros(rows, dtype=torch.bool, device=like.device), relative)

    def select(self, keep: Tensor) -> "_Tracker":
        return _Tracker(*(t.index_select(0, keep) for t in (self.best_rel, self.best_step, self.checked_rel,
                                                             self.best_value, self.best_at, self.shrank)),
                        self.relative)

    def remember(self, n: int, better: Tensor, g: Tensor) -> None:
        """Keep ``g`` for the samples whose residual is the lowest so far (``better``, from the judgement)."""
        torch.where(better.unsqueeze(1), g, self.best_value, out=self.best_value)
        self.best_at.masked_fill_(better, n)


@dataclass
class _Verdict:
    """The tests of one iteration; ``None`` where a test was not made (before ``min_iter``; the floor test runs
    every ``FLOOR_PATIENCE`` iterations)."""

    residual: Tensor
    converged: Tensor | None
    diverged: Tensor
    floor: Tensor | None
    step: Tensor  # |g(x) - x|
    norm: Tensor  # |x|
    better: Tensor  # the residual is the lowest so far (False where it is NaN; a finite residual means a finite g)

    @property
    def done(self) -> Tensor:
        done = self.diverged if self.converged is None else self.converged | self.diverged
        return done if self.floor is None else done | self.floor

    def outcome(self, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(converged, diverged, floor) of the rows ``mask`` (indices; all rows if None), each sample in exactly one
        of them or none: converged first, then diverged."""
        def pick(t: Tensor | None) -> Tensor:
            if t is None:
                t = torch.zeros_like(self.diverged)
            return t if mask is None else t[mask]

        converged, diverged, floor = pick(self.converged), pick(self.diverged), pick(self.floor)
        diverged = diverged & ~converged
        return converged, diverged, floor & ~(converged | diverged)


class _Thresholds:
    """The judgement's constants: as numbers (``values``: tol, growth, min_relative_step, floor; the native judge's)
    and as 0-dimensional tensors of the state's dtype and device for :func:`_judge` (a comparison with a Python
    float converts it to a tensor at every call), those made on first use, once per solve: a solve the native
    judge makes throughout never makes them."""

    def __init__(self, values: tuple[float, float, float, float], dtype: torch.dtype, device: torch.device):
        self.values, self._dtype, self._device = values, dtype, device

    @staticmethod
    def of(s: SolverSettings, like: Tensor) -> "_Thresholds":
        eps = floor_eps(like.dtype)  # the compute dtype's, under mixed precision (fpidsl.runtime.precision)
        return _Thresholds((s.tol, DIVERGENCE_GROWTH, DIVERGENCE_MIN_RELATIVE_STEP, floor_threshold(eps)), like.dtype,
                           like.device)

    @cached_property
    def _tensors(self) -> tuple[Tensor, ...]:
        tol, growth, min_relative_step, floor = self.values
        return torch.tensor([0.0, math.inf, growth, min_relative_step, floor, tol], dtype=self._dtype,
                            device=self._device).unbind()  # one tensor made, six views of it

    zero = property(lambda self: self._tensors[0])
    inf = property(lambda self: self._tensors[1])
    growth = property(lambda self: self._tensors[2])
    min_relative_step = property(lambda self: self._tensors[3])
    floor = property(lambda self: self._tensors[4])
    tol = property(lambda self: self._tensors[5])


def floor_threshold(eps: float) -> float:
    """The relative residual below which a sample that stopped improving is at the precision floor, for a map
    computing in a dtype of machine epsilon ``eps``: ``FLOOR_FACTOR`` epsilons in float32 and float64, and
    ``LOW_PRECISION_FLOOR_FACTOR`` in bfloat16 and float16, where ten epsilons (8% and 1% relative) passed
    iterations that oscillated or drifted at a few percent as done (the zoo's low-precision solves settle below
    2 eps: ``benchmarks/precision_floor.py --low-precision``)."""
    return (FLOOR_FACTOR if eps <= _EPS32 else LOW_PRECISION_FLOOR_FACTOR) * eps


_EPS32 = torch.finfo(torch.float32).eps


def _norm(v: Tensor) -> Tensor:
    """Each row's 2-norm; a float32 row's sum of squares in double, as the native judge sums it (in float32 a finite
    state above about 1.8e19 overflowed to an infinite norm, judged diverged where the native judge converged)."""
    if v.dtype == torch.float32:
        return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64).to(torch.float32)
    return torch.linalg.vector_norm(v, dim=1)


def _judge(n: int, x: Tensor, r: Tensor, track: _Tracker, s: SolverSettings, c: _Thresholds) -> _Verdict:
    """Decide, per running sample, after evaluation ``n`` (``r = g(x) - x``); updates ``track`` in place. About
    fifteen small tensor operations: this runs every iteration."""
    step, norm = _norm(r), _norm(x)
    # |g(x) - x| / |x|, with 0/0 = 0 (an exact fixed point at zero) and s/0 = inf (the first step from zero)
    rel = (step / norm).masked_fill_(step == c.zero, 0.0)
    residual = rel if track.relative else step
    better = residual < track.best_residual  # before the minima below take this iteration in
    diverged = ~(step < c.inf)  # a norm: not below inf exactly where it is inf or NaN
    if n > 1:
        diverged |= (step > c.growth * track.best_step) & (rel > c.min_relative_step)
        track.shrank = torch.lt(step, track.best_step) if track.relative else better  # the same comparison
    # new tensors (shrank above too), not written in place: a check interval's window holds each iteration's
    track.best_step = torch.fmin(track.best_step, step)
    track.best_rel = torch.fmin(track.best_rel, rel)
    if n < s.min_iter:
        return _Verdict(residual, None, diverged, None, step, norm, better)
    floor = None
    if n % FLOOR_PATIENCE == 0:
        no_new_low = track.best_rel >= track.checked_rel
        track.checked_rel.copy_(track.best_rel)
        floor = no_new_low & (rel <= c.floor)
    return _Verdict(residual, residual < c.tol, diverged, floor, step, norm, better)


class _NativeJudge:
    """:func:`_judge` with ``r = g(x) - x`` before it, :meth:`_Tracker.remember` after it and the count of the
    samples done, in one call of the native kernel (``judge_step.c`` of :mod:`fpidsl.runtime.native`) instead of
    23 aten operations, and :meth:`finish` in one more instead of 52; the same verdict, with the norms' sums of
    squares in double. The tracker's best value and iteration, its floor check and, in :func:`_loop`, the
    verdict's per-sample tensors and the rest of the tracker are written in place (:func:`_loop` uses each verdict
    within its iteration); :func:`_checked_loop`, whose window keeps every iteration's, gets new ones each iteration
    (``keeps``). Where an iteration's tensors are not what the kernel takes (:func:`~fpidsl.runtime.native.takes`:
    a strided ``g``, a torch.func wrapper, a large state with more than one torch thread), :meth:`__call__` returns
    None and that iteration runs the tensor code."""

    def __init__(self, lib, s: SolverSettings, c: _Thresholds, relative: bool, keeps: bool):
        self.lib, self.s, self.constants, self.relative, self.keeps = lib, s, c.values, relative, keeps
        self.rows: tuple[Tensor, ...] = ()  # the verdict's per-sample buffers (real: 3 rows, flags: 5)
        self.flags = 0  # the tests the last call made (judge_step.c's flags), for finish

    @staticmethod
    def of(x0: Tensor, s: SolverSettings, c: _Thresholds, relative: bool, keeps: bool = False
           ) -> "_NativeJudge | None":
        """The native judge of a solve from ``x0``, or None where the kernels are not in use for it."""
        lib = native.kernel_for(x0)
        return _NativeJudge(lib, s, c, relative, keeps) if lib is not None else None

    def __call__(self, n: int, x: Tensor, g: Tensor, track: _Tracker, frozen: Tensor | None = None
                 ) -> tuple[Tensor, _Verdict, Tensor, int] | None:
        """``(r, verdict, done, how many are done)`` of iteration ``n`` (the best value kept for the rows not
        ``frozen``), or None where the kernel cannot take it."""
        best = track.best_value
        if not native.takes(self.lib, x, g, best):  # the check each solver step makes
            return None
        batch = x.shape[0]
        if self.keeps or not self.rows or self.rows[0].shape[0] != batch:
            real = torch.empty(3, batch, dtype=x.dtype)
            flags = torch.empty(5, batch, dtype=torch.bool)
            self.rows = (*real.unbind(), *flags.unbind())
        if self.keeps:  # the window holds the last iteration's
            track.best_rel, track.best_step, track.shrank = track.best_rel.clone(), track.best_step.clone(), \
                track.shrank.clone()
        test = n >= self.s.min_iter
        floor = test and n % FLOOR_PATIENCE == 0
        flags = ((native.JUDGE_RELATIVE if self.relative else 0) | (native.JUDGE_LATER if n > 1 else 0)
                 | (native.JUDGE_TEST if test else 0) | (native.JUDGE_FLOOR if floor else 0))
        r = torch.empty_like(x)
        tracker = (track.best_rel, track.best_step, track.checked_rel, best, track.best_at, track.shrank)
        finished = native.judge_step(self.lib, flags, n, self.constants, x, g, r, self.rows, tracker, frozen)
        step, norm, rel, better, diverged, converged, floor_rows, done = self.rows
        verdict = _Verdict(rel if self.relative else step, converged if test else None, diverged,
                           floor_rows if floor else None, step, norm, better)
        self.flags = flags
        return r, verdict, done, finished

    def finish(self, n: int, done: Tensor | None, index: Tensor, x: Tensor, g: Tensor, track: _Tracker,
               record: "_Record", out: Tensor) -> Tensor | None:
        """:meth:`_Record.finish` and :func:`_split` of the verdict this judge just gave, in one call of the
        kernel: records the rows ``done`` (all where None) and returns the others (indices, in order), or None
        where the kernel cannot write ``out`` (a strided start's copy) and the caller must."""
        if not out.is_contiguous():
            return None
        step, norm, rel, _, diverged, converged, floor, _ = self.rows
        keep = torch.empty(x.shape[0], dtype=torch.long)
        verdict = (rel if self.relative else step, step, norm, converged, diverged, floor)
        tracker = (track.shrank, track.best_residual, track.best_at, track.best_value)
        fields = (record.iterations, record.converged, record.diverged, record.floor, record.step, record.norm,
                  record.shrank, record.best_iterate, record.best_at, record.residual, record.best_residual)
        kept = native.finish_step(self.lib, self.flags, n, done, index, x, g, verdict, tracker, fields, out, keep)
        return keep[:kept]


class _Record:
    """The per-sample outcome over the whole batch, written as samples finish."""

    def __init__(self, batch: int, like: Tensor, keep_history: bool):
        dev = like.device  # the fields of a kind are the rows of one tensor (three made instead of thirteen)
        # best_at: the iteration the result comes from
        self.iterations, self.best_at = torch.zeros(2, batch, dtype=torch.long, device=dev).unbind()
        # best_iterate: the result is an earlier, lower-residual iterate; shrank: the last step was smaller than
        # all before it
        self.converged, self.diverged, self.floor, self.best_iterate, self.shrank = torch.zeros(
            5, batch, dtype=torch.bool, device=dev).unbind()
        self.shrank.fill_(True)
        # halfway: the residual at iteration max_iter // 2; best_residual: the result's residual; step: the last
        # absolute step |g(x) - x|; norm: the last |x|
        self.residual, self.halfway, self.best_residual, self.step, self.norm = torch.full(
            (5, batch), float("nan"), dtype=like.dtype, device=dev).unbind()
        self.history: list[Tensor] | None = [] if keep_history else None

    def log(self, index: Tensor, residual: Tensor) -> None:
        if self.history is not None:
            row = torch.full_like(self.residual, float("nan"))
            row[index] = residual
            self.history.append(row)

    def write(self, index: Tensor, held: _Outcome, out: Tensor) -> None:
        """Record the samples ``index`` from ``held`` (one row each) and write their results into ``out``."""
        self.iterations[index], self.converged[index] = held.iterations, held.converged
        self.diverged[index], self.floor[index], self.shrank[index] = held.diverged, held.floor, held.shrank
        self.step[index], self.norm[index] = held.step, held.norm
        self.best_iterate[index], self.best_at[index] = held.best_iterate, held.best_at
        self.residual[index], self.best_residual[index] = held.residual, held.best_residual
        out[index] = held.value

    def finish(self, index: Tensor, n: int, verdict: _Verdict, mask: Tensor | None, out: Tensor, x: Tensor,
               g: Tensor, track: _Tracker) -> None:
        """Record the samples ``index`` (rows ``mask`` of the running ones, as indices; all if None) and write their
        results into ``out``: ``g(x)``, or the best iterate for a failed sample whose best residual is lower. The
        norms are the verdict's (not computed again)."""
        pick = (lambda t: t) if mask is None else (lambda t: t[mask])
        residual = pick(verdict.residual)
        self.iterations[index] = n
        converged, diverged, floor = verdict.outcome(mask)
        self.converged[index], self.diverged[index], self.floor[index] = converged, diverged, floor
        x, g = pick(x), pick(g)
        self.step[index] = pick(verdict.step)
        self.norm[index] = pick(verdict.norm)
        self.shrank[index] = pick(track.shrank)
        best = ~(converged | floor) & (pick(track.best_residual) < residual)
        self.best_iterate[index] = best
        self.best_at[index] = torch.where(best, pick(track.best_at), n)
        self.residual[index] = residual
        self.best_residual[index] = torch.where(best, pick(track.best_residual), residual)
        out[index] = torch.where(best.unsqueeze(1), pick(track.best_value), _result(x, g))

    def stats(self, phase: str, settings: SolverSettings) -> SolveStats:
        history = torch.stack(self.history) if self.history else None
        if self.history is not None and history is None:
            history = self.residual.new_zeros(0, self.residual.shape[0])
        return SolveStats(phase, settings, self.iterations, self.residual, self.converged, self.diverged,
                          self.floor, history, self.halfway, best_iterate=self.best_iterate, best_at=self.best_at,
                          best_residual=self.best_residual)


class _Outcome(NamedTuple):
    """What :class:`_Record` keeps of some samples, row by row (see :meth:`_Window.outcome`)."""

    iterations: Tensor
    converged: Tensor
    diverged: Tensor
    floor: Tensor
    shrank: Tensor
    best_iterate: Tensor
    best_at: Tensor
    residual: Tensor
    best_residual: Tensor
    step: Tensor
    norm: Tensor
    value: Tensor  # the result, (rows, dim)


class _Window:
    """The iterations since the last check (``check_every > 1``), per running row: whether it was found done
    (``frozen``), its ``g(x)`` at that iteration, and, per iteration, references to the tensors its record is made
    of. The judgement makes those fresh every iteration (nothing writes them later), so holding them costs no
    device work; the tracker's best value and iteration are not updated for a frozen row (:func:`_checked_loop`),
    and its ``x`` is held. The record is gathered at the check, for the rows that leave."""

    def __init__(self, x: Tensor, first: int):
        self.first = first  # the iteration of entries[0]
        self.frozen = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        self.frozen_rows = self.frozen.unsqueeze(1)  # a view: follows frozen
        self.g = torch.empty_like(x)
        self.no = torch.zeros_like(self.frozen)  # a test not made (before min_iter; the floor's off iterations)
        self.entries: list[tuple[Tensor, ...]] = []

    def add(self, done: Tensor, verdict: _Verdict, g: Tensor, track: _Tracker) -> None:
        """Iteration ``first + len(entries)``: freeze the rows ``done`` that were not."""
        torch.where(self.frozen_rows, self.g, g, out=self.g)  # the running rows' g: a frozen row's stays
        self.frozen |= done
        no = self.no
        self.entries.append((done, no if verdict.converged is None else verdict.converged, verdict.diverged,
                             no if verdict.floor is None else verdict.floor, track.shrank, verdict.residual,
                             track.best_residual, verdict.step, verdict.norm))

    def outcome(self, rows: Tensor | None, x: Tensor, track: _Tracker) -> _Outcome:
        """The record of the frozen rows ``rows`` (indices; all rows if None, where the unfrozen ones give garbage)
        as :meth:`_Record.finish` writes it at the iteration each was found done."""
        if rows is None:
            rows = torch.arange(self.frozen.shape[0], device=x.device)
        columns = [torch.stack(c) for c in zip(*self.entries)]  # each (iterations, running)
        at = columns[0].to(torch.uint8).argmax(0)[rows]  # the first iteration found done
        converged, diverged, floor, shrank, residual, best_residual, step, norm = (c[at, rows] for c in columns[1:])
        diverged = diverged & ~converged
        floor = floor & ~(converged | diverged)
        best = ~(converged | floor) & (best_residual < residual)
        n = at + self.first
        value = torch.where(best.unsqueeze(1), track.best_value[rows], _result(x[rows], self.g[rows]))
        return _Outcome(n, converged, diverged, floor, shrank, best, torch.where(best, track.best_at[rows], n),
                        residual, torch.where(best, best_residual, residual), step, norm, value)


def solve(
    evaluate: Evaluator, x0: Tensor, settings: SolverSettings, *, phase: str = "forward", history: bool = False
) -> tuple[Tensor, SolveStats]:
    """Iterate from ``x0`` (``(batch, dim)``) to the fixed point of ``evaluate``; no autograd is recorded.

    Returns the result (``(batch, dim)``, each row the finished value of that sample) and its :class:`SolveStats`.
    """
    with torch.no_grad():
        if settings.method == "gmres":
            out, stats, record = _linear(evaluate, x0, settings, phase, history)
        else:
            out, stats, record = _loop(evaluate, x0, settings, phase, history)
    _warn_large_steps(stats, record)
    snapshots = SNAPSHOTS.get() if phase == "forward" else None
    if snapshots is not None:  # iterations the solve did not reach: its result
        for n, value in snapshots.items():
            if value is None:
                snapshots[n] = out.clone()
    return out, stats


def _loop(evaluate: Evaluator, x0: Tensor, s: SolverSettings, phase: str, history: bool):
    batch = x0.shape[0]
    out = x0.clone()
    record = _Record(batch, x0, history)
    if batch == 0:
        return out, record.stats(phase, s), record
    solver = make_solver(s)
    thresholds = _Thresholds.of(s, x0)
    index = torch.arange(batch, device=x0.device)
    x = x0
    state = solver.init(x)
    track = _Tracker.start(batch, x, s.criterion == "relative")
    snapshots = SNAPSHOTS.get() if phase == "forward" else None
    if s.check_every > 1:
        return _checked_loop(evaluate, x, s, phase, out, record, solver, state, track, thresholds, snapshots)
    judge = _NativeJudge.of(x0, s, thresholds, track.relative)
    for n in range(1, s.max_iter + 1):
        g = evaluate(x)
        if snapshots is not None and n in snapshots:
            snapshots[n] = out.index_copy(0, index, g)
        judged = judge(n, x, g, track) if judge is not None else None
        if judged is None:
            r = g - x  # the residual, for the judgement and the solver's step
            verdict = _judge(n, x, r, track, s, thresholds)
            track.remember(n, verdict.better, g)
        else:
            r, verdict, done, finished = judged
        record.log(index, verdict.residual)
        if n == s.max_iter // 2:
            record.halfway[index] = verdict.residual
        if n == s.max_iter:
            if judged is None or judge.finish(n, None, index, x, g, track, record, out) is None:
                record.finish(index, n, verdict, None, out, x, g, track)
            break
        if judged is None:
            done = verdict.done
            finished = int(done.sum())  # the one host synchronisation of an iteration
        if finished:
            keep = judge.finish(n, done, index, x, g, track, record, out) if judged is not None else None
            if keep is None:
                rows, keep = _split(done, finished)
                record.finish(index[rows], n, verdict, rows, out, x, g, track)
            if finished == index.shape[0]:
                break
            index, x, g, r = (t.index_select(0, keep) for t in (index, x, g, r))
            state, track = solver.select(state, keep), track.select(keep)
            evaluate.restrict(index)
        x, state = solver.step(x, g, state, r)
    return out, record.stats(phase, s), record


def _checked_loop(evaluate: Evaluator, x: Tensor, s: SolverSettings, phase: str, out: Tensor, record: _Record,
                  solver, state, track: _Tracker, thresholds: _Thresholds, snapshots):
    """:func:`_loop` with the host reading ``done`` only every ``s.check_every`` iterations (and at ``max_iter``);
    in between, the samples found done are frozen (:class:`_Window`) and leave the working set at the next check."""
    index = torch.arange(x.shape[0], device=x.device)
    window = _Window(x, 1)
    judge = _NativeJudge.of(x, s, thresholds, track.relative, keeps=True)
    for n in range(1, s.max_iter + 1):
        g = evaluate(x)
        if snapshots is not None and n in snapshots:  # a sample frozen before this iteration: its result
            held = window.outcome(None, x, track).value if window.entries else g
            snapshots[n] = out.index_copy(0, index, torch.where(window.frozen_rows, held, g))
        judged = judge(n, x, g, track, window.frozen) if judge is not None else None
        if judged is None:
            r = g - x
            verdict = _judge(n, x, r, track, s, thresholds)
            track.remember(n, verdict.better > window.frozen, g)  # better, not frozen: a frozen sample keeps its best
        else:
            r, verdict = judged[:2]
        if record.history is not None or n == s.max_iter // 2:
            residual = verdict.residual.masked_fill(window.frozen, float("nan"))  # a frozen sample has left
            record.log(index, residual)
            if n == s.max_iter // 2:
                record.halfway[index] = residual
        if n == s.max_iter:
            window.add(torch.ones_like(window.frozen), verdict, g, track)
            record.write(index, window.outcome(None, x, track), out)
            break
        window.add(verdict.done, verdict, g, track)
        if n % s.check_every == 0:
            finished = int(window.frozen.sum())  # the one host synchronisation of a check interval
            if finished:
                rows, keep = _split(window.frozen, finished)
                record.write(index[rows], window.outcome(rows, x, track), out)
                if finished == index.shape[0]:
                    break
                index, x, g, r = (t.index_select(0, keep) for t in (index, x, g, r))
                state, track = solver.select(state, keep), track.select(keep)
                evaluate.restrict(index)
            window = _Window(x, n + 1)
        step, state = solver.step(x, g, state, r)
        x = torch.where(window.frozen_rows, x, step)  # a frozen sample stays where it was found done
    if record.history:  # the iterations after the last sample finished, before the check that saw it: not logged
        del record.history[int(record.iterations.max()):]
    return out, record.stats(phase, s), record


def _split(done: Tensor, finished: int) -> tuple[Tensor, Tensor]:
    """The rows that are ``done`` and the others, each in row order, as indices: one stable sort on the device
    (the host knows ``finished``, how many are done), so that recording and dropping them reads nothing more."""
    order = torch.argsort(done.to(torch.uint8), stable=True)
    kept = done.shape[0] - finished
    return order[kept:], order[:kept]


def _linear(evaluate: Evaluator, x0: Tensor, s: SolverSettings, phase: str, history: bool):
    """The fixed point of an affine map by restarted GMRES, recorded like the iteration's."""
    record = _Record(x0.shape[0], x0, history)
    result = gmres(evaluate, evaluate.restrict, x0, m=s.memory, tol=s.tol, relative=s.criterion == "relative",
                   max_iter=s.max_iter, min_iter=s.min_iter, floor=floor_threshold(floor_eps(x0.dtype)))
    record.iterations, record.residual, record.best_residual = result.iterations, result.residual, result.residual
    record.converged, record.diverged, record.floor = result.converged, result.diverged, result.floor
    if record.history is not None:
        record.history = result.history
    if x0.shape[0]:  # the large-step check's norms, from the residual (not worth one more evaluation)
        record.norm = torch.linalg.vector_norm(result.x, dim=1)
        record.step = result.residual * record.norm if s.criterion == "relative" else result.residual
        # the iteration's "smaller than every step before it": GMRES's last residual against its first (a singular
        # system's huge solution met the relative criterion with a residual larger than at the start, unwarned)
        record.shrank = record.step < result.first_step
    return result.x, record.stats(phase, s), record


def _warn_large_steps(stats: SolveStats, record: _Record) -> None:
    """The relative criterion's blind spot (see the module's doc): warn where it accepted a large absolute step."""
    s = stats.settings
    if s.criterion != "relative" or s.on_fail == "ignore" or stats.batch == 0:
        return
    large = stats.converged & (record.step >= LARGE_ABSOLUTE_STEP) & ~record.shrank
    count = int(large.sum())
    if not count:
        return
    from .stats import MAX_LISTED_SAMPLES, _user_stacklevel

    listed = torch.nonzero(large).flatten().tolist()
    samples = ", ".join(map(str, listed[:MAX_LISTED_SAMPLES])) + (
        f" and {count - MAX_LISTED_SAMPLES} more" if count > MAX_LISTED_SAMPLES else "")
    message = LARGE_STEP_WARNING.format(phase=stats.phase, count=count, batch=stats.batch, samples=samples,
                                        tol=s.tol, step=float(record.step[large].max()),
                                        norm=float(record.norm[large].max()))
    warnings.warn(message, ConvergenceWarning, stacklevel=_user_stacklevel())


def _result(x: Tensor, g: Tensor) -> Tensor:
    """``g`` where it is finite, else the last finite iterate ``x``."""
    finite = torch.isfinite(g).all(dim=1, keepdim=True)
    return torch.where(finite, g, x)
