"""``fpidsl trace FILE.py:NAME``: a PyTorch map written as a .fpi spec that checks and compiles to the same layer."""
from __future__ import annotations

import textwrap

import pytest
import torch

import fpidsl
from fpidsl.cli import main

MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Cell(nn.Module):
        def __init__(self, width=16, scale=0.5):
            super().__init__()
            self.fc = nn.Linear(width, width)
            self.inj = nn.Linear(width, width, bias=False)
            self.scale = scale

        def forward(self, x, z, gain=1.0):
            h = self.fc(x).view(x.shape[0], 2, -1).flatten(1)
            return self.scale * torch.tanh(h + gain * self.inj(z))

    def damped(x, a):
        return 0.5 * torch.sigmoid(x) + a

    def cumulative(x):
        return 0.1 * torch.cumsum(x, dim=1)

    def branching(x):
        if x.sum() > 0:
            return 0.5 * x
        return x
""")


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return path


def test_trace_writes_a_spec_that_checks_and_compiles_to_the_same_layer(model, tmp_path, capsys):
    out = tmp_path / "cell.fpi"
    args = [f"{model}:Cell", "--init", "width=8", "--init", "scale=0.25", "--shape", "x=4,8", "--shape", "z=4,8",
            "--value", "gain=2.0", "--dtype", "float64", "-o", str(out)]
    assert main(["trace", *args]) == 0
    text = out.read_text()
    assert text.startswith(f"# Traced from {model}:Cell (x=4,8 z=4,8) by fpidsl trace")
    assert "param fc : Linear(8, 8)" in text and "state x : [B, 8]" in text and "2.0 * " in text
    assert main(["check", str(out)]) == 0
    Written = fpidsl.load(str(out))
    namespace: dict = {}
    exec(compile(MODEL, str(model), "exec"), namespace)
    torch.manual_seed(0)
    cell = namespace["Cell"](width=8, scale=0.25).double()
    Traced = fpidsl.trace(cell, torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), 2.0)
    layer = Traced.from_module(cell)
    written = Written().double()
    written.load_state_dict(layer.state_dict())
    z = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(written(z), layer(z), rtol=0, atol=0)


def test_trace_of_a_function_to_stdout(model, capsys):
    assert main(["trace", f"{model}:damped", "--shape", "x=2,3", "--shape", "a=2,3"]) == 0
    out = capsys.readouterr().out
    assert "layer damped {" in out and "input a : [B, 3]" in out and "sigmoid(x)" in out


@pytest.mark.parametrize("argv, message", [
    (["{model}"], "expected FILE.py:NAME"),
    (["{model}:Nothing", "--shape", "x=2,3"], "has no Nothing"),
    (["missing.py:Cell"], "missing.py: no such file"),
    (["{model}:Cell", "--shape", "x=2,a"], "expected positive sizes"),
    (["{model}:Cell", "--shape", "y=2,3"], "takes no argument y"),
    (["{model}:Cell", "--shape", "x=2,16"], "give the argument z"),
    (["{model}:Cell", "--init", "width=oops", "--shape", "x=2,16"], "not a Python literal"),
    (["{model}:damped", "--init", "k=1", "--shape", "x=2,3"], "--init is for a module class"),
])
def test_wrong_usage_is_exit_status_2(model, capsys, argv, message):
    assert main(["trace", *(a.format(model=model) for a in argv)]) == 2
    assert message in capsys.readouterr().err


def test_an_operation_with_no_primitive_is_an_extern_of_the_written_spec(model, tmp_path, capsys):
    out = tmp_path / "cumulative.fpi"
    assert main(["trace", f"{model}:cumulative", "--shape", "x=2,3", "-o", str(out)]) == 0
    text = out.read_text()
    assert "param cumsum_fn : extern [2, 3] -> [2, 3]" in text and "torch.cumsum(#0, dim=1)" in text
    assert main(["check", str(out)]) == 0


def test_an_untraceable_map_is_exit_status_1_with_what_and_where(model, capsys):
    assert main(["trace", f"{model}:branching", "--shape", "x=2,3"]) == 1
    err = capsys.readouterr().err
    assert "cannot trace" in err and "torch.fx cannot trace the map" in err
