"""Symbolic sizes in emitted code: a reshape's target written from its argument's own sizes.

The generated step runs on whatever samples are still iterating, so a size is never a constant of the call: each
size of a reshape's result is written from the sizes of the tensor being reshaped (``v.shape[2] // 2`` for
``H/2`` when ``v`` is ``[B, C, H, W]``), which keeps every size explicit (a batch of 0 samples reshapes too);
at most one size that those sizes do not give becomes -1.
"""
from __future__ import annotations

from math import lcm

from ..ir.shapes import Shape, dim_substitute, dim_terms, sizes_not_given, symbols_given_by


def reshape_target(source: Shape, target: Shape, var: str) -> str:
    """The code of the tuple that ``var`` (of inferred shape ``source``) is reshaped to, to get ``target``."""
    given = symbols_given_by(source)
    unknown = sizes_not_given(source, target)
    if len(unknown) > 1:
        raise ValueError(f"reshape to {target}: more than one size not given by {source}")
    items = ["-1" if i in unknown else size_code(dim_substitute(d, given), var) for i, d in enumerate(target)]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def size_code(d, var: str) -> str:
    """Integer code for a dim over the axis placeholders ``@i`` of ``var`` (``var.shape[i]``): a sum of
    integer terms, floor-divided by the common denominator (exact where the layer's checks hold)."""
    if isinstance(d, int):
        return str(d)
    terms = dim_terms(d)
    den = lcm(*(c.denominator for _, c in terms))
    out = ""
    for mono, coef in terms:
        n = coef * den
        factors = [f"{var}.shape[{s[1:]}]" for s in mono]
        body = " * ".join(([str(abs(n.numerator))] if abs(n) != 1 or not factors else []) + factors)
        out += (f" - {body}" if n < 0 else f" + {body}") if out else (f"-{body}" if n < 0 else body)
    if den == 1:
        return out
    return f"({out}) // {den}" if len(terms) > 1 else f"{out} // {den}"
