"""Highlighting: the Pygments lexer (an installed entry point) and the VS Code extension's TextMate grammar
read every shipped spec without an error token, and name the language's words from the compiler's own tables."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pygments = pytest.importorskip("pygments", reason="pygments is part of the dev extra")
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename  # noqa: E402
from pygments.token import Comment, Error, Keyword, Name, Number  # noqa: E402

from fpidsl.frontend.parser import KEYWORDS, SOFT_KEYWORDS  # noqa: E402
from fpidsl.ir.primitives import MODULE_KINDS, PRIMITIVES  # noqa: E402
from fpidsl.passes.settings import SETTING_KEYS  # noqa: E402
from fpidsl.tools.lexer import FpiLexer  # noqa: E402
from tests.tools.test_fmt import DOC_BLOCKS, FPI_SPECS, rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VSCODE = ROOT / "editors" / "vscode"
GRAMMAR = json.loads((VSCODE / "syntaxes" / "fpi.tmLanguage.json").read_text())
TEXTS = [(rel(p), p.read_text()) for p in FPI_SPECS] + DOC_BLOCKS


def test_the_entry_point_finds_the_lexer():
    assert type(get_lexer_by_name("fpi")) is FpiLexer
    assert type(get_lexer_for_filename("spec.fpi")) is FpiLexer
    done = subprocess.run([str(Path(sys.executable).parent / "pygmentize"), "-l", "fpi", "-f", "html",
                           str(ROOT / "specs" / "denoise.fpi")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '<span class="kd">layer</span>' in done.stdout and '<span class="nb">relu</span>' in done.stdout


@pytest.mark.parametrize("where,text", TEXTS, ids=[w for w, _ in TEXTS])
def test_pygments_reads_every_spec(where, text):
    tokens = list(FpiLexer().get_tokens(text))
    assert "".join(value for _, value in tokens).rstrip("\n") == text.rstrip("\n")
    assert not [v for t, v in tokens if t in Error], where


def test_pygments_token_kinds():
    text = "layer L {  # c\n  state x : [B, 4] = zeros\n  update x = relu(fc(x)) * 1e-2\n  solve { tol = 1 }\n}\n"
    kinds = {value: kind for kind, value in FpiLexer().get_tokens(text) if value.strip()}
    assert kinds["layer"] in Keyword and kinds["L"] in Name.Class and kinds["# c"] in Comment
    assert kinds["relu"] in Name.Builtin and kinds["fc"] is Name and kinds["1e-2"] in Number.Float
    assert kinds["zeros"] in Name.Constant and kinds["tol"] in Name.Attribute


# --------------------------------------------------------------------------- the TextMate grammar


def _alternatives(rule: str) -> set[str]:
    pattern = GRAMMAR["repository"][rule]["match"]
    return set(re.search(r"\\b\(([^)]*)\)", pattern).group(1).split("|"))


def test_the_grammar_file_is_up_to_date():
    from fpidsl.tools.textmate import render

    assert (VSCODE / "syntaxes" / "fpi.tmLanguage.json").read_text() == render(), \
        "regenerate it: python -m fpidsl.tools.textmate editors/vscode/syntaxes/fpi.tmLanguage.json"


def test_the_grammar_names_the_compilers_words():
    keywords = set()
    for pattern in GRAMMAR["repository"]["keyword"]["patterns"]:
        keywords |= set(re.search(r"\(([^)]*)\)", pattern["match"]).group(1).split("|"))
    assert keywords == set(KEYWORDS) | set(SOFT_KEYWORDS)
    assert _alternatives("builtin") == {n for n, p in PRIMITIVES.items() if p.builtin}
    assert _alternatives("module") == set(MODULE_KINDS)
    assert _alternatives("setting") == set(SETTING_KEYS)
    assert _alternatives("input_type") == {"int", "bool", "sparse"}


def _scan(text: str) -> list[tuple[str, str]]:
    """TextMate's rule for a flat grammar: at each position the pattern whose match starts first wins (the first
    listed on a tie); returns (scope, text) for each match and ("", text) for what no pattern matched."""
    rules = []
    for include in GRAMMAR["patterns"]:
        rule = GRAMMAR["repository"][include["include"][1:]]
        for item in rule.get("patterns", [rule]):
            rules.append((re.compile(item["match"], re.M), item.get("name", "captured")))
    out, pos = [], 0
    while pos < len(text):
        found = [(m.start(), i, m, name) for i, (rx, name) in enumerate(rules) if (m := rx.search(text, pos))]
        if not found:
            out.append(("", text[pos:]))
            break
        start, _, match, name = min(found, key=lambda f: (f[0], f[1]))
        if start > pos:
            out.append(("", text[pos:start]))
        out.append((name, match.group(0)))
        pos = max(match.end(), pos + 1)
    return out


@pytest.mark.parametrize("where,text", TEXTS, ids=[w for w, _ in TEXTS])
def test_the_grammar_covers_every_spec(where, text):
    unmatched = [chunk for scope, chunk in _scan(text) if not scope and chunk.strip()]
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(unmatched)))
    leftover = re.sub(r"[A-Za-z_][A-Za-z0-9_]*|\s", "", "".join(unmatched))
    assert leftover == "", f"{where}: characters no rule matches: {leftover!r}"
    assert not names & set(KEYWORDS)


def test_the_extension_folder():
    package = json.loads((VSCODE / "package.json").read_text())
    language = package["contributes"]["languages"][0]
    assert language["id"] == "fpi" and language["extensions"] == [".fpi"]
    assert (VSCODE / language["configuration"]).exists()
    grammar = package["contributes"]["grammars"][0]
    assert grammar["scopeName"] == GRAMMAR["scopeName"] and (VSCODE / grammar["path"]).exists()
    assert (VSCODE / package["main"]).exists()
    setting = package["contributes"]["configuration"]["properties"]["fpidsl.server.command"]
    assert setting["default"] == ["fpidsl", "lsp"]
    json.loads((VSCODE / "language-configuration.json").read_text())
