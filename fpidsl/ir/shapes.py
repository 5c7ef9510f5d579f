"""Symbolic shape algebra.

A shape is a tuple of dims. A dim is one of

* an ``int`` (a known size),
* a ``str`` (a symbol such as ``"B"`` or ``"H"``, bound from the layer's inputs at call time),
* a :class:`DimExpr` (a polynomial in symbols with rational coefficients: ``H/2``, ``4*H*W``, ``H-2``).

Every dim is kept in one canonical form (:func:`norm`): a constant polynomial is an ``int`` and a bare
symbol is a ``str``, so two dims are equal exactly when ``==`` says so. Symbols are equal only to
themselves: ``B`` broadcasts with ``1`` and with ``B`` but conflicts with ``10`` and with ``C``.

Floor division (strided convolutions, stepped slices) is resolved under a *divisibility assumption*:
``(H - 1) // 2`` is ``H/2 - 1`` when ``H`` is even. Each assumption is recorded through a
:class:`ShapeCtx` (and from there in ``LayerGraph.assumptions``) so that the generated code checks it
when the layer is called; this is what lets ``Conv2d(stride=2)`` followed by
``ConvTranspose2d(stride=2)`` give back ``H`` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from math import floor, prod
from typing import Iterable, Union

Monomial = tuple[str, ...]  # sorted symbol names, with repetition; () is the constant term


@dataclass(frozen=True)
class DimExpr:
    """A polynomial dim: ``terms`` is a sorted tuple of (monomial, nonzero coefficient)."""

    terms: tuple[tuple[Monomial, Fraction], ...]

    def __str__(self) -> str:
        return _format_poly(self.terms)

    def __repr__(self) -> str:
        return f"DimExpr({str(self)!r})"


Dim = Union[int, str, DimExpr]
Shape = tuple  # tuple[Dim, ...]


class DimConflict(Exception):
    """Two dims that must be equal (or broadcast) are not."""

    def __init__(self, index: int, a: Dim, b: Dim):
        super().__init__(f"{fmt_dim(a)} vs {fmt_dim(b)}")
        self.index, self.a, self.b = index, a, b


class ShapeRuleError(Exception):
    """Raised by a primitive's shape rule. ``arg``: the argument at fault (None: the call itself);
    ``dim``: which of that argument's dims (for hints); ``at_call``: point at the whole call even
    though ``arg`` is at fault (a module applied to the wrong size); ``item``: which item of an index;
    ``attr``: the static attribute at fault (``dim=2`` out of range)."""

    def __init__(self, message: str, arg: int | None = None, hint: str | None = None,
                 dim: int | None = None, at_call: bool = False, item: int | None = None,
                 attr: str | None = None):
        super().__init__(message)
        self.message, self.arg, self.hint, self.dim = message, arg, hint, dim
        self.at_call, self.item, self.attr = at_call, item, attr


@dataclass
class ShapeCtx:
    """What a shape rule may use besides shapes and attributes: the callee's name for messages and
    a place to record divisibility assumptions ``(symbolic expression, divisor)``."""

    callee: str = ""
    assumptions: list[tuple[str, int]] = field(default_factory=list)

    def assume_divisible(self, expr: str, divisor: int) -> None:
        if (expr, divisor) not in self.assumptions:
            self.assumptions.append((expr, divisor))

    def fail(self, message: str, arg: int | None = None, hint: str | None = None,
             dim: int | None = None, at_call: bool = False, item: int | None = None,
             attr: str | None = None) -> "ShapeRuleError":
        return ShapeRuleError(message, arg, hint, dim, at_call, item, attr)


# --------------------------------------------------------------------------- polynomials


def _poly(d: Dim) -> dict[Monomial, Fraction]:
    if isinstance(d, bool):
        raise TypeError(f"not a dim: {d!r}")
    if isinstance(d, int):
        return {(): Fraction(d)} if d else {}
    if isinstance(d, str):
        return {(d,): Fraction(1)}
    if isinstance(d, DimExpr):
        return dict(d.terms)
    raise TypeError(f"not a dim: {d!r}")


def _make(terms: dict[Monomial, Fraction]) -> Dim:
    """The canonical dim of a polynomial."""
    clean = {m: c for m, c in terms.items() if c != 0}
    if not clean:
        return 0
    if list(clean) == [()] and clean[()].denominator == 1:
        return int(clean[()])
    if len(clean) == 1:
        ((mono, coef),) = clean.items()
        if coef == 1 and len(mono) == 1:
            return mono[0]
    ordered = sorted(clean.items(), key=lambda mc: (-len(mc[0]), mc[0]))
    return DimExpr(tuple(ordered))


def _format_poly(terms: Iterable[tuple[Monomial, Fraction]]) -> str:
    out = ""
    for mono, coef in terms:
        sign = "-" if coef < 0 else "+"
        mag = abs(coef)
        if mono:
            body = "*".join(mono)
            if mag.numerator != 1:
                body = f"{mag.numerator}*{body}"
            if mag.denominator != 1:
                body = f"{body}/{mag.denominator}"
        else:
            body = str(mag.numerator) if mag.denominator == 1 else f"{mag.numerator}/{mag.denominator}"
        if not out:
            out = body if sign == "+" else f"-{body}"
        else:
            out += f"{sign}{body}"
    return out or "0"


def norm(d: Dim) -> Dim:
    """The canonical form of a dim."""
    return _make(_poly(d))


def dim_add(a: Dim, b: Dim) -> Dim:
    terms = _poly(a)
    for m, c in _poly(b).items():
        terms[m] = terms.get(m, Fraction(0)) + c
    return _make(terms)


def dim_neg(a: Dim) -> Dim:
    return _make({m: -c for m, c in _poly(a).items()})


def dim_sub(a: Dim, b: Dim) -> Dim:
    return dim_add(a, dim_neg(b))


def dim_mul(a: Dim, b: Dim) -> Dim:
    terms: dict[Monomial, Fraction] = {}
    for ma, ca in _poly(a).items():
        for mb, cb in _poly(b).items():
            m = tuple(sorted(ma + mb))
            terms[m] = terms.get(m, Fraction(0)) + ca * cb
    return _make(terms)


def dim_prod(dims: Iterable[Dim]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


def symbols(d: Dim) -> set[str]:
    return {s for m in _poly(d) for s in m}


def dim_coefficients(d: Dim) -> list[Fraction]:
    """The coefficients of a dim's polynomial (its constant term included)."""
    return list(_poly(d).values())


def never_positive(d: Dim) -> bool:
    """Whether a dim is below 1 for every size of its symbols (each at least 1): an int below 1, or a
    polynomial with no positive coefficient."""
    if isinstance(d, int):
        return d < 1
    return all(c <= 0 for c in _poly(d).values())


def dim_terms(d: Dim) -> tuple[tuple[Monomial, Fraction], ...]:
    """A dim's polynomial as sorted (monomial, coefficient) pairs, as :class:`DimExpr` keeps them."""
    made = _make(_poly(d))
    return made.terms if isinstance(made, DimExpr) else tuple(sorted(_poly(d).items()))


def dim_value(d: Dim, sizes: dict[str, int]) -> int | Fraction:
    """A dim's value for the given sizes of its symbols (a Fraction when a ``/`` in it does not divide)."""
    if isinstance(d, (int, str)):
        return d if isinstance(d, int) else sizes[d]
    value = sum((c * prod(sizes[s] for s in m) for m, c in _poly(d).items()), start=Fraction(0))
    return int(value) if value.denominator == 1 else value


def symbols_given_by(shape: Shape) -> dict[str, Dim]:
    """The symbols that a tensor of ``shape`` gives away by its sizes, each as a dim of axis placeholders
    ``@0, @1, ...`` (the sizes of its dimensions): from an axis that is the symbol itself (``H``: ``@2``)
    or a degree-one dim of it alone (``H/2``: ``2*@2``; ``T+1``: ``@1-1``)."""
    out: dict[str, Dim] = {}
    for plain in (True, False):
        for axis, d in enumerate(shape):
            p = _poly(d)
            monos = [m for m in p if m]
            if len(monos) != 1 or len(monos[0]) != 1 or monos[0][0] in out:
                continue
            ((s,),) = monos
            a, b = p[(s,)], p.get((), Fraction(0))
            if (a == 1 and b == 0) == plain:
                out[s] = _make({(f"@{axis}",): 1 / a, (): -b / a})
    return out


def dim_substitute(d: Dim, values: dict[str, Dim]) -> Dim:
    """``d`` with each symbol replaced by its dim in ``values`` (all at once)."""
    out: Dim = 0
    for mono, coef in _poly(d).items():
        term = _make({(): coef})
        for s in mono:
            term = dim_mul(term, values[s])
        out = dim_add(out, term)
    return out


def _assume_integral(terms: dict[Monomial, Fraction], ctx: ShapeCtx | None) -> None:
    for mono, coef in terms.items():
        if mono and coef.denominator != 1:
            if ctx is None:
                raise ValueError("a divisibility assumption is needed")
            ctx.assume_divisible("*".join(mono), coef.denominator)


def dim_floordiv(a: Dim, k: int, ctx: ShapeCtx | None = None) -> Dim:
    """``a // k`` for a positive integer ``k``. A symbolic ``a`` is divided exactly in its symbolic
    part, under the assumption (recorded in ``ctx``) that each monomial is divisible by what it
    needs to be; the constant part is floored."""
    if k <= 0:
        raise ValueError("floor division by a non-positive number")
    terms = {m: c / k for m, c in _poly(a).items()}
    _assume_integral(terms, ctx)
    const = terms.pop((), Fraction(0))
    terms[()] = Fraction(floor(const))
    return _make(terms)


def dim_exact_div(a: Dim, b: Dim, ctx: ShapeCtx | None = None) -> Dim | None:
    """``a / b`` when it is a whole dim (b an integer or a single monomial), else None."""
    pb = _poly(b)
    if len(pb) != 1:
        return None
    ((mono_b, coef_b),) = pb.items()
    out: dict[Monomial, Fraction] = {}
    for mono, coef in _poly(a).items():
        rest = list(mono)
        for s in mono_b:
            if s not in rest:
                return None
            rest.remove(s)
        out[tuple(rest)] = coef / coef_b
    if out.get((), Fraction(0)).denominator != 1:
        return None
    _assume_integral(out, ctx)
    return _make(out)


# --------------------------------------------------------------------------- shapes


def fmt_dim(d: Dim) -> str:
    return str(d)


def fmt_shape(shape: Shape | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ", ".join(fmt_dim(d) for d in shape) + "]"


def numel(shape: Shape) -> Dim:
    return dim_prod(shape)


def broadcast(a: Shape, b: Shape) -> Shape:
    """PyTorch broadcasting; raises :class:`DimConflict` with the (negative) index of the first
    dimension pair that is neither equal nor contains a 1."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise DimConflict(-i, da, db)
    return tuple(reversed(out))


def broadcasts_to(a: Shape, target: Shape) -> bool:
    """Whether ``a`` broadcasts to exactly ``target``."""
    try:
        return broadcast(a, target) == tuple(target)
    except DimConflict:
        return False


def unify(a: Shape, b: Shape) -> Shape:
    """Two shapes that must be equal; raises :class:`DimConflict` at the first differing dim
    (index ``-1`` for a rank mismatch)."""
    if len(a) != len(b):
        raise DimConflict(-1, len(a), len(b))
    for i, (da, db) in enumerate(zip(a, b)):
        if da != db:
            raise DimConflict(i, da, db)
    return tuple(a)


def normalize_dim(d: int, rank: int) -> int | None:
    """A possibly negative dimension index as a non-negative one; None when out of range."""
    if -rank <= d < rank:
        return d % rank if rank else None
    return None


def shape_symbols(shape: Shape) -> set[str]:
    out: set[str] = set()
    for d in shape:
        out |= symbols(d)
    return out


def sizes_not_given(source: Shape, target: Shape) -> list[int]:
    """The positions of ``target`` whose symbols the sizes of a tensor of shape ``source`` do not give
    (:func:`symbols_given_by`)."""
    given = symbols_given_by(source)
    return [i for i, d in enumerate(target) if not symbols(d) <= given.keys()]
