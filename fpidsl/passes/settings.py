"""``solve { ... }``, ``backward { ... }`` and ``eval { ... }`` blocks → validated flat dicts.

``method = anderson(m=5)`` becomes ``{"method": "anderson", "m": 5}`` and ``mode = phantom(k=5, tau=0.5)``
becomes ``{"mode": "phantom", "k": 5, "tau": 0.5}``; only the keys the spec gives are kept (the runtime's
``FORWARD_DEFAULTS`` / ``BACKWARD_DEFAULTS`` fill the rest), each with the span of its ``key = value`` for later
messages. A method's or a mode's options may also be given at the top level of the block (``m = 4`` next to
``method = anderson``). ``gmres`` and ``mode`` belong to ``backward`` only. ``eval`` holds the forward settings
of eval mode, over ``solve``'s (``eval { max_iter = 20, tol = 1e-3 }``): it is checked against them (``m = 3``
alone is right where ``solve`` chose anderson).

The keys and rules mirror :class:`fpidsl.runtime.settings.SolverSettings` (a test keeps them equal); they
are restated here because importing anything under ``fpidsl.runtime`` imports torch, and checking a
spec must not.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import ErrorSink, FpiError, SettingsErr
from ..frontend import ast
from ..source import Span
from .resolve import NotStatic, UnknownStatic, did_you_mean, static_number

METHODS = ("picard", "anderson", "broyden", "gmres")
BACKWARD_ONLY_METHODS = ("gmres",)
MODES = ("implicit", "jfb", "phantom", "unrolled")
CRITERIA = ("relative", "absolute")
ON_FAIL = ("warn", "raise", "ignore")
SETTING_KEYS = ("method", "m", "beta", "lam", "tol", "criterion", "max_iter", "min_iter", "check_every", "on_fail",
                "mode", "k", "tau")
DEFAULT_MAX_ITER = 500
MAX_MEMORY = 1000
MAX_STEPS = 10000
# the options each method and each mode takes, in positional order
METHOD_OPTIONS = {"picard": ("beta",), "anderson": ("m", "beta", "lam"), "broyden": ("m",), "gmres": ("m",)}
MODE_OPTIONS = {"implicit": (), "jfb": (), "phantom": ("k", "tau"), "unrolled": ("k",)}  # the runtime's, restated
_CHOICES = {"method": (METHODS, METHOD_OPTIONS), "mode": (MODES, MODE_OPTIONS)}
_WORDS = {"criterion": CRITERIA, "on_fail": ON_FAIL}
_NUMBERS: dict[str, tuple[str, Callable[[Any], bool], bool]] = {
    # key: (rule in words, check, integer)
    "tol": ("> 0", lambda v: v > 0, False),
    "max_iter": (">= 1", lambda v: v >= 1, True),
    "min_iter": (">= 0", lambda v: v >= 0, True),
    "check_every": (">= 1", lambda v: v >= 1, True),
    "m": (f">= 1 and <= {MAX_MEMORY}", lambda v: 1 <= v <= MAX_MEMORY, True),
    "beta": ("in (0, 1]", lambda v: 0 < v <= 1, False),
    "lam": (">= 0", lambda v: v >= 0, False),
    "k": (f">= 1 and <= {MAX_STEPS}", lambda v: 1 <= v <= MAX_STEPS, True),
    "tau": ("in (0, 1]", lambda v: 0 < v <= 1, False),
}


def _words(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_settings(decl: ast.SettingsDecl | None, lookup, sink: ErrorSink,
                   base: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Span]]:
    """Validate one block; ``lookup`` resolves const names (see :func:`static_number`); ``base``: the settings the
    block goes over (``solve``'s, for ``eval``), which give the method and max_iter the block does not set."""
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    if decl is None:
        return values, spans
    base = base or {}
    where = decl.which

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
        elif key == "mode" and where != "backward":
            sink.add(SettingsErr("mode is a backward setting: it says how gradients are computed",
                                 setting.key_span, hint="write it in the backward block: backward { mode = ... }"))
        elif key in _CHOICES:
            _choice(key, expr, setting.span, where, put, lookup, sink)
        elif key in _WORDS:
            word = _word(key, expr, _WORDS[key], sink)
            if word is not None:
                put(key, word, setting.span)
        else:
            number = _number(key, expr, lookup, sink)
            if number is not None:
                put(key, number, setting.span)
    methods = METHOD_OPTIONS if where == "backward" else {
        name: options for name, options in METHOD_OPTIONS.items() if name not in BACKWARD_ONLY_METHODS}
    _options_apply(values, spans, "method", base.get("method", "picard"), methods, sink)
    _options_apply(values, spans, "mode", "implicit", MODE_OPTIONS, sink)
    if "check_every" in values and values.get("method", base.get("method")) in BACKWARD_ONLY_METHODS:
        sink.add(SettingsErr("check_every applies to method = picard, anderson or broyden, but the method is gmres",
                             spans["check_every"], hint="GMRES reads its residuals once a cycle: remove check_every"))
    max_iter = values.get("max_iter", base.get("max_iter", DEFAULT_MAX_ITER))
    min_iter = values.get("min_iter", base.get("min_iter", 0))
    if min_iter > max_iter:
        missing = next((k for k in ("min_iter", "max_iter") if k not in values), None)
        hint = (None if missing is None else f"{missing} comes from the solve block" if missing in base
                else f"max_iter defaults to {max_iter}")
        sink.add(SettingsErr(f"min_iter = {min_iter} is larger than max_iter = {max_iter}",
                             spans["min_iter" if "min_iter" in values else "max_iter"], hint=hint))
    return values, spans


def _options_apply(values, spans, key: str, default: str, options: dict, sink: ErrorSink) -> None:
    """Refuse an option (given at the top level or as an argument) that the chosen method or mode does not take;
    ``default``: the method or mode when the block names none."""
    chosen = values.get(key, default)
    for option in sorted({o for opts in options.values() for o in opts}, key=SETTING_KEYS.index):
        if option in values and option not in options[chosen]:
            takers = [name for name, opts in options.items() if option in opts]
            example = f"{takers[0]}({option}=...)"
            sink.add(SettingsErr(f"{option} applies to {key} = {_words(takers)}, but the {key} is {chosen}",
                                 spans[option], hint=f"write {key} = {example}"))


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
    if isinstance(value, float) and not math.isfinite(value):
        sink.add(SettingsErr(f"{key} must be a finite {kind.removeprefix('a ')} {rule}, found {value!r}", expr.span))
        return None
    if integer and not isinstance(value, int):
        sink.add(SettingsErr(f"{key} must be {kind} {rule}, found {value!r}", expr.span,
                             hint=f"write {int(value)}" if float(value).is_integer() else None))
        return None
    if not ok(value):
        sink.add(SettingsErr(f"{key} must be {kind} {rule}, found {value!r}", expr.span))
        return None
    return value


def _describe(key: str) -> str:
    names, options = _CHOICES[key]
    return " or ".join(f"{n}({', '.join(o + '=...' for o in options[n])})" if options[n] else n for n in names)


def _choice(key: str, expr, span: Span, where: str, put, lookup, sink: ErrorSink) -> None:
    """``method = NAME`` / ``NAME(options)``, or the same for ``mode``."""
    names, options = _CHOICES[key]
    if isinstance(expr, ast.Name):
        name, args, kwargs = expr.id, (), ()
        name_span = expr.span
    elif isinstance(expr, ast.Call):
        name, args, kwargs = expr.func.id, expr.args, expr.kwargs
        name_span = expr.func.span
    else:
        sink.add(SettingsErr(f"{key} must be {_describe(key)}", expr.span))
        return
    if name not in names:
        sink.add(SettingsErr(f"unknown {key} {name}", name_span,
                             hint=did_you_mean(name, names) or f"{key}s are {', '.join(names)}"))
        return
    if key == "method" and name in BACKWARD_ONLY_METHODS and where != "backward":
        sink.add(SettingsErr(f"{name} solves the linear system of the backward; it is not a forward method",
                             name_span, hint=f"write it in the backward block: backward {{ method = {name} }}, and "
                             "use picard, anderson or broyden here"))
        return
    allowed = options[name]
    if not allowed and (args or kwargs):
        sink.add(SettingsErr(f"{name} takes no options", expr.span))
        return
    put(key, name, span)
    if len(args) > len(allowed):
        sink.add(SettingsErr(f"{name} takes at most {len(allowed)} option{'s' if len(allowed) > 1 else ''}, "
                             f"{_words(allowed)}", args[len(allowed)].span))
        return
    given = [(option, a, a.span, a.span) for option, a in zip(allowed, args)]
    given += [(k.name, k.value, k.span, k.name_span) for k in kwargs]
    for option, value_expr, at, key_span in given:
        if option not in allowed:
            sink.add(SettingsErr(f"{name} has no option {option}", key_span,
                                 hint=did_you_mean(option, allowed) or f"its options are {_words(allowed)}"))
            continue
        value = _number(option, value_expr, lookup, sink)
        if value is not None:
            put(option, value, at)
