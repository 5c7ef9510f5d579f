"""Solver settings: one frozen, validated record per solve (forward, and backward), and the typed values it names.

This module does not import torch: the compiler front-end reads the defaults and validates ``solve { ... }`` and
``backward { ... }`` blocks with it.

The keys are flat, the ones users write (the ``.fpi`` form ``method = anderson(m=3)`` is the pair
``method="anderson", m=3``; ``mode = phantom(k=5, tau=0.5)`` is ``mode="phantom", k=5, tau=0.5``). A record is
validated once, when it is made; :attr:`SolverSettings.solver_method` and :attr:`SolverSettings.gradient` give
the typed values (:class:`AndersonMethod`, :class:`PhantomGradient`, ...) the runtime works with.

====================  =================================================================  ==================
key                   meaning                                                            default fwd / bwd
====================  =================================================================  ==================
``method``            ``"picard"``, ``"anderson"``, ``"broyden"``; backward also          picard / picard
                      ``"gmres"`` (the adjoint is a linear system)
``m``                 memory: Anderson's past iterates, Broyden's rank-one updates,       5 / 50 / 30
                      GMRES's restart length (``1 <= m <= MAX_MEMORY``)
``beta``              Picard damping ``x <- (1-beta) x + beta g(x)``; Anderson mixing;   1.0
                      ``0 < beta <= 1``
``lam``               Anderson: Tikhonov regularisation of the least-squares system,     1e-4
                      relative to the scale of its Gram matrix
``tol``               stop a sample once its residual is below this (finite, > 0)          1e-5 / 1e-6
``criterion``         ``"relative"``: ``|g(x)-x| / |x|``; ``"absolute"``: ``|g(x)-x|``     relative
                      (2-norms over one sample)
``max_iter``          at most this many evaluations of the map                            500
``min_iter``          at least this many (a sample is not declared done before)           0
``check_every``       the host reads which samples are done every this many iterations    1
                      (finished ones held fixed in between; records unchanged; not GMRES)
``on_fail``           ``"warn"``, ``"raise"`` or ``"ignore"``: what a sample that did      warn
                      not converge (or diverged) gets
``mode``              backward only: ``"implicit"`` (exact), ``"jfb"``, ``"phantom"``,   implicit
                      ``"unrolled"`` (see :mod:`fpidsl.runtime.gradient_modes`)
``k``                 phantom: damped steps (default 5); unrolled: steps of the forward   None
                      (default: the forward ``max_iter``); ``1 <= k <= MAX_STEPS``
``tau``               phantom: damping of its steps, ``0 < tau <= 1``                     1.0
====================  =================================================================  ==================

A key that does not apply to the chosen method or mode (``lam`` with Broyden) is ignored here; the spec checker
refuses it with a position.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

METHODS = ("picard", "anderson", "broyden", "gmres")
BACKWARD_ONLY_METHODS = ("gmres",)
MODES = ("implicit", "jfb", "phantom", "unrolled")
# the options each method and mode takes (a spec's block refuses the others, and so does merged)
METHOD_OPTIONS = {"picard": ("beta",), "anderson": ("m", "beta", "lam"), "broyden": ("m",), "gmres": ("m",)}
MODE_OPTIONS = {"implicit": (), "jfb": (), "phantom": ("k", "tau"), "unrolled": ("k",)}
CRITERIA = ("relative", "absolute")
ON_FAIL = ("warn", "raise", "ignore")
# Bounds that keep a setting from asking for absurd memory or time: the solvers allocate (batch, m, dim) buffers
# (m = 10**9 would ask for hundreds of GB), a phantom or unrolled mode records k evaluations of the map.
MAX_MEMORY = 1000
MAX_STEPS = 10000
DEFAULT_MEMORY = {"anderson": 5, "broyden": 50, "gmres": 30}
DEFAULT_PHANTOM_STEPS = 5
ROLES = ("forward", "backward")


class SettingsError(ValueError):
    """An unknown solver setting, or a value it does not accept. The message names both and what is allowed."""


# ---------------------------------------------------------------------------------------------- typed values


@dataclass(frozen=True)
class PicardMethod:
    """``x <- (1 - beta) x + beta g(x)``."""

    beta: float = 1.0


@dataclass(frozen=True)
class AndersonMethod:
    """Anderson acceleration with memory ``m``, mixing ``beta`` and relative regularisation ``lam``."""

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4


@dataclass(frozen=True)
class BroydenMethod:
    """Broyden's (good) method with up to ``m`` rank-one updates of the inverse Jacobian (then a restart)."""

    m: int = 50


@dataclass(frozen=True)
class GmresMethod:
    """Restarted GMRES(``m``) on the linear system of an affine map (the backward's adjoint)."""

    m: int = 30


SolverMethod = Union[PicardMethod, AndersonMethod, BroydenMethod, GmresMethod]


@dataclass(frozen=True)
class ImplicitGradient:
    """The exact implicit gradient: the adjoint fixed point ``c = J^T c + gbar``."""


@dataclass(frozen=True)
class JacobianFreeGradient:
    """JFB: the gradient of one step of the map at the fixed point (``c = gbar``)."""


@dataclass(frozen=True)
class PhantomGradient:
    """Autograd through ``k`` steps ``z <- (1 - tau) z + tau g(z)`` from the fixed point."""

    k: int = DEFAULT_PHANTOM_STEPS
    tau: float = 1.0


@dataclass(frozen=True)
class UnrolledGradient:
    """The output is ``k`` damped Picard steps from the start, differentiated by plain autograd (pretraining)."""

    k: int | None = None


GradientMode = Union[ImplicitGradient, JacobianFreeGradient, PhantomGradient, UnrolledGradient]


# ---------------------------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = " or ".join(map(repr, allowed)) if len(allowed) == 2 else "one of " + ", ".join(map(repr, allowed))
        raise SettingsError(f"{key} must be {options}, got {value!r}")


def _integer(key: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    rule = f">= {minimum}" if maximum is None else f"with {minimum} <= {key} <= {maximum}"
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        raise SettingsError(f"{key} must be an integer {rule}, got {value!r}")


def _real(key: str, value: Any, rule: str, ok) -> None:
    if not _is_number(value) or not ok(value):
        raise SettingsError(f"{key} must be a finite number {rule}, got {value!r}")


@dataclass(frozen=True)
class SolverSettings:
    """The settings of one fixed-point solve; validated on construction, immutable.

    ``role`` (not a setting key) says whether the record is a forward's or a backward's: ``gmres`` and a
    ``mode`` other than ``implicit`` belong to a backward. Build variants with :meth:`merged` (validates the
    keys) or :func:`dataclasses.replace`.
    """

    method: str = "picard"
    m: int | None = None
    beta: float = 1.0
    lam: float = 1e-4
    tol: float = 1e-5
    criterion: str = "relative"
    max_iter: int = 500
    min_iter: int = 0
    check_every: int = 1
    on_fail: str = "warn"
    mode: str = "implicit"
    k: int | None = None
    tau: float = 1.0
    role: str = dataclasses.field(default="forward", repr=False)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        if self.m is not None:
            _integer("m", self.m, 1, MAX_MEMORY)
        _real("beta", self.beta, "with 0 < beta <= 1", lambda v: 0 < v <= 1)
        _real("lam", self.lam, ">= 0", lambda v: v >= 0)
        _real("tol", self.tol, "> 0", lambda v: v > 0)
        _choice("criterion", self.criterion, CRITERIA)
        _integer("max_iter", self.max_iter, 1)
        _integer("min_iter", self.min_iter, 0)
        if self.min_iter > self.max_iter:
            raise SettingsError(
                f"min_iter must be <= max_iter, got min_iter={self.min_iter} and max_iter={self.max_iter}"
            )
        _integer("check_every", self.check_every, 1)
        _choice("on_fail", self.on_fail, ON_FAIL)
        _choice("mode", self.mode, MODES)
        if self.k is not None:
            _integer("k", self.k, 1, MAX_STEPS)
        _real("tau", self.tau, "with 0 < tau <= 1", lambda v: 0 < v <= 1)
        _choice("role", self.role, ROLES)
        if self.role == "forward":
            if self.method in BACKWARD_ONLY_METHODS:
                raise SettingsError(f"method {self.method!r} solves the linear system of the backward; it is a "
                                    "backward setting (backward={'method': 'gmres'}), not a forward one")
            if self.mode != "implicit":
                raise SettingsError(f"mode is a backward setting (backward={{'mode': {self.mode!r}}}), not a "
                                    "forward one")

    def merged(self, overrides: Mapping[str, Any] | None) -> "SolverSettings":
        """These settings with ``overrides`` (a mapping of setting keys) applied; unknown keys are an error."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise SettingsError(f"solver settings must be a mapping of keys to values, got {overrides!r}")
        for key in overrides:
            if key not in SETTING_KEYS:
                raise SettingsError(f"unknown solver setting {key!r}; known: {', '.join(SETTING_KEYS)}")
        merged = dataclasses.replace(self, **dict(overrides))
        merged._options_apply(overrides)
        return merged

    def _options_apply(self, given: Mapping[str, Any]) -> None:
        """Refuse an option given with these settings that their method or mode does not take (``m`` with picard,
        ``k`` without phantom or unrolled), as a spec's block does: it would be kept and never read."""
        for key, options, chosen in (("method", METHOD_OPTIONS, self.method), ("mode", MODE_OPTIONS, self.mode)):
            for option in given:
                takers = [name for name, opts in options.items() if option in opts]
                if takers and option not in options[chosen]:
                    names = takers[0] if len(takers) == 1 else ", ".join(takers[:-1]) + " or " + takers[-1]
                    raise SettingsError(f"{option} applies to {key} = {names}, but the {key} is {chosen}; give "
                                        f"{key}={takers[0]!r} with it, or leave {option} out")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain ``{key: value}`` mapping, in :data:`SETTING_KEYS` order."""
        return {key: getattr(self, key) for key in SETTING_KEYS}

    @property
    def memory(self) -> int:
        """``m``, or the method's default memory."""
        return self.m if self.m is not None else DEFAULT_MEMORY.get(self.method, 5)

    @property
    def solver_method(self) -> SolverMethod:
        """The typed solver value ``method`` and its options name."""
        if self.method == "anderson":
            return AndersonMethod(self.memory, self.beta, self.lam)
        if self.method == "broyden":
            return BroydenMethod(self.memory)
        if self.method == "gmres":
            return GmresMethod(self.memory)
        return PicardMethod(self.beta)

    @property
    def gradient(self) -> GradientMode:
        """The typed gradient mode (meaningful on a backward record)."""
        if self.mode == "jfb":
            return JacobianFreeGradient()
        if self.mode == "phantom":
            return PhantomGradient(self.k if self.k is not None else DEFAULT_PHANTOM_STEPS, self.tau)
        if self.mode == "unrolled":
            return UnrolledGradient(self.k)
        return ImplicitGradient()


SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SolverSettings) if f.name != "role")

FORWARD_DEFAULTS = SolverSettings()
BACKWARD_DEFAULTS = SolverSettings(tol=1e-6, role="backward")


def resolve_settings(value: "SolverSettings | Mapping[str, Any] | None", defaults: SolverSettings) -> SolverSettings:
    """``value`` as settings: a :class:`SolverSettings` is taken as is (in ``defaults``' role), a mapping is merged
    over ``defaults``."""
    if value is None:
        return defaults
    if isinstance(value, SolverSettings):
        return value if value.role == defaults.role else dataclasses.replace(value, role=defaults.role)
    return defaults.merged(value)
