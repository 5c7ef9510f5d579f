"""Every token of a ``.fpi`` file, comments included, with the grammar rule it belongs to.

The compiler's parser drops anonymous tokens and comments; the formatter needs both. This module parses the same
grammar (``fpidsl.grammars/fpi.lark``) with ``keep_all_tokens`` and collects the ignored ``COMMENT`` tokens
through a lexer callback. Structure is read from the parse tree, so a rule added to the grammar is laid out
with the generic spacing rules, never dropped.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from importlib import resources

from lark import Lark, Token, Tree

from ..frontend.parser import parse_fpi
from ..source import Source

OPENERS = {"(": ")", "[": "]", "{": "}"}
CLOSERS = {v: k for k, v in OPENERS.items()}


@dataclass
class Tok:
    """One token: its text and position (1-based, ``end_col`` exclusive), the rule it is a child of, and its
    structural role: ``item`` (first token of a file-level item), ``decl`` (first token of a declaration),
    ``open``/``close`` (a layer's braces), or ``""``."""

    text: str
    type: str
    line: int
    col: int
    end_line: int
    end_col: int
    rule: str = ""
    role: str = ""
    depth: int = 0  # how many layer bodies hold it

    @property
    def is_comment(self) -> bool:
        return self.type == "COMMENT"


@functools.lru_cache(maxsize=None)
def _grammar() -> str:
    return resources.files("fpidsl.grammars").joinpath("fpi.lark").read_text(encoding="utf-8")


class _Comments:
    """The lexer callback that collects the ignored ``COMMENT`` tokens of the parse in progress."""

    def __init__(self) -> None:
        self.found: list[Token] = []

    def __call__(self, token: Token) -> Token:
        self.found.append(token)
        return token


_COMMENTS = _Comments()
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    return Lark(_grammar(), parser="lalr", lexer="contextual", start="start", propagate_positions=True,
                keep_all_tokens=True, maybe_placeholders=True, lexer_callbacks={"COMMENT": _COMMENTS})


def _parse(text: str) -> tuple[Tree, list[Token]]:
    with _LOCK:  # one parser, one comment list: one parse at a time
        _COMMENTS.found = []
        tree = _parser().parse(text)
        return tree, _COMMENTS.found


def _tok(token: Token, rule: str = "", role: str = "", depth: int = 0) -> Tok:
    return Tok(str(token), token.type, token.line, token.column, token.end_line, token.end_column, rule, role, depth)


def _walk(tree: Tree, out: list[Tok], depth: int) -> None:
    rule = str(tree.data)
    body = rule == "layer"
    children = [c for c in tree.children if c is not None]
    for index, child in enumerate(children):
        if isinstance(child, Token):
            role = ""
            if body and child == "{" and index == 2:
                role = "open"
            elif body and child == "}" and index == len(children) - 1:
                role = "close"
            out.append(_tok(child, rule, role, depth))
            continue
        start = len(out)
        _walk(child, out, depth + 1 if body else depth)
        if len(out) > start and (rule == "start" or body):
            out[start].role = "item" if rule == "start" else "decl"


def tokens(source: Source) -> list[Tok]:
    """The tokens and comments of a ``.fpi`` source in text order. A file the compiler cannot parse raises the
    compiler's own :class:`~fpidsl.errors.SyntaxErr` (line:col and hint)."""
    parse_fpi(source)  # the compiler's errors, exactly
    tree, comments = _parse(source.text)
    out: list[Tok] = []
    _walk(tree, out, 0)
    merged = sorted(out + [_tok(c) for c in comments], key=lambda t: (t.line, t.col))
    level = 0  # a comment is inside a layer body between its braces
    for token in merged:
        if token.is_comment:
            token.depth = level
        elif token.role == "open":
            level += 1
        elif token.role == "close":
            level -= 1
    return merged
