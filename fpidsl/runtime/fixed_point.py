"""The differentiable fixed-point operator: ``x_hat = FP(f, x0, args)`` with ``f(x_hat, *args) = x_hat``.

Forward: a solver (:mod:`fpidsl.runtime.solvers`) iterates ``f`` without recording autograd; only ``x_hat`` is
kept, so memory does not grow with the number of iterations.

Backward (the paper's backward FPI): given ``g = dL/dx_hat``, solve ``c = (df/dx)^T c + g`` at ``x_hat`` by
vector-Jacobian products, then ``dL/dargs = (df/dargs)^T c``. The adjoint solve is itself this operator, applied to
the map ``c -> vjp_state(saved, c) + g`` with ``saved`` and ``g`` as explicit arguments, and ``x_hat`` inside the
backward is the saved output of this operator (so it stays attached to ``args`` through it). When the backward
runs with ``create_graph=True`` everything it does is a differentiable operation, and derivatives of every order
are exact; no loop of iterations is ever recorded on the tape. With grad mode off (an ordinary ``.backward()``) the
backward records ``f`` once at ``x_hat`` and reuses it for every product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from .adjoint import Adjoint, AdjointMap, AutogradAdjoint, _Bound, forward_tangent, linearized, vjp_args
from .buffers import kept_buffers, modules_of
from .capture import LOCK as CAPTURE_LOCK
from .capture import NOTHING_CAPTURED, Captured, HiddenTensorError, VersionGuard, check_complete, discover
from .capture import refresh_hooked_weights
from .driver import solve
from .gradient_modes import INEXACT_MODES, inexact_backprop, unrolled_forward
from .warm_start import EvalDerivation, WarmStart
from .layout import StateLayout, States
from .settings import BACKWARD_DEFAULTS, FORWARD_DEFAULTS, SolverSettings, resolve_settings
from .mixing import mixes_samples
from .stats import Stats, enforce
from .transforms import is_transformed, one_level_down, tangent_of_fixed_point, vmap_by_slices
from .precision import solve_in_safe_dtype

SettingsLike = SolverSettings | Mapping[str, Any] | None


@dataclass(frozen=True)
class Hoisted:
    """A faster form of the same map for the forward iterations, as the compiler emits it:
    ``f(x, *args) == step(x, *prepare(*args))`` where ``prepare`` computes once what depends on no state.
    ``batched`` says, per value of ``prepare``, whether dimension 0 is the batch (those values are sliced
    to the running samples when finished samples are dropped)."""

    prepare: Callable[..., Sequence[Any]]
    step: Callable[..., Any]
    batched: tuple[bool, ...]


class _HoistedStep:
    """``f`` on the states through a :class:`Hoisted` form, its values computed once; ``restrict`` slices them."""

    def __init__(self, hoisted: Hoisted, args: Sequence[Any], single: bool):
        self.hoisted, self.single = hoisted, single
        self.full = tuple(hoisted.prepare(*args))
        if len(self.full) != len(hoisted.batched):
            raise ValueError(f"hoisted.prepare returned {len(self.full)} values for {len(hoisted.batched)} "
                             "batched flags")
        self.values = self.full

    def __call__(self, xs: States) -> States:
        return _as_states(self.hoisted.step(xs[0] if self.single else tuple(xs), *self.values), self.single)

    def restrict(self, index: Tensor) -> None:
        self.values = tuple(v.index_select(0, index) if b and isinstance(v, Tensor) else v  # None: eval-mode seeds
                            for v, b in zip(self.full, self.hoisted.batched))


@dataclass(eq=False)
class _Problem:
    """Everything about one fixed point except the tensors: the map, the settings, where the stats go."""

    fn: Callable[..., States]  # pure: fn(xs, *args) -> states; args are explicit, parameters included
    iteration_map: Callable[[Sequence[Any]], Callable[[States], States]]  # args -> fast step used by the solver
    layout: StateLayout
    forward: SolverSettings
    backward: SolverSettings
    adjoint: Adjoint
    stats: Stats
    history: bool
    batched: tuple[bool, ...] | None  # per arg: dimension 0 is the batch (lets the solver drop finished samples)
    phase: str = "forward"
    # the tensors f reads besides its arguments that do not vary, checked unedited at every backward (capture.py)
    guard: VersionGuard | None = None

    @property
    def n_state(self) -> int:
        return len(self.layout.shapes)


# ----------------------------------------------------------------------------------------------------------------
# Evaluating the flattened map on the running samples


def _evaluated(step: Callable[[States], States], layout: StateLayout, x: Tensor) -> Tensor:
    """The map at ``x`` (``(batch, dim)``), flattened; checked to leave ``x`` alone (where ``x`` has a version
    counter: an inference tensor, made under ``torch.inference_mode``, has none) and to keep its samples."""
    if x.is_inference():
        return _same_rows(layout.flatten(step(layout.unflatten(x))), x)
    version = x._version
    out = layout.flatten(step(layout.unflatten(x)))
    if x._version != version:
        raise ValueError("the map changed its state argument in place (x.mul_(...), x += ...): the solver's iterate "
                         "is not the map's to change; compute a new tensor (x = x * ...)")
    return _same_rows(out, x)


def _same_rows(out: Tensor, x: Tensor) -> Tensor:
    """``out``, the map's value at ``x`` (both ``(batch, dim)``), checked to have ``x``'s samples (the layout checks
    the rest of the shape)."""
    if out.shape[0] != x.shape[0]:
        raise ValueError(f"the map returned {out.shape[0]} samples (dimension 0) for a state of {x.shape[0]}; "
                         "f(x, *args) must return x's structure")
    return out


class _WholeBatch:
    """Evaluates the map on the whole batch; a finished sample keeps its last iterate and its output is dropped."""

    def __init__(self, step: Callable[[States], States], layout: StateLayout):
        self.step, self.layout = step, layout
        self.index: Tensor | None = None
        self.full: Tensor | None = None
        self.last: Tensor | None = None

    def _eval(self, x: Tensor) -> Tensor:
        return _evaluated(self.step, self.layout, x)

    def __call__(self, x: Tensor) -> Tensor:
        if self.index is None:
            self.last = x
            return self._eval(x)
        self.full.index_copy_(0, self.index, x)
        return self._eval(self.full).index_select(0, self.index)

    def restrict(self, index: Tensor) -> None:
        if self.full is None:
            self.full = self.last.clone()
        self.index = index


class _Compacting:
    """Evaluates the map on the running samples only, slicing the batched arguments to them."""

    def __init__(self, problem: _Problem, args: Sequence[Any], batched: Sequence[bool]):
        self.problem, self.args, self.batched = problem, tuple(args), tuple(batched)
        self.step = problem.iteration_map(self.args)

    def __call__(self, x: Tensor) -> Tensor:
        return _evaluated(self.step, self.problem.layout, x)

    def restrict(self, index: Tensor) -> None:
        if isinstance(self.step, _HoistedStep):
            self.step.restrict(index)
            return
        sliced = tuple(a.index_select(0, index) if b else a for a, b in zip(self.args, self.batched))
        self.step = self.problem.iteration_map(sliced)


class _Primal:
    """An evaluator whose outputs are their primal values: under forward-mode AD, a map that reads a dual tensor
    it was not given returns duals, which the solvers' tensor code cannot write into its buffers (an ``out=``
    operation has no forward-mode rule). The solve runs on values; :func:`check_complete` then names the tensor."""

    def __init__(self, evaluate):
        self.evaluate = evaluate

    def __call__(self, x: Tensor) -> Tensor:
        return forward_ad.unpack_dual(self.evaluate(x)).primal

    def restrict(self, index: Tensor) -> None:
        self.evaluate.restrict(index)


def _evaluator(problem: _Problem, args: Sequence[Any]):
    if problem.batched is not None and problem.layout.per_sample and any(problem.batched):
        evaluate = _Compacting(problem, args, problem.batched)
    else:
        evaluate = _WholeBatch(problem.iteration_map(args), problem.layout)
    # the forward solve only: check_complete follows it and names a hidden dual tensor; elsewhere (the adjoint solve
    # of forward-over-reverse) a tangent is real and must not be dropped
    return _Primal(evaluate) if problem.phase == "forward" and forward_ad._current_level >= 0 else evaluate


# ----------------------------------------------------------------------------------------------------------------
# Solving (no autograd) and the differentiable operator


def _solve(problem: _Problem, x0: States, args: Sequence[Any]) -> States:
    """The fixed point, computed without recording autograd; fills the stats and applies ``on_fail``."""
    with torch.no_grad():
        start = problem.layout.flatten(tuple(x.detach() for x in x0))
        flat, stats = solve_in_safe_dtype(solve, _evaluator(problem, args), start, problem.forward,
                                          phase=problem.phase, history=problem.history)  # see .precision
    problem.stats.forward = stats
    enforce(stats)
    return problem.layout.unflatten(flat)


def _apply(problem: _Problem, x0: States, args: Sequence[Any]) -> States:
    """The fixed point, as a differentiable operation of ``args`` where autograd needs one."""
    if problem.phase == "forward" and problem.backward.mode == "unrolled":  # pretraining: no solver
        return unrolled_forward(problem, x0, args)
    inputs = (*x0, *args)
    if is_transformed(inputs):
        return _FixedPointFunction.apply(problem, *inputs)
    if _dual(inputs) or (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs)):
        return _plain_apply(problem, *inputs)
    return _solve(problem, x0, args)


def _plain_apply(problem: "_Problem", *inputs: Any) -> States:
    """``_FixedPointFunction.apply`` for inputs no torch.func transform wraps: the base class's apply, which
    ``Function.apply`` calls there after binding ``forward``'s default arguments (it has none) with
    ``inspect.signature``, at every call (76 µs of a 2.2 ms training step under cProfile, on the map and sizes of
    benchmarks/specs/small.fpi); under an active transform,
    ``Function.apply`` itself (it dispatches to the transform)."""
    if torch._C._are_functorch_transforms_active():
        return _FixedPointFunction.apply(problem, *inputs)
    return _BASE_APPLY(problem, *inputs)


class _FixedPointFunction(torch.autograd.Function):
    """``x_hat`` from ``(x0..., args...)``; the backward solves the adjoint fixed point (see the module's doc)."""

    @staticmethod
    def forward(problem: _Problem, *inputs: Any) -> States:
        n = problem.n_state
        if problem.guard is not None and problem.phase == "forward":
            problem.guard.start()  # before the solve's first evaluation of f
        return tuple(x.clone() for x in _solve(problem, inputs[:n], inputs[n:]))

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: States) -> None:
        problem, n = inputs[0], inputs[0].n_state
        args = inputs[1 + n :]
        if problem.guard is not None and problem.phase == "forward":
            problem.guard.mark()  # what the solve wrote is the map's own (batch norm's statistics)
        ctx.problem = problem
        ctx.constants = tuple(_SAVED if isinstance(a, Tensor) else a for a in args)
        tensors = (*output, *(a for a in args if isinstance(a, Tensor)))
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def jvp(ctx, _problem_tangent: None, *tangents: Any) -> States:  # forward mode: fpidsl.runtime.transforms
        n = ctx.problem.n_state
        x_hat, args = _saved(ctx, n)
        return one_level_down(lambda *v: tangent_of_fixed_point(ctx.problem, *v), x_hat, args, tangents[n:])

    @staticmethod
    def vmap(info, in_dims: tuple, problem: _Problem, *inputs: Any):  # torch.func.vmap: one solve per slice
        return vmap_by_slices(_FixedPointFunction.apply, info, in_dims, problem, inputs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:
        if any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads):
            raise RuntimeError(BATCHED_GRADS)
        problem: _Problem = ctx.problem
        if problem.guard is not None:  # a tensor f reads, edited in place since the forward: another map's gradient
            problem.guard.check()
        if torch.is_inference_mode_enabled():  # loss.backward() under torch.inference_mode(): it would stop the
            # backward's recordings of f (torch.enable_grad has no effect there) and every gradient be None, silently
            recording = torch.is_grad_enabled()  # inference_mode(False) turns grad mode on: put it back
            with torch.inference_mode(False), torch.set_grad_enabled(recording):
                return _FixedPointFunction._backward(ctx, problem, grads)
        return _FixedPointFunction._backward(ctx, problem, grads)

    @staticmethod
    def _backward(ctx, problem: _Problem, grads: tuple) -> tuple:
        n = problem.n_state
        x_hat, args = _saved(ctx, n)
        gbar = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, x_hat))
        arg_grads = _backprop(problem, x_hat, args, gbar, ctx.needs_input_grad[1 + n :])
        x0_grads = tuple(torch.zeros_like(x) if need else None for x, need in zip(x_hat, ctx.needs_input_grad[1:]))
        return (None, *x0_grads, *arg_grads)


BATCHED_GRADS = (
    "fixed_point's backward cannot take batched gradients (torch.autograd.grad(..., is_grads_batched=True), "
    "torch.autograd.functional.jacobian or hessian with vectorize=True): PyTorch's legacy vmap behind them has no "
    "rule for the backward's fixed-point solve. Use torch.func.jacrev or torch.func.vmap over torch.func.vjp, "
    "which solve one backward fixed point per row, or vectorize=False")

# the apply that Function.apply ends in outside torch.func transforms (torch.autograd.function.Function.apply)
_BASE_APPLY = super(torch.autograd.Function, _FixedPointFunction).apply


def _dual(inputs: Sequence[Any]) -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) carries a tangent on any input."""
    return forward_ad._current_level >= 0 and any(forward_tangent(t) is not None for t in inputs)  # level: cheap


_SAVED = object()  # in ctx.constants: the place of a saved tensor (a constant may itself be None: dropout's seeds)


def _saved(ctx, n: int) -> tuple[States, tuple]:
    """The fixed point and the arguments that the forward saved (constants put back in their places)."""
    saved = ctx.saved_tensors
    x_hat, tensors = saved[:n], iter(saved[n:])
    return tuple(x_hat), tuple(next(tensors) if c is _SAVED else c for c in ctx.constants)


def _backprop(problem: _Problem, x_hat: States, args: tuple, gbar: States, needs: Sequence[bool]) -> tuple:
    """``(df/dargs)^T c`` with ``c`` the fixed point of ``c = (df/dx)^T c + gbar``; ``None`` where not needed."""
    if not any(needs):
        return (None,) * len(args)
    if problem.phase == "forward" and problem.backward.mode in INEXACT_MODES:  # jfb, phantom: no adjoint solve
        return inexact_backprop(problem, x_hat, args, gbar, needs)
    adjoint = problem.adjoint
    saved = tuple(adjoint.prepare(x_hat, args))
    adjoint_stats = problem.stats.record_adjoint(Stats())
    start = tuple(g.detach() for g in gbar)
    # recording a higher derivative: create_graph, a torch.func transform, or forward-mode AD over the backward (a
    # dual fixed point, argument or cotangent: the adjoint's own tangent fixed point carries it)
    if torch.is_grad_enabled() or is_transformed((*x_hat, *args, *gbar)) or _dual((*x_hat, *args, *gbar)):
        c = _apply(_adjoint_problem(problem, saved, adjoint_stats), start, (*saved, *gbar))
        grads = vjp_args(adjoint, saved, c, needs)
    else:
        lin = linearized(adjoint, saved)
        c = _solve(_adjoint_problem(problem, saved, adjoint_stats, lin), start, (*saved, *gbar))
        grads = tuple(lin.vjp_args(c, needs)) if isinstance(lin, _Bound) else tuple(lin.vjp_args(c))
    if len(grads) != len(args):
        raise ValueError(f"{adjoint!r}.vjp_args returned {len(grads)} gradients for {len(args)} arguments")
    return tuple(g if need else None for g, need in zip(grads, needs))


def _adjoint_problem(problem: _Problem, saved: tuple, stats: Stats, lin=None) -> _Problem:
    """The backward fixed-point iteration of ``problem`` as a fixed-point problem of its own."""
    return derived_problem(problem, AdjointMap(problem.adjoint, len(saved), lin), stats, "backward")


def derived_problem(problem: _Problem, t_map, stats: Stats, phase: str) -> _Problem:
    """A fixed-point problem derived from ``problem`` (its adjoint, its tangent): the map ``t_map`` solved with
    ``problem``'s backward settings, and differentiated again by autograd through ``t_map``."""
    return _Problem(
        fn=t_map,
        iteration_map=t_map.iteration_map,
        layout=problem.layout,
        forward=problem.backward,
        backward=problem.backward,
        adjoint=AutogradAdjoint(t_map, tuple_states=True),
        stats=stats,
        history=problem.history,
        batched=None,
        phase=phase,
        guard=problem.guard,  # a higher derivative evaluates f again too
    )


# ----------------------------------------------------------------------------------------------------------------
# The user's map


def _as_states(y: Any, single: bool) -> States:
    if single:
        if not isinstance(y, Tensor):
            raise TypeError(f"f(x, *args) must return a tensor like x0, got {type(y).__name__}")
        return (y,)
    if not isinstance(y, (tuple, list)):
        raise TypeError(f"f(x, *args) must return a tuple of tensors like x0, got {type(y).__name__}")
    return tuple(y)


def _user_problem(
    f: Callable, single: bool, n_user: int, layout: StateLayout, forward: SolverSettings, backward: SolverSettings,
    adjoint: Adjoint | None, stats: Stats, history: bool, batched: Sequence[bool] | None, captured: Captured,
    hoisted: Hoisted | None = None,
) -> _Problem:
    n_params = len(captured.tensors)

    def fn(xs: States, *args: Any) -> States:  # the captured tensors are the trailing arguments
        x = xs[0] if single else tuple(xs)
        if n_params:
            with captured.substituted(args[n_user:]):
                return _as_states(f(x, *args[:n_user]), single)
        return _as_states(f(x, *args), single)

    guard = captured.version_guard()
    fn.version_guard = guard  # check_complete's evaluation marks it (what it writes is the map's own)

    def iteration_map(args: Sequence[Any]) -> Callable[[States], States]:
        user = tuple(args[:n_user])  # a module's own parameters are the trailing arguments
        if hoisted is not None:
            return _HoistedStep(hoisted, user, single)

        values = tuple(args[n_user:])
        if any(v is not t for v, t in zip(values, captured.tensors)):  # a slice of vmap's rule: put it in place
            def substituted_step(xs: States) -> States:
                with captured.substituted(values):
                    return _as_states(f(xs[0] if single else tuple(xs), *user), single)

            return substituted_step

        if not n_params:
            def step(xs: States) -> States:
                return _as_states(f(xs[0] if single else tuple(xs), *user), single)
        else:
            def step(xs: States) -> States:  # the captured tensors are where f reads them (not another thread's)
                with CAPTURE_LOCK:
                    return _as_states(f(xs[0] if single else tuple(xs), *user), single)

        return step

    return _Problem(
        fn=fn,
        iteration_map=iteration_map,
        layout=layout,
        forward=forward,
        backward=backward,
        adjoint=adjoint if adjoint is not None else AutogradAdjoint(fn, tuple_states=True),
        stats=stats,
        history=history,
        batched=None if batched is None else (*batched, *([False] * n_params)),
        guard=guard,
    )


def _check_batched(batched: Sequence[bool] | None, args: tuple, layout: StateLayout, x0: States) -> None:
    if batched is None or not layout.per_sample:
        return
    if len(batched) != len(args):
        raise ValueError(f"batched has {len(batched)} entries for {len(args)} arguments; give one bool per argument")
    rows = x0[0].shape[0] if layout.per_sample else 1
    for i, (a, b) in enumerate(zip(args, batched)):
        if b and not (isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == rows):
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"argument {i} is marked batched but is {shape}; a batched argument has the batch "
                             f"size {rows} in dimension 0")


# The trace front-end (fpidsl.tracing, which sits above the compiler) registers its planner here when it is
# imported (``fpidsl.fixed_point`` is re-exported through it): the runtime imports nothing of the compiler, and
# emitted modules, which import only the runtime, never trace.
_trace_planner: Callable | None = None


def register_trace_planner(planner: Callable) -> None:
    """``planner(f, x0, args, batched, per_sample)`` -> a compiled plan of ``f`` (``step``, ``arguments``,
    ``adjoint``, ``batched``, ``hoisted``) or None; :func:`fixed_point` with ``trace=True`` asks it first."""
    global _trace_planner
    _trace_planner = planner


@torch.compiler.disable  # torch.compile of a model: the solve is one graph break, never traced (docs/PYTORCH.md)
def _run(
    f: Callable, x0: Tensor | Sequence[Tensor], args: tuple, forward: SolverSettings, backward: SolverSettings,
    adjoint: Adjoint | None, stats: Stats, history: bool, batched: Sequence[bool] | None, per_sample: bool | None,
    hoisted: Hoisted | None = None, capture: str = "auto", trace: bool = False,
) -> Tensor | States:
    if capture not in ("auto", "explicit"):
        raise ValueError(f"capture must be 'auto' or 'explicit', got {capture!r}")
    single = isinstance(x0, Tensor)
    x0s = (x0,) if single else tuple(x0)
    probe, per_sample = per_sample is None, per_sample is not False  # None: per sample unless f mixes them
    layout = StateLayout.of(x0s, per_sample)
    _check_batched(batched, args, layout, x0s)
    if trace and _trace_planner is not None and capture == "auto" and adjoint is None and hoisted is None \
            and not is_transformed((*x0s, *args)) and not _dual((*x0s, *args)):
        plan = _trace_planner(f, x0, args, batched, per_sample)  # the compiled form of f, when f traces
        if plan is not None:
            joint = plan.per_sample is False or (plan.per_sample is None and probe
                                                 and _mixes(f, single, x0s, args, discover(f)))
            out = _run(plan.step, x0, plan.arguments, forward, backward, plan.adjoint, stats, history, plan.batched,
                       not joint, plan.hoisted, "explicit")
            refresh_hooked_weights(plan.hooked)
            return out
    captured = discover(f) if capture == "auto" else NOTHING_CAPTURED
    if probe and layout.per_sample and _mixes(f, single, x0s, args, captured):
        layout = StateLayout.of(x0s, False)  # one problem over the whole batch (fpidsl.runtime.mixing)
    params = tuple(captured.tensors)
    if hoisted is not None and params:
        raise ValueError("hoisted needs f to take every tensor as an argument (not an nn.Module's parameters)")
    if adjoint is not None and len(params) > captured.module_parameters:
        raise HiddenTensorError(
            f"f reads {captured.where(captured.module_parameters)}, which requires grad, and a custom adjoint "
            "sees only the arguments (and an nn.Module f's parameters): pass the tensor as an argument")
    problem = _user_problem(f, single, len(args), layout, forward, backward, adjoint, stats, history, batched,
                            captured, hoisted)
    x_hat = _apply(problem, x0s, (*args, *params))
    if capture == "auto":
        check_complete(problem.fn, x_hat, (*args, *params), keep=modules_of(f))
        refresh_hooked_weights(captured.hooked)
    return x_hat[0] if single else tuple(x_hat)


def _mixes(f: Callable, single: bool, x0s: tuple[Tensor, ...], args: tuple,
           captured: Captured = NOTHING_CAPTURED) -> bool:
    """Whether ``f`` mixes the samples (:func:`~fpidsl.runtime.mixing.mixes_samples`, at ``x0``; not under a
    ``torch.func`` transform or with forward-mode tangents, where the transform owns the batch), the buffers
    (batch norm's running statistics) of its modules left as they were: ``f``'s own and those the capture walk
    found (closures, globals, attributes: ``captured.modules``)."""
    if torch._C._functorch.maybe_current_level() is not None or is_transformed((*x0s, *args)) or _dual((*x0s, *args)):
        return False  # inside vmap, grad or jvp (a closure may hold the wrapped tensors): the transform's batch

    def evaluate(xs: tuple[Tensor, ...]):
        return f(xs[0] if single else xs, *args)

    with CAPTURE_LOCK, kept_buffers({id(m): m for m in (*modules_of(f), *captured.modules)}.values()):
        return mixes_samples(evaluate, x0s)


def fixed_point(
    f: Callable,
    x0: Tensor | Sequence[Tensor],
    *args: Any,
    backward: SettingsLike = None,
    solve: SettingsLike = None,
    adjoint: Adjoint | None = None,
    stats: Stats | None = None,
    history: bool = False,
    return_stats: bool = False,
    batched: Sequence[bool] | None = None,
    per_sample: bool | None = None,
    hoisted: Hoisted | None = None,
    capture: str = "auto",
    trace: bool = True,
    **forward_settings: Any,
) -> Any:
    """The fixed point ``x_hat = f(x_hat, *args)``, differentiable (to any order) in ``args`` and in every other
    tensor requiring grad that ``f`` reads (module parameters, closures, ...: see ``capture``).

    Args:
        f: ``f(x, *args)``, returning the structure of ``x`` (a tensor, or a tuple of tensors: several states
            iterated together). Where it mixes the samples (dimension 0 of every state), see ``per_sample``.
        x0: the start, a tensor or a tuple of tensors; dimension 0 is the batch. The gradient with respect to it
            is zero. The result has the structure, dtype and device of ``x0``.
        *args: tensors (or constants) that ``f`` reads; gradients flow to the tensors that require them.
        backward: settings of the backward fixed-point iteration, a mapping over
            :data:`~fpidsl.runtime.settings.BACKWARD_DEFAULTS` or a :class:`SolverSettings`.
        adjoint: the vector-Jacobian products of ``f`` (see :mod:`fpidsl.runtime.adjoint`); default
            :class:`AutogradAdjoint`. When ``f`` is an ``nn.Module``, its parameters follow ``args`` in the
            arguments the adjoint sees, in ``f.parameters()`` order.
        stats: a :class:`Stats` to fill (``forward`` now, ``backward`` when a backward runs).
        history: record every iteration's residual in the stats.
        return_stats: return ``(x_hat, stats)`` instead of ``x_hat``.
        batched: one bool per argument: ``True`` where dimension 0 of the argument is the batch. Given, the
            solver evaluates ``f`` on the samples still running only (arguments sliced accordingly); otherwise
            ``f`` always sees the whole batch and finished samples are held fixed.
        per_sample: ``None`` (default): dimension 0 of the states is the batch, and each sample is judged,
            held and finished alone unless ``f`` mixes samples (found by a probe at ``x0``: five evaluations of
            ``f``, :mod:`fpidsl.runtime.mixing`; a traced ``f`` knows), when the batch is solved as one problem.
            ``True``: the same, without the probe (``f`` treats the samples independently: it must). ``False``:
            the whole state is one sample (no batch dimension).
        hoisted: a :class:`Hoisted` form of ``f`` that the forward iterations use instead of ``f`` (compiled
            layers pass the one the compiler emits); the backward and the differentiable application use ``f``.
        capture: ``"auto"`` (default): the tensors requiring grad that ``f`` reads besides ``args`` (module
            parameters, closure variables, ``functools.partial`` arguments, globals, ...; see
            :mod:`fpidsl.runtime.capture`) become extra arguments and get their exact gradient; after the solve
            ``f`` is evaluated once more at the fixed point (grad mode on only) to check that it reads no other
            tensor requiring grad, else :class:`~fpidsl.runtime.capture.HiddenTensorError`. ``"explicit"``:
            ``f`` reads no tensor requiring grad but its arguments (compiled layers; no discovery, no check).
        trace: ``True`` (default): when ``f`` traces with ``torch.fx`` into the primitive table, solve with the
            compiled map instead (the derived backward, hoisting and narrowing of a compiled spec; the same numbers,
            checked at the first call), traced once per ``f`` and signature (:mod:`fpidsl.tracing.auto`,
            docs/TRACE.md); otherwise, or with ``trace=False``, ``f`` through autograd. Only for tensor states
            (one, or a tuple), ``per_sample`` None or True, ``capture="auto"`` and no ``adjoint`` or ``hoisted``.
        solve: the forward's settings as one value (a :class:`SolverSettings`, taken as validated, or a mapping);
            ``forward_settings`` apply over it.
        **forward_settings: the solver settings of the forward (``method``, ``m``, ``beta``, ``lam``, ``tol``,
            ``criterion``, ``max_iter``, ``min_iter``, ``check_every``, ``on_fail``) over
            :data:`~fpidsl.runtime.settings.FORWARD_DEFAULTS`; an unknown key raises ``SettingsError``. The
            backward's ``mode`` (``implicit``, ``jfb``, ``phantom`` with ``k`` and ``tau``, ``unrolled`` with ``k``;
            :mod:`fpidsl.runtime.gradient_modes`) and ``method="gmres"`` go in ``backward``.

    Raises:
        ConvergenceError: a forward (or, later, backward) solve failed and ``on_fail='raise'``; with
            ``on_fail='warn'`` a :class:`ConvergenceWarning` is issued instead.
    """
    forward = resolve_settings(solve, FORWARD_DEFAULTS).merged(forward_settings)
    backward_settings = resolve_settings(backward, BACKWARD_DEFAULTS)
    stats = Stats() if stats is None else stats
    x_hat = _as_given(x0, _run(f, x0, args, forward, backward_settings, adjoint, stats, history, batched, per_sample,
                               hoisted, capture, trace))
    return (x_hat, stats) if return_stats else x_hat


def _as_given(x0: Any, x_hat: Any) -> Any:
    """The result in ``x0``'s structure: a list of states for a list (as torchdeq returns them), else as solved."""
    return list(x_hat) if isinstance(x0, list) and isinstance(x_hat, tuple) else x_hat


class FixedPoint(nn.Module):
    """A fixed-point layer holding the map ``f`` and the settings; ``forward(x0, *args)`` returns ``x_hat``.

    ``solve`` and ``backward`` are mappings of setting keys merged over the forward and backward defaults (an
    unknown key raises ``SettingsError``), or :class:`SolverSettings`. When ``f`` is an ``nn.Module`` it is a
    submodule and its parameters get gradients. After each call ``self.stats`` holds that call's :class:`Stats`
    (its ``backward`` is filled when the backward runs). ``adjoint``, ``batched``, ``per_sample`` and ``history``
    are as in :func:`fixed_point`. ``eval_solve`` (keys over ``solve``) applies instead of ``solve`` in eval mode
    (``module.eval()``): an inference budget. ``warm_start=True`` starts each call from the previous call's fixed
    point where the start has the same shapes (:mod:`fpidsl.runtime.warm_start`). ``trace`` is as in
    :func:`fixed_point`.
    """

    def __init__(
        self,
        f: Callable,
        solve: SettingsLike = None,
        backward: SettingsLike = None,
        *,
        adjoint: Adjoint | None = None,
        batched: Sequence[bool] | None = None,
        per_sample: bool | None = None,
        history: bool = False,
        eval_solve: SettingsLike = None,
        warm_start: bool = False,
        trace: bool = True,
    ):
        super().__init__()
        self.f = f
        self.solve_settings = resolve_settings(solve, FORWARD_DEFAULTS)
        self._eval = EvalDerivation(self.solve_settings, eval_solve)
        self.eval_settings = self._eval.derived
        self.warm = WarmStart(warm_start)
        self.backward_settings = resolve_settings(backward, BACKWARD_DEFAULTS)
        self.adjoint = adjoint
        self.batched = None if batched is None else tuple(batched)
        self.per_sample = per_sample
        self.history = history
        self.trace = trace
        self.stats: Stats | None = None

    def forward(self, x0: Tensor | Sequence[Tensor], *args: Any) -> Any:
        self.stats = Stats()
        settings = self.solve_settings if self.training else self._eval_solve_settings()
        x_hat = _run(self.f, self.warm.start(x0, self.backward_settings), args, settings, self.backward_settings,
                     self.adjoint, self.stats, self.history, self.batched, self.per_sample, trace=self.trace)
        self.warm.remember(x_hat, self.stats.forward.diverged if self.stats.forward is not None else None)
        return _as_given(x0, x_hat)

    def _eval_solve_settings(self) -> SolverSettings:
        """The eval-mode settings (:class:`~fpidsl.runtime.warm_start.EvalDerivation`: derived ones follow a later
        ``solve_settings``)."""
        derivation = self.__dict__.get("_eval")
        if derivation is not None:
            self.__dict__["eval_settings"] = derivation.settings(self.solve_settings, self.eval_settings)
        return self.eval_settings

    def extra_repr(self) -> str:
        def short(s: SolverSettings, defaults: SolverSettings) -> str:
            changed = {k: v for k, v in s.as_dict().items() if v != getattr(defaults, k)}
            return ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "defaults"

        return (f"solve: {short(self.solve_settings, FORWARD_DEFAULTS)}; "
                f"backward: {short(self.backward_settings, BACKWARD_DEFAULTS)}")
