"""Names and scopes: which declarations a layer has, what each name is, and compile-time numbers.

* :func:`resolve_fns` checks the file's ``fn`` definitions (names, parameters, no recursion) and
  returns the :class:`FnTable` the graph builder inlines from.
* :func:`resolve_layer` checks one layer's declarations (every name declared once, none shadowing a
  built-in, a keyword or an ``fn``; each state updated exactly once; one ``output``; one ``solve`` and
  one ``backward``), evaluates its ``const`` s and returns a :class:`LayerScope`.
* :func:`static_number` evaluates a compile-time number (literals, consts, ``+ - * / **``, elementwise
  built-ins on numbers), within the limits of :mod:`fpidsl.frontend.numbers`.

Lets and energies may be used anywhere in their layer, before or after their declaration: a layer is a
set of equations, not a program. A let that depends on itself (directly or through other lets) is an
error, reported by the graph builder.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from ..errors import ErrorSink, NameErr, SettingsErr, StructureErr, TypeErr
from ..frontend import ast, numbers
from ..ir.primitives import BUILTINS, MODULE_KINDS, TENSOR_INITS
from ..source import Span

Number = Union[int, float]

KEYWORDS = frozenset(
    "layer fn input state param tensor extern const let energy update descend on step output solve backward".split()
)
WORDS = {"true": "a boolean", "false": "a boolean", "zeros": "an initializer", "ones": "an initializer"}
WORDS.update({k: "an initializer" for k in TENSOR_INITS})

KIND_WORDS = {
    "input": "an input", "state": "a state", "module": "a param module", "tensor": "a param",
    "extern": "an extern module",
    "const": "a const", "let": "a let", "energy": "an energy",
}


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A "did you mean" hint from the closest candidate, if any is close."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def reserved(name: str) -> str | None:
    """Why ``name`` cannot be declared, or None."""
    if name in KEYWORDS:
        return f"{name} is a keyword"
    if name in BUILTINS:
        return f"{name} shadows the built-in function {name}"
    if name in MODULE_KINDS:
        return f"{name} shadows the module kind {name}"
    if name in WORDS:
        return f"{name} is reserved ({WORDS[name]})"
    return None


# --------------------------------------------------------------------------- compile-time numbers


class NotStatic(Exception):
    """An expression that is not a compile-time number: ``expr`` is the innermost culprit and
    ``reason`` says what it is (``y is a state``); ``unknown`` when it is an undeclared name."""

    def __init__(self, expr, reason: str, unknown: bool = False):
        super().__init__(reason)
        self.expr, self.reason, self.unknown = expr, reason, unknown


class UnknownStatic(Exception):
    """A value that failed earlier (its error is already reported): report nothing more."""


def describe_expr(expr) -> str:
    if isinstance(expr, ast.Call):
        return f"a call of {expr.func.id}"
    if isinstance(expr, ast.ListExpr):
        return "a list"
    if isinstance(expr, ast.Index):
        return "an indexed tensor"
    if isinstance(expr, ast.Str):
        return "a string"
    return "a tensor expression"


def static_number(expr, lookup: Callable[[ast.Name], Number], cache: dict | None = None) -> Number:
    """Evaluate a compile-time number. ``lookup`` gives a name's number or raises :class:`NotStatic`.
    Elementwise built-ins whose arguments are all numbers are folded (``tanh(0.5)``). Numbers out of range
    (integers of 64 bits or more, infinity, ``log(0)``) and arithmetic errors are
    :class:`~fpidsl.errors.TypeErr` at the expression. ``cache`` (``id(expr)`` -> value or exception) makes
    repeated evaluation of the subexpressions of one tree linear; the caller keeps the tree alive."""
    ok, value = _evaluate(expr, lookup, cache)
    if ok:
        return value
    raise _copy(value) if cache is not None else value


def static_outcome(expr, lookup: Callable[[ast.Name], Number], cache: dict) -> tuple[bool, Any]:
    """:func:`static_number` without the raise: ``(True, number)``, or ``(False, the exception)`` (the cached
    one: copy it before raising it)."""
    return _evaluate(expr, lookup, cache)


def _copy(exc: Exception) -> Exception:
    """A copy of a cached failure, to raise: raising the cached exception itself would tie the frames it passes
    through to the cache (through its traceback), and every failed evaluation kept its frames alive."""
    copy = exc.__class__.__new__(exc.__class__)
    copy.args = exc.args
    copy.__dict__.update(exc.__dict__)
    return copy


def _evaluate(expr, lookup, cache) -> tuple[bool, Any]:
    """``(True, number)``, or ``(False, the exception to raise)``: a failure is handed up the expression as a
    value, not raised through every level of it (a spec's every subexpression is tried as a number)."""
    key = id(expr)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    try:
        hit = _static(expr, lookup, cache)
    except (NotStatic, UnknownStatic, TypeErr) as exc:  # from lookup, an arithmetic check or an unfoldable call
        hit = (False, exc.with_traceback(None))  # a kept traceback would keep every frame alive
    if cache is not None:
        cache[key] = hit
    return hit


def _static(expr, lookup, cache) -> tuple[bool, Any]:
    if isinstance(expr, ast.Num):
        return True, expr.value
    if isinstance(expr, ast.Name):
        return True, lookup(expr)
    if isinstance(expr, ast.Neg):
        ok, value = _evaluate(expr.operand, lookup, cache)
        return (True, _checked(lambda: numbers.checked(-value), expr.span)) if ok else (False, value)
    if isinstance(expr, ast.BinOp) and expr.op != "@":
        ok, a = _evaluate(expr.left, lookup, cache)
        if not ok:
            return False, a
        ok, b = _evaluate(expr.right, lookup, cache)
        if not ok:
            return False, b
        return True, _checked(lambda: numbers.arithmetic(expr.op, a, b), expr.span)
    if isinstance(expr, ast.Call) and expr.func.id in numbers.FOLDS:
        return _fold(expr, lookup, cache)
    return False, _not_static(expr)


def _not_static(expr) -> NotStatic:
    return NotStatic(expr, f"`{_short(expr)}` is {describe_expr(expr)}")


def _checked(compute: Callable[[], Number], span: Span) -> Number:
    try:
        return compute()
    except numbers.OutOfRange as exc:
        raise TypeErr(exc.reason, span, hint=exc.hint) from None


def _fold(call: ast.Call, lookup, cache) -> tuple[bool, Any]:
    """A built-in on numbers only. Arguments that do not bind are left to the graph builder's messages."""
    names, defaults, _ = numbers.FOLDS[call.func.id]
    if len(call.args) > len(names):
        return False, _not_static(call)
    bound = dict(zip(names, call.args))
    for kw in call.kwargs:
        if kw.name not in names or kw.name in bound:
            return False, _not_static(call)
        bound[kw.name] = kw.value
    if any(n not in bound and n not in defaults for n in names):
        return False, _not_static(call)
    values = {}
    for n, e in bound.items():
        ok, value = _evaluate(e, lookup, cache)
        if not ok:
            return False, value
        values[n] = value
    return True, _checked(lambda: numbers.fold(call.func.id, values), call.span)


def _short(expr) -> str:
    if isinstance(expr, ast.Call):
        return f"{expr.func.id}(...)"
    if isinstance(expr, ast.Name):
        return expr.id
    return "..."


# --------------------------------------------------------------------------- fns


@dataclass
class FnTable:
    """The file's valid ``fn`` definitions; ``recursive`` ones are reported and never inlined."""

    fns: dict[str, ast.FnDef] = field(default_factory=dict)
    recursive: set[str] = field(default_factory=set)


def _calls(expr) -> Iterable[ast.Call]:
    if isinstance(expr, ast.Call):
        yield expr
        for a in expr.args:
            yield from _calls(a)
        for k in expr.kwargs:
            yield from _calls(k.value)
    elif isinstance(expr, ast.BinOp):
        yield from _calls(expr.left)
        yield from _calls(expr.right)
    elif isinstance(expr, ast.Neg):
        yield from _calls(expr.operand)
    elif isinstance(expr, ast.ListExpr):
        for i in expr.items:
            yield from _calls(i)
    elif isinstance(expr, ast.Index):
        yield from _calls(expr.value)
        for i in expr.items:
            if isinstance(i, ast.Slice):
                for part in (i.lo, i.hi, i.step):
                    if part is not None:
                        yield from _calls(part)
            elif not isinstance(i, ast.EllipsisIndex):
                yield from _calls(i)


def resolve_fns(spec: ast.SpecFile, sink: ErrorSink) -> FnTable:
    """Check ``fn`` names and parameters, and that no fn calls itself (directly or not)."""
    table = FnTable()
    for fn in spec.fns:
        why = reserved(fn.name)
        if why:
            sink.add(NameErr(f"fn {why}", fn.name_span, hint=f"rename it, e.g. {fn.name}_"))
            continue
        if fn.name in table.fns:
            first = table.fns[fn.name]
            sink.add(NameErr(f"fn {fn.name} is already defined at line {first.name_span.line}", fn.name_span))
            continue
        seen: set[str] = set()
        for p in fn.params:
            why = reserved(p.id)
            if why:
                sink.add(NameErr(f"parameter {why}", p.span, hint=f"rename it, e.g. {p.id}_"))
            elif p.id in seen:
                sink.add(NameErr(f"fn {fn.name} has two parameters named {p.id}", p.span))
            seen.add(p.id)
        table.fns[fn.name] = fn
    # recursion: a depth-first walk of the call graph
    state: dict[str, int] = {}

    def visit(name: str, path: list[tuple[str, ast.Call | None]]) -> None:
        state[name] = 1
        for call in _calls(table.fns[name].body):
            callee = call.func.id
            if callee not in table.fns:
                continue
            if state.get(callee) == 1:
                names = [n for n, _ in path] + [name]
                cycle = names[names.index(callee):] + [callee]
                table.recursive.update(cycle)
                sink.add(StructureErr(
                    f"fn {callee} calls itself ({' → '.join(cycle)})", call.span,
                    hint="fns are inlined where they are called, so they cannot be recursive"))
            elif callee not in state:
                visit(callee, path + [(name, call)])
        state[name] = 2

    for name in table.fns:
        if name not in state:
            visit(name, [])
    return table


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Symbol:
    """A declared name: ``kind`` is input, state, module, tensor, const, let or energy."""

    name: str
    kind: str
    decl: object
    span: Span


@dataclass
class LayerScope:
    """The resolved declarations of one layer, in declaration order."""

    layer: ast.Layer
    symbols: dict[str, Symbol] = field(default_factory=dict)
    consts: dict[str, Number] = field(default_factory=dict)
    updates: dict[str, object] = field(default_factory=dict)  # state -> UpdateDecl | DescendDecl
    output: ast.OutputDecl | None = None
    settings: dict[str, ast.SettingsDecl] = field(default_factory=dict)  # "solve" / "backward" / "eval"

    def of_kind(self, kind: str) -> list[Symbol]:
        return [s for s in self.symbols.values() if s.kind == kind]

    def const_lookup(self, ref: ast.Name) -> Number:
        """A :func:`static_number` lookup over the layer's consts."""
        if ref.id in self.consts:
            return self.consts[ref.id]
        sym = self.symbols.get(ref.id)
        if sym is None:
            raise NotStatic(ref, f"{ref.id} is not declared", unknown=True)
        if sym.kind == "const":  # a const whose value failed
            raise UnknownStatic()
        raise NotStatic(ref, f"{ref.id} is {KIND_WORDS[sym.kind]}")


_DECL_KINDS = {
    ast.InputDecl: "input", ast.StateDecl: "state", ast.ModuleParamDecl: "module",
    ast.TensorParamDecl: "tensor", ast.ExternParamDecl: "extern", ast.ConstDecl: "const", ast.LetDecl: "let", ast.EnergyDecl: "energy",
}


def resolve_layer(layer: ast.Layer, fns: FnTable, sink: ErrorSink) -> LayerScope:
    scope = LayerScope(layer)
    pending: dict[str, list] = {}
    for decl in layer.decls:
        kind = _DECL_KINDS.get(type(decl))
        if kind is not None:
            _declare(scope, fns, decl, kind, sink)
        elif isinstance(decl, (ast.UpdateDecl, ast.DescendDecl)):
            pending.setdefault(decl.name, []).append(decl)
        elif isinstance(decl, ast.OutputDecl):
            if scope.output is not None:
                sink.add(StructureErr(
                    f"layer {layer.name} already has an output declaration (line {scope.output.span.line})",
                    decl.span, hint="list several values in one declaration: output a, b"))
            else:
                scope.output = decl
        elif isinstance(decl, ast.SettingsDecl):
            if decl.which in scope.settings:
                sink.add(SettingsErr(
                    f"layer {layer.name} already has a {decl.which} block "
                    f"(line {scope.settings[decl.which].span.line})", decl.span,
                    hint="put all the settings in one block"))
            else:
                scope.settings[decl.which] = decl
    _eval_consts(scope, sink)
    _resolve_updates(scope, pending, sink)
    return scope


def _declare(scope: LayerScope, fns: FnTable, decl, kind: str, sink: ErrorSink) -> None:
    name = decl.name
    why = reserved(name)
    if why:
        sink.add(NameErr(why, decl.name_span, hint=f"rename it, e.g. {name}_"))
        return
    if name in fns.fns:
        sink.add(NameErr(f"{name} shadows the fn {name} (line {fns.fns[name].name_span.line})",
                         decl.name_span, hint=f"rename it, e.g. {name}_"))
        return
    first = scope.symbols.get(name)
    if first is not None:
        sink.add(NameErr(
            f"{name} is already declared at line {first.span.line} ({KIND_WORDS[first.kind]})",
            decl.name_span, hint="a name is declared once per layer"))
        return
    scope.symbols[name] = Symbol(name, kind, decl, decl.name_span)


def _eval_consts(scope: LayerScope, sink: ErrorSink) -> None:
    """Consts may refer to other consts, in any order; cycles are errors."""
    busy: list[str] = []  # the consts being evaluated, in order (for the cycle's message)
    busy_set: set[str] = set()

    def lookup(ref: ast.Name) -> Number:
        sym = scope.symbols.get(ref.id)
        if sym is not None and sym.kind == "const":
            return value_of(sym, ref)
        return scope.const_lookup(ref)

    def value_of(sym: Symbol, ref: ast.Name | None) -> Number:
        if sym.name in scope.consts:
            return scope.consts[sym.name]
        if sym.name in busy_set:
            cycle = busy[busy.index(sym.name):] + [sym.name]
            sink.add(StructureErr(f"const {sym.name} is defined in terms of itself ({' → '.join(cycle)})",
                                  ref.span if ref else sym.span))
            raise UnknownStatic()
        busy.append(sym.name)
        busy_set.add(sym.name)
        try:
            value = static_number(sym.decl.value, lookup)
        finally:
            busy_set.discard(busy.pop())
        scope.consts[sym.name] = value
        return value

    for sym in scope.of_kind("const"):
        try:
            value_of(sym, None)
        except NotStatic as e:
            cls = NameErr if e.unknown else TypeErr
            sink.add(cls(f"const {sym.name} must be a number known at compile time, but {e.reason}",
                         e.expr.span, hint="a const is a number, or arithmetic on numbers and other consts"))
        except UnknownStatic:
            pass
        except TypeErr as e:
            sink.add(e)


def _resolve_updates(scope: LayerScope, pending: dict[str, list], sink: ErrorSink) -> None:
    states = [s.name for s in scope.of_kind("state")]
    for name, decls in pending.items():
        sym = scope.symbols.get(name)
        first = decls[0]
        if sym is None:
            for d in decls:
                sink.add(NameErr(f"update of an unknown state {name}", d.name_span,
                                 hint=did_you_mean(name, states) or "declare it: state NAME : SHAPE"))
            continue
        if sym.kind != "state":
            for d in decls:
                sink.add(StructureErr(f"{name} is {KIND_WORDS[sym.kind]}, not a state: only states are updated",
                                      d.name_span, hint="declare a state, or use a let for a named value"))
            continue
        for d in decls[1:]:
            verb = "updated" if isinstance(first, ast.UpdateDecl) else "descended"
            sink.add(StructureErr(f"state {name} is already {verb} at line {first.span.line}", d.name_span,
                                  hint="a state has exactly one update (or one descend)"))
        scope.updates[name] = first
    for name in states:
        if name not in pending:
            sym = scope.symbols[name]
            sink.add(StructureErr(f"state {name} has no update", sym.span,
                                  hint=f"add `update {name} = ...` or `descend {name} on ENERGY step NUMBER`"))
    if not states:
        sink.add(StructureErr(f"layer {scope.layer.name} has no state", scope.layer.name_span,
                              hint="a fixed-point layer iterates at least one `state NAME : SHAPE`"))
