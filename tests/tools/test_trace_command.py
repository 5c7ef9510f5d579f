"""`fpidsl trace`'s wrong usage that fails only when the example is made: exit status 2 with what to change, not
an internal error (exit 3, "a bug in fpidsl")."""
from __future__ import annotations

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
