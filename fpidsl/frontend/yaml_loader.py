"""The YAML front-end: a spec written as a YAML mapping, read into the same AST as the ``.fpi`` grammar.

The schema is the "YAML form" of LANGUAGE.md::

    fpi: 1
    fns: {"sq(v)": "v * v"}                    # optional
    layers:
      L:
        inputs:   {a: "[B, 10]"}
        states:   {x: "[B, 10]", y: {shape: "[B, 10]", init: a}}
        params:   {fc: "Linear(20, 10)", w: "tensor [10] = ones"}
        consts:   {k: 0.5}
        lets:     [{h: "relu(fc(cat([x, a], dim=-1)))"}]      # a list: lets are ordered
        energies: {E: "sum(square(y - a), dim=-1)"}
        updates:  {x: "h * k"}
        descend:  {y: {on: E, step: 0.01}}
        output:   [x, y]                       # or one string
        solve:    {method: "anderson(m=5)", tol: 1e-6}
        backward: {max_iter: 200}
        eval:     {max_iter: 20, tol: 1e-3}      # the solve of eval mode, over `solve`

Expressions, shapes and parameter types are YAML scalars parsed with the ``.fpi`` grammar's fragment
parsers; a YAML number where an expression is expected is parsed from its text, so ``init: -0.5`` is the
same ``Neg(Num(0.5))`` as ``= -0.5`` in ``.fpi``. A shape may also be a YAML list of names and integers
(``[B, 10]`` unquoted), an extension of the contract. Declarations are listed in a fixed order whatever the
order of the YAML keys: inputs, states, params, consts, lets, energies, updates, descend, output, solve,
backward, eval. An absent or empty (``null``) section means no declarations of that kind.

Safety: the file is only *composed* (``yaml.compose`` with ``yaml.SafeLoader``): a node tree, nothing is
constructed. Any explicit tag (``!!python/object``, ``!!binary``, ``!custom``, and core ones such as ``!!float``,
which would only disagree with the value read from the text: ``!!float 1`` is the integer 1 here) is
a :class:`~fpidsl.errors.SchemaErr`, as are duplicate keys (which PyYAML would silently collapse),
recursive aliases and aliases that expand to more than ``MAX_EXPANDED_NODES`` nodes. YAML syntax errors
are :class:`~fpidsl.errors.SyntaxErr` at PyYAML's problem mark.

Spans point into the YAML file. A key's span is the key (inside its quotes, if quoted). An expression
is parsed from the file's own text of the scalar, placed where that text starts: plain scalars at their
first character, quoted ones one column after the quote, block scalars (``|``, ``>``) at column 1 of their
first content line (their indentation is parsed as whitespace). This is exact as long as that text reads
as the scalar's value: equal to it, or equal up to whitespace and line breaks (folded and multi-line
scalars) and without a ``#``. Otherwise (escapes in double quotes, ``''`` in single quotes, a ``#`` inside
a folded block, unusual line breaks) the value is parsed on its own and *every* span of the fragment,
including a syntax error's, is the whole scalar, so that no column is silently shifted. A ``#`` comment of such a
value that holds more than its line of the file (YAML joined the lines of a folded, quoted or plain scalar, so the
comment would hide the code after it) is a :class:`~fpidsl.errors.SyntaxErr` at the ``#``.

Numbers: YAML 1.1 reads a plain integer with a leading zero as octal (``010`` is 8); where that differs from the
expression syntax's reading (10), the number is a :class:`~fpidsl.errors.SchemaErr`.
"""
from __future__ import annotations

import bisect
import difflib
import re
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable

import yaml

from ..errors import LimitErr, SchemaErr, SyntaxErr, TypeErr
from ..source import MAX_SOURCE_BYTES, Source, Span, line_breaks
from . import ast, numbers
from .parser import (KEYWORDS, Placement, parse_dim, parse_expr, parse_fn_head, parse_input_type, parse_param_type,
                     parse_shape)

FORMAT_VERSION = 1
MAX_EXPANDED_NODES = 100_000
MAX_FLOW_DEPTH = 100  # levels of [ ] and { }: a spec needs about 6
MAX_EXPANDED_CHARS = MAX_SOURCE_BYTES  # the text of the values, aliases expanded: no more than a spec file holds

ROOT_KEYS = ("fpi", "layers", "fns")
LAYER_KEYS = ("inputs", "states", "params", "consts", "lets", "energies", "updates", "descend", "output",
              "solve", "backward", "eval")
STATE_KEYS = ("shape", "init")
DESCEND_KEYS = ("on", "step")

_CORE = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_CORE + t for t in ("str", "int", "float", "bool", "null"))
# The tags the core schema resolves plain text to; anything else was written explicitly and is refused.
_ALLOWED_TAGS = frozenset(_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq",
                                              "timestamp", "merge", "value"))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe composer, noting on each node the tag written in the file (``written_tag``; None when the
    tag was resolved from the text): a node tree does not say which tags were explicit."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        node = super().compose_node(parent, index)
        if not isinstance(event, yaml.AliasEvent) and node is not None:
            node.written_tag = event.tag
        return node


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
# PyYAML reads YAML 1.1: a plain integer with a leading 0 is octal (`010` is 8), which the expression syntax reads as
# decimal (10); such a number is refused where the two readings differ
_OCTAL = re.compile(r"[-+]?0[0-7_]+\Z")
# Line breaks that YAML counts and the expression grammar does not: text holding them is not parsed in place.
_ODD_BREAKS = re.compile(r"\r(?!\n)|[\x85\u2028\u2029]")

NAME_HINT = "names are identifiers: letters, digits and `_`, not starting with a digit"
NUMBER_HINT = "write numbers as in the expression syntax: 12, 0.5, 1e-6, -3"
OCTAL_HINT = 'drop the leading zero, or quote the number ("{v}") to read it as the expression syntax does'
EXPR_HINT = 'write an expression as a string, e.g. "relu(fc(x))", or a number'
BOOL_HINT = ("YAML reads `{v}` as a boolean and a spec has no boolean values here; "
             'quote it ("{v}") if you mean the name `{v}`')
TAG_HINT = "a spec is plain data (mappings, lists, strings and numbers); nothing is constructed from it"
CORE_TAG_HINT = "write the value without a tag: a spec reads each value from its text (`!!float 1` would be 1)"
DUPLICATE_HINT = "YAML would keep only the last one; remove or rename one of them"
MERGE_HINT = "YAML merge keys (`<<`) are not supported: write the entries out"
FOLDED_COMMENT_HINT = ("write the value as a literal block (`x: |`), which keeps its line breaks, or put the comment "
                       "outside the value, after it or on a line of its own")
LETS_HINT = 'lets are ordered, so `lets` is a list: `lets: [{h: "relu(x)"}, {y: "h + 1"}]`'
DESCEND_HINT = "write it as `x: {on: E, step: 0.01}`: descend state x along the gradient of energy E"
OUTPUT_HINT = "several outputs are a YAML list: `output: [x, y]`"
FN_HINT = "an `fns` key is the function's head with its parameters, e.g. `sq(v)`, or `two()` for none"

_SECTION_SHAPES = {
    "layers": "a mapping of layer name to layer",
    "fns": "a mapping of `name(a, b)` to expression",
    "inputs": "a mapping of name to shape",
    "states": "a mapping of name to shape or to {shape, init}",
    "params": "a mapping of name to a module or tensor type",
    "consts": "a mapping of name to number",
    "lets": "a list of one-key mappings `name: EXPR`",
    "energies": "a mapping of name to expression",
    "updates": "a mapping of state name to expression",
    "descend": "a mapping of state name to {on: ENERGY, step: NUMBER}",
    "output": "an expression or a list of expressions",
    "solve": "a mapping of setting to value",
    "backward": "a mapping of setting to value",
    "eval": "a mapping of setting to value",
}


def parse_yaml(source: Source) -> ast.SpecFile:
    """Parse a YAML spec into the AST; errors are :class:`~fpidsl.errors.SyntaxErr` or ``SchemaErr``."""
    return _Reader(source).spec()


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Fragment:
    """The text of a scalar to hand to a fragment parser, and where it sits in the file."""

    text: str
    at: Placement
    exact: bool  # the text is the file's own text at `at`; if not, every span becomes `whole`
    whole: Span


def _respan(node: Any, span: Span) -> Any:
    """``node`` with every :class:`Span` in it replaced by ``span``."""
    if isinstance(node, Span):
        return span
    if isinstance(node, tuple):
        return tuple(_respan(item, span) for item in node)
    if is_dataclass(node) and not isinstance(node, type):
        return replace(node, **{f.name: _respan(getattr(node, f.name), span) for f in fields(node)})
    return node


_YAML_BREAKS = "\r\n\x85\u2028\u2029"


def _comments(text: str, breaks: str) -> list[tuple[int, str]]:
    """The expression grammar's comments in ``text``: ``(index, text)`` of each ``#`` outside a string (einsum's
    equation), to the end of its line (a character of ``breaks``)."""
    out, i, quoted = [], 0, False
    while i < len(text):
        ch = text[i]
        if ch in breaks:
            quoted = False
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            end = i
            while end < len(text) and text[end] not in breaks:
                end += 1
            out.append((i, text[i:end].rstrip()))
            i = end
            continue
        i += 1
    return out


def _comment_runs_on(raw: str, value: str, style: str | None) -> tuple[int, str] | None:
    """Where (an index into ``raw``, the file's text of a scalar) a comment of the value holds more than its line of
    the file, and what more: YAML folded the scalar's lines into one (``>``, a quoted or plain scalar over several
    lines), so a ``#`` comment, which runs to the end of its line, would hide the code of the lines after it."""
    written = _comments(raw, _YAML_BREAKS)
    for k, (_, text) in enumerate(_comments(value, "\n")):
        if k >= len(written):
            return 0, text
        start, line = written[k]
        if style == "'":
            line = line.replace("''", "'")
        if line != text:
            return start, text[len(line):].strip() if text.startswith(line) else text
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _kind(node: yaml.Node) -> str:
    """What a node is, for messages: "a list", "the number 5", ..."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "nothing"
    if node.tag == _BOOL:
        return f"the boolean `{node.value}`"
    if node.tag in (_INT, _FLOAT):
        return f"the number {node.value}"
    text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    return f'the string "{text}"'


def _unknown_key(text: str, allowed: tuple[str, ...], where: str, span: Span, value: yaml.Node) -> SchemaErr:
    if text == "<<":
        return SchemaErr(f"unknown key `<<` {where}", span, hint=MERGE_HINT)
    close = difflib.get_close_matches(text, allowed, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean `{close[0]}`?"
    elif where == "at the top level" and isinstance(value, yaml.MappingNode) and any(
        isinstance(k, yaml.ScalarNode) and k.value in LAYER_KEYS for k, _ in value.value
    ):
        hint = f"is `{text}` a layer? layers go under `layers:`"
    else:
        hint = "the keys here are " + ", ".join(f"`{k}`" for k in allowed)
    return SchemaErr(f"unknown key `{text}` {where}", span, hint=hint)


def _too_deep_flow(text: str) -> int | None:
    """The index of the first ``[`` or ``{`` nested deeper than ``MAX_FLOW_DEPTH``, or None. PyYAML's scanner
    spends time proportional to the nesting on every token (200,000 levels ran for minutes), so the depth is
    found first, by one pass that skips quoted scalars and comments (an over-count elsewhere only refuses a
    spec that nests brackets past the limit inside its text)."""
    depth, i, n = 0, 0, len(text)
    previous = "\n"
    while i < n:
        ch = text[i]
        if ch == "#" and previous in " \t\n":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "'\"" and previous in " \t\n[{,:":
            i = _quoted_end(text, i)
            previous = ch
            continue
        if ch in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return i
        elif ch in "]}":
            depth = max(depth - 1, 0)
        previous = ch
        i += 1
    return None


def _quoted_end(text: str, start: int) -> int:
    """The index after the quoted scalar that starts at ``start`` (the end of the text if it is not closed)."""
    quote, i, n = text[start], start + 1, len(text)
    while i < n:
        ch = text[i]
        if quote == '"' and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if quote == "'" and i + 1 < n and text[i + 1] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    return n


# --------------------------------------------------------------------------- the reader


class _Reader:
    """Reads one YAML source into an :class:`ast.SpecFile`; raises the first error found."""

    def __init__(self, source: Source):
        self.source = source
        self.path = source.path
        self._line_starts: list[int] | None = None

    # ------------------------------------------------------------------ positions
    def _point(self, index: int) -> tuple[int, int]:
        """The 1-based (line, column) of a character index into the text."""
        if self._line_starts is None:
            text = self.source.text
            self._line_starts = [0] + [m.end() for m in line_breaks(self.path, self.source.format).finditer(text)]
        row = bisect.bisect_right(self._line_starts, index) - 1
        return row + 1, index - self._line_starts[row] + 1

    def _end(self, node: yaml.Node) -> tuple[int, int]:
        """Where a node's text ends, without the trailing blank lines and comments PyYAML's mark includes."""
        seen = set()
        while isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
            if id(node) in seen:  # a recursive alias (reported by the caller)
                break
            seen.add(id(node))
            node = _children(node)[-1]
        text = self.source.text
        index = min(node.end_mark.index, len(text))
        while index > node.start_mark.index and text[index - 1] in " \t\r\n":
            index -= 1
        return self._point(index)

    def _span(self, node: yaml.Node) -> Span:
        start = node.start_mark
        end_line, end_col = self._end(node)
        if (end_line, end_col) <= (start.line + 1, start.column + 1):
            end_line, end_col = start.line + 1, start.column + 2
        return Span(self.path, start.line + 1, start.column + 1, end_line, end_col)

    def _cover(self, first: yaml.Node, last: yaml.Node) -> Span:
        """From the start of ``first`` (a key) to the end of ``last`` (its value)."""
        return self._span(first).cover(self._span(last))

    def _key_span(self, node: yaml.Node) -> Span:
        """A key's span, inside the quotes of a quoted key."""
        span = self._span(node)
        if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
            inner = self.source.text[node.start_mark.index + 1:node.end_mark.index - 1]
            if inner == node.value and "\n" not in inner:
                return Span(self.path, span.line, span.col + 1, span.line, span.col + 1 + len(inner))
        return span

    def _fragment(self, node: yaml.ScalarNode) -> _Fragment:
        whole = self._span(node)
        text, value = self.source.text, node.value
        start, end = node.start_mark, node.end_mark
        lo, hi, line, col = start.index, end.index, start.line, start.column
        if node.style in ("'", '"'):
            lo, hi, col = lo + 1, hi - 1, col + 1
        elif node.style in ("|", ">"):
            newline = text.find("\n", lo, hi)
            lo, line, col = (newline + 1, line + 1, 0) if newline >= 0 else (hi, line, col)
        raw = text[lo:hi] if lo <= hi else ""
        in_place = raw == value or ("#" not in raw and raw.split() == value.split())
        if in_place and not _ODD_BREAKS.search(raw):
            return _Fragment(raw, Placement(self.path, line + 1, col + 1), True, whole)
        hidden = _comment_runs_on(raw, value, node.style)
        if hidden is not None:
            at, what = hidden
            shown = what if len(what) <= 40 else what[:37] + "..."
            raise SyntaxErr(f"this `#` starts a comment that would hide `{shown}`: in the value YAML reads, that "
                            "text is on the comment's line (YAML joins the lines of a folded, quoted or plain scalar)",
                            Span.point(self.path, *self._point(lo + at)), hint=FOLDED_COMMENT_HINT)
        return _Fragment(value, Placement(self.path, whole.line, whole.col), False, whole)

    def _parse(self, parse: Callable[[str, Placement], Any], node: yaml.ScalarNode) -> Any:
        """Run a fragment parser of the ``.fpi`` grammar on a scalar, with spans in the YAML file."""
        fragment = self._fragment(node)
        try:
            result = parse(fragment.text, fragment.at)
        except SyntaxErr as exc:
            message = exc.message.replace("the end of the file", "the end of the value")
            raise SyntaxErr(message, exc.span if fragment.exact else fragment.whole, hint=exc.hint) from None
        return result if fragment.exact else _respan(result, fragment.whole)

    # ------------------------------------------------------------------ loading
    def spec(self) -> ast.SpecFile:
        root = self._compose()
        if root is None or _is_null(root):
            raise SchemaErr(
                "the YAML document is empty", Span.point(self.path, 1, 1),
                hint=f"a YAML spec is a mapping that starts with `fpi: {FORMAT_VERSION}` and has `layers`",
            )
        self._check_tree(root)
        if not isinstance(root, yaml.MappingNode):
            raise SchemaErr(f"a YAML spec must be a mapping with the keys `fpi` and `layers`, got {_kind(root)}",
                            self._span(root))
        sections = self._keys(root, ROOT_KEYS, "at the top level")
        self._version(root, sections)
        if "layers" not in sections:
            raise SchemaErr("missing key `layers` at the top level", self._span(root),
                            hint="add `layers:` with one mapping per layer, e.g. `layers: {L: {...}}`")
        layers: list[ast.Layer] = []
        fns: list[ast.FnDef] = []
        for name, (key, value) in sections.items():
            if name == "layers":
                layers = self._layers(key, value)
            elif name == "fns":
                fns = self._fns(value)
        return ast.SpecFile(self.path, tuple(layers), tuple(fns), self._span(root))

    def _compose(self) -> yaml.Node | None:
        deep = _too_deep_flow(self.source.text)
        if deep is not None:
            line, col = self._point(deep)
            raise LimitErr(f"YAML nested more than {MAX_FLOW_DEPTH} levels of [ ] and {{ }}",
                           Span.point(self.path, line, col), hint="a spec is a few levels of mappings and lists")
        try:
            return yaml.compose(self.source.text, Loader=_Loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            hint = None
            if exc.problem and exc.context:
                hint = exc.context
                if exc.context_mark is not None:
                    hint += f" (line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
            message = exc.problem or exc.context or "not valid YAML"
            message = message[4:] if message.startswith("but ") else message
            raise SyntaxErr(f"invalid YAML: {message}", Span.point(self.path, line, col), hint=hint) from None
        except yaml.reader.ReaderError as exc:
            line, col = self._point(exc.position)
            code = exc.character if isinstance(exc.character, int) else ord(exc.character)
            raise SyntaxErr(f"invalid YAML: the character U+{code:04X} is not allowed in YAML text",
                            Span.point(self.path, line, col)) from None
        except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML error above carries a position
            raise SyntaxErr(f"invalid YAML: {exc}", Span.point(self.path, 1, 1)) from None
        except RecursionError:
            raise SyntaxErr("invalid YAML: nested too deeply", Span.point(self.path, 1, 1),
                            hint="a spec is a few levels of mappings and lists") from None

    def _check_tree(self, root: yaml.Node) -> None:
        """Refuse non-core tags, duplicate keys, recursive aliases and alias bombs, in document order."""
        sizes: dict[int, int] = {}
        chars: dict[int, int] = {}  # the length of the scalars of a node, aliases expanded
        open_nodes: set[int] = set()
        duplicates: dict[int, yaml.Node] = {}  # id of a repeated key -> its first occurrence
        stack: list[tuple[yaml.Node, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            key = id(node)
            if finished:
                open_nodes.discard(key)
                children = _children(node)
                sizes[key] = 1 + sum(sizes[id(child)] for child in children)
                chars[key] = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(
                    chars[id(child)] for child in children)
                if sizes[key] > MAX_EXPANDED_NODES:
                    raise SchemaErr(f"YAML aliases expand this spec to more than {MAX_EXPANDED_NODES:,} values",
                                    self._span(node), hint="a spec is small; is this the right file?")
                if chars[key] > MAX_EXPANDED_CHARS:
                    raise SchemaErr(f"YAML aliases expand this spec to more than {MAX_EXPANDED_CHARS:,} characters "
                                    "of values", self._span(node),
                                    hint="each use of an alias is read again: write it once, as a let")
                continue
            if key in sizes:
                continue  # reached again through an alias; already checked
            if key in open_nodes:
                raise SchemaErr("a YAML alias refers to a node that contains it", self._span(node),
                                hint="a spec is a tree: recursive anchors are not allowed")
            written = getattr(node, "written_tag", None)
            if node.tag not in _ALLOWED_TAGS or written is not None:
                raise SchemaErr(f"the YAML tag `{_short_tag(written or node.tag)}` is not allowed in a spec",
                                self._span(node), hint=CORE_TAG_HINT if node.tag in _ALLOWED_TAGS else TAG_HINT)
            if key in duplicates:
                first = duplicates[key]
                raise SchemaErr(
                    f"duplicate key `{node.value}` (first at line {first.start_mark.line + 1}, "
                    f"column {first.start_mark.column + 1})", self._key_span(node), hint=DUPLICATE_HINT)
            if isinstance(node, yaml.MappingNode):
                self._find_duplicates(node, duplicates)
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(_children(node)))

    def _find_duplicates(self, node: yaml.MappingNode, duplicates: dict[int, yaml.Node]) -> None:
        seen: dict[str, yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if key.value not in seen:
                seen[key.value] = key
                continue
            first = seen[key.value]
            if first is key or id(key) in duplicates:  # the same node twice, through an alias
                raise SchemaErr(f"duplicate key `{key.value}`", self._span(node), hint=DUPLICATE_HINT)
            duplicates[id(key)] = first

    # ------------------------------------------------------------------ structure
    def _keys(self, node: yaml.MappingNode, allowed: tuple[str, ...], where: str) -> dict:
        """The entries of a schema mapping by key, in document order; unknown keys are errors."""
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or _is_null(key):
                raise SchemaErr(f"keys {where} are words such as `{allowed[0]}`, got {_kind(key)}",
                                self._span(key))
            if key.value not in allowed:
                raise _unknown_key(key.value, allowed, where, self._key_span(key), value)
            out[key.value] = (key, value)
        return out

    def _entries(self, value: yaml.Node, section: str) -> list:
        """The ``(key, value)`` pairs of a section that maps names to things; ``null`` is empty."""
        if _is_null(value):
            return []
        if not isinstance(value, yaml.MappingNode):
            raise SchemaErr(f"`{section}` must be {_SECTION_SHAPES[section]}, got {_kind(value)}",
                            self._span(value))
        return list(value.value)

    def _name(self, node: yaml.Node, what: str) -> tuple[str, Span]:
        """A declared name written as a key."""
        if not isinstance(node, yaml.ScalarNode) or _is_null(node):
            raise SchemaErr(f"{what} must be a name, got {_kind(node)}", self._span(node), hint=NAME_HINT)
        text, span = node.value, self._key_span(node)
        if not _NAME.match(text):
            raise SchemaErr(f"`{text}` is not a valid {what}", span, hint=NAME_HINT)
        if text in KEYWORDS:
            raise SchemaErr(f"'{text}' is a keyword and cannot be used as a name", span,
                            hint=f"rename it: {', '.join(sorted(KEYWORDS))} are keywords")
        return text, span

    def _version(self, root: yaml.MappingNode, sections: dict) -> None:
        if "fpi" not in sections:
            raise SchemaErr("missing key `fpi` at the top level", self._span(root),
                            hint=f"start the file with `fpi: {FORMAT_VERSION}`, the version of the format")
        key, value = sections["fpi"]
        if not (isinstance(value, yaml.ScalarNode) and value.tag == _INT):
            raise SchemaErr(f"`fpi` must be the format version {FORMAT_VERSION}, got {_kind(value)}",
                            self._span(value) if not _is_null(value) else self._key_span(key),
                            hint=f"write `fpi: {FORMAT_VERSION}`")
        if value.value != str(FORMAT_VERSION):
            shown = value.value if len(value.value) <= 20 else value.value[:17] + "..."
            raise SchemaErr(f"unsupported format version `fpi: {shown}`", self._span(value),
                            hint=f"this fpidsl reads `fpi: {FORMAT_VERSION}`")

    # ------------------------------------------------------------------ values
    def _expr(self, node: yaml.Node, what: str, key: yaml.Node | None = None) -> ast.Expr:
        """A scalar where an expression is expected: a string in the expression syntax or a number."""
        if not isinstance(node, yaml.ScalarNode):
            raise SchemaErr(f"{what} must be an expression, got {_kind(node)}", self._span(node), hint=EXPR_HINT)
        if node.tag == _NULL:
            raise SchemaErr(f"{what} has no value", self._key_span(key) if key is not None else self._span(node),
                            hint=EXPR_HINT)
        if node.tag == _BOOL:
            raise SchemaErr(f"{what} must be an expression, got {_kind(node)}", self._span(node),
                            hint=BOOL_HINT.format(v=node.value))
        if node.tag not in (_INT, _FLOAT):
            return self._parse(parse_expr, node)
        self._refuse_octal(node, what)
        try:
            number = self._parse(parse_expr, node)
        except SyntaxErr:
            number = None
        operand = number.operand if isinstance(number, ast.Neg) else number
        if not isinstance(operand, ast.Num):
            raise SchemaErr(f"{what}: `{node.value}` is not a number the language accepts", self._span(node),
                            hint=NUMBER_HINT)
        return number

    def _refuse_octal(self, node: yaml.ScalarNode, what: str) -> None:
        """A YAML integer with a leading zero that YAML reads as octal and the expression syntax as decimal."""
        if node.tag != _INT or not _OCTAL.match(node.value):
            return
        digits = node.value.lstrip("+-").replace("_", "")
        sign = "-" if node.value.startswith("-") else ""
        if int(digits, 8) != int(digits):
            raise SchemaErr(f"{what}: YAML reads `{node.value}` as the octal number {sign}{int(digits, 8)}, the "
                            f"expression syntax as {sign}{int(digits)}", self._span(node),
                            hint=OCTAL_HINT.format(v=node.value))

    def _string(self, node: yaml.Node, what: str, example: str, key: yaml.Node) -> yaml.ScalarNode:
        """A scalar that must hold text (a shape, a parameter type)."""
        if _is_null(node):
            raise SchemaErr(f"{what} is missing", self._key_span(key), hint=f"write it as a string: {example}")
        if not isinstance(node, yaml.ScalarNode) or node.tag != _STR:
            raise SchemaErr(f"{what} must be a string such as {example}, got {_kind(node)}", self._span(node))
        return node

    def _shape(self, node: yaml.Node, what: str, key: yaml.Node) -> ast.Shape:
        if isinstance(node, yaml.SequenceNode):
            return ast.Shape(tuple(self._dim(item, what) for item in node.value), self._span(node))
        return self._parse(parse_shape, self._string(node, what, '"[B, 10]"', key))

    def _input_type(self, node: yaml.Node, what: str, key: yaml.Node) -> tuple[str, ast.Shape]:
        """An input's shape, as a list or a string, the string optionally led by ``int`` or ``bool``."""
        if isinstance(node, yaml.SequenceNode):
            return "float", self._shape(node, what, key)
        return self._parse(parse_input_type, self._string(node, what, '"[B, 10]"', key))

    def _dim(self, node: yaml.Node, what: str) -> ast.Name | ast.Num | ast.BinOp:
        """One dimension of a shape written as a YAML list: a name, a non-negative integer, or arithmetic of
        them written as text (``"C // 2"``)."""
        if isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _STR):
            span = self._span(node)
            if node.tag == _INT and _DIGITS.match(node.value):
                self._refuse_octal(node, f"a dimension of {what}")
                try:
                    value = numbers.literal(node.value)
                except numbers.OutOfRange as exc:
                    raise TypeErr(exc.reason, span, hint=exc.hint) from None
                return ast.Num(value, node.value, span)
            if node.tag == _STR and _NAME.match(node.value) and node.value not in KEYWORDS:
                return ast.Name(node.value, self._key_span(node))
            if node.tag == _STR and any(op in node.value for op in "+-*/"):
                return self._parse(parse_dim, node)
        raise SchemaErr(f"a dimension of {what} must be a name, an integer or arithmetic of them, got "
                        f"{_kind(node)}",
                        self._span(node), hint='shapes look like "[B, 10]" or [B, 1, H, W]')

    # ------------------------------------------------------------------ file level
    def _layers(self, key: yaml.Node, value: yaml.Node) -> list[ast.Layer]:
        entries = self._entries(value, "layers")
        if not entries:
            raise SchemaErr("`layers` is empty: a spec defines at least one layer", self._key_span(key),
                            hint="add one mapping per layer, e.g. `layers: {L: {inputs: ..., states: ...}}`")
        return [self._layer(name_node, body) for name_node, body in entries]

    def _fns(self, value: yaml.Node) -> list[ast.FnDef]:
        fns = []
        for head, body in self._entries(value, "fns"):
            if not isinstance(head, yaml.ScalarNode) or head.tag != _STR:
                raise SchemaErr(f"an `fns` key must be a head such as `sq(v)`, got {_kind(head)}",
                                self._span(head), hint=FN_HINT)
            if _NAME.match(head.value):
                raise SchemaErr(f"the function `{head.value}` needs a parameter list", self._key_span(head),
                                hint=FN_HINT)
            name, params = self._parse(parse_fn_head, head)
            expr = self._expr(body, f"the body of fn `{name.id}`", head)
            fns.append(ast.FnDef(name.id, tuple(params), expr, name.span, self._cover(head, body)))
        return fns

    # ------------------------------------------------------------------ a layer
    def _layer(self, name_node: yaml.Node, body: yaml.Node) -> ast.Layer:
        name, name_span = self._name(name_node, "layer name")
        if not isinstance(body, yaml.MappingNode):
            raise SchemaErr(f"layer `{name}` must be a mapping of sections ({', '.join(LAYER_KEYS)}), "
                            f"got {_kind(body)}", self._span(body) if not _is_null(body) else name_span)
        by_section: dict[str, list[ast.Decl]] = {}
        for section, (key, value) in self._keys(body, LAYER_KEYS, f"in layer `{name}`").items():
            by_section[section] = getattr(self, f"_{section}")(key, value)
        decls = tuple(d for section in LAYER_KEYS for d in by_section.get(section, ()))
        return ast.Layer(name, decls, name_span, self._cover(name_node, body))

    def _inputs(self, key, value) -> list[ast.Decl]:
        decls = []
        for name_node, shape in self._entries(value, "inputs"):
            name, span = self._name(name_node, "input name")
            dtype, parsed = self._input_type(shape, f"the shape of input `{name}`", name_node)
            decls.append(ast.InputDecl(name, parsed, span, self._cover(name_node, shape), dtype))
        return decls

    def _states(self, key, value) -> list[ast.Decl]:
        decls = []
        for name_node, spec in self._entries(value, "states"):
            name, span = self._name(name_node, "state name")
            what = f"the shape of state `{name}`"
            init = None
            if isinstance(spec, yaml.MappingNode):
                parts = self._keys(spec, STATE_KEYS, f"in state `{name}`")
                if "shape" not in parts:
                    raise SchemaErr(f"state `{name}` is missing `shape`", self._span(spec),
                                    hint='write it as `x: {shape: "[B, 10]", init: zeros}`')
                shape = self._shape(parts["shape"][1], what, parts["shape"][0])
                if "init" in parts:
                    init_key, init_node = parts["init"]
                    init = self._expr(init_node, f"`init` of state `{name}`", init_key)
            else:
                shape = self._shape(spec, what, name_node)
            decls.append(ast.StateDecl(name, shape, init, span, self._cover(name_node, spec)))
        return decls

    def _params(self, key, value) -> list[ast.Decl]:
        decls = []
        for name_node, kind in self._entries(value, "params"):
            name, span = self._name(name_node, "param name")
            text = self._string(kind, f"the type of param `{name}`", '"Linear(20, 32)" or "tensor [5] = ones"',
                                name_node)
            parsed = self._parse(parse_param_type, text)
            whole = self._cover(name_node, kind)
            if isinstance(parsed, ast.Call):
                decls.append(ast.ModuleParamDecl(name, parsed, span, whole))
            elif isinstance(parsed, ast.ExternType):
                decls.append(ast.ExternParamDecl(name, parsed, span, whole))
            else:
                shape, init = parsed
                decls.append(ast.TensorParamDecl(name, shape, init, span, whole))
        return decls

    def _named_exprs(self, key, value, section: str, what: str, make) -> list[ast.Decl]:
        decls = []
        for name_node, expr in self._entries(value, section):
            name, span = self._name(name_node, f"{what} name")
            decls.append(make(name, self._expr(expr, f"{what} `{name}`", name_node), span,
                              self._cover(name_node, expr)))
        return decls

    def _consts(self, key, value) -> list[ast.Decl]:
        return self._named_exprs(key, value, "consts", "const", ast.ConstDecl)

    def _energies(self, key, value) -> list[ast.Decl]:
        return self._named_exprs(key, value, "energies", "energy", ast.EnergyDecl)

    def _updates(self, key, value) -> list[ast.Decl]:
        return self._named_exprs(key, value, "updates", "update of state", ast.UpdateDecl)

    def _lets(self, key, value) -> list[ast.Decl]:
        if _is_null(value):
            return []
        if not isinstance(value, yaml.SequenceNode):
            raise SchemaErr(f"`lets` must be {_SECTION_SHAPES['lets']}, got {_kind(value)}", self._span(value),
                            hint=LETS_HINT)
        decls = []
        for item in value.value:
            if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
                count = f"{len(item.value)} entries" if isinstance(item, yaml.MappingNode) else _kind(item)
                raise SchemaErr(f"each item of `lets` must be one `name: EXPR`, got {count}", self._span(item),
                                hint=LETS_HINT)
            (name_node, expr), = item.value
            name, span = self._name(name_node, "let name")
            decls.append(ast.LetDecl(name, self._expr(expr, f"let `{name}`", name_node), span,
                                     self._cover(name_node, expr)))
        return decls

    def _descend(self, key, value) -> list[ast.Decl]:
        decls = []
        for name_node, spec in self._entries(value, "descend"):
            name, span = self._name(name_node, "state name")
            if not isinstance(spec, yaml.MappingNode):
                raise SchemaErr(f"the `descend` of `{name}` must be a mapping {{on: ENERGY, step: NUMBER}}, "
                                f"got {_kind(spec)}", self._span(spec) if not _is_null(spec) else span,
                                hint=DESCEND_HINT)
            parts = self._keys(spec, DESCEND_KEYS, f"in the `descend` of `{name}`")
            for required in DESCEND_KEYS:
                if required not in parts:
                    raise SchemaErr(f"the `descend` of `{name}` is missing `{required}`", self._span(spec),
                                    hint=DESCEND_HINT)
            energy_node = parts["on"][1]
            if not (isinstance(energy_node, yaml.ScalarNode) and energy_node.tag == _STR
                    and _NAME.match(energy_node.value)):
                raise SchemaErr(f"`on` in the `descend` of `{name}` must name an energy, got {_kind(energy_node)}",
                                self._span(energy_node) if not _is_null(energy_node)
                                else self._key_span(parts["on"][0]), hint=DESCEND_HINT)
            energy = ast.Name(energy_node.value, self._key_span(energy_node))
            step = self._expr(parts["step"][1], f"`step` in the `descend` of `{name}`", parts["step"][0])
            decls.append(ast.DescendDecl(name, energy, step, span, self._cover(name_node, spec)))
        return decls

    def _output(self, key, value) -> list[ast.Decl]:
        if isinstance(value, yaml.SequenceNode):
            if not value.value:
                raise SchemaErr("`output` is an empty list", self._span(value),
                                hint="list what the layer returns, or leave `output` out to return the states")
            values = tuple(self._expr(item, "an output") for item in value.value)
        elif isinstance(value, yaml.ScalarNode) and not _is_null(value):
            try:
                values = (self._expr(value, "the output"),)
            except SyntaxErr as exc:
                if "," in value.value and exc.hint is None:
                    raise SyntaxErr(exc.message, exc.span, hint=OUTPUT_HINT) from None
                raise
        else:
            raise SchemaErr(f"`output` must be {_SECTION_SHAPES['output']}, got {_kind(value)}",
                            self._span(value) if not _is_null(value) else self._key_span(key), hint=OUTPUT_HINT)
        return [ast.OutputDecl(values, self._cover(key, value))]

    def _settings(self, key, value, which: str) -> list[ast.Decl]:
        settings = []
        for setting_node, setting_value in self._entries(value, which):
            name, span = self._name(setting_node, f"`{which}` setting")
            expr = self._expr(setting_value, f"`{which}` setting `{name}`", setting_node)
            settings.append(ast.Setting(name, expr, span, self._cover(setting_node, setting_value)))
        return [ast.SettingsDecl(which, tuple(settings), self._cover(key, value))]

    def _solve(self, key, value) -> list[ast.Decl]:
        return self._settings(key, value, "solve")

    def _backward(self, key, value) -> list[ast.Decl]:
        return self._settings(key, value, "backward")

    def _eval(self, key, value) -> list[ast.Decl]:
        return self._settings(key, value, "eval")
