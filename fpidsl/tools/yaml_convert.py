"""``fpidsl fmt --to fpi|yaml``: a spec in the other form, with the same AST (hence the same graph).

The YAML form lists declarations by kind (inputs, states, params, consts, lets, energies, updates, descend,
output, solve, backward, eval), so ``--to yaml`` orders each layer's declarations that way; ``--to fpi`` keeps the
order it reads. Comments travel with what they are next to: a comment on the line where a declaration ends is
its trailing comment, comment lines before a declaration (or a layer, or an ``fn``) lead it, the comments before
the first of them head the file and the rest end it.

The result is checked, not trusted: it must parse to the source's AST with spans stripped (in YAML order for
``--to yaml``), else :class:`ConversionError` says what the YAML form cannot hold (two ``solve`` blocks, two
updates of one state, ...).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import yaml

from ..errors import FpiError
from ..frontend import ast
from ..frontend.ast_compare import strip_spans
from ..frontend.load import parse_source
from ..source import Source, Span, format_of
from . import unparse
from .fmt import format_source
from .tokens import tokens

SECTIONS = (
    ("inputs", ast.InputDecl), ("states", ast.StateDecl), ("params", (ast.ModuleParamDecl, ast.TensorParamDecl, ast.ExternParamDecl)),
    ("consts", ast.ConstDecl), ("lets", ast.LetDecl), ("energies", ast.EnergyDecl), ("updates", ast.UpdateDecl),
    ("descend", ast.DescendDecl), ("output", ast.OutputDecl),
)
# a number YAML may hold unquoted: no leading zero (YAML 1.1 reads `010` as octal 8, the language as 10)
_PLAIN_NUMBER = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?\Z")


class ConversionError(FpiError):
    """A spec that the other form cannot hold."""

    kind = "conversion"


# --------------------------------------------------------------------------- comments


@dataclass
class _Comment:
    line: int
    col: int
    text: str
    trailing: bool  # code before it on its line


@dataclass
class Comments:
    """The comments of a file, placed: ``lead``/``trail`` by anchor (a declaration, layer or fn object id)."""

    head: list[str] = field(default_factory=list)
    lead: dict[int, list[str]] = field(default_factory=dict)
    trail: dict[int, str] = field(default_factory=dict)
    layer_foot: dict[int, list[str]] = field(default_factory=dict)
    foot: list[str] = field(default_factory=list)


def _fpi_comments(source: Source) -> list[_Comment]:
    toks = tokens(source)
    out = []
    for i, tok in enumerate(toks):
        if tok.is_comment:
            trailing = i > 0 and not toks[i - 1].is_comment and toks[i - 1].end_line == tok.line
            out.append(_Comment(tok.line, tok.col, tok.text.rstrip(), trailing))
    return out


def _yaml_comments(source: Source) -> list[_Comment]:
    """Comments of a YAML file: a ``#`` at the start of a line or after a blank, outside quotes."""
    out = []
    for number, line in enumerate(source.text.splitlines(), start=1):
        quote = None
        for col, ch in enumerate(line):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (col == 0 or line[col - 1] in " \t[{,:"):
                quote = ch
            elif ch == "#" and (col == 0 or line[col - 1] in " \t"):
                out.append(_Comment(number, col + 1, line[col:].rstrip(), bool(line[:col].strip())))
                break
    return out


def _anchors(spec: ast.SpecFile) -> list[tuple[Span, object]]:
    """What comments can attach to, by where it is written."""
    out: list[tuple[Span, object]] = [(fn.span, fn) for fn in spec.fns]
    for layer in spec.layers:
        out.append((layer.name_span, layer))
        out += [(d.span, d) for d in layer.decls]
    return sorted(out, key=lambda a: (a[0].line, a[0].col))


def place_comments(source: Source, spec: ast.SpecFile) -> Comments:
    """Attach each comment of ``source`` to the declaration, layer or fn it belongs with."""
    fpi = (source.format or format_of(source.path)) == "fpi"
    found = _fpi_comments(source) if fpi else _yaml_comments(source)
    anchors = _anchors(spec)
    placed = Comments()
    for comment in found:
        line = comment.line
        holding = [obj for span, obj in anchors if span.line <= line <= span.end_line]
        if comment.trailing and holding:
            key = id(holding[-1])
            placed.trail[key] = f"{placed.trail[key]} {comment.text}" if key in placed.trail else comment.text
            continue
        if holding:
            placed.lead.setdefault(id(holding[-1]), []).append(comment.text)
            continue
        layer = next((la for la in spec.layers if la.span.line <= line <= la.span.end_line), None)
        if layer is None and not fpi:  # YAML: a comment indented under a layer's name is inside it
            above = [la for la in spec.layers if la.name_span.line < line]
            if above and comment.col > above[-1].name_span.col:
                layer = above[-1]
        after = [obj for span, obj in anchors if span.line > line]
        if layer is not None and not any(d.span.line > line for d in layer.decls):
            placed.layer_foot.setdefault(id(layer), []).append(comment.text)
        elif not anchors or anchors[0][0].line > line:
            placed.head.append(comment.text)
        elif after:
            placed.lead.setdefault(id(after[0]), []).append(comment.text)
        else:
            placed.foot.append(comment.text)
    return placed


# --------------------------------------------------------------------------- to .fpi


def to_fpi(source: Source, spec: ast.SpecFile) -> str:
    """The ``.fpi`` text of a parsed spec, in canonical layout, comments carried."""
    notes = place_comments(source, spec)
    lines = list(notes.head)

    def put(obj, text: str, indent: str = "") -> None:
        lines.extend(indent + c for c in notes.lead.get(id(obj), ()))
        trail = notes.trail.get(id(obj))
        lines.append(indent + text + (f"  {trail}" if trail else ""))

    if notes.head:
        lines.append("")
    for fn in spec.fns:
        put(fn, unparse.fn_def(fn))
    for layer in spec.layers:
        if lines and lines[-1]:
            lines.append("")
        put(layer, f"layer {layer.name} {{")
        for decl in layer.decls:
            put(decl, unparse.decl(decl), "  ")
        lines.extend("  " + c for c in notes.layer_foot.get(id(layer), ()))
        lines.append("}")
    if notes.foot:
        lines += [""] + notes.foot
    path = os.path.splitext(source.path)[0] + ".fpi"
    return format_source(Source(path, "\n".join(lines) + "\n"))


# --------------------------------------------------------------------------- to YAML


def _key(name: str) -> str:
    """A mapping key, quoted when YAML would read it as something other than a string."""
    resolved = yaml.resolver.Resolver().resolve(yaml.ScalarNode, name, (True, False))
    return name if resolved == "tag:yaml.org,2002:str" and name not in ("on",) else json.dumps(name)


def _value(expr) -> str:
    """An expression as a YAML scalar: a plain number or name, else a double-quoted string."""
    if isinstance(expr, ast.Num) and _PLAIN_NUMBER.match(expr.text):
        return expr.text
    if isinstance(expr, ast.Name):
        return _key(expr.id)
    return json.dumps(unparse.expr(expr))


def _decl_yaml(decl) -> tuple[str, str]:
    """The key and the value text of one declaration in its section."""
    if isinstance(decl, ast.InputDecl):
        return decl.name, json.dumps(unparse.input_type(decl))
    if isinstance(decl, ast.StateDecl):
        shape = json.dumps(unparse.shape(decl.shape))
        if decl.init is None:
            return decl.name, shape
        return decl.name, f"{{shape: {shape}, init: {_value(decl.init)}}}"
    if isinstance(decl, (ast.ModuleParamDecl, ast.TensorParamDecl, ast.ExternParamDecl)):
        return decl.name, json.dumps(unparse.param_type(decl))
    if isinstance(decl, ast.DescendDecl):
        return decl.name, f"{{on: {_key(decl.energy.id)}, step: {_value(decl.step)}}}"
    return decl.name, _value(decl.value)


def reorder(spec: ast.SpecFile) -> ast.SpecFile:
    """``spec`` with each layer's declarations in the YAML form's order (stable within a kind)."""
    from dataclasses import replace

    def rank(decl) -> int:
        for i, (_, kind) in enumerate(SECTIONS):
            if isinstance(decl, kind):
                return i
        return len(SECTIONS) + ("solve", "backward", "eval").index(decl.which)

    return replace(spec, layers=tuple(replace(layer, decls=tuple(sorted(layer.decls, key=rank)))
                                      for layer in spec.layers))


def _refuse_what_yaml_cannot_hold(spec: ast.SpecFile) -> None:
    """A second ``solve``/``backward``/``output`` of a layer, or a second entry of one name in a YAML mapping."""
    for layer in spec.layers:
        seen: dict[tuple[str, str], ast.Decl] = {}
        for decl in layer.decls:
            if isinstance(decl, ast.SettingsDecl):
                key, what = (decl.which, ""), f"a second `{decl.which}` block"
            elif isinstance(decl, ast.OutputDecl):
                key, what = ("output", ""), "a second `output`"
            elif isinstance(decl, ast.LetDecl):
                continue  # `lets` is a list
            else:
                section = next(name for name, kind in SECTIONS if isinstance(decl, kind))
                key, what = (section, decl.name), f"a second entry `{decl.name}` in `{section}`"
            if key in seen:
                raise ConversionError(f"{what} in layer {layer.name}: the YAML form holds one", decl.span,
                                      hint=_HINT)
            seen[key] = decl


def to_yaml(source: Source, spec: ast.SpecFile) -> str:
    """The YAML text of a parsed spec, comments carried."""
    _refuse_what_yaml_cannot_hold(spec)
    notes = place_comments(source, spec)
    out = list(notes.head) + ["fpi: 1"]

    def put(obj, text: str, indent: str) -> None:
        out.extend(indent + c for c in notes.lead.get(id(obj), ()))
        trail = notes.trail.get(id(obj))
        out.append(indent + text + (f"  {trail}" if trail else ""))

    if spec.fns:
        out.append("fns:")
        for fn in spec.fns:
            head = f"{fn.name}({', '.join(p.id for p in fn.params)})"
            put(fn, f"{json.dumps(head)}: {json.dumps(unparse.expr(fn.body))}", "  ")
    out.append("layers:")
    for original, layer in zip(spec.layers, reorder(spec).layers):
        put(original, f"{_key(layer.name)}:", "  ")
        for section, kind in SECTIONS:
            decls = [d for d in layer.decls if isinstance(d, kind)]
            if not decls:
                continue
            if section == "output":
                for decl in decls:
                    put(decl, "output: [" + ", ".join(_value(v) for v in decl.values) + "]", "    ")
                continue
            out.append(f"    {section}:")
            for decl in decls:
                key, value = _decl_yaml(decl)
                put(decl, f"- {_key(key)}: {value}" if section == "lets" else f"{_key(key)}: {value}", "      ")
        for decl in layer.decls:
            if isinstance(decl, ast.SettingsDecl):
                inner = ", ".join(f"{_key(s.key)}: {_value(s.value)}" for s in decl.settings)
                put(decl, f"{decl.which}: {{{inner}}}", "    ")
        out.extend("    " + c for c in notes.layer_foot.get(id(original), ()))
    out += notes.foot
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- both ways, checked


def convert(source: Source, to: str) -> str:
    """``source`` (either form) as ``to`` (``"fpi"`` or ``"yaml"``); the result parses to the same AST."""
    spec = parse_source(source)
    if to == "fpi":
        text, path, expected = to_fpi(source, spec), os.path.splitext(source.path)[0] + ".fpi", spec
    elif to == "yaml":
        text, path, expected = to_yaml(source, spec), os.path.splitext(source.path)[0] + ".yaml", reorder(spec)
    else:
        raise ValueError(f"unknown target form {to!r}")
    try:
        again = parse_source(Source(path, text))
    except FpiError as exc:
        raise ConversionError(f"the {to} form of this spec does not read back: {exc.message}", spec.span,
                              hint=_HINT) from None
    if strip_spans(again) != strip_spans(expected):
        raise ConversionError(f"this spec cannot be written in the {to} form without changing it", spec.span,
                              hint=_HINT)
    return text


_HINT = ("the YAML form holds one `solve`, one `backward` and one `output` per layer and one entry per name "
         "in each section")
