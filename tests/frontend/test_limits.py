"""Issue 16, the front half: numbers out of range, built-ins on numbers, nesting and chain limits, YAML alias
expansion, line ends and unprintable text. Every bad input is checked for its kind, line and column."""
from __future__ import annotations

import math
import time

import pytest

from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors, as_list, printable, render
from fpidsl.frontend import numbers
from fpidsl.limits import MAX_NESTING, run_deep
from fpidsl.frontend.read import decode_source
from fpidsl.source import Source

HEAD = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n"


def errors(text: str, path: str = "t.fpi") -> list[tuple[str, int, int]]:
    try:
        check_source(Source(path, text))
    except (FpiError, FpiErrors) as exc:
        return [(e.kind, e.span.line, e.span.col) for e in as_list(exc)]
    return []


def first_error(text: str, path: str = "t.fpi") -> FpiError:
    try:
        check_source(Source(path, text))
    except (FpiError, FpiErrors) as exc:
        return as_list(exc)[0]
    raise AssertionError("the spec checked clean")


def layer(body: str) -> str:
    return HEAD + body + "}\n"


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("body, line, col, words", [
    ("  const k = 9223372036854775808\n  update x = 0.5 * x + k * a\n", 4, 13, "does not fit in 64 bits"),
    ("  const k = " + "9" * 5000 + "\n  update x = 0.5 * x + a\n", 4, 13, "does not fit in 64 bits"),
    ("  const lam = 1e999\n  update x = 0.5 * x + lam * a\n", 4, 15, "infinity"),
    ("  param w : tensor [3] = 1e999\n  update x = 0.5 * x + w * a\n", 4, 26, "infinity"),
    ("  update x = 0.5 * x + 1e999 * a\n", 4, 24, "infinity"),
    ("  const k = 2 ** 2 ** 40\n  update x = 0.5 * x + a\n", 4, 13, "does not fit in 64 bits"),
    ("  const k = 3037000500 * 3037000500\n  update x = 0.5 * x + a\n", 4, 13, "does not fit in 64 bits"),
    ("  const k = 1e300 * 1e300\n  update x = 0.5 * x + k * a\n", 4, 13, "infinity"),
    ("  const k = 2.0 ** 5000\n  update x = 0.5 * x + k * a\n", 4, 13, "overflows"),
    ("  const k = log(0)\n  update x = 0.5 * x + k * a\n", 4, 13, "log"),
    ("  const k = exp(1000)\n  update x = 0.5 * x + k * a\n", 4, 13, "overflows"),
    ("  update x = 0.5 * x + softplus(0, beta=0) * a\n", 4, 24, "not a finite number"),
    ("  state y : [B, 3] = 1e999\n  update y = y\n  update x = 0.5 * x + a\n", 4, 22, "infinity"),
    ("  update x = 0.5 * x + 1e-400 * a\n", 4, 24, "the number 1e-400 is too small: as a float it is 0"),
    ("  const c = (-2) ** 0.5\n  update x = 0.5 * x + c * a\n", 4, 13, "(-2) ** 0.5 is not a real number"),
])
def test_numbers_out_of_range_are_refused_where_written(body, line, col, words):
    error = first_error(layer(body))
    assert (error.kind, error.span.line, error.span.col) == ("type", line, col), render(error)
    assert words in error.message


def test_the_largest_integer_and_float_are_accepted():
    assert errors(layer("  const k = 9223372036854775807\n  const f = 1.7e308\n  update x = 0.5 * x + a\n")) == []
    assert errors(layer("  const z = 0.0e-400\n  const t = 5e-324\n  update x = 0.5 * x + (z + t) * a\n")) == []


@pytest.mark.parametrize("text", ["[B, \u09ea]", "[B, \uff13]", "[B, 3\u0663]"])
def test_non_ascii_digits_are_not_numbers(text):
    kinds = errors(f"layer L {{\n  input a : {text}\n  state x : [B, 3] = zeros\n  update x = 0.5 * x\n}}\n")
    assert kinds and kinds[0][:2] == ("syntax", 2) and kinds[0][2] >= 15


def test_non_ascii_digits_in_expressions_are_refused():
    assert errors(layer("  update x = \u0663 * x + a\n")) == [("syntax", 4, 14)]


def test_numbers_module_limits():
    assert numbers.literal("1_000") == 1000
    assert numbers.power(2, 62) == 2**62
    assert numbers.power(-2, 63) == -(2**63)
    with pytest.raises(numbers.OutOfRange):
        numbers.power(-2, 64)
    with pytest.raises(numbers.OutOfRange):
        numbers.power(2, 63)
    with pytest.raises(numbers.OutOfRange):
        numbers.power(10, 10**18)  # refused before it is computed
    with pytest.raises(numbers.OutOfRange):
        numbers.checked(math.inf)


# --------------------------------------------------------------------------- built-ins on numbers


@pytest.mark.parametrize("name, args, expected", [
    ("tanh", "0.5", math.tanh(0.5)),
    ("exp", "0 - 1", math.exp(-1)),
    ("sigmoid", "-800", 0.0),
    ("softplus", "2, beta=3", math.log1p(math.exp(6)) / 3),
    ("softplus", "30", 30.0),
    ("clamp", "5, lo=0, hi=1", 1.0),
    ("leaky_relu", "-2, slope=0.1", -0.2),
    ("elu", "-1", math.expm1(-1)),
    ("maximum", "2, 3", 3.0),
])
def test_builtins_on_numbers_fold_to_a_const(name, args, expected):
    checked = check_source(Source("t.fpi", layer(f"  const k = {name}({args})\n  update x = k * x + a\n")))
    graph = checked.graphs["L"]
    values = [graph.node(n)["value"] for n in graph.nodes() if graph.node(n)["op"] == "const"]
    assert any(math.isclose(v, expected, rel_tol=1e-15, abs_tol=1e-300) for v in values), values


def test_fold_matches_torch():
    import torch

    x = torch.tensor([-3.0, -0.5, 0.0, 0.7, 25.0], dtype=torch.float64)
    F = torch.nn.functional
    pairs = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": F.softplus,
             "elu": F.elu, "exp": torch.exp, "square": torch.square, "abs": torch.abs, "sin": torch.sin,
             "cos": torch.cos, "leaky_relu": F.leaky_relu}
    for name, fn in pairs.items():
        for value, reference in zip(x.tolist(), fn(x).tolist()):
            assert math.isclose(numbers.fold(name, {"x": value}), reference, rel_tol=1e-14, abs_tol=1e-15), name


@pytest.mark.parametrize("body, line, col", [
    ("  update x = 0.5 * x + sum(0.5) * a\n", 4, 28),
    ("  update x = 0.5 * x + softmax(1, dim=0) * a\n", 4, 32),
    ("  param fc : Linear(3, 3)\n  update x = 0.5 * x + fc(2) * a\n", 5, 27),
])
def test_builtins_that_need_a_tensor_refuse_numbers_at_check(body, line, col):
    assert errors(layer(body))[0] == ("type", line, col)


def test_yaml_builtin_on_numbers_checks_and_folds():
    text = ('fpi: 1\nlayers:\n  L:\n    inputs: {a: "[B, 3]"}\n    states: {x: "[B, 3]"}\n'
            '    updates: {x: "exp(0 - 1) * x + a"}\n')
    graph = check_source(Source("t.yaml", text)).graphs["L"]
    values = [graph.node(n)["value"] for n in graph.nodes() if graph.node(n)["op"] == "const"]
    assert any(math.isclose(v, math.exp(-1)) for v in values)


# --------------------------------------------------------------------------- nesting and chains


@pytest.mark.slow
def test_nesting_up_to_the_limit_checks_and_beyond_is_a_positioned_error():
    deep = layer("  update x = 0.5 * " + "tanh(" * 5000 + "x" + ")" * 5000 + " + a\n")
    assert errors(deep) == []
    over = layer("  update x = " + "-" * (MAX_NESTING + 1) + "x\n")
    assert errors(over) == [("limit", 4, 14 + MAX_NESTING)]


# chains of 5000 lets and fns, and sums of 5000 terms, are in the hostile table (tests/attack/test_hostile.py)


@pytest.mark.slow
def test_a_chain_too_deep_is_a_positioned_error(monkeypatch):
    from fpidsl.passes import build_graph

    monkeypatch.setattr(build_graph, "MAX_BUILD_DEPTH", 60)  # the mechanism, on a small chain
    e = "0.5 * (0.5 * (0.5 * (0.5 * (0.5 * ({}))))) "
    fns = "fn f0(v) = v\n" + "".join(f"fn f{i + 1}(v) = {e.format(f'f{i}(v)')}\n" for i in range(30))
    found = errors(fns + layer("  update x = 0.5 * f30(x) + a\n"))
    assert found == [("limit", 22, 27)]
    assert errors(fns + layer("  update x = 0.5 * f8(x) + a\n")) == []  # 9 fns of 6 levels: within 60


def test_run_deep_is_reentrant_and_reraises():
    assert run_deep(lambda: run_deep(lambda: 7)) == 7
    with pytest.raises(KeyError):
        run_deep(lambda: {}["missing"])


# --------------------------------------------------------------------------- YAML expansion


def test_yaml_alias_expansion_is_bounded_in_characters():
    e = " + ".join(["tanh(a)"] * 500)
    lines = ["fpi: 1", "layers:", "  L:", '    inputs: {a: "[B, 3]"}', '    states: {x: "[B, 3]"}', "    lets:",
             f'    - {{l0: &e "{e}"}}', *(f"    - {{l{i}: *e}}" for i in range(1, 2000)),
             '    updates: {x: "0.001 * x + l1"}']
    start = time.perf_counter()
    found = errors("\n".join(lines) + "\n", "t.yaml")
    assert time.perf_counter() - start < 5
    assert found == [("schema", 7, 5)]


# --------------------------------------------------------------------------- line ends and unprintable text


def test_carriage_return_line_ends_give_true_positions():
    text = "layer L {\r  input a : [B, 3]\r  state x : [B, 3] = zeros\r  update x = 0.5 * x + q\r}\r"
    assert errors(text) == [("name", 4, 24)]
    assert errors(text.replace("\r", "\r\n")) == [("name", 4, 24)]
    source = decode_source("t.fpi", text.encode())
    assert source.line(4) == "  update x = 0.5 * x + q"


@pytest.mark.parametrize("odd", ["\x0c", "\u2028", "\x85", "\u2029", "\x0b"])
def test_odd_characters_in_comments_do_not_shift_the_shown_line(odd):
    text = f"layer L {{\n  input a : [B, 3] # one{odd}two\n  state x : [B, 3] = zeros\n  update x = 0.5 * x + q\n}}\n"
    error = first_error(text)
    assert (error.kind, error.span.line, error.span.col) == ("name", 4, 24)
    shown = render(error, Source("t.fpi", text)).splitlines()
    assert shown[1] == "    4 |   update x = 0.5 * x + q"
    assert shown[2].index("^") == shown[1].index("q")


def test_yaml_lines_are_counted_as_pyyaml_counts_them():
    text = ('fpi: 1 # a\u2028# b\nlayers:\n  L:\n    inputs: {a: "[B, 3]"}\n    states: {x: "[B, 3]"}\n'
            '    updates: {x: "0.5 * x + q"}\n')
    error = first_error(text, "t.yaml")
    source = Source("t.yaml", text)
    assert source.line(error.span.line).strip().startswith("updates")
    assert source.line(error.span.line)[error.span.col - 1] == "q"


def test_terminal_escapes_are_not_echoed_raw():
    text = layer("  update x = 0.5 * x + q # \x1b[31mred\x1b]0;title\x07\n")
    error = first_error(text)
    shown = render(error, Source("t.fpi", text))
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b[31mred" in shown
    caret = shown.splitlines()[2]
    assert caret.index("^") == shown.splitlines()[1].index("q")


def test_carets_stay_under_their_text_after_escaped_characters():
    text = layer("  let z = \x1b + q\n  update x = x\n")
    error = first_error(text)
    lines = render(error, Source("t.fpi", text)).splitlines()
    assert lines[1][lines[2].index("^")] == "\\"  # the escape's first character, where the bad one is
    assert printable("a\u202eb\udcff") == "a\\u202eb\\udcff"


def test_a_long_line_is_shown_around_the_error():
    text = layer("  update x = 0.001 * x + " + " + ".join(["a"] * 3000) + " + q + a\n")
    error = first_error(text)
    assert (error.kind, error.span.line, error.span.col) == ("name", 4, 26 + 4 * 3000)
    shown = render(error, Source("t.fpi", text)).splitlines()
    assert len(shown[1]) < 200 and shown[1].startswith("    4 | ...") and shown[1].endswith(" + q + a")
    assert shown[1][shown[2].index("^")] == "q"


@pytest.mark.parametrize("dim", ["9" * 5000, "99999999999999999999"])
def test_yaml_list_dimensions_out_of_range(dim):
    text = (f'fpi: 1\nlayers:\n  L:\n    inputs: {{a: [B, {dim}]}}\n    states: {{x: "[B, 3]"}}\n'
            '    updates: {x: "x"}\n')
    assert errors(text, "t.yaml") == [("type", 4, 21)]


@pytest.mark.parametrize("decl, line, col", [
    ("  param w : tensor [3000000, 3000000, 300000] = zeros\n", 4, 20),
    ("  param fc : Linear(100000, 100000)\n", 4, 14),
])
def test_parameters_too_large_to_allocate_are_refused_at_check(decl, line, col):
    found = errors(layer(decl + "  update x = 0.5 * x + a\n"))
    assert found == [("limit", line, col)]
