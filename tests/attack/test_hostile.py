"""The standing attack, hand-written half: a table of hostile specs, each with its expected outcome (an fpidsl
error of a kind at line:col, or a clean check, or a clean check that also compiles, loads and runs forward and
backward), each run in its own process under a 5 s and 500 MB bound (tests/attack/sandbox.py)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.attack.sandbox import Sandbox

pytestmark = pytest.mark.slow  # subprocesses or long runs: not in `pytest -m "not slow"`

H = "layer L {\n  input a : [B, 3]\n  state x : [B, 3] = zeros\n"


def fpi(body: str) -> str:
    return H + body + "}\n"


def yaml_layer(updates: str, extra: str = "") -> str:
    return ('fpi: 1\nlayers:\n  L:\n    inputs: {a: "[B, 3]"}\n    states: {x: "[B, 3]"}\n' + extra
            + f'    updates: {{x: "{updates}"}}\n')


def chain_of_lets(n: int) -> str:
    return fpi("  let l0 = x\n" + "".join(f"  let l{i + 1} = 0.5 * l{i}\n" for i in range(n))
               + f"  update x = l{n} + a\n")


def chain_of_fns(n: int) -> str:
    return ("fn f0(v) = v\n" + "".join(f"fn f{i + 1}(v) = 0.9 * f{i}(v)\n" for i in range(n))
            + fpi(f"  update x = 0.5 * f{n}(x) + a\n"))


def billion_laughs() -> str:
    lines = ["fpi: 1", 'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines += ["layers: {}"]
    return "\n".join(lines) + "\n"


def alias_of_long_text() -> str:
    e = " + ".join(["tanh(a)"] * 500)
    lets = [f'    - {{l0: &e "{e}"}}', *(f"    - {{l{i}: *e}}" for i in range(1, 2000))]
    return yaml_layer("0.001 * x + l1", "    lets:\n" + "\n".join(lets) + "\n")


def big_spec() -> str:
    """About 300 KB of lets: a large spec must check in seconds."""
    return chain_of_lets(9000)


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    expect: str  # "run", "clean" or "KIND LINE:COL"
    path: str = "t.fpi"
    seconds: float = 5.0  # CPU seconds


CASES = [
    # point 3: built-ins on numbers only
    Case("builtin on a number", fpi("  update x = tanh(0.5) * x + a\n"), "run"),
    Case("builtin on numbers in YAML", yaml_layer("exp(0 - 1) * x + a"), "run", "t.yaml"),
    Case("fn of numbers only", "fn f(v) = sigmoid(v)\n" + fpi("  update x = f(0.5) * x + a\n"), "run"),
    Case("reduction of a number", fpi("  update x = 0.5 * x + sum(0.5) * a\n"), "type 4:28"),
    # point 5: numbers out of range
    Case("integer of 2**63", fpi("  const k = 9223372036854775808\n  update x = 0.5 * x + k * a\n"), "type 4:13"),
    Case("integer of 5000 digits", fpi("  const k = " + "9" * 5000 + "\n  update x = 0.5 * x + a\n"), "type 4:13"),
    Case("infinite const", fpi("  const lam = 1e999\n  update x = 0.5 * x + lam * a\n"), "type 4:15"),
    Case("infinite param init", fpi("  param w : tensor [3] = 1e999\n  update x = 0.5 * x + w * a\n"), "type 4:26"),
    Case("infinite YAML const", yaml_layer("0.5 * x + k * a", "    consts: {k: 1e999}\n"), "type 6:17", "t.yaml"),
    Case("const overflow by product", fpi("  const k = 1e300 * 1e300\n  update x = 0.5 * x + k * a\n"), "type 4:13"),
    # point 7: recursion
    Case("243 nested calls", fpi("  update x = 0.5 * " + "tanh(" * 243 + "x" + ")" * 243 + " + a\n"), "run"),
    Case("486-term sum", fpi("  update x = 0.001 * x + " + " + ".join(["a"] * 486) + "\n"), "run"),
    Case("141 chained lets", chain_of_lets(141), "run"),
    Case("196 chained fns", chain_of_fns(196), "run"),
    # 5000 levels through check, compile, load and a forward and backward run (emission takes its time)
    Case("5000 nested calls", fpi("  update x = 0.5 * " + "tanh(" * 5000 + "x" + ")" * 5000 + " + a\n"), "run",
         seconds=15),
    Case("5000 chained lets", chain_of_lets(5000), "run", seconds=15),
    Case("5000 lets chained backwards", fpi("".join(f"  let l{i} = 0.5 * l{i + 1}\n" for i in range(5000))
                                            + "  let l5000 = x\n  update x = l0 + a\n"), "clean"),
    Case("5000 chained fns", chain_of_fns(5000), "clean"),
    Case("5000-term sum", fpi("  update x = 0.001 * x + " + " + ".join(["a"] * 5000) + "\n"), "clean"),
    Case("nesting past the limit", fpi("  update x = " + "-" * 10001 + "x\n"), "limit 4:10014"),
    Case("20000 parentheses", fpi("  update x = 0.5 * " + "(" * 20000 + "x" + ")" * 20000 + " + a\n"), "clean"),
    # point 8: denial of service
    Case("power tower", fpi("  const k = 2 ** 2 ** 40\n  update x = 0.5 * x + a\n"), "type 4:13"),
    Case("power of a float", fpi("  const k = 1.5 ** 1e18\n  update x = 0.5 * x + a\n"), "type 4:13"),
    Case("billion laughs", billion_laughs(), "schema 6:5", "t.yaml"),
    Case("alias of a long text", alias_of_long_text(), "schema 7:5", "t.yaml"),
    Case("YAML lists nested 200000 deep", "fpi: 1\nlayers: " + "[" * 200000 + "]" * 200000 + "\n", "limit 2:109",
         "t.yaml"),
    Case("YAML quoted brackets", yaml_layer("0.5 * x + a", "    consts: {k: '" + "[" * 300 + "' }\n"),
         "syntax 6:318", "t.yaml"),  # brackets in a quoted scalar are not YAML nesting
    Case("a large spec", big_spec(), "clean"),
    # point 10: line ends and odd characters
    Case("CR line ends", "layer L {\r  input a : [B, 3]\r  state x : [B, 3] = zeros\r  update x = 0.5 * x + q\r}\r",
         "name 4:24"),
    Case("form feed in a comment", fpi("  # one\x0ctwo\n  update x = 0.5 * x + q\n"), "name 5:24"),
    Case("line separator in a comment", fpi("  # one\u2028two\x85three\n  update x = 0.5 * x + q\n"), "name 5:24"),
    Case("terminal escapes", fpi("  update x = 0.5 * x + q # \x1b[2J\x1b]0;pwned\x07\n"), "name 4:24"),
    Case("Bengali digit", "layer L {\n  input a : [B, \u09ea]\n  state x : [B, 4]\n  update x = 0.5 * x\n}\n",
         "syntax 2:17"),
    Case("fullwidth digit", fpi("  update x = \uff13 * x + a\n"), "syntax 4:14"),
    Case("NUL byte", fpi("  update x = 0.5 * x + a\x00\n"), "syntax 4:25"),
    Case("right-to-left override", fpi("  update x = 0.5 * x + a \u202e\n"), "syntax 4:26"),
]


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_spec(case, sandbox):
    outcome = sandbox.run(case.path, case.text, run=case.expect == "run", seconds=case.seconds)
    assert outcome.status not in ("crash", "timeout", "memory", "died"), (outcome.status, outcome.detail)
    if case.expect in ("run", "clean"):
        assert outcome.status == "clean", outcome.errors
    else:
        kind, where = case.expect.split()
        line, col = map(int, where.split(":"))
        assert outcome.status == "errors" and outcome.errors[0][:3] == (kind, line, col), outcome.errors
    assert outcome.seconds < case.seconds and outcome.added_mb < 500  # CPU seconds, resident MB added


def test_the_sandbox_catches_what_it_bounds(sandbox):
    """The bounds themselves: a case over time is a timeout, a case over memory is refused."""
    outcome = sandbox.run("t.fpi", fpi("  update x = 0.5 * x + a\n"), seconds=0.001)
    assert outcome.status in ("timeout", "clean")
    huge = sandbox.run("t.fpi", chain_of_lets(5000), run=True, memory_mb=50, seconds=30)  # adds about 120 MB
    assert huge.status == "memory" and huge.added_mb > 50
