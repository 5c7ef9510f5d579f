"""``solve { ... }`` and ``backward { ... }`` blocks → validated flat dicts.

``method = anderson(m=5)`` becomes ``{"method": "anderson", "m": 5}``; only the keys the spec gives are
kept (the runtime's ``FORWARD_DEFAULTS`` / ``BACKWARD_DEFAULTS`` fill the rest), each with the span of
its ``key = value`` for later messages. ``m``, ``beta`` and ``lam`` may also be given at the top level of a
block whose method is anderson.

The keys and rules mirror :class:`fpidsl.runtime.settings.SolverSettings` (a test keeps them equal); they
are restated here because importing anything under ``fpidsl.runtime`` imports torch, and checking a
spec must not.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import ErrorSink, FpiError, SettingsErr
from ..frontend import ast
from ..source import Span
from .resolve import NotStatic, UnknownStatic, did_you_mean, static_number

METHODS = ("picard", "anderson")
CRITERIA = ("relative", "absolute")
ON_FAIL = ("warn", "raise", "ignore")
SETTING_KEYS = ("method", "m", "beta", "lam", "tol", "criterion", "max_iter", "min_iter", "on_fail")
DEFAULT_MAX_ITER = 500
ANDERSON_KEYS = ("m", "beta", "lam")
_WORDS = {"criterion": CRITERIA, "on_fail": ON_FAIL}
_NUMBERS: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
    # key: (rule in words, check, integer)
    "tol": ("> 0", lambda v: v > 0, False),
    "max_iter": (">= 1", lambda v: v >= 1, True),
    "min_iter": (">= 0", lambda v: v >= 0, True),
    "m": (">= 1", lambda v: v >= 1, True),
    "beta": ("in (0, 1]", lambda v: 0 < v <= 1, False),
    "lam": (">= 0", lambda v: v >= 0, False),
}


def check_settings(decl: ast.SettingsDecl | None, lookup, sink: ErrorSink) -> tuple[dict[str, Any], dict[str, Span]]:
    """Validate one block; ``lookup`` resolves const names (see :func:`static_number`)."""
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    if decl is None:
        return values, spans
    where = "solve" if decl.which == "solve" else "backward"

    def put(key: str, value: Any, span: Span) -> None:
        if key in values:
            sink.add(SettingsErr(f"{key} is set twice in {where} (first at line {spans[key].line})", span))
            return
        values[key] = value
        spans[key] = span

    for setting in decl.settings:
        key, expr = setting.key, setting.value
        if key not in SETTING_KEYS:
            sink.add(SettingsErr(f"unknown {where} setting {key}", setting.key_span,
                                 hint=did_you_mean(key, SETTING_KEYS) or f"settings are {', '.join(SETTING_KEYS)}"))
        elif key == "method":
            _method(expr, setting.span, put, lookup, sink)
        elif key in _WORDS:
            word = _word(key, expr, _WORDS[key], sink)
            if word is not None:
                put(key, word, setting.span)
        else:
            number = _number(key, expr, lookup, sink)
            if number is not None:
                put(key, number, setting.span)
    method = values.get("method", "picard")
    for key in ANDERSON_KEYS:
        if key in values and method != "anderson":
            sink.add(SettingsErr(f"{key} applies to method = anderson, but the method is {method}", spans[key],
                                 hint=f"write method = anderson({key}=...)"))
    max_iter = values.get("max_iter", DEFAULT_MAX_ITER)
    if values.get("min_iter", 0) > max_iter:
        sink.add(SettingsErr(f"min_iter = {values['min_iter']} is larger than max_iter = {max_iter}",
                             spans["min_iter"], hint=None if "max_iter" in values else "max_iter defaults to "
                             f"{max_iter}"))
    return values, spans


def _word(key: str, expr, allowed: tuple[str, ...], sink: ErrorSink) -> str | None:
    if isinstance(expr, ast.Name) and expr.id in allowed:
        return expr.id
    found = expr.id if isinstance(expr, ast.Name) else "an expression"
    hint = did_you_mean(expr.id, allowed) if isinstance(expr, ast.Name) else None
    sink.add(SettingsErr(f"{key} must be {' or '.join(allowed)}, found {found}", expr.span,
                         hint=hint or f"{key} is one of {', '.join(allowed)}"))
    return None


def _number(key: str, expr, lookup, sink: ErrorSink):
    rule, ok, integer = _NUMBERS[key]
    kind = "an integer" if integer else "a number"
    try:
        value = static_number(expr, lookup)
    except NotStatic as e:
        sink.add(SettingsErr(f"{key} must be {kind} {rule}, but {e.reason}", e.expr.span))
        return None
    except UnknownStatic:
        return None
    except FpiError as e:  # an arithmetic error
        sink.add(e)
        return None
    if integer and not isinstance(value, int):
        sink.add(SettingsErr(f"{key} must be {kind} {rule}, found {value!r}", expr.span,
                             hint=f"write {int(value)}" if float(value).is_integer() else None))
        return None
    if not ok(value):
        sink.add(SettingsErr(f"{key} must be {kind} {rule}, found {value!r}", expr.span))
        return None
    return value


def _method(expr, span: Span, put, lookup, sink: ErrorSink) -> None:
    if isinstance(expr, ast.Name):
        name, args, kwargs = expr.id, (), ()
        name_span = expr.span
    elif isinstance(expr, ast.Call):
        name, args, kwargs = expr.func.id, expr.args, expr.kwargs
        name_span = expr.func.span
    else:
        sink.add(SettingsErr("method must be picard or anderson(m=..., beta=..., lam=...)", expr.span))
        return
    if name not in METHODS:
        sink.add(SettingsErr(f"unknown method {name}", name_span,
                             hint=did_you_mean(name, METHODS) or f"methods are {', '.join(METHODS)}"))
        return
    if name == "picard" and (args or kwargs):
        sink.add(SettingsErr("picard takes no options", expr.span, hint="options belong to anderson(m=..., ...)"))
        return
    put("method", name, span)
    if len(args) > len(ANDERSON_KEYS):
        sink.add(SettingsErr(f"anderson takes at most {len(ANDERSON_KEYS)} options, m, beta and lam",
                             args[len(ANDERSON_KEYS)].span))
        return
    given = [(key, a, a.span, a.span) for key, a in zip(ANDERSON_KEYS, args)]
    given += [(k.name, k.value, k.span, k.name_span) for k in kwargs]
    for key, value_expr, at, key_span in given:
        if key not in ANDERSON_KEYS:
            sink.add(SettingsErr(f"anderson has no option {key}", key_span,
                                 hint=did_you_mean(key, ANDERSON_KEYS) or "its options are m, beta and lam"))
            continue
        value = _number(key, value_expr, lookup, sink)
        if value is not None:
            put(key, value, at)
