"""The ``.fpi`` front-end: the lark grammar in ``fpidsl.grammars`` and ONE transformer to the AST.

Syntax errors become :class:`~fpidsl.errors.SyntaxErr` with the position of the offending token, what was
found and what the grammar expected there, in words.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import lark
from lark import Lark, Token, Tree

from ..errors import FpiError, LimitErr, SyntaxErr, TypeErr
from ..limits import MAX_NESTING
from ..source import Source, Span
from . import ast, fast_lexer, numbers
from .reductions import Reduced, TreelessParser, install

KEYWORDS = frozenset(
    "layer fn input state param tensor extern const let energy update descend on step output solve backward".split()
)
# words that open a block only where a declaration starts (``eval { ... }``) and stay usable as names: added
# after names could already be spelled so, they reserve nothing
SOFT_KEYWORDS = frozenset({"eval"})

_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "NUMBER": "a number",
    "STRING": "a string",
    "SETTINGS_KIND": "`solve`, `backward` or `eval`",
    "INPUT_DTYPE": "`int`, `bool` or `sparse`",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "AT": "'@'",
    "COMPARE": "a comparison (< <= > >= == !=)",
    "$END": "the end of the file",
}


@functools.lru_cache(maxsize=None)
def _parser() -> Lark:
    """The parser that builds a parse tree with positions: syntax errors and too-deep nesting are reported from
    it (the spec is parsed again), and it is the whole path where :func:`_treeless` is None."""
    return _lark(propagate_positions=True)


@functools.lru_cache(maxsize=None)
def _treeless() -> TreelessParser | None:
    """The parser that calls :class:`ToAst`'s methods as it reduces (:mod:`fpidsl.frontend.reductions`: faster,
    and without the tree's memory), with :mod:`fpidsl.frontend.fast_lexer`'s lexer where it installs; None where
    the installed lark lays out its parser otherwise."""
    parser = TreelessParser(_lark(propagate_positions=False), ToAst.rule_method, _EXPRESSION_LEVELS)
    if not install(parser):
        return None
    fast_lexer.install(parser.lark)
    return parser


def _lark(propagate_positions: bool) -> Lark:
    grammar = resources.files("fpidsl.grammars").joinpath("fpi.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        start=["start", "expr_only", "shape_only", "input_type_only", "dim_only", "param_type_only", "fn_head_only"],
        propagate_positions=propagate_positions,
        maybe_placeholders=True,
    )


@dataclass(frozen=True)
class Placement:
    """Where a parsed text sits in its file: line 1 column 1 of the text is ``line``:``col`` there.

    ``.fpi`` files are parsed in place (1, 1); YAML scalars are parsed at their own position so that
    every span points into the YAML file.
    """

    path: str
    line: int = 1
    col: int = 1

    def span(self, line: int, col: int, end_line: int, end_col: int) -> Span:
        if self.line == 1 and self.col == 1:  # a whole file
            return Span(self.path, line, col, end_line, end_col)

        def shift(ln: int, cl: int) -> tuple[int, int]:
            return (self.line + ln - 1, cl + self.col - 1 if ln == 1 else cl)

        start = shift(line, col)
        end = shift(end_line, end_col)
        return Span(self.path, start[0], start[1], end[0], end[1])


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    if token.type == "NAME" and str(token) in KEYWORDS:
        return f"keyword '{token}'"
    if token.type in ("NAME",):
        return f"name '{token}'"
    if token.type in ("NUMBER", "INT"):
        return f"number {token}"
    return f"'{token}'"


_DECLARATION_KEYWORDS = {"input", "state", "param", "const", "let", "energy", "update", "descend", "output"}
_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "COMPARE", "LSQB", "LPAR"}
_OPERATOR_LITERALS = {"**", "//"}  # anonymous terminals (lark numbers them in grammar order)


def _expected_words(expected: set[str]) -> str:
    """What the grammar accepts at an error, in a few words rather than a list of every terminal."""
    words: set[str] = set()
    remaining = set(expected)
    literals = {t: _literal_map().get(t, "") for t in remaining}
    decls = {t for t, lit in literals.items() if lit in _DECLARATION_KEYWORDS or t == "SETTINGS_KIND"}
    if decls:
        words.add("a declaration")
        remaining -= decls
    if {"NAME", "NUMBER"} <= remaining and "MINUS" in remaining:
        words.add("an expression")
        remaining -= {"NAME", "NUMBER", "MINUS", "LPAR", "LSQB", "STRING"}
    operators = _OPERATORS | {t for t in remaining if _literal_map().get(t) in _OPERATOR_LITERALS}
    if remaining - operators:
        remaining -= operators
    words |= {_TERMINAL_WORDS.get(t, _literal_of(t)) for t in remaining}
    ordered = sorted(words, key=lambda w: (not w.startswith("'"), w))
    if not ordered:
        return "something else"
    if len(ordered) == 1:
        return ordered[0]
    return ", ".join(ordered[:-1]) + " or " + ordered[-1]


@functools.lru_cache(maxsize=None)
def _literal_map() -> dict[str, str]:
    return {t.name: t.pattern.value for t in _parser().terminals}


def _literal_of(terminal: str) -> str:
    pattern = _literal_map().get(terminal)
    if pattern is None:
        return terminal.lower()
    if terminal.isupper() and not terminal.startswith("__") and pattern.isalpha():
        return f"'{pattern}'"
    return f"'{pattern}'"


def _syntax_error(exc: lark.exceptions.UnexpectedInput, text: str, at: Placement) -> SyntaxErr:
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
        span = at.span(exc.line, exc.column, exc.line, exc.column + 1)
        if char == "." and exc.pos_in_stream > 0 and (text[exc.pos_in_stream - 1].isalnum()
                                                      or text[exc.pos_in_stream - 1] in "_)]"):
            return _attribute_error(text, exc.pos_in_stream, span)
        if char in "\"'":
            return SyntaxErr(
                "string literals in single quotes (or spanning lines) are not part of the language",
                span,
                hint='names are bare identifiers and values are numbers; the one string, in double quotes on one '
                     'line, is the equation of einsum("bi,ij->bj", x, W); a spec is data, not code',
            )
        return SyntaxErr(f"unexpected character {char!r}", span,
                         hint=f"expected {_expected_words(set(exc.allowed or ()))}")
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        token = exc.token
        expected = set(exc.accepts or exc.expected or ())
        if token.type == "$END":
            lines = _lines(text)
            line = len(lines)
            col = len(lines[-1]) + 1
            span = at.span(line, col, line, col + 1)
            return SyntaxErr(f"unexpected end of input: expected {_expected_words(expected)}", span,
                             hint=_hint_for_end(expected))
        end_col = token.end_column if token.end_column else token.column + len(str(token))
        span = at.span(token.line, token.column, token.end_line or token.line, end_col)
        message = f"expected {_expected_words(expected)}, found {_describe(token)}"
        hint = None
        if token.type == "NAME" and str(token) in KEYWORDS and "NAME" in expected:
            hint = f"'{token}' is a keyword and cannot be used as a name"
        elif token.type == "COMPARE" and _follows_a_comparison(text, token.start_pos):
            message = f"comparisons do not chain: found a second {_describe(token)}"
            hint = "compare once, or combine masks: (a < b) * (b < c)"
        elif token.type == "COMPARE":
            message = f"a comparison is not allowed here: {message}"
            hint = ("comparisons give 0/1 masks inside expressions; a declared shape takes names, integers "
                    "and + - * // /")
        elif token.type == "LPAR" and "NAME" not in expected:
            hint = "only built-in functions, `fn` definitions and param modules can be called, by name"
        elif token.type in ("RBRACE", "RPAR", "RSQB") or str(token) in KEYWORDS:
            hint = _hint_for_end(expected)
        elif "COMMA" in expected:
            hint = "is a ',' missing before it?"
        return SyntaxErr(message, span, hint=hint)
    if isinstance(exc, lark.exceptions.UnexpectedEOF):
        lines = _lines(text)
        span = at.span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        return SyntaxErr(f"unexpected end of input: expected {_expected_words(set(exc.expected))}", span)
    raise exc  # pragma: no cover - lark has no other kinds


_ATTRIBUTES = {
    "T": "use transpose(x, 0, 1) (or permute(x, [dims]) for more than two dimensions)",
    "shape": "shapes are declared, not read: write the declared sizes, e.g. reshape(x, [B, -1])",
    "sum": "use sum(x, dim=...)",
    "mean": "use mean(x, dim=...)",
    "max": "use max(x, dim)",
    "min": "use min(x, dim)",
    "reshape": "use reshape(x, [sizes])",
    "view": "use reshape(x, [sizes])",
    "transpose": "use transpose(x, dim0, dim1)",
    "permute": "use permute(x, [dims])",
    "unsqueeze": "use unsqueeze(x, dim) or x[:, None]",
    "abs": "use abs(x)",
    "exp": "use exp(x)",
}


def _attribute_error(text: str, pos: int, span: Span) -> SyntaxErr:
    """``W.T``, ``x.sum(...)``: attribute access is not part of the language; say what is."""
    end = pos + 1
    while end < len(text) and (text[end].isalnum() or text[end] == "_"):
        end += 1
    attribute = text[pos + 1:end]
    start = pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    receiver = text[start:pos] if start < pos and not text[start].isdigit() else ""
    hint = _ATTRIBUTES.get(attribute)
    if hint is not None and receiver:  # W.T -> transpose(W, 0, 1)
        hint = hint.replace("(x,", f"({receiver},")
    if hint is None:
        hint = ("functions are called by name on their argument, e.g. transpose(W, 0, 1), sum(x, dim=1)"
                if attribute else "a number needs a digit before or after its '.', e.g. 0.5")
    what = f"'.{attribute}'" if attribute else "'.'"
    return SyntaxErr(f"attribute access ({what}) is not part of the language", span, hint=hint)


def _follows_a_comparison(text: str, pos: int) -> bool:
    """Whether a comparison operator comes before ``pos`` in the same (bracket-level) expression."""
    depth = 0
    i = pos - 1
    while i >= 0:
        c = text[i]
        if c in ")]":
            depth += 1
        elif c in "([":
            if depth == 0:
                return False
            depth -= 1
        elif depth == 0 and (c in ",\n" or (c == "=" and text[i - 1:i] not in ("<", ">", "=", "!")
                                             and text[i + 1:i + 2] != "=")):
            return False
        elif depth == 0 and c in "<>" or (depth == 0 and c in "=!" and text[i + 1:i + 2] == "="):
            return True
        i -= 1
    return False


def _lines(text: str) -> list[str]:
    """The lines as the grammar counts them (at ``\\n`` only), like ``str.splitlines`` for a final newline."""
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return lines


def _hint_for_end(expected: set[str]) -> str | None:
    if "RPAR" in expected:
        return "a `(` is not closed"
    if "RSQB" in expected:
        return "a `[` is not closed"
    if "RBRACE" in expected:
        return "a `{` is not closed"
    return None


def _number(token: Token, span: Span) -> int | float:
    """The value of a number token; one out of range is a positioned :class:`TypeErr`."""
    try:
        return numbers.literal(str(token))
    except numbers.OutOfRange as exc:
        raise _Misplaced(TypeErr(exc.reason, span, hint=exc.hint)) from None


class ToAst:
    """The one transformer from the parse tree to :mod:`fpidsl.frontend.ast` nodes: a method per grammar rule,
    ``(meta, children)`` -> its node, called children first, left to right; by :meth:`transform` on a lark tree,
    or by the treeless parser as it reduces."""

    def __init__(self, at: Placement):
        self.at = at
        # a whole file's spans are its positions as they are: made without Placement.span's shift
        self._at_span = functools.partial(Span, at.path) if (at.line, at.col) == (1, 1) else at.span

    @classmethod
    def rule_method(cls, rule: str):
        """The method of a grammar rule (``add``, ``let_decl``), or None."""
        method = None if rule.startswith("_") else getattr(cls, rule, None)
        return method if callable(method) else None

    def transform(self, tree: Tree):
        """The AST of a parse tree, children first, without recursion (a tree may be deeper than Python's
        stack); a rule without a method stays a tree, as in a lark transformer."""
        values: list = []
        stack: list = [(tree, False)]
        while stack:
            node, ready = stack.pop()
            if not isinstance(node, Tree):
                values.append(node)
            elif not ready:
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.children))
            else:
                n = len(node.children)
                children = values[len(values) - n:]
                del values[len(values) - n:]
                method = self.rule_method(node.data)
                values.append(Tree(node.data, children, node.meta) if method is None
                              else method(self, node.meta, children))
        return values[0]

    # ------------------------------------------------------------------ positions
    def _span(self, meta) -> Span:
        return self._at_span(meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, token: Token) -> Span:
        return self._at_span(token.line, token.column, token.end_line, token.end_column)

    def _declared(self, token: Token) -> Span:
        """The span of a name being declared; a keyword is refused here, with its position."""
        span = self._tok(token)
        if str(token) in KEYWORDS:
            raise _Misplaced(SyntaxErr(
                f"'{token}' is a keyword and cannot be used as a name", span,
                hint=f"rename it, e.g. '{token}_'",
            ))
        return span

    # ------------------------------------------------------------------ file level
    def start(self, meta, items):
        layers = tuple(i for i in items if isinstance(i, ast.Layer))
        fns = tuple(i for i in items if isinstance(i, ast.FnDef))
        span = self._span(meta) if not meta.empty else Span(self.at.path, 1, 1, 1, 1)
        return ast.SpecFile(self.at.path, layers, fns, span)

    def layer(self, meta, children):
        name, *decls = children
        return ast.Layer(str(name), tuple(decls), self._declared(name), self._span(meta))

    def fn_def(self, meta, children):
        name, params, body = children
        return ast.FnDef(str(name), params or (), body, self._declared(name), self._span(meta))

    def fn_params(self, meta, names):
        return tuple(ast.Name(str(n), self._declared(n)) for n in names)

    def fn_head_only(self, meta, children):
        name, params = children
        return ast.Name(str(name), self._tok(name)), params or ()

    # ------------------------------------------------------------------ declarations
    def input_decl(self, meta, children):
        name, dtype, shape = children
        return ast.InputDecl(str(name), shape, self._declared(name), self._span(meta),
                             "float" if dtype is None else str(dtype))

    def state_decl(self, meta, children):
        name, shape, init = children
        return ast.StateDecl(str(name), shape, init, self._declared(name), self._span(meta))

    def param_decl(self, meta, children):
        name, kind = children
        if isinstance(kind, ast.Call):
            return ast.ModuleParamDecl(str(name), kind, self._declared(name), self._span(meta))
        if isinstance(kind, ast.ExternType):
            return ast.ExternParamDecl(str(name), kind, self._declared(name), self._span(meta))
        shape, init = kind
        return ast.TensorParamDecl(str(name), shape, init, self._declared(name), self._span(meta))

    def module_type(self, meta, children):
        return children[0]

    def tensor_type(self, meta, children):
        return tuple(children)

    def extern_type(self, meta, children):
        samplewise, inputs, output = children
        return ast.ExternType(inputs, output, samplewise is not None, self._span(meta))

    def extern_inputs(self, meta, shapes):
        return tuple(shapes)

    def param_type_only(self, meta, children):
        return children[0]

    def const_decl(self, meta, children):
        name, value = children
        return ast.ConstDecl(str(name), value, self._declared(name), self._span(meta))

    def let_decl(self, meta, children):
        name, value = children
        return ast.LetDecl(str(name), value, self._declared(name), self._span(meta))

    def energy_decl(self, meta, children):
        name, value = children
        return ast.EnergyDecl(str(name), value, self._declared(name), self._span(meta))

    def update_decl(self, meta, children):
        name, value = children
        return ast.UpdateDecl(str(name), value, self._tok(name), self._span(meta))

    def descend_decl(self, meta, children):
        name, energy, step = children
        return ast.DescendDecl(
            str(name), ast.Name(str(energy), self._tok(energy)), step, self._tok(name), self._span(meta)
        )

    def output_decl(self, meta, children):
        return ast.OutputDecl(tuple(children), self._span(meta))

    def settings_decl(self, meta, children):
        kind, *settings = children
        return ast.SettingsDecl(str(kind), tuple(s for s in settings if s is not None), self._span(meta))

    def setting(self, meta, children):
        key, value = children
        return ast.Setting(str(key), value, self._tok(key), self._span(meta))

    def shape(self, meta, dims):
        return ast.Shape(tuple(d for d in dims if d is not None), self._span(meta))

    def shape_only(self, meta, children):
        return children[0]

    def input_type_only(self, meta, children):
        dtype, shape = children
        return ("float" if dtype is None else str(dtype)), shape

    def dim_only(self, meta, children):
        return children[0]

    def dim_name(self, meta, children):
        return ast.Name(str(children[0]), self._tok(children[0]))

    def _dim_binop(op):  # noqa: N805 - a rule factory used in the class body
        def rule(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, self._span(meta))

        return rule

    dim_add = _dim_binop("+")
    dim_sub = _dim_binop("-")
    dim_mul = _dim_binop("*")
    dim_div = _dim_binop("/")
    dim_floordiv = _dim_binop("//")
    del _dim_binop

    def dim_int(self, meta, children):
        span = self._tok(children[0])
        return ast.Num(_number(children[0], span), str(children[0]), span)

    # ------------------------------------------------------------------ expressions
    def expr_only(self, meta, children):
        return children[0]

    def _binop(op):  # noqa: N805 - a rule factory used in the class body
        def rule(self, meta, children):
            left, right = children
            return ast.BinOp(op, left, right, self._span(meta))

        return rule

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")
    floordiv = _binop("//")
    matmul = _binop("@")
    pow = _binop("**")
    del _binop

    def compare(self, meta, children):
        left, op, right = children
        return ast.BinOp(str(op), left, right, self._span(meta))

    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))

    def number(self, meta, children):
        token = children[0]
        span = self._tok(token)
        return ast.Num(_number(token, span), str(token), span)

    def string(self, meta, children):
        token = children[0]
        return ast.Str(str(token)[1:-1], self._tok(token))

    def name(self, meta, children):
        token = children[0]
        return ast.Name(str(token), self._tok(token))

    def call(self, meta, children):
        func, arguments = children
        arguments = arguments or ()
        args = tuple(a for a in arguments if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in arguments if isinstance(a, ast.Keyword))
        return ast.Call(ast.Name(str(func), self._tok(func)), args, kwargs, self._span(meta))

    def arguments(self, meta, children):
        return self._positional_before_keywords(tuple(c for c in children if c is not None))

    def _positional_before_keywords(self, arguments):
        seen_keyword = None
        for argument in arguments:
            if isinstance(argument, ast.Keyword):
                seen_keyword = argument
            elif seen_keyword is not None:
                raise _Misplaced(SyntaxErr(
                    "a positional argument follows a keyword argument",
                    argument.span,
                    hint=f"move it before `{seen_keyword.name}=` or give it a keyword",
                ))
        return arguments

    def keyword(self, meta, children):
        name, value = children
        return ast.Keyword(str(name), value, self._tok(name), self._span(meta))

    def list(self, meta, items):
        return ast.ListExpr(tuple(i for i in items if i is not None), self._span(meta))

    def index(self, meta, children):
        value, items = children
        return ast.Index(value, items, self._span(meta))

    def index_items(self, meta, items):
        return tuple(items)

    def slice(self, meta, children):
        lo, hi, step = children
        return ast.Slice(lo, hi, step, self._span(meta))

    def ellipsis(self, meta, children):
        return ast.EllipsisIndex(self._span(meta))


class _Misplaced(Exception):
    """Carries an error found while transforming out of lark's visitor machinery."""

    def __init__(self, error: FpiError):
        super().__init__(error.message)
        self.error = error


# Parse-tree nodes that are one level of an expression (calls, operators, lists, indexing).
_EXPRESSION_LEVELS = frozenset("add sub mul div floordiv matmul pow compare neg call list index "
                               "dim_add dim_sub dim_mul dim_div dim_floordiv".split())


def _check_nesting(tree: lark.Tree, at: Placement) -> None:
    """Refuse an expression nested deeper than :data:`~fpidsl.limits.MAX_NESTING` levels, at its innermost
    level past the limit (an iterative walk: the parse tree may be deeper than Python's recursion limit)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data in _EXPRESSION_LEVELS:
            depth += 1
            if depth > MAX_NESTING:
                meta = node.meta
                span = at.span(meta.line, meta.column, meta.line, meta.column + 1)
                raise LimitErr(f"this expression is nested more than {MAX_NESTING:,} levels deep", span,
                               hint="split it into lets, or sum long lists with fewer, larger terms")
        stack.extend((child, depth) for child in node.children if isinstance(child, lark.Tree))


def _parse(text: str, start: str, at: Placement):
    treeless = _treeless()
    if treeless is not None:
        try:
            done = treeless.parse(text, start, ToAst(at))
        except (lark.exceptions.UnexpectedInput, _Misplaced, fast_lexer.Unsure):
            pass  # reported from the tree, as before: a syntax error, else too deep a nesting, else this one
        else:
            if not isinstance(done, Reduced):
                return done
            if done.levels <= MAX_NESTING:
                return done.value
    return _parse_tree(text, start, at)


def _parse_tree(text: str, start: str, at: Placement):
    """Parse to a tree, refuse too deep a nesting, transform: the reference path, and the one errors take."""
    try:
        tree = _parser().parse(text, start=start)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, text, at) from None
    _check_nesting(tree, at)
    try:
        return ToAst(at).transform(tree)
    except _Misplaced as exc:
        raise exc.error from None


def parse_fpi(source: Source) -> ast.SpecFile:
    """Parse a whole ``.fpi`` file."""
    return _parse(source.text, "start", Placement(source.path))


def parse_expr(text: str, at: Placement) -> ast.Expr:
    """Parse one expression placed at ``at`` (used by the YAML front-end)."""
    return _parse(text, "expr_only", at)


def parse_shape(text: str, at: Placement) -> ast.Shape:
    """Parse a shape such as ``[B, 10]``."""
    return _parse(text, "shape_only", at)


def parse_input_type(text: str, at: Placement) -> tuple[str, ast.Shape]:
    """Parse an input's type, ``[B, 10]`` or ``int [B, T]``: its dtype and shape."""
    return _parse(text, "input_type_only", at)


def parse_dim(text: str, at: Placement):
    """Parse one dimension of a shape: ``B``, ``10``, ``C // 2``."""
    return _parse(text, "dim_only", at)


def parse_param_type(text: str, at: Placement):
    """Parse what follows ``param NAME :``: a module call, or ``(shape, init)`` for ``tensor SHAPE = INIT``."""
    return _parse(text, "param_type_only", at)


def parse_fn_head(text: str, at: Placement) -> tuple[ast.Name, tuple[ast.Name, ...]]:
    """Parse ``name(a, b)``, the key of an ``fns`` entry in YAML."""
    return _parse(text, "fn_head_only", at)
