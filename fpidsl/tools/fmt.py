"""``fpidsl fmt``: the canonical layout of a ``.fpi`` file, keeping every comment.

The layout, from the token stream and the parse tree (:mod:`fpidsl.tools.tokens`):

* file-level items (``layer``, ``fn``) start at column 1, one blank line between them; a layer's declarations
  one a line, indented two spaces; at most one blank line anywhere, none inside a declaration or right
  inside a layer's braces;
* one space around binary operators, ``=``, ``:`` and after ``,``; none inside brackets, before ``(`` of a
  call or ``[`` of an index, after a unary ``-``, around ``=`` of a keyword argument or ``:`` of a slice;
  ``{ a = 1 }`` and ``{}`` for settings; a trailing comma before a closing bracket on the same line dropped;
* a line break the author put inside a declaration is kept (so a comment inside an expression stays where it
  is); a continuation line is indented four spaces past its declaration, or two past the line that opened the
  bracket it is in; a closing bracket that starts a line lines up with that line;
* trailing comments of consecutive lines are aligned two spaces after the longest line of the run.

Formatting is checked, not trusted: the result must parse to the same AST (numbers as written) and hold the
same comments, else :class:`FormatBug` is raised and nothing is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..frontend.ast_compare import strip_spans
from ..frontend.parser import parse_fpi
from ..source import Source
from .tokens import CLOSERS, OPENERS, Tok, tokens

INDENT = 2
CONTINUATION = 4
COMMENT_GAP = 2


class FormatBug(AssertionError):
    """The formatter produced text that means something else: a bug in fpidsl, never written to a file."""


@dataclass
class _Line:
    indent: int
    code: str = ""
    comment: str = ""


@dataclass
class _Printer:
    lines: list[_Line] = field(default_factory=list)
    current: _Line | None = None

    def start(self, indent: int, blanks: int = 0) -> None:
        self.end()
        if self.lines:
            self.lines.extend(_Line(0) for _ in range(blanks))
        self.current = _Line(indent)

    def write(self, text: str, space: bool) -> None:
        assert self.current is not None
        if space and self.current.code:
            self.current.code += " "
        self.current.code += text

    def trailing_comment(self, text: str) -> None:
        assert self.current is not None
        self.current.comment = text
        self.end()

    def own_line_comment(self, text: str, indent: int, blanks: int) -> None:
        self.start(indent, blanks)
        self.current.comment = text
        self.end()

    def end(self) -> None:
        if self.current is not None:
            self.lines.append(self.current)
            self.current = None

    @property
    def open(self) -> bool:
        return self.current is not None


def _space(a: Tok, b: Tok) -> bool:
    """Whether one space separates ``a`` and ``b`` on a line."""
    if a.text in ("(", "[") or b.text in (")", "]", ","):
        return False
    if a.text == ",":
        return True
    if a.text == "{":
        return b.text != "}"
    if b.text == "(" and b.rule in ("call", "fn_def", "fn_head_only"):
        return False
    if b.text == "[" and b.rule == "index":
        return False
    if (a.text == "=" or b.text == "=") and (a.rule == "keyword" if a.text == "=" else b.rule == "keyword"):
        return False
    if (a.text == ":" and a.rule == "slice") or (b.text == ":" and b.rule == "slice"):
        return False
    if a.text == "-" and a.rule == "neg":
        return b.text == "-"  # `- -x`, not `--x`
    return True


def _blank_lines(prev_end: int, line: int, most: int, least: int = 0) -> int:
    return max(least, min(most, line - prev_end - 1))


def format_source(source: Source) -> str:
    """The canonical text of a ``.fpi`` source (raises the compiler's ``SyntaxErr`` for text it cannot parse)."""
    text = _layout(tokens(source))
    _verify(source, text)
    return text


def _layout(toks: list[Tok]) -> str:
    out = _Printer()
    code = [t for t in toks if not t.is_comment]
    # the last token of each file-level item: the next code token starts an item, or none is left
    item_ends = {id(t) for t, nxt in zip(code, code[1:] + [None]) if nxt is None or nxt.role == "item"}
    prev: Tok | None = None  # the previous token (code or comment)
    prev_code: Tok | None = None
    opened: list[tuple[str, int]] = []  # brackets open in the current declaration: (text, indent of its line)
    decl_indent = 0
    after_item = False  # the previous code token ended a file-level item

    for i, tok in enumerate(toks):
        if tok.is_comment:
            trailing = prev is not None and not prev.is_comment and prev.end_line == tok.line and out.open
            if trailing:
                out.trailing_comment(tok.text.rstrip())
            else:
                nxt = next((t for t in toks[i + 1:] if not t.is_comment), None)
                inside = nxt is not None and not nxt.role and prev_code is not None and prev_code.role != "open"
                if inside:  # a comment inside a declaration: indented as the token after it will be
                    indent, most, least = _continuation_indent(nxt, opened, decl_indent), 0, 0
                else:
                    indent = INDENT * tok.depth
                    most = 0 if prev_code is not None and prev_code.role == "open" and prev is prev_code else 1
                    least = 1 if after_item else 0
                blanks = _blank_lines(prev.end_line, tok.line, most, least) if prev is not None else 0
                out.own_line_comment(tok.text.rstrip(), indent, blanks)
                after_item = False
            prev = tok
            continue

        if tok.role == "item":
            least = 1 if after_item else 0
            blanks = _blank_lines(prev.end_line, tok.line, 1, least) if prev is not None else 0
            out.start(0, blanks)
            opened, decl_indent = [], 0
        elif tok.role == "decl":
            first = prev_code is not None and prev_code.role == "open"
            most = 0 if first and (prev is prev_code) else 1
            blanks = _blank_lines(prev.end_line, tok.line, most) if prev is not None else 0
            decl_indent = INDENT * tok.depth
            out.start(decl_indent, blanks)
            opened = []
        elif tok.role == "close":
            out.start(INDENT * tok.depth, 0)
            opened = []
        elif tok.role == "open":  # a layer's `{` stays on the header line unless a comment is in the way
            if not out.open:
                out.start(INDENT * tok.depth, 0)
        elif not out.open or (prev is not None and prev.end_line < tok.line):
            # a line break the author made inside a declaration (or one forced by a comment)
            out.start(_continuation_indent(tok, opened, decl_indent), 0)
        if tok.text == "," and _drops_trailing_comma(toks, i):
            prev = prev_code = tok
            continue
        out.write(tok.text, prev_code is not None and out.current.code != "" and _space(prev_code, tok))
        if tok.role not in ("open", "close"):
            if tok.text in OPENERS:
                opened.append((tok.text, out.current.indent))
            elif tok.text in CLOSERS and opened:
                opened.pop()
        after_item = id(tok) in item_ends
        prev = prev_code = tok
    out.end()
    return _render(out.lines)


def _continuation_indent(tok: Tok, opened: list[tuple[str, int]], decl_indent: int) -> int:
    """The indent of a line that continues a declaration and starts with ``tok``."""
    if opened:
        return opened[-1][1] + (0 if tok.text in CLOSERS else INDENT)
    return decl_indent + CONTINUATION


def _drops_trailing_comma(toks: list[Tok], i: int) -> bool:
    """A ``,`` right before a closing bracket on the same line (no comment between) is dropped."""
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    return nxt is not None and not nxt.is_comment and nxt.text in CLOSERS and nxt.line == toks[i].end_line


def _render(lines: list[_Line]) -> str:
    """The text of the lines, trailing comments of consecutive lines aligned."""
    rendered: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.comment and line.code:
            j = i
            while j < len(lines) and lines[j].comment and lines[j].code:
                j += 1
            column = max(lines[k].indent + len(lines[k].code) for k in range(i, j)) + COMMENT_GAP
            for k in range(i, j):
                head = " " * lines[k].indent + lines[k].code
                rendered.append(head.ljust(column) + lines[k].comment)
            i = j
            continue
        body = line.code or line.comment
        rendered.append(" " * line.indent + body if body else "")
        i += 1
    while rendered and not rendered[-1]:
        rendered.pop()
    return "\n".join(rendered) + "\n"


def _comments(source: Source) -> list[str]:
    return [t.text.rstrip() for t in tokens(source) if t.is_comment]


def _verify(source: Source, text: str) -> None:
    """The formatted text parses to the same AST (numbers as written) and holds the same comments."""
    again = Source(source.path, text)
    try:
        same = strip_spans(parse_fpi(again), keep_text=True) == strip_spans(parse_fpi(source), keep_text=True)
    except Exception as exc:  # noqa: BLE001 - any failure to re-read the output is the formatter's bug
        raise FormatBug(f"the formatted {source.path} does not parse: {exc}") from None
    if not same:
        raise FormatBug(f"formatting {source.path} would change its meaning")
    if _comments(again) != _comments(source):
        raise FormatBug(f"formatting {source.path} would lose or change a comment")
