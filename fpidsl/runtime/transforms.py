"""Forward-mode AD and ``torch.func.vmap`` for the fixed-point operator.

Forward mode. Differentiating ``x_hat = g(x_hat, theta)`` along a direction ``dtheta`` gives the tangent
``t = dx_hat`` as the fixed point of a linear map of its own::

    t = (dg/dx) t + (dg/dtheta) dtheta        (both Jacobians at x_hat)

:func:`tangent_of_fixed_point` computes ``b = (dg/dtheta) dtheta`` with one ``torch.func.jvp`` and solves the
tangent fixed point with the same fixed-point operator (and so the same solvers and settings as the backward:
the layer's ``backward`` settings), its map ``t -> jvp_x(t) + b`` evaluated by ``torch.func.jvp`` of ``g``. The
tangent solve is itself a differentiable fixed point of explicit arguments, so reverse mode over forward mode
(``jacrev(jacfwd(...))``) and forward over forward stay exact, as the backward does.

vmap. A solve has data-dependent control flow (per-sample convergence tests), which ``vmap`` cannot batch.
:func:`vmap_by_slices` is the operator's vmap rule: one solve per slice of the vmapped dimension, stacked. It is
exact; it costs one solve per slice (``jacrev`` / ``jacfwd`` over a fixed point solve one backward / tangent
fixed point per row of the Jacobian).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .torch_faults import norms_with_a_separate_bias

States = tuple[Tensor, ...]


def is_transformed(values: Sequence[Any]) -> bool:
    """Whether any of ``values`` is a tensor wrapped by a ``torch.func`` transform (vmap, grad, jvp)."""
    return any(isinstance(v, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(v) for v in values)


def jvp(fn: Callable[..., States], primals: States, tangents: States) -> States:
    """``(d fn / d primals) tangents``: ``torch.func.jvp``, or, inside a ``torch.autograd.forward_ad`` level
    (which does not nest), the transpose of a vector-Jacobian product (``torch.func.vjp`` twice; exact too).

    Inside ``torch.func.jvp`` (``jacfwd``, ``hessian``) the dual level open is its own and ``torch.func.jvp`` nests, so
    torch's forward-mode rules are used there too: the transposed form differentiated torch's double backward of
    ``batch_norm`` (eval mode), ``instance_norm`` and ``layer_norm`` under ``vmap``, which fails for a batched weight
    or bias ("output with shape [2, 4] doesn't match the broadcast shape [4, 2, 4]", also ``linalg.solve``) where
    the forward-mode rules work. An operation without a forward-mode rule there (``native_group_norm_backward``,
    reached by the tangent of an adjoint solve) takes the transposed form, as before."""
    from torch._functorch import eager_transforms
    from torch.autograd import forward_ad

    # make_dual writes into its primal: an expanded one (the cotangent of .sum(), under torch.func.hessian) raised
    # "more than one element of the written-to tensor refers to a single memory location"
    primals = tuple(_dense(p) for p in primals)
    tangents = tuple(_dense(t) for t in tangents)
    with norms_with_a_separate_bias(higher=True):  # torch's faulty derivatives worked around
        if forward_ad._current_level < 0:
            return tuple(torch.func.jvp(fn, tuple(primals), tuple(tangents))[1])
        if eager_transforms.JVP_NESTING > 0:  # inside torch.func.jvp
            try:
                return tuple(torch.func.jvp(fn, tuple(primals), tuple(tangents))[1])
            except NotImplementedError:  # "Trying to use forward AD with ... that does not support it"
                pass
        return _transposed_vjp(fn, primals, tangents)


def _dense(t: Any) -> Any:
    """``t`` with storage of its own where it is a view sharing memory between its elements (an expanded tensor)."""
    dense = isinstance(t, torch.Tensor) and t.layout == torch.strided
    return t.contiguous() if dense and not t.is_contiguous() else t


def _transposed_vjp(fn: Callable[..., States], primals: States, tangents: States) -> States:
    """``(d fn / d primals) tangents`` as the transpose of the (linear) vector-Jacobian product."""
    y, pull = torch.func.vjp(fn, *primals)
    cotangent = tuple(torch.zeros_like(yi) for yi in y)
    _, pull_transposed = torch.func.vjp(lambda *u: tuple(pull(tuple(u))), *cotangent)
    return tuple(pull_transposed(tuple(tangents)))


class TangentMap:
    """``T(t; x_hat, args, b) = (dg/dx)(x_hat, args) t + b``, a pure function of its explicit arguments."""

    def __init__(self, fn: Callable[..., States], n_state: int, n_args: int):
        self.fn, self.n_state, self.n_args = fn, n_state, n_args

    def __repr__(self) -> str:
        return f"TangentMap({self.fn!r})"

    def split(self, rest: Sequence[Any]) -> tuple[States, tuple, States]:
        n, k = self.n_state, self.n_args
        return tuple(rest[:n]), tuple(rest[n : n + k]), tuple(rest[n + k :])

    def jvp_state(self, x_hat: States, args: tuple, t: States) -> States:
        return jvp(lambda *xs: tuple(self.fn(tuple(xs), *args)), x_hat, t)

    def __call__(self, t: States, *rest: Any) -> States:
        x_hat, args, b = self.split(rest)
        return tuple(j + bi for j, bi in zip(self.jvp_state(x_hat, args, t), b))

    def iteration_map(self, rest: Sequence[Any]) -> Callable[[States], States]:
        x_hat, args, b = self.split(rest)

        def step(t: States) -> States:
            return tuple(j + bi for j, bi in zip(self.jvp_state(x_hat, args, t), b))

        return step


def _args_tangent(fn: Callable[..., States], x_hat: States, args: tuple, tangents: Sequence[Any]) -> States | None:
    """``(dg/dargs) dargs`` at ``x_hat``; ``None`` where no argument has a tangent."""
    moving = [i for i, (a, t) in enumerate(zip(args, tangents)) if isinstance(a, Tensor) and t is not None]
    if not moving:
        return None

    def g_of(*values: Tensor) -> States:
        full = list(args)
        for i, v in zip(moving, values):
            full[i] = v
        return tuple(fn(tuple(x_hat), *full))

    return jvp(g_of, tuple(args[i] for i in moving), tuple(tangents[i] for i in moving))


def _tangent_stats(stats: Any) -> Any:
    """A fresh :class:`Stats` for a tangent solve, kept as ``stats.tangent`` (the last one)."""
    from .stats import Stats

    stats.tangent = Stats()
    return stats.tangent


def tangent_of_fixed_point(problem: Any, x_hat: States, args: tuple, arg_tangents: Sequence[Any]) -> States:
    """The tangent of the fixed point along ``arg_tangents`` (one per argument, ``None`` for none): see the
    module's doc. ``problem`` is the operator's ``_Problem``."""
    from .fixed_point import _apply, derived_problem

    b = _args_tangent(problem.fn, x_hat, args, arg_tangents)
    if b is None:
        return tuple(torch.zeros_like(x) for x in x_hat)
    t_map = TangentMap(problem.fn, len(x_hat), len(args))
    tangent = derived_problem(problem, t_map, _tangent_stats(problem.stats), "tangent")
    start = tuple(bi.detach() if not is_transformed((bi,)) else bi for bi in b)
    return tuple(_apply(tangent, start, (*x_hat, *args, *b)))


def one_level_down(rule: Callable[..., States], *inputs: Any) -> States:
    """``rule(*inputs)`` for an ``autograd.Function``'s ``jvp`` staticmethod under ``torch.func.jvp``, computed one
    functorch level down so that an enclosing transform differentiates it.

    PyTorch runs a Function's jvp rule at the rule's own level with forward gradients off, so an outer
    ``torch.func.jvp`` silently drops the tangent's own derivative (forward over forward gave zero second
    derivatives: pytorch/pytorch#197867, still so in 2.13). The rule is run here the way functorch runs the
    Function's ``forward``: on inputs unwrapped at the current level, under ``interpreter.lower()`` with forward and
    backward gradients on, its outputs wrapped again. Outside ``torch.func.jvp`` (``torch.autograd.forward_ad``)
    it is ``rule(*inputs)``."""
    from torch._C._functorch import TransformType, _unwrap_for_grad, _wrap_for_grad
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    from torch.autograd.forward_ad import _set_fwd_grad_enabled
    from torch.utils._pytree import tree_map_only

    if torch._C._functorch.peek_interpreter_stack() is None:
        return rule(*inputs)
    interpreter = retrieve_current_functorch_interpreter()
    if interpreter.key() != TransformType.Jvp:
        return rule(*inputs)
    level = interpreter.level()
    lowered = tree_map_only(Tensor, lambda t: _unwrap_for_grad(t, level), inputs)
    with torch.enable_grad(), _set_fwd_grad_enabled(True), interpreter.lower():
        out = rule(*lowered)
    return tuple(_wrap_for_grad(t, level) for t in out)


def vmap_by_slices(apply: Callable[..., States], info: Any, in_dims: Sequence[Any], problem: Any,
                   inputs: Sequence[Any]) -> tuple[States, tuple[int, ...]]:
    """The vmap rule of the operator: ``apply(problem, *slice)`` for each slice of the vmapped dimension."""
    dims = tuple(in_dims[1:])  # in_dims[0] is the problem's
    outs = []
    for b in range(info.batch_size):
        sliced = tuple(x.select(d, b) if d is not None and isinstance(x, Tensor) else x
                       for x, d in zip(inputs, dims))
        outs.append(apply(problem, *sliced))
    stacked = tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))
    return stacked, (0,) * len(stacked)


# ----------------------------------------------------------------------------------------------------------------
# Vector-Jacobian products under torch.func transforms (where torch.autograd.grad and requires_grad_ are not
# allowed): the same partial derivatives through torch.func.vjp, which every transform composes with.


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex())


def func_vjp_state(call: Callable[[States, Sequence[Any]], States], xs: States, args: Sequence[Any],
                   c: States) -> States:
    """``(dg/dx)^T c`` by ``torch.func.vjp``."""
    _, pull = torch.func.vjp(lambda *x: tuple(call(tuple(x), args)), *xs)
    return tuple(pull(tuple(c)))


def func_vjp_args(call: Callable[[States, Sequence[Any]], States], xs: States, args: Sequence[Any],
                  c: States) -> tuple[Tensor | None, ...]:
    """``(dg/dargs)^T c`` by ``torch.func.vjp``, for every floating-point tensor argument (``None`` elsewhere)."""
    moving = [i for i, a in enumerate(args) if _floating(a)]
    if not moving:
        return (None,) * len(args)

    def g_of(*values: Tensor) -> States:
        full = list(args)
        for i, v in zip(moving, values):
            full[i] = v
        return tuple(call(tuple(xs), full))

    _, pull = torch.func.vjp(g_of, *(args[i] for i in moving))
    out: list[Tensor | None] = [None] * len(args)
    for i, g in zip(moving, pull(tuple(c))):
        out[i] = g
    return tuple(out)
