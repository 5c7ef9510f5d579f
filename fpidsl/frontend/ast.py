"""The AST of a spec: frozen dataclasses, every node with the :class:`~fpidsl.source.Span` of its text.

Both front-ends (the ``.fpi`` grammar and YAML) produce exactly these nodes; the passes never look at
anything else. Spans of nodes made from YAML point into the YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..source import Span

# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Num:
    """A numeric literal. ``value`` is an ``int`` when the text has no ``.``/exponent, else ``float``."""

    value: Union[int, float]
    text: str
    span: Span


@dataclass(frozen=True)
class Str:
    """A string literal, ``"ij,jk->ik"``: only einsum's equation. ``value`` is the text between the quotes."""

    value: str
    span: Span


@dataclass(frozen=True)
class Name:
    """A reference to a declared name, a parameter of an ``fn``, a built-in, or a bare word (``zeros``)."""

    id: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    """``left op right`` with ``op`` one of ``+ - * / @ **``."""

    op: str
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    """Unary minus."""

    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Keyword:
    """``name=value`` inside a call."""

    name: str
    value: "Expr"
    name_span: Span
    span: Span


@dataclass(frozen=True)
class Call:
    """``func(args..., kw=value...)``; ``func`` is a plain name (built-in, ``fn``, or param module)."""

    func: Name
    args: tuple["Expr", ...]
    kwargs: tuple[Keyword, ...]
    span: Span


@dataclass(frozen=True)
class ListExpr:
    """``[a, b, ...]``."""

    items: tuple["Expr", ...]
    span: Span


@dataclass(frozen=True)
class Slice:
    """``lo:hi`` or ``lo:hi:step`` inside an index; missing parts are ``None``."""

    lo: "Expr | None"
    hi: "Expr | None"
    step: "Expr | None"
    span: Span


@dataclass(frozen=True)
class EllipsisIndex:
    """``...`` inside an index."""

    span: Span


IndexItem = Union["Expr", Slice, EllipsisIndex]


@dataclass(frozen=True)
class Index:
    """``value[item, item, ...]``; an integer item selects (drops the dimension), a slice keeps it."""

    value: "Expr"
    items: tuple[IndexItem, ...]
    span: Span


Expr = Union[Num, Str, Name, BinOp, Neg, Call, ListExpr, Index]

# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Shape:
    """``[B, 10]``: each dimension a :class:`Name` (symbolic), an integer :class:`Num`, or a :class:`BinOp`
    (``+ - * / //``) of them (``[B, H / 2]``)."""

    dims: tuple[Union[Name, Num, BinOp], ...]
    span: Span


INPUT_DTYPES = ("float", "int", "bool", "sparse")  # `input NAME : [int | bool | sparse] SHAPE`; int and bool
#                                                    inputs are indices only, a sparse one only spmm's matrix


@dataclass(frozen=True)
class InputDecl:
    name: str
    shape: Shape
    name_span: Span
    span: Span
    dtype: str = "float"  # one of INPUT_DTYPES


@dataclass(frozen=True)
class StateDecl:
    """``state x : SHAPE [= INIT]``; ``init`` is ``None`` for the default (zeros)."""

    name: str
    shape: Shape
    init: "Expr | None"
    name_span: Span
    span: Span


@dataclass(frozen=True)
class ModuleParamDecl:
    """``param fc : Linear(20, 32, init_scale=0.1)``: ``module`` is the call ``Linear(...)`` as written."""

    name: str
    module: Call
    name_span: Span
    span: Span


@dataclass(frozen=True)
class TensorParamDecl:
    """``param w : tensor [5, 5] = normal(0, 0.1)``; ``init`` is ``None`` for the default (zeros)."""

    name: str
    shape: Shape
    init: "Expr | None"
    name_span: Span
    span: Span


@dataclass(frozen=True)
class ExternType:
    """``extern [samplewise] SHAPE -> SHAPE`` or ``extern (SHAPE, SHAPE, ...) -> SHAPE``: what follows ``param NAME :``
    for an outside nn.Module (``inputs`` one shape per argument)."""

    inputs: tuple[Shape, ...]
    output: Shape
    samplewise: bool
    span: Span


@dataclass(frozen=True)
class ExternParamDecl:
    """``param f : extern [B, C] -> [B, C]``: a user's nn.Module given at construction (``Layer(f=module)``)."""

    name: str
    extern: ExternType
    name_span: Span
    span: Span


@dataclass(frozen=True)
class ConstDecl:
    name: str
    value: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class LetDecl:
    name: str
    value: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class EnergyDecl:
    name: str
    value: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class UpdateDecl:
    """``update x = EXPR``: ``name`` is the state it updates."""

    name: str
    value: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class DescendDecl:
    """``descend x on E step 0.01``."""

    name: str
    energy: Name
    step: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class OutputDecl:
    values: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class Setting:
    """``key = value`` in a ``solve``/``backward`` block; ``value`` is an expression (``anderson(m=5)``,
    ``relative``, ``1e-6``)."""

    key: str
    value: Expr
    key_span: Span
    span: Span


@dataclass(frozen=True)
class SettingsDecl:
    """``solve { ... }`` (``which == "solve"``), ``backward { ... }`` or ``eval { ... }`` (the solve of eval mode)."""

    which: str
    settings: tuple[Setting, ...]
    span: Span


Decl = Union[
    InputDecl,
    StateDecl,
    ModuleParamDecl,
    TensorParamDecl,
    ExternParamDecl,
    ConstDecl,
    LetDecl,
    EnergyDecl,
    UpdateDecl,
    DescendDecl,
    OutputDecl,
    SettingsDecl,
]


@dataclass(frozen=True)
class Layer:
    name: str
    decls: tuple[Decl, ...]
    name_span: Span
    span: Span


@dataclass(frozen=True)
class FnDef:
    """``fn name(a, b) = EXPR`` at file level."""

    name: str
    params: tuple[Name, ...]
    body: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class SpecFile:
    """One parsed file: its layers and ``fn`` definitions in source order."""

    path: str
    layers: tuple[Layer, ...]
    fns: tuple[FnDef, ...]
    span: Span
