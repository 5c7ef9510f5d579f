"""The YAML front-end: the same AST as `.fpi`, spans into the YAML file, and every schema mistake's place and words."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest

from fpidsl.errors import FpiError, InputError, LimitErr, SchemaErr, SyntaxErr
from fpidsl.frontend import ast
from fpidsl.frontend.ast_compare import strip_spans
from fpidsl.frontend.load import parse_source
from fpidsl.frontend.parser import parse_fpi
from fpidsl.frontend.yaml_loader import MAX_EXPANDED_NODES, parse_yaml
from fpidsl.frontend.read import read_source
from fpidsl.source import Source, Span
from tests.conftest import SPECS


def from_yaml(text: str, path: str = "t.yaml") -> ast.SpecFile:
    return parse_yaml(Source(path, textwrap.dedent(text)))


def from_fpi(text: str) -> ast.SpecFile:
    return parse_fpi(Source("t.fpi", textwrap.dedent(text)))


def nodes(node):
    """Every AST node under ``node`` (itself included), depth first."""
    if isinstance(node, (tuple, list)):
        for item in node:
            yield from nodes(item)
    elif dataclasses.is_dataclass(node) and not isinstance(node, (type, Span)):
        yield node
        for field in dataclasses.fields(node):
            yield from nodes(getattr(node, field.name))


def text_at(source: Source, span: Span) -> str:
    assert span.line == span.end_line, span
    return source.line(span.line)[span.col - 1:span.end_col - 1]


def assert_leaf_spans_exact(spec: ast.SpecFile, source: Source) -> int:
    """Each name and number (and each declared name) sits exactly where its span says. Returns how many."""
    checked = 0
    for node in nodes(spec):
        if isinstance(node, ast.Name):
            assert text_at(source, node.span) == node.id, node
        elif isinstance(node, ast.Num):
            assert text_at(source, node.span) == node.text, node
        elif hasattr(node, "name_span"):
            assert text_at(source, node.name_span) == node.name, node
        else:
            continue
        checked += 1
    return checked


# --------------------------------------------------------------------------- twins


def test_shipped_box_projection_twin_is_the_same_ast():
    fpi_source = read_source(str(SPECS / "box_projection.fpi"))
    yaml_source = read_source(str(SPECS / "box_projection.yaml"))
    from_f, from_y = parse_fpi(fpi_source), parse_yaml(yaml_source)
    assert strip_spans(from_y, keep_text=True) == strip_spans(from_f, keep_text=True)
    assert [layer.name for layer in from_y.layers] == ["BoxProjectionNN", "BoxProjectionGD"]
    assert assert_leaf_spans_exact(from_y, yaml_source) > 40


@pytest.mark.parametrize("yaml_spec", sorted(SPECS.glob("*.yaml")) + sorted(SPECS.glob("*.yml")),
                         ids=lambda p: p.name)
def test_every_shipped_yaml_spec_has_an_equal_fpi_twin(yaml_spec):
    twin = yaml_spec.with_suffix(".fpi")
    assert twin.exists(), f"{yaml_spec.name} has no .fpi twin"
    source = read_source(str(yaml_spec))
    spec = parse_source(source)
    assert strip_spans(spec) == strip_spans(parse_source(read_source(str(twin))))
    assert_leaf_spans_exact(spec, source)


TWINS = {
    "states with init": (
        """
        layer L {
          input a : [B, 10]
          state x : [B, 10] = zeros
          state y : [B, 10]
          state z : [B, 10] = -0.5
          state w : [B, 10] = a * 2
          update x = a
          update y = a
          update z = a
          update w = a
        }
        """,
        """
        fpi: 1
        layers:
          L:
            inputs: {a: "[B, 10]"}
            states:
              x: {shape: "[B, 10]", init: zeros}
              y: "[B, 10]"
              z: {shape: "[B, 10]", init: -0.5}
              w: {shape: "[B, 10]", init: "a * 2"}
            updates: {x: a, y: a, z: a, w: a}
        """,
    ),
    "params of every kind": (
        """
        layer L {
          param fc : Linear(10, 10, bias=false, init_scale=0.1, norm=spectral)
          param conv : Conv2d(1, 8, 3, padding=1)
          param w : tensor [10] = normal(0, 0.01)
          param v : tensor [2, 3]
          param u : tensor [5] = ones
        }
        """,
        """
        fpi: 1
        layers:
          L:
            params:
              fc: "Linear(10, 10, bias=false, init_scale=0.1, norm=spectral)"
              conv: Conv2d(1, 8, 3, padding=1)
              w: "tensor [10] = normal(0, 0.01)"
              v: tensor [2, 3]
              u: 'tensor [5] = ones'
        """,
    ),
    "consts and lets in order": (
        """
        layer L {
          const k = 0.5
          const n = 3
          const eps = 1e-6
          const m = -2
          let h = x * k
          let g = h + n
          let a = g ** 2
        }
        """,
        """
        fpi: 1
        layers:
          L:
            consts: {k: 0.5, n: 3, eps: 1e-6, m: -2}
            lets:
              - h: "x * k"
              - g: h + n
              - a: "g ** 2"
        """,
    ),
    "fns": (
        """
        fn sq(v) = v * v
        fn two() = 2
        fn mix(a, b) = a * 0.5 + b * 0.5
        layer L {
          let h = sq(two())
        }
        """,
        """
        fpi: 1
        fns:
          sq(v): "v * v"
          two(): 2
          "mix(a, b)": "a * 0.5 + b * 0.5"
        layers:
          L:
            lets: [{h: "sq(two())"}]
        """,
    ),
    "energies, descend, output list, settings": (
        """
        layer L {
          input a : [B, 10]
          state x : [B, 10]
          state y : [B, 10]
          energy E = sum(square(x - a), dim=-1)
          energy F = sum(square(y - a), dim=-1)
          descend x on E step 0.01
          descend y on F step 1e-3
          output x, y + 1, x[:, 0:3]
          solve { method = anderson(m=5, beta=0.5), tol = 1e-6, criterion = relative, max_iter = 500 }
          backward { method = picard, tol = 1e-7, on_fail = raise, min_iter = 2 }
        }
        """,
        """
        fpi: 1
        layers:
          L:
            inputs: {a: "[B, 10]"}
            states: {x: "[B, 10]", y: "[B, 10]"}
            energies:
              E: "sum(square(x - a), dim=-1)"
              F: "sum(square(y - a), dim=-1)"
            descend:
              x: {on: E, step: 0.01}
              y: {on: F, step: 1e-3}
            output: [x, "y + 1", "x[:, 0:3]"]
            solve: {method: "anderson(m=5, beta=0.5)", tol: 1e-6, criterion: relative, max_iter: 500}
            backward:
              method: picard
              tol: 1e-7
              on_fail: raise
              min_iter: 2
        """,
    ),
    "output as one string, several layers": (
        """
        layer A {
          state x : [B]
          update x = x * 0.5
          output x * 2
        }
        layer B {
          state x : [B]
          update x = x
          solve { }
        }
        """,
        """
        fpi: 1
        layers:
          A:
            states: {x: "[B]"}
            updates: {x: "x * 0.5"}
            output: "x * 2"
          B:
            states: {x: "[B]"}
            updates: {x: x}
            solve: {}
        """,
    ),
    "sections in any order give the canonical order": (
        """
        layer L {
          input a : [B]
          state x : [B]
          let h = a
          update x = h
          output x
          solve { tol = 1e-6 }
        }
        """,
        """
        fpi: 1
        layers:
          L:
            solve: {tol: 1e-6}
            output: x
            updates: {x: h}
            lets: [{h: a}]
            states: {x: "[B]"}
            inputs: {a: "[B]"}
        """,
    ),
    "scalar styles and shapes as YAML lists": (
        """
        layer L {
          input a : [B, 1, H, W]
          state x : [B, 1, H, W] = a
          let h = cat([x, a], dim=1)
          energy E = sum(x, dim=[1, 2, 3])
          update x = relu(a + x) * 0.5
        }
        """,
        """
        fpi: 1
        layers:
          L:
            inputs: {a: [B, 1, H, W]}
            states:
              x:
                shape: [B, 1, H, W]
                init: a
            lets:
              - h: >
                  cat([x, a],
                      dim=1)
            energies:
              E: |-
                sum(x,
                    dim=[1, 2, 3])
            updates:
              x: relu(a +
                x) * 0.5
        """,
    ),
    "empty sections are no declarations": (
        """
        layer L {
          input a : [B]
        }
        """,
        """
        fpi: 1
        layers:
          L:
            inputs: {a: "[B]"}
            states:
            params: {}
            lets: []
        """,
    ),
}


@pytest.mark.parametrize("fpi_text, yaml_text", TWINS.values(), ids=list(TWINS))
def test_yaml_twins_give_the_same_ast(fpi_text, yaml_text):
    source = Source("t.yaml", textwrap.dedent(yaml_text))
    spec = parse_yaml(source)
    assert strip_spans(spec, keep_text=True) == strip_spans(from_fpi(fpi_text), keep_text=True)
    assert_leaf_spans_exact(spec, source)


def test_yaml_numbers_become_num_like_in_fpi():
    spec = from_yaml("""
        fpi: 1
        layers:
          L:
            states: {x: {shape: "[B]", init: 0.5}}
            consts: {k: 1.0e-6, n: 1_000}
            descend: {x: {on: E, step: 0.01}}
            solve: {tol: 1.0e-6, max_iter: 500}
        """)
    state, k, n, descend, solve = spec.layers[0].decls
    assert state.init == ast.Num(0.5, "0.5", Span("t.yaml", 5, 38, 5, 41))
    assert (k.value.value, k.value.text, n.value.value) == (1e-6, "1.0e-6", 1000)
    assert isinstance(descend.step, ast.Num) and descend.step.value == 0.01
    assert [(s.key, s.value.value) for s in solve.settings] == [("tol", 1e-6), ("max_iter", 500)]
    assert type(solve.settings[1].value.value) is int


# --------------------------------------------------------------------------- spans


def test_spans_of_keys_declarations_and_expressions():
    source = Source("t.yaml", textwrap.dedent("""\
        fpi: 1
        fns:
          "sq(v)": "v * v"
        layers:
          L:
            inputs: {a: "[B, 10]"}
            updates:
              x: 'relu(a)'
            lets:
              - h: sq(a)
        """))
    spec = parse_yaml(source)
    layer = spec.layers[0]
    assert (layer.name_span.line, layer.name_span.col, layer.name_span.end_col) == (5, 3, 4)
    fn = spec.fns[0]
    assert (fn.name_span.line, fn.name_span.col, fn.name_span.end_col) == (3, 4, 6)
    assert (fn.params[0].span.col, fn.body.span.col, fn.body.span.end_col) == (7, 13, 18)
    inputs, let, update = layer.decls
    assert inputs.span == Span("t.yaml", 6, 14, 6, 26)  # from the key to the closing quote
    assert (inputs.shape.span.col, inputs.shape.span.end_col) == (18, 25)
    assert update.name_span == Span("t.yaml", 8, 7, 8, 8)
    assert update.value.span == Span("t.yaml", 8, 11, 8, 18)  # inside the single quotes
    assert let.value.span == Span("t.yaml", 10, 12, 10, 17)
    assert_leaf_spans_exact(spec, source)


def test_expression_error_points_into_a_quoted_string():
    with pytest.raises(SyntaxErr) as info:
        from_yaml("""\
            fpi: 1
            layers:
              L:
                updates:
                  x: "relu(a"
            """)
    error = info.value
    # `"relu(a"` starts at column 10; the text at 11; the end of input is after `a`, at the closing quote.
    assert (error.span.path, error.span.line, error.span.col) == ("t.yaml", 5, 17)
    assert "expected ')'" in error.message and error.hint == "a `(` is not closed"


def test_expression_error_points_into_a_plain_string():
    with pytest.raises(SyntaxErr) as info:
        from_yaml("fpi: 1\nlayers:\n  L:\n    updates: {x: relu(a $ b)}\n")
    assert (info.value.span.line, info.value.span.col) == (4, 25)
    assert "unexpected character '$'" in info.value.message


def test_expression_error_points_into_a_block_scalar():
    with pytest.raises(SyntaxErr) as info:
        from_yaml("""\
            fpi: 1
            layers:
              L:
                updates:
                  x: |
                    relu(a +
                         b c)
            """)
    assert (info.value.span.line, info.value.span.col) == (7, 16)
    assert "found name 'c'" in info.value.message


def test_escapes_fall_back_to_the_whole_scalar():
    """A double-quoted string with escapes does not read like its value: no column is guessed."""
    text = 'fpi: 1\nlayers:\n  L:\n    updates:\n      x: "relu(a)\\t* $"\n'
    with pytest.raises(SyntaxErr) as info:
        parse_yaml(Source("t.yaml", text))
    assert info.value.span == Span("t.yaml", 5, 10, 5, 24)
    spec = parse_yaml(Source("t.yaml", text.replace("$", "2")))
    update = spec.layers[0].decls[0]
    assert {node.span for node in nodes(update.value)} == {Span("t.yaml", 5, 10, 5, 24)}
    assert strip_spans(update.value) == strip_spans(from_fpi("layer L { let y = relu(a) * 2 }").layers[0]
                                                    .decls[0].value)


def test_end_of_input_in_a_fragment_is_the_end_of_the_value():
    with pytest.raises(SyntaxErr) as info:
        from_yaml("fpi: 1\nlayers:\n  L:\n    output: x, y\n")
    assert (info.value.span.line, info.value.span.col) == (4, 14)
    assert "expected the end of the value, found ','" in info.value.message
    assert "output: [x, y]" in info.value.hint


# --------------------------------------------------------------------------- malformed specs

LAYER = "fpi: 1\nlayers:\n  L:\n"

# (id, text, error class, line, column, message fragment, hint fragment or None)
BAD_SPECS = [
    ("unknown top-level key", "fpi: 1\nlayer:\n  L: {}\n",
     SchemaErr, 2, 1, "unknown key `layer` at the top level", "did you mean `layers`?"),
    ("a layer outside layers", "fpi: 1\nL:\n  inputs: {a: '[B]'}\n",
     SchemaErr, 2, 1, "unknown key `L` at the top level", "layers go under `layers:`"),
    ("unknown layer key", LAYER + "    inptus: {a: '[B]'}\n",
     SchemaErr, 4, 5, "unknown key `inptus` in layer `L`", "did you mean `inputs`?"),
    ("unknown state key", LAYER + "    states: {x: {shape: '[B]', start: zeros}}\n",
     SchemaErr, 4, 32, "unknown key `start` in state `x`", "`shape`, `init`"),
    ("unknown descend key", LAYER + "    descend: {x: {on: E, stpe: 0.1}}\n",
     SchemaErr, 4, 26, "unknown key `stpe` in the `descend` of `x`", "did you mean `step`?"),
    ("a merge key", LAYER + "    <<: {inputs: {a: '[B]'}}\n",
     SchemaErr, 4, 5, "unknown key `<<` in layer `L`", "merge keys"),
    ("inputs as a list", LAYER + "    inputs: [a, b]\n",
     SchemaErr, 4, 13, "`inputs` must be a mapping of name to shape, got a list", None),
    ("shape as a number", LAYER + "    inputs: {a: 10}\n",
     SchemaErr, 4, 17, 'the shape of input `a` must be a string such as "[B, 10]", got the number 10', None),
    ("shape missing", LAYER + "    inputs:\n      a:\n",
     SchemaErr, 5, 7, "the shape of input `a` is missing", '"[B, 10]"'),
    ("shape list with a float", LAYER + "    inputs: {a: [B, 1.5]}\n",
     SchemaErr, 4, 21, "a dimension of the shape of input `a` must be a name, an integer or arithmetic of them, got the number 1.5",
     None),
    ("param type not a string", LAYER + "    params: {fc: [Linear, 2]}\n",
     SchemaErr, 4, 18, "the type of param `fc` must be a string", None),
    ("missing fpi", "layers:\n  L: {}\n",
     SchemaErr, 1, 1, "missing key `fpi` at the top level", "`fpi: 1`"),
    ("missing layers", "# a comment\nfpi: 1\n",
     SchemaErr, 2, 1, "missing key `layers` at the top level", None),
    ("wrong fpi version", "fpi: 2\nlayers: {L: {}}\n",
     SchemaErr, 1, 6, "unsupported format version `fpi: 2`", "reads `fpi: 1`"),
    ("fpi version as a string", "fpi: '1'\nlayers: {L: {}}\n",
     SchemaErr, 1, 6, "`fpi` must be the format version 1, got the string \"1\"", None),
    ("no layers", "fpi: 1\nlayers: {}\n",
     SchemaErr, 2, 1, "`layers` is empty", None),
    ("layer not a mapping", "fpi: 1\nlayers:\n  L: [x]\n",
     SchemaErr, 3, 6, "layer `L` must be a mapping of sections", None),
    ("duplicate section", LAYER + "    inputs: {a: '[B]'}\n    inputs: {b: '[B]'}\n",
     SchemaErr, 5, 5, "duplicate key `inputs` (first at line 4, column 5)", "keep only the last"),
    ("duplicate name", LAYER + "    updates:\n      x: a\n      'x': b\n",
     SchemaErr, 6, 8, "duplicate key `x` (first at line 5, column 7)", None),
    ("duplicate layer", "fpi: 1\nlayers:\n  L: {}\n  L: {}\n",
     SchemaErr, 4, 3, "duplicate key `L`", None),
    ("python tag", "fpi: 1\nlayers:\n  L: !!python/object/apply:os.system ['ls']\n",
     SchemaErr, 3, 6, "the YAML tag `!!python/object/apply:os.system` is not allowed", "plain data"),
    ("python tag under an unknown key", "fpi: 1\nx: !!python/name:os.system ''\nlayers: {L: {}}\n",
     SchemaErr, 2, 4, "the YAML tag `!!python/name:os.system` is not allowed", None),
    ("custom tag", LAYER + "    consts: {k: !big 1}\n",
     SchemaErr, 4, 17, "the YAML tag `!big` is not allowed", None),
    ("binary tag", LAYER + "    consts: {k: !!binary aGk=}\n",
     SchemaErr, 4, 17, "the YAML tag `!!binary` is not allowed", None),
    ("YAML syntax: unclosed flow mapping", LAYER + "    inputs: {a: '[B]'\n",
     SyntaxErr, 5, 1, "invalid YAML: expected ',' or '}', but got '<stream end>'", "while parsing a flow mapping"),
    ("YAML syntax: bad indentation", "fpi: 1\nlayers:\n  L:\n    inputs: {}\n   states: {}\n",
     SyntaxErr, 5, 4, "invalid YAML:", None),
    ("YAML syntax: a tab", "fpi: 1\nlayers:\n\tL: {}\n",
     SyntaxErr, 3, 1, "found character '\\t' that cannot start any token", None),
    ("two documents", "fpi: 1\nlayers: {L: {}}\n---\nfpi: 1\n",
     SyntaxErr, 3, 1, "found another document", "expected a single document"),
    ("a control character", "fpi: 1\nlayers:\n  L: \x07\n",
     SyntaxErr, 3, 6, "the character U+0007 is not allowed", None),
    ("lets as a mapping", LAYER + "    lets: {h: x}\n",
     SchemaErr, 4, 11, "`lets` must be a list of one-key mappings `name: EXPR`, got a mapping", "lets are ordered"),
    ("lets item with two names", LAYER + "    lets:\n      - {h: x, g: h}\n",
     SchemaErr, 5, 9, "each item of `lets` must be one `name: EXPR`, got 2 entries", None),
    ("lets item a string", LAYER + "    lets: [h]\n",
     SchemaErr, 4, 12, 'each item of `lets` must be one `name: EXPR`, got the string "h"', None),
    ("descend missing step", LAYER + "    descend: {x: {on: E}}\n",
     SchemaErr, 4, 18, "the `descend` of `x` is missing `step`", "{on: E, step: 0.01}"),
    ("descend not a mapping", LAYER + "    descend: {x: E}\n",
     SchemaErr, 4, 18, "the `descend` of `x` must be a mapping {on: ENERGY, step: NUMBER}", None),
    ("descend on a number", LAYER + "    descend: {x: {on: 1, step: 0.1}}\n",
     SchemaErr, 4, 23, "`on` in the `descend` of `x` must name an energy, got the number 1", None),
    ("a non-mapping root", "- fpi: 1\n- layers: {}\n",
     SchemaErr, 1, 1, "a YAML spec must be a mapping with the keys `fpi` and `layers`, got a list", None),
    ("a string root", "just some words\n",
     SchemaErr, 1, 1, 'got the string "just some words"', None),
    ("empty document", "",
     SchemaErr, 1, 1, "the YAML document is empty", "`fpi: 1`"),
    ("only a comment", "# nothing here\n",
     SchemaErr, 1, 1, "the YAML document is empty", None),
    ("only a document marker", "---\n",
     SchemaErr, 1, 1, "the YAML document is empty", None),
    ("boolean init", LAYER + "    states: {x: {shape: '[B]', init: yes}}\n",
     SchemaErr, 4, 38, "`init` of state `x` must be an expression, got the boolean `yes`", 'quote it ("yes")'),
    ("boolean setting", LAYER + "    solve: {criterion: off}\n",
     SchemaErr, 4, 24, "`solve` setting `criterion` must be an expression, got the boolean `off`", None),
    ("init with no value", LAYER + "    states: {x: {shape: '[B]', init: }}\n",
     SchemaErr, 4, 32, "`init` of state `x` has no value", None),
    ("a YAML number the language does not write", LAYER + "    consts: {k: .inf}\n",
     SchemaErr, 4, 17, "const `k`: `.inf` is not a number the language accepts", "1e-6"),
    ("update as a list", LAYER + "    updates: {x: [a]}\n",
     SchemaErr, 4, 18, "update of state `x` must be an expression, got a list", None),
    ("keyword as a name", LAYER + "    lets: [{input: a}]\n",
     SchemaErr, 4, 13, "'input' is a keyword and cannot be used as a name", "rename it"),
    ("not an identifier", LAYER + "    inputs: {'my a': '[B]'}\n",
     SchemaErr, 4, 15, "`my a` is not a valid input name", "identifiers"),
    ("a list as a key", LAYER + "    inputs: {[a]: '[B]'}\n",
     SchemaErr, 4, 14, "input name must be a name, got a list", None),
    ("output an empty list", LAYER + "    output: []\n",
     SchemaErr, 4, 13, "`output` is an empty list", None),
    ("output a mapping", LAYER + "    output: {x: 1}\n",
     SchemaErr, 4, 13, "`output` must be an expression or a list of expressions, got a mapping", "[x, y]"),
    ("solve as a list", LAYER + "    solve: [tol]\n",
     SchemaErr, 4, 12, "`solve` must be a mapping of setting to value, got a list", None),
    ("fn without a parameter list", "fpi: 1\nfns: {sq: 'v * v'}\nlayers: {L: {}}\n",
     SchemaErr, 2, 7, "the function `sq` needs a parameter list", "`two()`"),
    ("fn head not closed", "fpi: 1\nfns: {'sq(v': 'v * v'}\nlayers: {L: {}}\n",
     SyntaxErr, 2, 12, "expected ')' or ','", None),
    ("expression syntax error", LAYER + "    updates: {x: 'relu(a'}\n",
     SyntaxErr, 4, 25, "unexpected end of input: expected ')'", "`(` is not closed"),
    ("string literal in an expression", LAYER + "    updates: {x: f('a')}\n",
     SyntaxErr, 4, 20, "string literals in single quotes (or spanning lines) are not part of the language", None),
    ("recursive alias", "fpi: 1\nlayers: &a\n  L: *a\n",
     SchemaErr, 2, 9, "a YAML alias refers to a node that contains it", "recursive anchors"),
    ("alias bomb", "fpi: 1\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef"))
     + "layers: {L: {}}\n",
     SchemaErr, 6, 4, f"more than {MAX_EXPANDED_NODES:,} values", None),
    ("nested too deeply", "fpi: 1\nlayers: " + "[" * 3000 + "\n",
     LimitErr, 2, 109, "nested more than 100 levels", None),
    # a core tag given explicitly would only disagree with the value read from the text (`!!float 1` is the int 1)
    ("an explicit core tag", LAYER + "    consts: {k: !!float 1}\n",
     SchemaErr, 4, 17, "the YAML tag `!!float` is not allowed", "without a tag"),
    ("an explicit str tag behind an anchor", LAYER + "    updates:\n      x: &u !!str relu(a)\n",
     SchemaErr, 5, 10, "the YAML tag `!!str` is not allowed", None),
    ("the non-specific tag", LAYER + "    updates: {x: ! a}\n",
     SchemaErr, 4, 18, "the YAML tag `!` is not allowed", None),
    # YAML 1.1 reads a leading 0 as octal: 010 is 8 there and 10 in the expression syntax
    ("an octal setting", LAYER + "    solve: {m: 010}\n",
     SchemaErr, 4, 16, "`solve` setting `m`: YAML reads `010` as the octal number 8, the expression syntax as 10",
     '("010")'),
    ("a negative octal const", LAYER + "    consts: {k: -0_17}\n",
     SchemaErr, 4, 17, "YAML reads `-0_17` as the octal number -15, the expression syntax as -17", None),
    ("an octal dimension", LAYER + "    inputs: {a: [B, 010]}\n",
     SchemaErr, 4, 21, "a dimension of the shape of input `a`: YAML reads `010` as the octal number 8", None),
    # YAML folds the lines of these scalars into one: the comment would swallow `+ a`
    ("a comment in a folded block", LAYER + "    updates:\n      x: >\n        relu(a)  # act\n        + a\n",
     SyntaxErr, 6, 18, "this `#` starts a comment that would hide `+ a`", "literal block"),
    ("a comment in a quoted value over two lines", LAYER + '    updates:\n      x: "relu(a) # act\n        + a"\n',
     SyntaxErr, 5, 19, "would hide `+ a`", None),
    ("a comment in a plain value over two lines", LAYER + "    updates:\n      x: relu(a)#act\n        - a\n",
     SyntaxErr, 5, 17, "would hide `- a`", None),
]


@pytest.mark.parametrize("text, kind, line, col, message, hint",
                         [case[1:] for case in BAD_SPECS], ids=[case[0] for case in BAD_SPECS])
def test_malformed_yaml(text, kind, line, col, message, hint):
    with pytest.raises(FpiError) as info:
        parse_yaml(Source("bad.yaml", text))
    error = info.value
    assert type(error) is kind, error
    assert (error.span.path, error.span.line, error.span.col) == ("bad.yaml", line, col), str(error)
    assert message in error.message
    if hint is not None:
        assert error.hint is not None and hint in error.hint, error.hint


def test_the_malformed_table_is_large_and_distinct():
    assert len(BAD_SPECS) >= 15
    assert len({case[1] for case in BAD_SPECS}) == len(BAD_SPECS)


def test_what_yaml_reads_alike_is_accepted():
    """Each of these reads the same in YAML and in the expression syntax, so it is not refused: a leading zero with
    the same value both ways, a quoted number, a comment kept on its line by a literal block or at a folded block's
    end, a comment with a quote doubled in a single-quoted value."""
    spec = from_yaml("""
        fpi: 1
        layers:
          L:
            consts: {k: 007, n: "010", f: 010.5}
            updates:
              x: |
                relu(a)  # act
                + a
              y: >
                relu(a)
                + a  # the end
              z: 'relu(a) # it''s'
        """)
    k, n, f, x, y, z = spec.layers[0].decls
    assert (k.value.value, n.value.value, f.value.value) == (7, 10, 10.5)
    same = strip_spans(parse_fpi(Source("t.fpi", "layer L { let v = relu(a) + a }")).layers[0].decls[0].value)
    assert strip_spans(x.value) == strip_spans(y.value) == same
    assert strip_spans(z.value) == strip_spans(parse_fpi(Source("t.fpi", "layer L { let v = relu(a) }")).layers[0]
                                               .decls[0].value)


def test_nothing_is_constructed_from_tags(tmp_path):
    marker = tmp_path / "ran"
    text = f"fpi: 1\nlayers:\n  L: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(SchemaErr):
        parse_yaml(Source("bad.yaml", text))
    assert not marker.exists()


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("path", ["t.fpi", "dir.v2/t.FPI"])
def test_parse_source_reads_fpi(path):
    spec = parse_source(Source(path, "layer L { input a : [B] }\n"))
    assert spec.layers[0].name == "L" and spec.path == path


@pytest.mark.parametrize("path", ["t.yaml", "t.yml", "T.YAML"])
def test_parse_source_reads_yaml(path):
    spec = parse_source(Source(path, "fpi: 1\nlayers: {L: {inputs: {a: '[B]'}}}\n"))
    assert spec.layers[0].name == "L" and spec.layers[0].decls[0].name_span.path == path


@pytest.mark.parametrize("path, found", [("t.txt", "`.txt`"), ("spec", "no extension"), ("t.fpi.bak", "`.bak`")])
def test_parse_source_refuses_other_extensions(path, found):
    with pytest.raises(InputError) as info:
        parse_source(Source(path, "layer L { }\n"))
    error = info.value
    assert (error.span.path, error.span.line, error.span.col) == (path, 1, 1)
    assert ".fpi, .yaml, .yml" in error.message and found in error.message


# --------------------------------------------------------------------------- strip_spans


def test_strip_spans_ignores_places_and_spelling_but_not_values():
    a = from_fpi("layer L { const k = 1e-6 }")
    b = parse_fpi(Source("other.fpi", "\n\nlayer L {\n  const k = 0.000001\n}\n"))
    assert strip_spans(a) == strip_spans(b)
    assert strip_spans(a, keep_text=True) != strip_spans(b, keep_text=True)
    assert strip_spans(from_fpi("layer L { const k = 1 }")) != strip_spans(from_fpi("layer L { const k = 1.0 }"))
    assert strip_spans(from_fpi("layer L { let k = a }")) != strip_spans(from_fpi("layer L { let k = b }"))
    stripped = strip_spans(a)
    assert stripped["node"] == "SpecFile" and "span" not in stripped and "path" not in stripped
    assert "name_span" not in stripped["layers"][0]["decls"][0]
    with pytest.raises(TypeError):
        strip_spans(a.span)
