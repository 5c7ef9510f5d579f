"""The adjoint protocol: the vector-Jacobian products that the backward fixed-point iteration is made of.

An adjoint for a map ``f(x, *args)`` (``x`` a tuple of state tensors) is an object with

- ``prepare(x_hat, args) -> saved``: a tuple computed (differentiably) from the fixed point ``x_hat`` (a tuple of
  state tensors) and ``args``; everything that depends only on the fixed point (activations, masks) is computed
  here, once. Entries that are not tensors are passed through as constants.
- ``vjp_state(saved, c) -> tuple``: ``(df/dx)^T c`` for ``c`` a tuple like the states, made only of
  differentiable torch operations on ``saved`` and ``c``;
- ``vjp_args(saved, c) -> tuple``: ``(df/dargs)^T c``, one entry per argument (``None`` for one that gets no
  gradient). An adjoint whose class sets ``SELECTIVE_VJP_ARGS = True`` takes ``needs`` (one bool per argument)
  as a third argument and computes only the gradients asked for (compiled layers: no gradient for a data
  input that does not require one).

The derivatives are partial: ``x`` and ``args`` are independent variables there, although ``x_hat`` depends on
``args`` (the paper's operator ``P``). Compiled layers emit such an object with a hand-derived backward map;
:class:`AutogradAdjoint` builds one for any ``f`` from autograd.

An adjoint may also offer ``linearize(saved)``, returning an object with ``vjp_state(c)`` and ``vjp_args(c)``
that reuses one recorded evaluation of ``f`` at the fixed point for every product. The runtime uses it where no
higher derivative is being recorded (grad mode off), so each backward iteration costs one vector-Jacobian
product and no re-evaluation of ``f``.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .torch_faults import norms_with_a_separate_bias
from .transforms import func_vjp_args, func_vjp_state, is_transformed

States = tuple[Tensor, ...]


class Adjoint(Protocol):
    def prepare(self, x_hat: States, args: tuple) -> tuple: ...

    def vjp_state(self, saved: tuple, c: States) -> States: ...

    def vjp_args(self, saved: tuple, c: States) -> tuple[Tensor | None, ...]: ...


class Linearized(Protocol):
    def vjp_state(self, c: States) -> States: ...

    def vjp_args(self, c: States) -> tuple[Tensor | None, ...]: ...


def _wants_grad(value: Any) -> bool:
    return isinstance(value, Tensor) and value.requires_grad and value.is_floating_point()


def _independent(t: Tensor, create_graph: bool) -> Tensor:
    """A variable standing for ``t`` that autograd can differentiate with respect to, on its own.

    Recording (``create_graph``) and ``t`` attached: an alias, so the result stays differentiable with respect to
    whatever ``t`` depends on, while a gradient taken with respect to the alias only sees the alias' direct uses
    (a partial derivative). Otherwise: a detached leaf.
    """
    if create_graph and t.requires_grad:
        return t.view_as(t)
    return detached(t).requires_grad_()


def forward_tangent(t: Any) -> Tensor | None:
    """The forward-mode tangent ``t`` carries (``torch.autograd.forward_ad``, ``torch.func.jvp``), else None (a
    sparse tensor has no storage for ``unpack_dual`` to read: none)."""
    if forward_ad._current_level < 0 or not isinstance(t, Tensor) or t.layout != torch.strided:
        return None
    return forward_ad.unpack_dual(t).tangent


def detached(t: Tensor) -> Tensor:
    """``t.detach()`` that keeps a forward-mode tangent (``detach`` drops it): forward mode over the backward
    (``autograd.grad`` inside ``forward_ad.dual_level``) differentiates the vector-Jacobian products through it."""
    tangent = forward_tangent(t)
    if tangent is None:
        return t.detach()
    return forward_ad.make_dual(forward_ad.unpack_dual(t).primal.detach(), tangent)


def _pair_outputs(y: States, c: States) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs that depend on something differentiable, with their cotangents."""
    outputs, cotangents = [], []
    for yi, ci in zip(y, c):
        if yi.requires_grad:
            outputs.append(yi)
            cotangents.append(ci)
    return outputs, cotangents


def _grads(y: States, wrt: Sequence[Tensor], c: States, create_graph: bool, retain: bool) -> list[Tensor | None]:
    outputs, cotangents = _pair_outputs(y, c)
    if not outputs or not wrt:
        return [None] * len(wrt)
    return list(torch.autograd.grad(outputs, list(wrt), cotangents, create_graph=create_graph,
                                    retain_graph=retain or create_graph, allow_unused=True))


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> States:
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, like))


class AutogradAdjoint:
    """The adjoint of any differentiable ``f(x, *args)``, by autograd.

    ``f`` follows the :func:`~fpidsl.runtime.fixed_point` convention: it receives the state as a tensor when there
    is one state (unless ``tuple_states``) and as a tuple otherwise, and returns the same structure.
    ``saved`` is ``(number of states, *x_hat, *args)``: nothing is precomputed, so every product is a
    differentiable function of the explicit ``saved`` and ``c`` (with ``create_graph`` when grad mode is on), and
    differentiating it again is exact. :meth:`linearize` gives the fast form for grad mode off.
    """

    def __init__(self, f: Callable, tuple_states: bool = False):
        self.f = f
        self.tuple_states = tuple_states

    def __repr__(self) -> str:
        return f"AutogradAdjoint({self.f!r})"

    def call(self, xs: States, args: Sequence[Any], higher: bool = True) -> States:
        """``f`` on a tuple of states, returning a tuple of states; every evaluation here is one to differentiate,
        so torch's faulty derivatives are worked around (:mod:`fpidsl.runtime.torch_faults`: about 2 µs a torch
        call of ``f``, and only on the backward's side), those of higher order too unless ``higher`` is False (the
        products taken of this evaluation will not be differentiated)."""
        x = xs if (self.tuple_states or len(xs) > 1) else xs[0]
        with norms_with_a_separate_bias(higher):
            y = self.f(x, *args)
        if isinstance(y, Tensor):
            return (y,)
        return tuple(y)

    @staticmethod
    def split(saved: tuple) -> tuple[States, tuple]:
        n = saved[0]
        return tuple(saved[1 : 1 + n]), tuple(saved[1 + n :])

    def prepare(self, x_hat: States, args: tuple) -> tuple:
        return (len(x_hat), *x_hat, *args)

    def vjp_state(self, saved: tuple, c: States) -> States:
        xs, args = self.split(saved)
        if is_transformed((*xs, *args, *c)):  # inside torch.func transforms: torch.func.vjp
            return func_vjp_state(self.call, xs, args, c)
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            xs_i = tuple(_independent(x, create) for x in xs)
            y = self.call(xs_i, args, create)
            grads = _grads(y, xs_i, c, create, retain=False)
        return _zeros_for_none(grads, xs)

    def vjp_args(self, saved: tuple, c: States) -> tuple[Tensor | None, ...]:
        xs, args = self.split(saved)
        if is_transformed((*xs, *args, *c)):
            return func_vjp_args(self.call, xs, args, c)
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            args_i = tuple(_independent(a, create) if _wants_grad(a) else a for a in args)
            y = self.call(xs if create else tuple(detached(x) for x in xs), args_i, create)
            wanted = [i for i, a in enumerate(args) if _wants_grad(a)]
            grads = _grads(y, [args_i[i] for i in wanted], c, create, retain=False)
        out: list[Tensor | None] = [None] * len(args)
        for i, g in zip(wanted, grads):
            out[i] = g
        return tuple(out)

    def linearize(self, saved: tuple) -> "AutogradLinearization":
        return AutogradLinearization(self, saved)


class AutogradLinearization:
    """``f`` recorded once at the fixed point (on detached copies); each product is one backward pass over it.

    Not differentiable: used where grad mode is off.
    """

    def __init__(self, adjoint: AutogradAdjoint, saved: tuple):
        xs, args = adjoint.split(saved)
        with torch.enable_grad():
            self.xs = tuple(x.detach().requires_grad_() for x in xs)
            self.args = tuple(a.detach().requires_grad_() if _wants_grad(a) else a for a in args)
            self.y = adjoint.call(self.xs, self.args, higher=False)
        self.wanted = [i for i, a in enumerate(args) if _wants_grad(a)]

    def vjp_state(self, c: States) -> States:
        return _zeros_for_none(_grads(self.y, self.xs, c, False, retain=True), self.xs)

    def vjp_args(self, c: States) -> tuple[Tensor | None, ...]:
        grads = _grads(self.y, [self.args[i] for i in self.wanted], c, False, retain=True)
        out: list[Tensor | None] = [None] * len(self.args)
        for i, g in zip(self.wanted, grads):
            out[i] = g
        return tuple(out)


def vjp_args(adjoint: Adjoint, saved: tuple, c: States, needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """``adjoint.vjp_args``, computing only the gradients in ``needs`` where the adjoint can."""
    if getattr(adjoint, "SELECTIVE_VJP_ARGS", False):
        return tuple(adjoint.vjp_args(saved, c, tuple(bool(n) for n in needs)))
    return tuple(adjoint.vjp_args(saved, c))


class _Bound:
    """An adjoint without ``linearize``, bound to its ``saved``."""

    def __init__(self, adjoint: Adjoint, saved: tuple):
        self.adjoint, self.saved = adjoint, saved

    def vjp_state(self, c: States) -> States:
        return tuple(self.adjoint.vjp_state(self.saved, c))

    def vjp_args(self, c: States, needs: Sequence[bool] | None = None) -> tuple[Tensor | None, ...]:
        if needs is None:
            return tuple(self.adjoint.vjp_args(self.saved, c))
        return vjp_args(self.adjoint, self.saved, c, needs)


def linearized(adjoint: Adjoint, saved: tuple) -> Linearized:
    """The fastest non-differentiable form of ``adjoint`` at ``saved``."""
    linearize = getattr(adjoint, "linearize", None)
    return linearize(saved) if linearize is not None else _Bound(adjoint, saved)


class AdjointMap:
    """The map of the backward fixed-point iteration, ``T(c; saved, g) = vjp_state(saved, c) + g``.

    A pure function of its explicit arguments ``(c, *saved, *g)`` (nothing is captured by closure), so the
    runtime solves it with the same differentiable fixed-point operator as the forward, and differentiating
    the backward once more is exact. :meth:`iteration_map` is the fast form used inside a solve.
    """

    def __init__(self, adjoint: Adjoint, n_saved: int, linearization: Linearized | None = None):
        self.adjoint = adjoint
        self.n_saved = n_saved
        self.linearization = linearization

    def __repr__(self) -> str:
        return f"AdjointMap({self.adjoint!r})"

    def __call__(self, c: States, *args: Any) -> States:
        saved, gbar = args[: self.n_saved], args[self.n_saved :]
        return tuple(v + g for v, g in zip(self.adjoint.vjp_state(saved, c), gbar))

    def iteration_map(self, args: Sequence[Any]) -> Callable[[States], States]:
        saved, gbar = tuple(args[: self.n_saved]), tuple(args[self.n_saved :])
        lin = self.linearization if self.linearization is not None else linearized(self.adjoint, saved)

        def step(c: States) -> States:
            return tuple(v + g for v, g in zip(lin.vjp_state(c), gbar))

        return step
