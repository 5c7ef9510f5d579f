"""The TextMate grammar of ``.fpi`` (``editors/vscode/syntaxes/fpi.tmLanguage.json``), made from the compiler's own
word lists (the same as the Pygments lexer's), so that a new built-in only needs the file regenerated::

    python -m fpidsl.tools.textmate editors/vscode/syntaxes/fpi.tmLanguage.json

(``tests/tools/test_highlighting.py`` fails, naming this command, when the file is out of date.)
"""
from __future__ import annotations

import json
import sys

from ..ir.primitives import MODULE_KINDS
from ..passes.settings import SETTING_KEYS
from .lexer import BLOCK_WORDS, BUILTINS, CONSTANTS, DECLARATION_WORDS, INPUT_TYPES

_NAME = "[A-Za-z_][A-Za-z0-9_]*"


def _words(words) -> str:
    return "|".join(words)


def grammar() -> dict:
    """The grammar as a JSON object."""
    rules = ("comment", "string", "declaration", "keyword", "input_type", "module", "builtin", "constant", "setting", "number",
             "operator", "punctuation")
    return {
        "$schema": "https://raw.githubusercontent.com/martinring/tmlanguage/master/tmlanguage.json",
        "name": "fpi",
        "scopeName": "source.fpi",
        "fileTypes": ["fpi"],
        "patterns": [{"include": f"#{rule}"} for rule in rules],
        "repository": {
            "comment": {"name": "comment.line.number-sign.fpi", "match": "#.*$"},
            "string": {"name": "string.quoted.double.fpi", "match": "\"[^\"\\n]*\""},
            "declaration": {"patterns": [
                {"match": f"\\b(layer|fn)\\s+({_NAME})",
                 "captures": {"1": {"name": "storage.type.fpi"}, "2": {"name": "entity.name.type.fpi"}}},
                {"match": f"\\b(input|state|param|const|let|energy|update|descend)\\s+({_NAME})",
                 "captures": {"1": {"name": "storage.type.fpi"}, "2": {"name": "variable.other.declaration.fpi"}}},
            ]},
            "keyword": {"patterns": [
                {"name": "storage.type.fpi", "match": f"\\b({_words(DECLARATION_WORDS)})\\b"},
                {"name": "storage.type.fpi", "match": f"\\b({_words(BLOCK_WORDS)})\\b(?=\\s*\\{{)"},
                {"name": "keyword.other.fpi", "match": "\\b(on|step|tensor|extern)\\b"},
            ]},
            "input_type": {"name": "storage.type.input.fpi", "match": f"\\b({_words(INPUT_TYPES)})\\b(?=\\s*\\[)"},
            "module": {"name": "support.class.fpi", "match": f"\\b({_words(sorted(MODULE_KINDS))})\\b"},
            "builtin": {"name": "support.function.builtin.fpi", "match": f"\\b({_words(BUILTINS)})\\b(?=\\s*\\()"},
            "constant": {"name": "constant.language.fpi", "match": f"\\b({_words(CONSTANTS)})\\b"},
            "setting": {"name": "variable.parameter.setting.fpi", "match": f"\\b({_words(SETTING_KEYS)})\\b(?=\\s*=)"},
            "number": {"name": "constant.numeric.fpi",
                       "match": "(?<![A-Za-z0-9_])(\\d+(_\\d+)*(\\.(\\d+(_\\d+)*)?)?|\\.\\d+(_\\d+)*)"
                                "([eE][+-]?\\d+(_\\d+)*)?"},
            "operator": {"name": "keyword.operator.fpi", "match": "\\*\\*|//|[<>=!]=|[-+*/@=:<>]"},
            "punctuation": {"name": "punctuation.separator.fpi", "match": "\\.\\.\\.|[,()\\[\\]{}]"},
        },
    }


def render() -> str:
    """The grammar file's text."""
    return json.dumps(grammar(), indent=2) + "\n"


if __name__ == "__main__":  # pragma: no cover - the regeneration command
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fpidsl.tools.textmate OUT.tmLanguage.json")
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        handle.write(render())
