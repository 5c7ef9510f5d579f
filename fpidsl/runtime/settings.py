"""Solver settings: one frozen, validated record per solve (forward, and backward fixed-point iteration).

This module does not import torch: the compiler front-end reads the defaults and validates ``solve { ... }`` and
``backward { ... }`` blocks with it.

The keys are flat (the ``.fpi`` form ``method = anderson(m=3)`` is the pair ``method="anderson", m=3``):

====================  =================================================================  ==================
key                   meaning                                                            default fwd / bwd
====================  =================================================================  ==================
``method``            ``"picard"`` or ``"anderson"``                                     picard / picard
``m``                 Anderson: how many past iterates the least-squares mix uses        5
``beta``              Anderson: mixing, ``0 < beta <= 1`` (1: undamped)                  1.0
``lam``               Anderson: Tikhonov regularisation of the least-squares system,     1e-4
                      relative to the scale of its Gram matrix
``tol``               stop a sample once its residual is below this                       1e-5 / 1e-6
``criterion``         ``"relative"``: ``|g(x)-x| / |x|``; ``"absolute"``: ``|g(x)-x|``     relative
                      (2-norms over one sample)
``max_iter``          at most this many evaluations of the map                            500
``min_iter``          at least this many (a sample is not declared done before)           0
``on_fail``           ``"warn"``, ``"raise"`` or ``"ignore"``: what a sample that did      warn
                      not converge (or diverged) gets
====================  =================================================================  ==================
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

METHODS = ("picard", "anderson")
CRITERIA = ("relative", "absolute")
ON_FAIL = ("warn", "raise", "ignore")


class SettingsError(ValueError):
    """An unknown solver setting, or a value it does not accept. The message names both and what is allowed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        options = " or ".join(map(repr, allowed)) if len(allowed) == 2 else "one of " + ", ".join(map(repr, allowed))
        raise SettingsError(f"{key} must be {options}, got {value!r}")


def _integer(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value):
        raise SettingsError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise SettingsError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _real(key: str, value: Any, rule: str, ok) -> None:
    if not _is_number(value) or not ok(value):
        raise SettingsError(f"{key} must be a number {rule}, got {value!r}")


@dataclass(frozen=True)
class SolverSettings:
    """The settings of one fixed-point solve; validated on construction, immutable.

    Build variants with :meth:`merged` (validates the keys) or :func:`dataclasses.replace`.
    """

    method: str = "picard"
    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    tol: float = 1e-5
    criterion: str = "relative"
    max_iter: int = 500
    min_iter: int = 0
    on_fail: str = "warn"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _integer("m", self.m, 1)
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
        _choice("on_fail", self.on_fail, ON_FAIL)

    def merged(self, overrides: Mapping[str, Any] | None) -> "SolverSettings":
        """These settings with ``overrides`` (a mapping of setting keys) applied; unknown keys are an error."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise SettingsError(f"solver settings must be a mapping of keys to values, got {overrides!r}")
        for key in overrides:
            if key not in SETTING_KEYS:
                raise SettingsError(f"unknown solver setting {key!r}; known: {', '.join(SETTING_KEYS)}")
        return dataclasses.replace(self, **dict(overrides))

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain ``{key: value}`` mapping, in :data:`SETTING_KEYS` order."""
        return {key: getattr(self, key) for key in SETTING_KEYS}


SETTING_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SolverSettings))

FORWARD_DEFAULTS = SolverSettings()
BACKWARD_DEFAULTS = SolverSettings(tol=1e-6)


def resolve_settings(value: "SolverSettings | Mapping[str, Any] | None", defaults: SolverSettings) -> SolverSettings:
    """``value`` as settings: a :class:`SolverSettings` is taken as is, a mapping is merged over ``defaults``."""
    if value is None:
        return defaults
    if isinstance(value, SolverSettings):
        return value
    return defaults.merged(value)
