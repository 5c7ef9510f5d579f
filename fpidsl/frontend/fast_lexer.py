"""A faster stand-in for lark's contextual lexer, for the treeless parse of valid specs.

lark's contextual lexer matches each token with the regex of the terminals its parser state accepts, and spent a
third of parsing a large spec in its per-token bookkeeping. :class:`FastLexer` matches every token with one regex
(a word, a number, a string or an operator, then the whitespace and comments after it) and asks a table built
from lark's own per-state lexers what lark would call that text in the parser's current state:

* a word or an operator from the grammar (``let``, ``int``, ``eval``, ``**``, ``<=``): the type lark's lexer of
  that state gives it alone, found once per state when the tables are built;
* any other word: ``NAME`` where the state accepts names (lark tries ``NAME`` first, the longest terminal);
* a number: ``NUMBER`` where the state accepts numbers, ``INT`` where it accepts only integers and the number is
  all digits; a string: ``STRING`` where the state accepts it.

It gives lark's tokens (types, values, positions) or raises :class:`Unsure`: wherever its answer could differ
from lark's (an unknown character, a word lark would split, a state with no answer), the caller parses again
with lark's lexer, which reports the error or parses what this lexer refused. Its tokens and lark's are compared
over the specs and a table of bad inputs in tests/frontend/test_fast_lexer.py.
"""
from __future__ import annotations

import re
from typing import Iterator

from lark import Lark, Token
from lark.lexer import BasicLexer, ContextualLexer, Lexer, LexerState
from lark.utils import TextSlice

# Terminals of an open language, matched by rule; every other terminal has finitely many texts, looked up.
_WORD, _NUMBER, _INT, _STRING = "NAME", "NUMBER", "INT", "STRING"
_OPEN = frozenset({_WORD, _NUMBER, _INT, _STRING})


class Unsure(Exception):
    """The fast lexer cannot tell that its token is lark's: parse with lark's lexer instead."""


class FastLexer(Lexer):
    """lark's ``Lexer`` interface over the tables of a :class:`~lark.lexer.ContextualLexer` (see the module)."""

    def __init__(self, contextual: ContextualLexer):
        terminals = {t.name: t for t in contextual.root_lexer.terminals}
        ignored = contextual.root_lexer.ignore_types
        if not _OPEN <= terminals.keys():
            raise ValueError("the grammar's open terminals are not NAME, NUMBER, INT and STRING")
        texts: set[str] = set()
        for name, terminal in terminals.items():
            if name in _OPEN or name in ignored:
                continue
            texts |= _finite_texts(terminal.pattern)
        word = re.compile(terminals[_WORD].pattern.to_regexp())
        words = {t for t in texts if word.fullmatch(t)}
        operators = sorted(texts - words, key=len, reverse=True)  # the longest first: ** before *
        if any(o[:1] in "\"'#" or o[:1].isalnum() or o[:1] in "_." and o != "..." for o in operators):
            raise ValueError("an operator of the grammar starts like a word, number, string or comment")
        skip = "|".join(terminals[n].pattern.to_regexp() for n in sorted(ignored))
        self._skip = re.compile(f"(?:{skip})*")
        self._token = re.compile(
            f"(?:(?P<w>{terminals[_WORD].pattern.to_regexp()})|(?P<n>{terminals[_NUMBER].pattern.to_regexp()})"
            f"|(?P<p>{'|'.join(map(re.escape, operators))})|(?P<s>{terminals[_STRING].pattern.to_regexp()}))"
            f"(?:{skip})*"
        )
        by_lexer: dict[int, tuple] = {}
        self._contexts: dict = {}
        for state, basic in contextual.lexers.items():
            context = by_lexer.get(id(basic))
            if context is None:
                context = by_lexer[id(basic)] = _context(basic, words | set(operators))
            self._contexts[state] = context

    def lex(self, lexer_state: LexerState, parser_state) -> Iterator[Token]:
        whole = lexer_state.text
        text = whole.text if isinstance(whole, TextSlice) else whole
        if not isinstance(text, str) or (isinstance(whole, TextSlice) and not whole.is_complete_text()):
            raise Unsure("only whole texts")
        contexts, match = self._contexts, self._token.match
        pos, end = 0, len(text)
        line, line_start = 1, 0
        skipped = self._skip.match(text, 0).end()
        if skipped:
            newlines = text.count("\n", 0, skipped)
            if newlines:
                line += newlines
                line_start = text.rindex("\n", 0, skipped) + 1
            pos = skipped
        new = str.__new__
        stack = parser_state.state_stack  # lark's ParserState.position, without the property's call a token
        while pos < end:
            m = match(text, pos)
            if m is None:
                raise Unsure("a character no terminal starts with")
            kind = m.lastgroup
            stop = m.end(kind)
            value = text[pos:stop]
            table, name, number, integer, string = contexts[stack[-1]]
            type_ = table.get(value)
            if type_ is None:
                if kind == "w":
                    type_ = name
                elif kind == "n":
                    type_ = number or (integer if value.isdigit() else None)
                elif kind == "s":
                    type_ = string
            if not type_:
                raise Unsure(f"{value!r} in parser state {stack[-1]}")
            column = pos - line_start + 1
            token = new(Token, value)
            token.type, token.value, token.start_pos, token.end_pos = type_, value, pos, stop
            token.line, token.end_line, token.column, token.end_column = line, line, column, column + stop - pos
            pos = m.end()
            if pos > stop:
                newlines = text.count("\n", stop, pos)
                if newlines:
                    line += newlines
                    line_start = text.rindex("\n", stop, pos) + 1
            yield token


def _finite_texts(pattern) -> set[str]:
    """Every text a terminal of finitely many matches: a string, or ``(?:a|b|c)`` of plain alternatives."""
    if pattern.type == "str":
        return {pattern.value}
    value = pattern.value
    if value.startswith("(?:") and value.endswith(")") and not pattern.flags:
        texts = {re.sub(r"\\(.)", r"\1", t) for t in value[3:-1].split("|")}
        if all(re.fullmatch(pattern.to_regexp(), t) for t in texts) and "(" not in value[3:-1]:
            return texts
    raise ValueError(f"cannot list the texts of the terminal pattern {value!r}")


def _context(basic: BasicLexer, texts: set[str]) -> tuple:
    """One parser state's answers: (the type of each listed text, or False where lark's lexer of the state does not
    give it whole; the type of other words; of numbers; of all-digit numbers; of strings)."""
    accepts = {t.name for t in basic.terminals}
    table = {text: _lark_type(basic, text) or False for text in texts}
    return (table, _WORD if _WORD in accepts else None, _NUMBER if _NUMBER in accepts else None,
            _INT if _INT in accepts and _NUMBER not in accepts else None, _STRING if _STRING in accepts else None)


def _lark_type(basic: BasicLexer, text: str) -> str | None:
    """The type of the one token lark's lexer of a state makes of ``text``, or None."""
    try:
        token = basic.next_token(LexerState(TextSlice.cast_from(text)), None)
    except Exception:  # noqa: BLE001 - lark's lexer refused the text: no answer
        return None
    return "".join(token.type) if token.value == text and token.end_pos == len(text) else None  # a plain str


def install(lark: Lark) -> bool:
    """Put a :class:`FastLexer` in ``lark``'s parsing front-end; False where lark's layout or grammar differ."""
    frontend = getattr(lark, "parser", None)
    contextual = getattr(frontend, "lexer", None)
    if not isinstance(contextual, ContextualLexer):
        return False
    try:
        frontend.lexer = FastLexer(contextual)
    except ValueError:
        return False
    return True
