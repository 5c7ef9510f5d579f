"""`fpidsl trace`'s wrong usage that fails only when the example is made: exit status 2 with what to change, not
an internal error (exit 3, "a bug in fpidsl")."""
from __future__ import annotations

import pytest

from fpidsl.cli import main


def test_an_example_too_large_to_make_is_wrong_usage(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text("def damped(x):\n    return 0.5 * x\n")
    # 10**20 numbers: more than any machine holds (torch refuses the size before allocating anything)
    assert main(["trace", f"{model}:damped", "--shape", "x=10000000000,10000000000"]) == 2
    err = capsys.readouterr().err
    assert err == ("fpidsl: error: --shape x=10000000000,10000000000: cannot make an example of "
                   "100,000,000,000,000,000,000 numbers (400,000,000,000,000,000,000 bytes) on this machine\n")


def test_a_map_that_returns_integers_cannot_be_traced(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text("def rounds(x):\n    return x.long()\n")
    assert main(["trace", f"{model}:rounds", "--shape", "x=2,3"]) == 1
    err = capsys.readouterr().err
    assert err == (f"fpidsl: error: cannot trace {model}:rounds: the map returns [2, 3] (int64) for a state of "
                   "[2, 3] (float32): it must return the new state (its structure and shapes, in floating point)\n")


MAP = "import torch\ndef g(x, z, s=1.0):\n    return torch.tanh(0.5 * x + z) * s\n"


@pytest.fixture
def g(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(MAP)
    return model


def test_a_target_that_is_not_a_python_file_is_wrong_usage(tmp_path, capsys):
    spec = tmp_path / "ok.fpi"  # a file Python has no importer for: spec_from_file_location gives None
    spec.write_text("layer L {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * x + a\n}\n")
    assert main(["trace", f"{spec}:L", "--shape", "x=2,3"]) == 2
    assert capsys.readouterr().err == f"fpidsl: error: {spec}: not a Python file (expected FILE.py:NAME)\n"


@pytest.mark.parametrize("literal", ["{[]: 1}", "{{}}", "-" * 100_000 + "1"])  # unhashable keys; too deep to parse
def test_a_value_that_is_no_literal_is_wrong_usage(g, capsys, literal):
    assert main(["trace", f"{g}:g", "--shape", "x=2,3", "--shape", "z=2,3", "--value", f"s={literal}"]) == 2
    assert capsys.readouterr().err == (f"fpidsl: error: --value s={literal}: not a Python literal "
                                       "(a number, a string in quotes, a list ...)\n")


def test_a_size_past_64_bits_is_wrong_usage(g, capsys):
    assert main(["trace", f"{g}:g", "--shape", "x=9223372036854775808,3", "--shape", "z=2,3"]) == 2
    assert capsys.readouterr().err == ("fpidsl: error: --shape x=9223372036854775808,3: a size is at most "
                                       "9,223,372,036,854,775,807\n")
    # the largest size is one torch can be asked for: it refuses the example, not the command line
    assert main(["trace", f"{g}:g", "--shape", "x=9223372036854775807,3", "--shape", "z=2,3"]) == 2
    assert "--shape x=9223372036854775807,3: cannot make an example of " in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**64), str(-(2**63) - 1)])
def test_a_seed_past_64_bits_is_wrong_usage(g, capsys, seed):
    assert main(["trace", f"{g}:g", "--shape", "x=2,3", "--shape", "z=2,3", "--seed", seed]) == 2
    assert capsys.readouterr().err == (f"fpidsl: error: --seed {seed}: a seed is an integer from "
                                       "-9,223,372,036,854,775,808 to 18,446,744,073,709,551,615 (64 bits)\n")
    for extreme in (2**64 - 1, -(2**63)):  # the ends of the range are taken
        assert main(["trace", f"{g}:g", "--shape", "x=2,3", "--shape", "z=2,3", "--seed", str(extreme)]) == 0
        assert "layer g {" in capsys.readouterr().out


def test_a_name_given_both_a_shape_and_a_value_is_wrong_usage(g, capsys):
    assert main(["trace", f"{g}:g", "--shape", "x=2,3", "--shape", "z=2,3", "--value", "z=3"]) == 2
    assert capsys.readouterr().err == ("fpidsl: error: z is given both --shape (a tensor) and --value "
                                       "(a non-tensor): give one\n")


def test_a_map_that_fails_on_the_example_says_why_and_where_without_a_traceback(g, capsys):
    assert main(["trace", f"{g}:g", "--shape", "x=2,3", "--shape", "z=2,4"]) == 1
    err = capsys.readouterr().err
    # torch.fx's "While executing %add ...", "Original traceback: File ..." and tlparse lines are left out; the
    # line of the traced file that failed is kept
    assert err == (f"fpidsl: error: cannot trace {g}:g: the traced graph fails on the example (RuntimeError: The "
                   "size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1) "
                   f"at {g}:3, in g\n")


def test_the_fx_traceback_is_cut_from_a_message():
    from fpidsl.tools.trace_command import _without_fx_traceback

    message = ("the traced graph fails on the example (RuntimeError: bad (3)\n\nWhile executing %add : ...\n"
               "Original traceback:\nFile \"/elsewhere/a.py\", line 8, in <module>\n    main()\n"
               "Use tlparse to see full graph. (https://github.com/pytorch/tlparse))")
    assert _without_fx_traceback(message, "/nowhere/model.py") == \
        "the traced graph fails on the example (RuntimeError: bad (3))"
    assert _without_fx_traceback("no traceback (here)", "model.py") == "no traceback (here)"
