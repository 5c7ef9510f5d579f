"""Declared sizes at call time.

A generated layer writes each declared dimension as an ``int``, a symbol (``"H"``, bound from the inputs) or a
polynomial in symbols as the compiler prints it (``"H/2"``, ``"C*H*W/4"``, ``"2*T+1"``: a sum of terms
``[coefficient*]symbol*symbol[/denominator]``). :func:`size` evaluates one for the bound symbols, exactly.
"""
from __future__ import annotations

import functools
import math
import re
from fractions import Fraction
from typing import Mapping

Dim = int | str
_TERM = re.compile(r"([+-]?)([^+-]+)")


def is_symbol(dim: Dim) -> bool:
    """Whether ``dim`` is one symbol (bound from an input's size), not a number or a polynomial."""
    return isinstance(dim, str) and dim.isidentifier()


@functools.lru_cache(maxsize=256)
def terms(text: str) -> tuple[tuple[Fraction, tuple[str, ...]], ...]:
    """The (coefficient, symbols) terms of a polynomial size written as the compiler prints it."""
    out = []
    for sign, body in _TERM.findall(text.replace(" ", "")):
        numerator, _, denominator = body.partition("/")
        factors = numerator.split("*")
        coef = Fraction(int(factors[0]) if factors[0].isdigit() else 1, int(denominator or 1))
        out.append((-coef if sign == "-" else coef, tuple(f for f in factors if not f.isdigit())))
    return tuple(out)


def symbols(dim: Dim) -> tuple[str, ...]:
    """The symbols a declared size is written with, in order of first appearance (none for a number)."""
    if isinstance(dim, int):
        return ()
    if is_symbol(dim):
        return (dim,)
    return tuple(dict.fromkeys(s for _, factors in terms(dim) for s in factors))


def size(dim: Dim, sizes: Mapping[str, int]) -> int | Fraction:
    """The value of a declared size for the bound ``sizes`` of its symbols: an int, or a Fraction when a
    ``/`` in it does not divide (the layer's divisibility checks report that first)."""
    if isinstance(dim, int):
        return dim
    if is_symbol(dim):
        return sizes[dim]
    value = sum((c * math.prod(sizes[s] for s in names) for c, names in terms(dim)), start=Fraction(0))
    return int(value) if value.denominator == 1 else value
