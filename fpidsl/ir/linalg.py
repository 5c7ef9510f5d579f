"""Linear-algebra notation shared by the shape, VJP and batch rules of ``solve`` and ``einsum``.

* ``solve(A, b)``: ``b`` is a vector right-hand side (``[.., n]``) when it has one dimension, or one fewer
  than ``A``; otherwise a matrix of right-hand sides (``[.., n, k]``). Decided by ranks alone, so that the
  compile-time shape and the run-time call agree whatever sizes the symbols take.
* einsum equations (:func:`parse`): each operand's dims named by ASCII letters, an optional leading ``...``
  for broadcast dims, ``->`` before the output (without it, the output is ``...`` when an operand has it,
  then the letters written once, in alphabetical order). :class:`Equation` is the checked form; its
  ``str`` is the canonical explicit text the compiler stores and the generated code passes to torch.
"""
from __future__ import annotations

from dataclasses import dataclass
import functools

ELLIPSIS = "..."


def solve_rhs_is_vector(a_rank: int, b_rank: int) -> bool:
    """Whether ``solve(A, b)`` reads ``b`` as vectors ``[.., n]`` (else as matrices ``[.., n, k]``)."""
    return b_rank == 1 or b_rank == a_rank - 1


@dataclass(frozen=True)
class Equation:
    """A checked einsum equation: per operand, and for the output, its subscripts (letters, ``...`` first)."""

    operands: tuple[tuple[str, ...], ...]
    output: tuple[str, ...]

    def __str__(self) -> str:
        return ",".join("".join(t) for t in self.operands) + "->" + "".join(self.output)

    @property
    def has_ellipsis(self) -> bool:
        return ELLIPSIS in self.output


class EquationError(ValueError):
    """A malformed equation: ``offset``/``length`` locate the fault in the equation's text."""

    def __init__(self, message: str, offset: int, length: int = 1, hint: str | None = None):
        super().__init__(message)
        self.message, self.offset, self.length, self.hint = message, offset, length, hint


SUBSCRIPTS_HINT = ("subscripts are letters a-z and A-Z, one per dimension, with `...` first for broadcast "
                   "dimensions; commas separate the operands and -> comes before the output: \"bij,bjk->bik\"")


def _terms(text: str, start: int, end: int) -> list[tuple[list[str], list[int], int]]:
    """The comma-separated terms of text[start:end]: (subscripts, their offsets, the term's offset)."""
    out: list[tuple[list[str], list[int], int]] = [([], [], start)]
    i = start
    while i < end:
        ch = text[i]
        subs, offsets, _ = out[-1]
        if ch == ",":
            out.append(([], [], i + 1))
        elif ch == " ":
            pass
        elif ch == ".":
            if text[i:i + 3] != ELLIPSIS or i + 3 > end:
                raise EquationError("a '.' in an einsum equation must be part of `...`", i, hint=SUBSCRIPTS_HINT)
            if subs:
                what = "again" if ELLIPSIS in subs else "after a letter"
                raise EquationError(f"`...` {what} in one term of the einsum equation: it may only come first",
                                    i, 3, hint="`...` stands for an operand's leading broadcast dimensions")
            subs.append(ELLIPSIS)
            offsets.append(i)
            i += 3
            continue
        elif ch.isascii() and ch.isalpha():
            subs.append(ch)
            offsets.append(i)
        else:
            raise EquationError(f"unexpected character {ch!r} in the einsum equation", i, hint=SUBSCRIPTS_HINT)
        i += 1
    return out


def _no_repeats(subs: list[str], offsets: list[int], where: str) -> None:
    seen: set[str] = set()
    for s, at in zip(subs, offsets):
        if s in seen:
            raise EquationError(f"the letter {s} appears twice in {where}", at,
                                hint="a diagonal (the same letter twice in one operand) is not supported; "
                                     "each letter names one dimension of an operand")
        seen.add(s)


@functools.lru_cache(maxsize=256)
def parse(text: str) -> Equation:
    """The checked form of an equation, or :class:`EquationError` at the offending character."""
    arrow = text.find("->")
    second = text.find("->", arrow + 2) if arrow >= 0 else -1
    if second >= 0:
        raise EquationError("an einsum equation has at most one ->", second, 2, hint=SUBSCRIPTS_HINT)
    left_end = arrow if arrow >= 0 else len(text)
    for i, ch in enumerate(text):
        if ch in "->" and not (arrow >= 0 and arrow <= i <= arrow + 1):
            raise EquationError(f"unexpected character {ch!r} in the einsum equation", i, hint=SUBSCRIPTS_HINT)
    operands = _terms(text, 0, left_end)
    for k, (subs, offsets, _) in enumerate(operands):
        _no_repeats(subs, offsets, f"operand {k}")
    any_ellipsis = any(ELLIPSIS in subs for subs, _, _ in operands)
    written = [s for subs, _, _ in operands for s in subs if s != ELLIPSIS]
    if arrow < 0:
        once = sorted(s for s in set(written) if written.count(s) == 1)
        output = ((ELLIPSIS,) if any_ellipsis else ()) + tuple(once)
    else:
        outs = _terms(text, arrow + 2, len(text))
        if len(outs) > 1:
            raise EquationError("the output of an einsum equation is one term (no comma after ->)",
                                outs[1][2] - 1, hint=SUBSCRIPTS_HINT)
        subs, offsets, _ = outs[0]
        _no_repeats(subs, offsets, "the output")
        for s, at in zip(subs, offsets):
            if s == ELLIPSIS and not any_ellipsis:
                raise EquationError("the output has `...` but no operand has", at, 3,
                                    hint="write `...` first in the operands whose leading dims it stands for")
            if s != ELLIPSIS and s not in written:
                raise EquationError(f"the output letter {s} is not a letter of any operand", at,
                                    hint="every output letter names a dimension of an operand")
        if any_ellipsis and ELLIPSIS not in subs:
            raise EquationError("an operand has `...` but the output does not", arrow, 2,
                                hint="write `...` first in the output: the broadcast dims are kept, not summed")
        output = tuple(subs)
    return Equation(tuple(tuple(subs) for subs, _, _ in operands), output)


def letters(term: tuple[str, ...]) -> tuple[str, ...]:
    """A term's letters, without its ``...``."""
    return tuple(s for s in term if s != ELLIPSIS)


def ellipsis_rank(term: tuple[str, ...], rank: int) -> int:
    """How many dims of an operand of ``rank`` dims its ``...`` covers (0 without one)."""
    return rank - len(letters(term)) if ELLIPSIS in term else 0


def operand_gradient(eq: Equation, i: int) -> tuple[Equation, tuple[int, ...]]:
    """The equation of operand ``i``'s cotangent, ``einsum(grad_eq, ct, *other operands)``, and the
    positions (counted from the end of the operand, negative) of the letters that only operand ``i`` has:
    they are summed in the primal, so the cotangent is broadcast along them. When the equation has ``...``
    the cotangent equation keeps the full broadcast ``...`` (summed back to operand ``i``'s by the rule)."""
    others = [eq.output] + [t for j, t in enumerate(eq.operands) if j != i]
    available = {s for t in others for s in t}
    term = eq.operands[i]
    own = letters(term)
    lonely = tuple(k - len(own) for k, s in enumerate(own) if s not in available)
    kept = tuple(s for s in own if s in available)
    target = ((ELLIPSIS,) if eq.has_ellipsis else ()) + kept
    return Equation(tuple(others), target), lonely
