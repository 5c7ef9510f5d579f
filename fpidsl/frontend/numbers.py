"""Compile-time numbers and their limits: literals, checked arithmetic and built-ins folded on numbers.

A compile-time number is an ``int`` of 64 bits (what a tensor's integer arguments hold) or a finite
``float``. Anything else is refused where it is written, with :class:`OutOfRange`: an integer literal of
2**63 or more, a float literal that is infinity (``1e999``), arithmetic whose result leaves that range
(``2 ** 2 ** 40`` is refused before it is computed, so constant arithmetic is bounded in time and memory),
a built-in outside its domain (``log(0)``).

:data:`FOLDS` are the elementwise built-ins that are evaluated when all their arguments are numbers
(``tanh(0.5) * x``), with torch's float64 definitions.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Union

Number = Union[int, float]

INT_MAX = 2**63 - 1
INT_MIN = -(2**63)
INT_HINT = f"integers are at most {INT_MAX:,}; write a float for a larger number, e.g. 1e20"
FLOAT_HINT = "the largest float is about 1.8e308"


class OutOfRange(Exception):
    """A number the compiler does not hold: ``reason`` says why, ``hint`` what to write instead."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


def literal(text: str) -> Number:
    """The value of a number literal as the grammar reads it (``12``, ``0.5``, ``1e-6``, ``1_000``)."""
    clean = text.replace("_", "")
    if any(ch in clean for ch in ".eE"):
        value = float(clean)
        if not math.isfinite(value):
            raise OutOfRange(f"the number {_short(text)} is too large: as a float it is infinity", FLOAT_HINT)
        if value == 0 and any(ch in "123456789" for ch in clean.lower().partition("e")[0]):
            raise OutOfRange(f"the number {_short(text)} is too small: as a float it is 0",
                             "write 0 if 0 is meant (the smallest float is about 5e-324)")
        return value
    digits = clean.lstrip("0")
    if len(digits) > len(str(INT_MAX)) or int(digits or "0") > INT_MAX:
        raise OutOfRange(f"the integer {_short(text)} does not fit in 64 bits", INT_HINT)
    return int(clean)


def _short(text: str) -> str:
    return text if len(text) <= 30 else f"{text[:12]}...{text[-6:]} ({len(text)} characters)"


def checked(value: Number, what: str = "this constant expression") -> Number:
    """``value`` if it is a compile-time number, else :class:`OutOfRange`."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise OutOfRange(f"{what} is an integer that does not fit in 64 bits", INT_HINT)
        return value
    if isinstance(value, complex):
        raise OutOfRange(f"{what} is not a real number")
    if math.isnan(value):
        raise OutOfRange(f"{what} is not a number (NaN)")
    if math.isinf(value):
        raise OutOfRange(f"{what} overflows: as a float it is infinity", FLOAT_HINT)
    return value


def _operand(v: Number) -> str:
    """``v`` as an operand of ``**`` in a message: a negative one in parentheses (``-2 ** 0.5`` is ``-(2 ** 0.5)``)."""
    return f"({v})" if v < 0 else f"{v}"


def power(a: Number, b: Number) -> Number:
    """``a ** b``, refused before it is computed when an integer result would not fit in 64 bits."""
    shown = f"{_operand(a)} ** {_operand(b)}"
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and (abs(a).bit_length() - 1) * b > 63:
        raise OutOfRange(f"{shown} does not fit in 64 bits", INT_HINT)
    try:
        value = a ** b
    except OverflowError:
        raise OutOfRange(f"{shown} overflows", FLOAT_HINT) from None
    except ZeroDivisionError:
        raise OutOfRange(f"{shown} divides by zero") from None
    if isinstance(value, complex):
        raise OutOfRange(f"{shown} is not a real number")
    return checked(value, shown)


_COMPARISONS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
                "!=": operator.ne}


def arithmetic(op: str, a: Number, b: Number) -> Number:
    """``a op b`` for ``op`` in ``+ - * / // **`` (``//``: floor division, an integer of integers), or a
    comparison ``< <= > >= == !=`` (1 or 0), checked."""
    if op == "**":
        return power(a, b)
    if op in _COMPARISONS:
        return int(_COMPARISONS[op](a, b))
    try:
        if op == "//":
            value = a // b
        elif op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        else:
            value = a / b
    except ZeroDivisionError:
        raise OutOfRange("division by zero in a constant expression") from None
    except OverflowError:
        raise OutOfRange("this constant expression overflows", FLOAT_HINT) from None
    return checked(value)


# --------------------------------------------------------------------------- built-ins on numbers


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softplus(x: float, beta: float = 1.0) -> float:
    # torch.nn.functional.softplus with its default threshold 20: linear above beta * x > 20
    if beta * x > 20:
        return float(x)
    return math.log1p(math.exp(beta * x)) / beta


def _log(x: float) -> float:
    if x <= 0:
        raise OutOfRange(f"log({x}) is not a finite number", "log takes a positive number")
    return math.log(x)


def _sqrt(x: float) -> float:
    if x < 0:
        raise OutOfRange(f"sqrt({x}) is not a real number", "sqrt takes a number >= 0")
    return math.sqrt(x)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        raise OutOfRange(f"exp({x}) overflows", FLOAT_HINT) from None


# name -> (the argument names, positional first, with the defaults of the optional ones, the function)
FOLDS: dict[str, tuple[tuple[str, ...], dict[str, Number], Callable[..., Number]]] = {
    "relu": (("x",), {}, lambda x: float(max(x, 0.0))),
    "leaky_relu": (("x", "slope"), {"slope": 0.01}, lambda x, slope: float(x if x > 0 else slope * x)),
    "tanh": (("x",), {}, math.tanh),
    "sigmoid": (("x",), {}, _sigmoid),
    "softplus": (("x", "beta"), {"beta": 1.0}, _softplus),
    "elu": (("x", "alpha"), {"alpha": 1.0}, lambda x, alpha: float(x if x > 0 else alpha * math.expm1(x))),
    "exp": (("x",), {}, _exp),
    "log": (("x",), {}, _log),
    "sqrt": (("x",), {}, _sqrt),
    "square": (("x",), {}, lambda x: float(x) * float(x)),
    "abs": (("x",), {}, lambda x: float(abs(x))),
    "sin": (("x",), {}, math.sin),
    "cos": (("x",), {}, math.cos),
    "clamp": (("x", "lo", "hi"), {}, lambda x, lo, hi: float(min(max(x, lo), hi))),
    "minimum": (("a", "b"), {}, lambda a, b: float(min(a, b))),
    "maximum": (("a", "b"), {}, lambda a, b: float(max(a, b))),
}


def fold(name: str, values: dict[str, Number]) -> float:
    """The built-in ``name`` applied to numbers (bound by argument name), as a checked float."""
    _, defaults, fn = FOLDS[name]
    names = FOLDS[name][0]
    args = [values[n] if n in values else defaults[n] for n in names]
    try:
        value = fn(*(float(a) for a in args))
    except OverflowError:
        raise OutOfRange(f"{name}(...) overflows", FLOAT_HINT) from None
    except (ZeroDivisionError, ValueError):  # softplus(x, beta=0), a math domain error
        raise OutOfRange(f"{name}(...) of these numbers is not a finite number") from None
    return checked(float(value), f"{name}(...)")
