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
  eps fails loudly (not converged) instead of passing an unconverged sample as a success.

A converged sample's result is ``g(x)`` (its last, most accurate value; ``x`` if ``g(x)`` is not finite). A sample
that fails (diverged, or out of iterations) gets its best iterate instead: ``g(x)`` at the iteration of its lowest
residual (locuslab/deq's ``lowest_xest``); ``stats.best_iterate`` flags it, ``stats.best_residual`` and
``stats.best_at`` give that residual and iteration (``stats.residual`` stays the last one).
A finished sample leaves the working set: the solver's state, the trackers and, when the evaluator can (see
:class:`Evaluator`), the map's own work shrink to the running samples. Finished samples are never touched again,
so a sample's result does not depend on the rest of the batch. The loop asks the host one question per
check (how many samples finished), every ``check_every`` iterations (and at ``max_iter``). Between two checks a
sample found done is frozen, on the device: its record (iteration, outcome, residuals, best iterate, result) is
taken at that iteration into per-row sticky tensors (:class:`_Sticky`), its ``x`` is held, and it is not judged
again; it leaves the working set at the next check. Every sample gets the record and the result it gets with
``check_every = 1`` (each solver works on each row alone, so a held row changes no other row's step); only
the frozen rows' extra evaluations are spent.

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

import dataclasses
import math
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .precision import floor_eps
from .settings import SolverSettings
from .solvers import make_solver
from .solvers.gmres import gmres
from .stats import ConvergenceWarning, SolveStats

DIVERGENCE_GROWTH = 1e4
DIVERGENCE_MIN_RELATIVE_STEP = 1e-3
FLOOR_FACTOR = 10.0
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
        inf = torch.full((rows,), float("inf"), dtype=like.dtype, device=like.device)
        return _Tracker(inf, inf.clone(), inf.clone(), like.clone(),
                        torch.zeros(rows, dtype=torch.long, device=like.device),
                        torch.zeros(rows, dtype=torch.bool, device=like.device), relative)

    def select(self, keep: Tensor) -> "_Tracker":
        return _Tracker(self.best_rel[keep], self.best_step[keep], self.checked_rel[keep], self.best_value[keep],
                        self.best_at[keep], self.shrank[keep], self.relative)

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


@dataclass(frozen=True)
class _Thresholds:
    """The judgement's constants as 0-dimensional tensors of the state's dtype and device, made once per solve (a
    comparison with a Python float converts it to a tensor at every call)."""

    zero: Tensor
    inf: Tensor
    growth: Tensor
    min_relative_step: Tensor
    floor: Tensor
    tol: Tensor

    @staticmethod
    def of(s: SolverSettings, like: Tensor) -> "_Thresholds":
        def const(value: float) -> Tensor:
            return torch.tensor(value, dtype=like.dtype, device=like.device)

        eps = floor_eps(like.dtype)  # the compute dtype's, under mixed precision (fpidsl.runtime.precision)
        return _Thresholds(const(0.0), const(math.inf), const(DIVERGENCE_GROWTH), const(DIVERGENCE_MIN_RELATIVE_STEP),
                           const(FLOOR_FACTOR * eps), const(s.tol))


def _judge(n: int, x: Tensor, r: Tensor, track: _Tracker, s: SolverSettings, c: _Thresholds) -> _Verdict:
    """Decide, per running sample, after evaluation ``n`` (``r = g(x) - x``); updates ``track`` in place. About
    fifteen small tensor operations: this runs every iteration."""
    step = torch.linalg.vector_norm(r, dim=1)
    norm = torch.linalg.vector_norm(x, dim=1)
    # |g(x) - x| / |x|, with 0/0 = 0 (an exact fixed point at zero) and s/0 = inf (the first step from zero)
    rel = (step / norm).masked_fill_(step == c.zero, 0.0)
    residual = rel if track.relative else step
    better = residual < track.best_residual  # before the minima below take this iteration in
    diverged = ~(step < c.inf)  # a norm: not below inf exactly where it is inf or NaN
    if n > 1:
        diverged |= (step > c.growth * track.best_step) & (rel > c.min_relative_step)
        if track.relative:
            torch.lt(step, track.best_step, out=track.shrank)
        else:
            track.shrank = better  # the same comparison
    torch.fmin(track.best_step, step, out=track.best_step)
    torch.fmin(track.best_rel, rel, out=track.best_rel)
    if n < s.min_iter:
        return _Verdict(residual, None, diverged, None, step, norm, better)
    floor = None
    if n % FLOOR_PATIENCE == 0:
        no_new_low = track.best_rel >= track.checked_rel
        track.checked_rel.copy_(track.best_rel)
        floor = no_new_low & (rel <= c.floor)
    return _Verdict(residual, residual < c.tol, diverged, floor, step, norm, better)


class _Record:
    """The per-sample outcome over the whole batch, written as samples finish."""

    def __init__(self, batch: int, like: Tensor, keep_history: bool):
        dev = like.device
        self.iterations = torch.zeros(batch, dtype=torch.long, device=dev)
        self.residual = torch.full((batch,), float("nan"), dtype=like.dtype, device=dev)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.diverged = torch.zeros_like(self.converged)
        self.floor = torch.zeros_like(self.converged)
        self.halfway = torch.full_like(self.residual, float("nan"))  # the residual at iteration max_iter // 2
        self.best_iterate = torch.zeros_like(self.converged)  # the result is an earlier, lower-residual iterate
        self.best_at = torch.zeros_like(self.iterations)
        self.best_residual = torch.full_like(self.residual, float("nan"))  # the result's residual
        self.step = torch.full_like(self.residual, float("nan"))  # the last absolute step |g(x) - x|
        self.norm = torch.full_like(self.residual, float("nan"))  # the last |x|
        self.shrank = torch.ones_like(self.converged)  # the last step was smaller than all before it
        self.history: list[Tensor] | None = [] if keep_history else None

    def log(self, index: Tensor, residual: Tensor) -> None:
        if self.history is not None:
            row = torch.full_like(self.residual, float("nan"))
            row[index] = residual
            self.history.append(row)

    def write(self, index: Tensor, mask: Tensor | None, held: "_Sticky", out: Tensor) -> None:
        """Record the samples ``index`` (rows ``mask`` of the running ones, as indices; all if None) from their
        sticky records, and write their results into ``out``."""
        pick = (lambda t: t) if mask is None else (lambda t: t[mask])
        self.iterations[index] = pick(held.iterations)
        self.converged[index], self.diverged[index] = pick(held.converged), pick(held.diverged)
        self.floor[index], self.shrank[index] = pick(held.floor), pick(held.shrank)
        self.step[index], self.norm[index] = pick(held.step), pick(held.norm)
        self.best_iterate[index], self.best_at[index] = pick(held.best_iterate), pick(held.best_at)
        self.residual[index], self.best_residual[index] = pick(held.residual), pick(held.best_residual)
        out[index] = pick(held.value)

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


@dataclass
class _Sticky:
    """Per running row, between two checks (``check_every > 1``): whether the sample is done (``frozen``) and the
    record :meth:`_Record.finish` would write for it, taken at the iteration that found it done. Updated with
    device-side selects only (no value reaches the host)."""

    frozen: Tensor
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

    @staticmethod
    def start(x: Tensor) -> "_Sticky":
        rows = x.shape[0]
        no = torch.zeros(rows, dtype=torch.bool, device=x.device)
        count = torch.zeros(rows, dtype=torch.long, device=x.device)
        nan = torch.full((rows,), float("nan"), dtype=x.dtype, device=x.device)
        return _Sticky(no, count, no.clone(), no.clone(), no.clone(), no.clone(), no.clone(), count.clone(), nan,
                       nan.clone(), nan.clone(), nan.clone(), x.clone())

    def select(self, keep: Tensor) -> "_Sticky":
        return _Sticky(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

    def hold(self, newly: Tensor, n: int, verdict: _Verdict, x: Tensor, g: Tensor, track: _Tracker) -> None:
        """Take the record of the rows ``newly`` done at iteration ``n`` (as :meth:`_Record.finish` computes it)
        and freeze them."""
        converged, diverged, floor = verdict.outcome(None)
        residual = verdict.residual
        best = ~(converged | floor) & (track.best_residual < residual)
        self.iterations.masked_fill_(newly, n)
        for name, value in (("converged", converged), ("diverged", diverged), ("floor", floor),
                            ("shrank", track.shrank), ("best_iterate", best), ("residual", residual),
                            ("step", verdict.step), ("norm", verdict.norm),
                            ("best_at", torch.where(best, track.best_at, n)),
                            ("best_residual", torch.where(best, track.best_residual, residual))):
            kept = getattr(self, name)
            torch.where(newly, value, kept, out=kept)
        value = torch.where(best.unsqueeze(1), track.best_value, _result(x, g))
        torch.where(newly.unsqueeze(1), value, self.value, out=self.value)
        self.frozen |= newly


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
    for n in range(1, s.max_iter + 1):
        g = evaluate(x)
        if snapshots is not None and n in snapshots:
            snapshots[n] = out.index_copy(0, index, g)
        r = g - x  # the residual, for the judgement and the solver's step
        verdict = _judge(n, x, r, track, s, thresholds)
        track.remember(n, verdict.better, g)
        record.log(index, verdict.residual)
        if n == s.max_iter // 2:
            record.halfway[index] = verdict.residual
        if n == s.max_iter:
            record.finish(index, n, verdict, None, out, x, g, track)
            break
        done = verdict.done
        finished = int(done.sum())  # the one host synchronisation of an iteration
        if finished:
            rows, keep = _split(done, finished)
            record.finish(index[rows], n, verdict, rows, out, x, g, track)
            if finished == index.shape[0]:
                break
            index, x, g, r = index[keep], x[keep], g[keep], r[keep]
            state, track = solver.select(state, keep), track.select(keep)
            evaluate.restrict(index)
        x, state = solver.step(x, g, state, r)
    return out, record.stats(phase, s), record


def _checked_loop(evaluate: Evaluator, x: Tensor, s: SolverSettings, phase: str, out: Tensor, record: _Record,
                  solver, state, track: _Tracker, thresholds: _Thresholds, snapshots):
    """:func:`_loop` with the host reading ``done`` only every ``s.check_every`` iterations (and at ``max_iter``);
    in between, the samples found done are frozen (:class:`_Sticky`) and leave the working set at the next check."""
    index = torch.arange(x.shape[0], device=x.device)
    held = _Sticky.start(x)
    for n in range(1, s.max_iter + 1):
        g = evaluate(x)
        if snapshots is not None and n in snapshots:  # a sample frozen before this iteration: its result
            snapshots[n] = out.index_copy(0, index, torch.where(held.frozen.unsqueeze(1), held.value, g))
        r = g - x
        verdict = _judge(n, x, r, track, s, thresholds)
        track.remember(n, verdict.better, g)
        running = verdict.residual.masked_fill(held.frozen, float("nan"))  # a frozen sample has left the log
        record.log(index, running)
        if n == s.max_iter // 2:
            record.halfway[index] = running
        if n == s.max_iter:
            held.hold(~held.frozen, n, verdict, x, g, track)
            record.write(index, None, held, out)
            break
        held.hold(verdict.done & ~held.frozen, n, verdict, x, g, track)
        if n % s.check_every == 0:
            finished = int(held.frozen.sum())  # the one host synchronisation of a check interval
            if finished:
                rows, keep = _split(held.frozen, finished)
                record.write(index[rows], rows, held, out)
                if finished == index.shape[0]:
                    break
                index, x, g, r = index[keep], x[keep], g[keep], r[keep]
                state, track, held = solver.select(state, keep), track.select(keep), held.select(keep)
                evaluate.restrict(index)
        step, state = solver.step(x, g, state, r)
        x = torch.where(held.frozen.unsqueeze(1), x, step)  # a frozen sample stays where it was found done
    return out, record.stats(phase, s), record


def _split(done: Tensor, finished: int) -> tuple[Tensor, Tensor]:
    """The rows that are ``done`` and the others, each in row order, as indices: one stable sort on the device
    (the host knows ``finished``, how many are done), so that recording and dropping them reads nothing more."""
    order = torch.argsort(done, stable=True)
    kept = done.shape[0] - finished
    return order[kept:], order[:kept]


def _linear(evaluate: Evaluator, x0: Tensor, s: SolverSettings, phase: str, history: bool):
    """The fixed point of an affine map by restarted GMRES, recorded like the iteration's."""
    record = _Record(x0.shape[0], x0, history)
    result = gmres(evaluate, evaluate.restrict, x0, m=s.memory, tol=s.tol, relative=s.criterion == "relative",
                   max_iter=s.max_iter, min_iter=s.min_iter, floor=FLOOR_FACTOR * floor_eps(x0.dtype))
    record.iterations, record.residual, record.best_residual = result.iterations, result.residual, result.residual
    record.converged, record.diverged, record.floor = result.converged, result.diverged, result.floor
    if record.history is not None:
        record.history = result.history
    if x0.shape[0]:  # the large-step check's norms, from the residual (not worth one more evaluation)
        record.norm = torch.linalg.vector_norm(result.x, dim=1)
        record.step = result.residual * record.norm if s.criterion == "relative" else result.residual
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
