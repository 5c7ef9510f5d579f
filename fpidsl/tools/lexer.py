"""A Pygments lexer for ``.fpi`` specs, registered as the ``pygments.lexers`` entry point ``fpi`` (so
``pygmentize -l fpi spec.fpi`` and Markdown/Sphinx ```` ```fpi ```` blocks highlight once fpidsl is installed).

Keywords are the grammar's, built-in functions and module kinds come from the compiler's tables, and solver
setting names and words from the settings pass, so the lexer cannot drift from the language.
"""
from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import Comment, Keyword, Name, Number, Operator, Punctuation, String, Text, Whitespace

from ..frontend.ast import INPUT_DTYPES

from ..frontend.parser import KEYWORDS, SOFT_KEYWORDS
from ..ir.primitives import MODULE_KINDS, PRIMITIVES, TENSOR_INITS
from ..passes.settings import CRITERIA, METHODS, MODES, ON_FAIL, SETTING_KEYS

DECLARATION_WORDS = tuple(sorted(KEYWORDS - {"on", "step", "tensor", "extern"}))
BLOCK_WORDS = tuple(sorted(SOFT_KEYWORDS))  # keywords only before a '{' (names elsewhere)
BUILTINS = tuple(sorted(name for name, prim in PRIMITIVES.items() if prim.builtin))
INPUT_TYPES = tuple(d for d in INPUT_DTYPES if d != "float")  # `input A : sparse [N, N]`: before a shape
CONSTANTS = tuple(sorted(set(TENSOR_INITS) | set(METHODS) | set(MODES) | set(CRITERIA) | set(ON_FAIL)))


class FpiLexer(RegexLexer):
    """Highlights ``.fpi`` specs of fixed-point layers (fpidsl)."""

    name = "fpi"
    aliases = ["fpi", "fpidsl"]
    filenames = ["*.fpi"]
    mimetypes = ["text/x-fpi"]
    url = "https://github.com/fpidsl/fpidsl"

    tokens = {
        "root": [
            (r"\s+", Whitespace),
            (r"#.*?$", Comment.Single),
            (r"\b(layer|fn)(\s+)([A-Za-z_][A-Za-z0-9_]*)", bygroups(Keyword.Declaration, Whitespace, Name.Class)),
            (r"\b(input|state|param|const|let|energy|update|descend)(\s+)([A-Za-z_][A-Za-z0-9_]*)",
             bygroups(Keyword.Declaration, Whitespace, Name.Variable)),
            (words(DECLARATION_WORDS, suffix=r"\b"), Keyword.Declaration),
            (words(BLOCK_WORDS, suffix=r"\b(?=\s*\{)"), Keyword.Declaration),
            (words(("on", "step", "tensor", "extern"), suffix=r"\b"), Keyword),
            (words(INPUT_TYPES, suffix=r"\b(?=\s*\[)"), Keyword.Type),
            (r'"[^"\n]*"', String.Double),
            (words(tuple(sorted(MODULE_KINDS)), suffix=r"\b"), Name.Builtin.Pseudo),
            (words(BUILTINS, suffix=r"\b(?=\s*\()"), Name.Builtin),
            (words(CONSTANTS, suffix=r"\b"), Name.Constant),
            (r"\b(" + "|".join(SETTING_KEYS) + r")(?=\s*=)", Name.Attribute),
            (r"(\d+(_\d+)*(\.(\d+(_\d+)*)?)?|\.\d+(_\d+)*)[eE][+-]?\d+(_\d+)*", Number.Float),
            (r"\d+(_\d+)*\.(\d+(_\d+)*)?|\.\d+(_\d+)*", Number.Float),
            (r"\d+(_\d+)*", Number.Integer),
            (r"[A-Za-z_][A-Za-z0-9_]*", Name),
            (r"\*\*|//|[<>=!]=|[-+*/@=:<>]", Operator),
            (r"\.\.\.", Punctuation),
            (r"[\[\](){},]", Punctuation),
            (r".", Text),
        ],
    }
