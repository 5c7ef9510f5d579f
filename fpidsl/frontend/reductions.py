"""Parsing without a parse tree: lark's LALR parser calls the AST builder's rule methods as it reduces.

lark's usual way, a tree with ``propagate_positions`` and a transformer run over it afterwards, spent much of
parsing a large spec in its per-node position bookkeeping, the tree and the walk over it (and held the whole tree
in memory). lark can call a transformer while it parses (``Lark(transformer=...)``), but gives it no positions
then, and a rule's position needs tokens the tree drops (``let``, parentheses, brackets). So :func:`install` replaces the parser's reduction callbacks
(one per grammar rule) with ones that do what the tree path does, in the same order (LALR reduces bottom-up,
left to right, as the transformer visits):

* a rule spans its first to its last child, the dropped tokens included (``propagate_positions``'s rule); a
  child inlined by a ``?rule`` between dropped tokens (``(a + b)``) keeps its own position for itself and
  gives its parents the surrounding one, as lark's ``container_*`` positions do;
* the children are filtered by lark's own child filter (dropped tokens out, ``None`` for an absent
  ``[optional]``, ``_inlined`` rules spliced in), then the rule's method is called with ``(meta, children)``,
  where ``meta`` has lark's ``line``, ``column``, ``end_line``, ``end_column`` and ``empty``;
* the levels of expression nesting are counted (:attr:`Reduced.levels`), so that a caller can refuse a spec
  nested too deeply without a tree to walk.

The callbacks live in lark's private ``Lark._callbacks`` (the dict its LALR parser reads): :func:`install`
returns False, and the caller keeps the tree path, where a lark release lays them out otherwise.

lark's LALR loop (``_Parser.parse_from_state``) drives the parse, over lark's parse table, with a
:class:`_TableState` for its parser state: lark's ``ParserState`` whose ``feed_token`` reads a copy of the table
in which each reduction already holds its callback, its length and its rule's name (lark's looked each up per
reduction, hashing and comparing ``Rule`` objects in Python), and where a unit rule that passes its child
through (``?sum: term``, several above every atom) changes only the state on top of the stack.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedToken
from lark.grammar import Rule
from lark.parse_tree_builder import maybe_create_child_filter
from lark.parsers.lalr_analysis import Shift
from lark.parsers.lalr_parser_state import ParseConf, ParserState
from lark.tree import Meta


class Reduced:
    """A reduced rule's value while parsing, with where it is in the text (for its parents: a ``?rule`` child
    between dropped tokens carries their span) and the levels of expression nesting in it. Also the ``meta`` the
    rule's method is given."""

    __slots__ = ("value", "line", "column", "end_line", "end_column", "levels", "children")
    empty = False


class _EmptyReduced(Reduced):
    """A rule that matched no text (an empty file's ``start``)."""

    __slots__ = ()
    empty = True


class TreelessParser:
    """A lark LALR parser whose reductions call the rule methods of a builder object (``method(builder, meta,
    children)``; a rule without a method becomes a lark ``Tree``, as in a lark transformer). One parse at a time:
    the builder of the parse in progress is held here."""

    def __init__(self, lark: Lark, methods: Callable[[str], Callable | None], levels: Iterable[str]):
        self.lark = lark
        self.builder: Any = None
        self._lock = threading.Lock()
        self._methods, self._levels = methods, frozenset(levels)
        self._table: dict | None = None  # the parse table with its reductions' callbacks, once installed

    def parse(self, text: str, start: str, builder: Any) -> Reduced | Token | None:
        """The start rule's :class:`Reduced` (its ``value`` is the builder's result, ``levels`` its nesting)."""
        with self._lock:
            self.builder = builder
            try:
                if self._table is None:
                    return self.lark.parse(text, start=start)
                frontend = self.lark.parser
                parser = frontend.parser.parser
                conf = ParseConf(parser.parse_table, parser.callbacks, frontend._verify_start(start))
                conf.states = self._table
                return parser.parse_from_state(_TableState(conf, frontend._make_lexer_thread(text)))
            finally:
                self.builder = None

    def callback(self, rule: Rule) -> Callable[[list], Any]:
        """The reduction callback of one grammar rule."""
        name = rule.alias or rule.options.template_source or rule.origin.name
        expand1 = bool(rule.options.expand1) and not rule.alias
        placeholders = rule.options.empty_indices if self.lark.options.maybe_placeholders else None
        make_filter = maybe_create_child_filter(rule.expansion, rule.options.keep_all_tokens, False, placeholders)
        if expand1 and make_filter is None and len(rule.expansion) == 1:
            return _pass_through  # `?sum: term`: the child itself, position and all
        keep = make_filter(_as_is) if make_filter is not None else _as_is
        inlined = rule.origin.name.startswith("_")
        method = None if inlined else self._methods(name)
        level = 1 if name in self._levels else 0
        parser = self

        def reduce(raw: list) -> Any:
            out = _place(raw)
            levels = 0
            for child in raw:
                if type(child) is Reduced and child.levels > levels:
                    levels = child.levels
            out.levels = levels + level
            children = keep(raw)
            if inlined:  # spliced into its parent by the parent's child filter
                out.children = children
                return out
            if expand1 and len(children) == 1:  # `"(" expr ")"`: the child, placed between the tokens
                only = children[0]
                if type(only) is not Reduced:  # a token, or a rule that matched no text
                    return only
                out.value = only.value
                return out
            values = [c.value if isinstance(c, Reduced) else c for c in children]
            if method is None:
                out.value = Tree(name, values, _lark_meta(out))
            else:
                out.value = method(parser.builder, out, values)
            return out

        return reduce


def install(parser: TreelessParser) -> bool:
    """Put ``parser``'s reduction callbacks in its lark parser; False where lark keeps them elsewhere."""
    lark = parser.lark
    callbacks = getattr(lark, "_callbacks", None)
    frontend = getattr(getattr(getattr(lark, "parser", None), "parser", None), "parser", None)
    if not isinstance(callbacks, dict) or getattr(frontend, "callbacks", None) is not callbacks:
        return False
    rules = [r for r in callbacks if isinstance(r, Rule)]
    if len(rules) != len(lark.rules):
        return False
    for rule in rules:
        callbacks[rule] = parser.callback(rule)
    parser._table = _callback_table(lark, callbacks)
    return True


def _callback_table(lark: Lark, callbacks: dict) -> dict | None:
    """lark's parse table with ``(True, state)`` for a shift and ``(False, (callback, length, rule name))`` for a
    reduction; None (lark's own ``ParserState`` then) where lark's parser is laid out otherwise or calls token
    callbacks."""
    parser = getattr(getattr(lark.parser, "parser", None), "parser", None)
    table = getattr(getattr(parser, "parse_table", None), "states", None)
    if (not isinstance(table, dict) or getattr(parser, "callbacks", None) is not callbacks
            or not hasattr(parser, "parse_from_state") or not hasattr(lark.parser, "_make_lexer_thread")
            or not hasattr(lark.parser, "_verify_start")
            or any(not isinstance(k, Rule) for k in callbacks)):
        return None
    def reduction(rule: Rule) -> tuple:
        callback = callbacks[rule]
        if callback is _pass_through and len(rule.expansion) == 1:
            callback = None  # `?sum: term`: the child stays on the stack as it is, only the state changes
        return callback, len(rule.expansion), _plain(rule.origin.name)

    out = {}
    for state, actions in table.items():  # names as plain strings: lark's are Tokens, compared in Python
        out[state] = {_plain(sym): (True, arg) if action is Shift else (False, reduction(arg))
                      for sym, (action, arg) in actions.items()}
    return out


def _plain(name: str) -> str:
    return str.__str__(name) if type(name) is str else "".join(name)


class _TableState(ParserState):
    """lark's parser state over :func:`_callback_table`'s table: lark's ``feed_token`` without its per-reduction
    lookups (and asserts)."""

    __slots__ = ()

    def feed_token(self, token: Token, is_end: bool = False) -> Any:
        state_stack, value_stack = self.state_stack, self.value_stack
        states, end_state = self.parse_conf.states, self.parse_conf.end_state
        kind = token.type
        while True:
            try:
                shift, arg = states[state_stack[-1]][kind]
            except KeyError:
                expected = {s for s in states[state_stack[-1]] if s.isupper()}
                raise UnexpectedToken(token, expected, state=self, interactive_parser=None) from None
            if shift:
                state_stack.append(arg)
                value_stack.append(token)
                return None
            callback, size, origin = arg
            if callback is None:  # a unit rule passing its child through (lark: pop it, push it back)
                state_stack[-1] = states[state_stack[-2]][origin][1]
            else:
                if size:
                    children = value_stack[-size:]
                    del state_stack[-size:]
                    del value_stack[-size:]
                else:
                    children = []
                value = callback(children)
                state_stack.append(states[state_stack[-1]][origin][1])
                value_stack.append(value)
            if is_end and state_stack[-1] == end_state:
                return value_stack[-1]


def _pass_through(raw: list) -> Any:
    return raw[0]


def _as_is(children: list) -> list:
    """The filtered children, not copied: the filter of a left-recursive ``_inlined`` rule (``decl*``) appends to
    its first child's list, and a copy per reduction made a long file quadratic."""
    return children


def _place(raw: list) -> Reduced:
    """A new :class:`Reduced` spanning ``raw``, the rule's children as parsed: tokens and reduced rules; a rule
    that matched no text does not count (lark's ``_pp_get_meta``)."""
    if raw and type(raw[0]) in _TAKES_TEXT and type(raw[-1]) in _TAKES_TEXT:
        first, last = raw[0], raw[-1]
    else:
        placed = [c for c in raw if type(c) is Reduced or isinstance(c, Token)]
        if not placed:
            return _EmptyReduced()
        first, last = placed[0], placed[-1]
    out = Reduced()
    out.line, out.column = first.line, first.column
    out.end_line, out.end_column = last.end_line, last.end_column
    return out


_TAKES_TEXT = frozenset({Reduced, Token})


def _lark_meta(place: Reduced) -> Meta:
    meta = Meta()
    if not place.empty:
        meta.empty = False
        meta.line, meta.column, meta.end_line, meta.end_column = (place.line, place.column, place.end_line,
                                                                  place.end_column)
    return meta
