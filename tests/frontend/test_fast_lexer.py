"""The fast lexer (fpidsl/frontend/fast_lexer.py) against lark's contextual lexer it stands in for: the same tokens
(type, value, start and end positions, lines and columns) on every shipped spec, the hostile table's specs, the
YAML fragments and random generated specs; on bad or mutated inputs, never a token lark would not give there (it
gives lark's tokens up to where it stops, and it stops wherever lark's parse fails); and through ``_parse``, the
same errors as the tree path."""
from __future__ import annotations

import operator
import pathlib
import random

import pytest
from hypothesis import HealthCheck, given, settings

from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors
from fpidsl.frontend import fast_lexer
from fpidsl.frontend.parser import Placement, _lark, _parse, _parse_tree, _treeless
from fpidsl.limits import run_deep
from fpidsl.source import Source
from tests.attack.generate import specs
from tests.attack.test_hostile import CASES

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPECS = sorted({*ROOT.glob("specs/**/*.fpi"), *ROOT.glob("examples/**/*.fpi"), *ROOT.glob("tests/**/*.fpi"),
                *ROOT.glob("docs/**/*.fpi"), *ROOT.glob("benchmarks/**/*.fpi")})
H = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n"


class _Recorder(fast_lexer.Lexer):
    """A lexer that passes on another's tokens and keeps each as (type, value, positions)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def lex(self, lexer_state, parser_state):
        for t in self.inner.lex(lexer_state, parser_state):
            self.tokens.append((t.type, str(t), t.value, t.start_pos, t.end_pos, t.line, t.column, t.end_line,
                                t.end_column))
            yield t


def _recording(fast: bool):
    parser = _lark(propagate_positions=False)
    if fast:
        assert fast_lexer.install(parser)
    recorder = _Recorder(parser.parser.lexer)
    parser.parser.lexer = recorder
    return parser, recorder


LARK, LARK_TOKENS = _recording(fast=False)
FAST, FAST_TOKENS = _recording(fast=True)


def lex_both(text: str, start: str = "start"):
    """(lark's tokens, whether lark parsed the text), (the fast lexer's tokens, how its parse ended)."""
    outcomes = []
    for parser, recorder in ((LARK, LARK_TOKENS), (FAST, FAST_TOKENS)):
        recorder.tokens = []
        try:
            run_deep(parser.parse, text, start=start)
            outcome = "parsed"
        except fast_lexer.Unsure:
            outcome = "unsure"
        except Exception as exc:  # noqa: BLE001 - lark's syntax errors, of either parse
            outcome = type(exc).__name__
        outcomes.append((recorder.tokens, outcome))
    return outcomes


def assert_same_tokens(text: str, start: str = "start"):
    (lark_tokens, lark_outcome), (fast_tokens, fast_outcome) = lex_both(text, start)
    assert lark_outcome == "parsed"
    assert fast_outcome == "parsed"
    assert fast_tokens == lark_tokens


def assert_never_other_tokens(text: str, start: str = "start"):
    (lark_tokens, lark_outcome), (fast_tokens, fast_outcome) = lex_both(text, start)
    assert fast_tokens == lark_tokens[:len(fast_tokens)]
    if fast_outcome == "parsed":
        assert lark_outcome == "parsed" and fast_tokens == lark_tokens
    if lark_outcome != "parsed":
        assert fast_outcome != "parsed"
    return fast_outcome


def test_the_fast_lexer_is_installed_in_the_treeless_parser():
    assert isinstance(_treeless().lark.parser.lexer, fast_lexer.FastLexer)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_specs_lex_the_same(path):
    assert_same_tokens(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", [c for c in CASES if c.path.endswith(".fpi") and len(c.text) < 50_000],
                         ids=lambda c: c.name)
def test_hostile_specs_lex_the_same_or_stop(case):
    assert_never_other_tokens(case.text)


@pytest.mark.parametrize("start, text", [
    ("expr_only", "0.5 * (a + b)[:, 1] - f(c, dim=-1) ** 2 // 3 @ W"), ("expr_only", 'einsum("bi,ij->bj", x, W)'),
    ("expr_only", "(a <= b) + (a >= b) * (a == b) - (a != b) / (a < b) + (a > b)"),
    ("expr_only", "x[..., ::2, 1:] + .5e-3 + 1_000.25E+1_0 + 7."),
    ("shape_only", "[B, C // 2, 3,]"), ("dim_only", "(H - 1) * 2 + W / 4"),
    ("param_type_only", "tensor [3, 3] = normal(0, 0.1)"), ("param_type_only", "extern samplewise ([B, 3], [B]) -> [B, 2]"),
    ("param_type_only", "Linear(3, 3, bias=false)"), ("input_type_only", "int [B, T]"), ("input_type_only", "[B]"),
    ("fn_head_only", "sq(v, w)"), ("fn_head_only", "two()"),
])
def test_fragments_lex_the_same(start, text):
    assert_same_tokens(text, start)


# Words lark's contextual lexer reads by context: keywords, soft keywords, dtypes, a keyword's prefix.
CONTEXTUAL = [
    H + "  let int = a\n  let bool = int\n  let sparse = bool\n  update x = sparse\n}\n",
    H + "  let eval = a\n  let solve_ = eval\n  update x = eval\n  eval { tol = 1e-3 }\n  solve { max_iter = 3 }\n}\n",
    "layer L {\n  input i : int [B, T]\n  input m : bool [B]\n  input s : sparse [N, N]\n  state x : [B, 3]\n"
    "  update x = 0.5 * x\n  backward { tol = 1e-4 }\n}\n",
    H + "  param e : extern samplewise [B, 3] -> [B, 3]\n  param f : extern ([B, 3], [B, 3]) -> [B, 3]\n"
        "  update x = 0.5 * e(x) + f(x, a)\n}\n",
    H + "  let samplewise = a\n  let tensor_ = samplewise\n  let layers = tensor_\n  update x = layers\n}\n",
    H + "  energy E = 0.5 * sum(x * x, dim=1)\n  descend x on E step 0.1\n}\n",
    "\n\n  # a comment\n\r\n\t" + H + "  update x = a # the end\n}   \n# last\n",
    "fn f(v) = v\nfn g() = 1\nlayer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5*f(x)+g()*a\n}",
]


@pytest.mark.parametrize("text", CONTEXTUAL)
def test_context_dependent_words_lex_the_same(text):
    assert_same_tokens(text)


# Bad inputs: the compiler refuses each (lark's parse, or the AST builder where lark reads a keyword as a name);
# the fast parse never gives a token lark would not give there.
BAD = [
    H + "  update x = a $ b\n}\n", H + "  update x = 'a'\n}\n", H + "  update x = W.T\n}\n",
    H + "  let layer = a\n  update x = a\n}\n", H + "  let h = let\n  update x = h\n}\n",
    "layerL {\n}\n", "layer L {\n  letx = 1\n}\n", H + "  update x = 2x\n}\n",
    "layer L {\n  input a : [B, 1.5]\n}\n", "layer L {\n  input a : [B, 1_0]\n}\n", "layer L {\n  input a : [B, 1e3]\n}\n",
    "layer L {\n  input a : integer [B]\n}\n", "layer L {\n  solver { }\n}\n", H + "  solve { tol == 1 }\n}\n",
    H + "  update x = a < b < c\n}\n", H + "  update x = (a\n}\n", H + "  update x = \"ab\n\"\n}\n",
    H + "  update x = a -> b\n}\n", H + "  update x = a ... b\n}\n", H + "  update x = 1..2\n}\n",
    H + "  update x = a\u00e9\n}\n", H + "  update x = \u0967\n}\n", "layer L {", "}", "@",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_inputs_never_lex_otherwise(text):
    assert_never_other_tokens(text)


def _mutations(seed: int, count: int):
    """Texts of the shipped specs with a few characters or words inserted, deleted or replaced."""
    rng = random.Random(seed)
    pieces = ["let", "int", "eval", "solve", "samplewise", "tensor", "extern", "on", "step", "layer", "x", "1",
              "1.5", "_0", "e5", "**", "*", "//", "/", "<", "<=", "=", "==", "!", "-", "->", ".", "...", ",", ":",
              "(", ")", "[", "]", "{", "}", '"', "#", "\n", " ", "@", "+", "\u00e9"]
    texts = [p.read_text(encoding="utf-8") for p in SPECS if p.stat().st_size < 4000]
    for _ in range(count):
        text = rng.choice(texts)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            j = i + rng.randint(0, 3)
            text = text[:i] + (rng.choice(pieces) if rng.random() < 0.8 else "") + text[j:]
        yield text


@pytest.mark.parametrize("seed", range(4))
def test_mutated_specs_never_lex_otherwise(seed):
    outcomes = [assert_never_other_tokens(text) for text in _mutations(seed, 150)]
    assert "parsed" in outcomes and len(set(outcomes)) > 1  # the mutations reach both parses and failures


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(specs())
def test_generated_specs_lex_the_same(spec):
    assert_same_tokens(spec.fpi())


def _outcome(run, text, start="start", at=Placement("t.fpi")):
    """An AST, or an error as (kind, line, column, message, hint)."""
    try:
        return run_deep(run, text, start, at)
    except FpiError as e:
        return (e.kind, e.span.line, e.span.col, e.message, e.hint)


@pytest.mark.parametrize("text", BAD)
def test_bad_inputs_parse_or_fail_as_on_the_tree_path(text):
    assert run_deep(operator.eq, _outcome(_parse, text), _outcome(_parse_tree, text))


def _checked(text: str):
    try:
        check_source(Source("t.fpi", text))
    except FpiErrors as e:
        return [(x.kind, x.span.line, x.span.col, x.message) for x in e.errors]
    except FpiError as e:
        return [(e.kind, e.span.line, e.span.col, e.message)]
    return None


def test_errors_keep_their_kind_line_column_and_message():
    assert _checked(H + "  update x = a $ b\n}\n") == [("syntax", 4, 16, "unexpected character '$'")]
    assert _checked(H + "  let layer = a\n  update x = a\n}\n") == [
        ("syntax", 4, 7, "'layer' is a keyword and cannot be used as a name")]
    assert _checked("layer L {\n  input a : [B, 1.5]\n}\n")[0][:3] == ("syntax", 2, 18)
