"""Compiled layers pickle: torch.save of a whole model loads in a fresh process (a subprocess that never saw the
spec), deepcopy, state_dicts across processes, distinct modules for two files with one text, and the runtime
check of an emitted module file."""
from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.loader import load_module
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # subprocesses or long runs: not in `pytest -m "not slow"`

SPEC = """
layer Tanh {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param fc : Linear(8, 4, init_scale=0.3)
  update x = tanh(fc(cat([x, a], dim=-1)))
  output x
  solve { tol = 1e-12, max_iter = 500 }
}
"""


class Model(nn.Module):
    """A user's model around a compiled layer (importable from this test module)."""

    def __init__(self, layer):
        super().__init__()
        self.head = nn.Linear(4, 2).double()
        self.layer = layer

    def forward(self, a):
        return self.head(self.layer(a))


@pytest.fixture()
def spec_file(tmp_path):
    path = tmp_path / "tanh.fpi"
    path.write_text(SPEC)
    return path


def run_fresh(code: str) -> str:
    """``code`` in a new Python process (the repository on its path, nothing compiled yet)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_whole_model_and_state_dict_load_in_a_new_process(spec_file, tmp_path):
    """One fresh process (it has never compiled the spec): the pickled model without the spec file, then the
    state_dict into a freshly compiled layer once the file is back."""
    torch.manual_seed(0)
    layer = fpidsl.load(str(spec_file))(solve={"tol": 1e-13}, backward={"tol": 1e-13}).double()
    model = Model(layer)
    a = torch.randn(3, 4, dtype=torch.float64)
    torch.save({"model": model, "a": a, "want": model(a).detach()}, tmp_path / "model.pt")
    torch.save({"state": layer.state_dict(), "a": a, "want": layer(a).detach()}, tmp_path / "state.pt")
    text = spec_file.read_text()
    spec_file.unlink()  # the new process has only the pickle
    out = run_fresh(f"""
        import pathlib, torch
        blob = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
        model = blob["model"]
        got = model(blob["a"])
        assert torch.equal(got.detach(), blob["want"]), (got, blob["want"])
        assert model.layer.solve_settings.tol == 1e-13 and model.layer.backward_settings.tol == 1e-13
        got.sum().backward()
        assert model.layer.fc.weight.grad is not None
        print(type(model.layer).__name__, type(model.layer).__module__.startswith("fpidsl_compiled_"))

        import fpidsl
        pathlib.Path({str(spec_file)!r}).write_text({text!r})
        blob = torch.load({str(tmp_path / 'state.pt')!r})  # weights_only: plain tensors
        layer = fpidsl.load({str(spec_file)!r})(solve={{"tol": 1e-13}}, backward={{"tol": 1e-13}}).double()
        layer.load_state_dict(blob["state"])
        assert torch.equal(layer(blob["a"]).detach(), blob["want"])
        print("ok")
    """)
    assert out.split() == ["Tanh", "True", "ok"]


def test_deepcopy_and_pickle_round_trip_give_independent_equal_layers(spec_file):
    torch.manual_seed(2)
    layer = fpidsl.load(str(spec_file))(compile=False).double()
    a = torch.randn(2, 4, dtype=torch.float64)
    want = layer(a).detach()
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is type(layer)  # the cache: same spec text, same class
        assert torch.equal(twin(a).detach(), want)
        with torch.no_grad():
            twin.fc.weight.add_(1.0)
        assert not torch.equal(twin.fc.weight, layer.fc.weight)
    rng = torch.get_rng_state()
    pickle.loads(pickle.dumps(layer))
    assert torch.equal(rng, torch.get_rng_state())  # unpickling draws no random numbers


def test_two_files_with_one_text_get_two_modules_and_both_pickle(tmp_path):
    first, second = tmp_path / "one.fpi", tmp_path / "two.fpi"
    first.write_text(SPEC)
    second.write_text(SPEC)
    m1, m2 = load_module(str(first)), load_module(str(second))
    assert m1.__name__ != m2.__name__
    for path in (first, second):
        layer = fpidsl.load(str(path))()
        clone = pickle.loads(pickle.dumps(layer))
        assert type(clone).SPEC == path.name


def test_unpickling_an_old_state_without_newer_attributes(spec_file):
    """State pickled by an fpidsl that had fewer attributes: what __init__ derives is filled in."""
    layer = fpidsl.load(str(spec_file))()
    fn, spec, state = layer.__reduce_ex__(4)
    for newer in ("warm", "eval_settings", "_last_call"):
        state.pop(newer, None)
    clone = fn(*spec)
    clone.__setstate__(state)
    a = torch.randn(2, 4)
    assert torch.equal(clone(a), layer(a))


def test_emitted_module_refuses_a_runtime_it_does_not_match(tmp_path, spec_file):
    import importlib.util

    from fpidsl.cli import main

    out_py = tmp_path / "tanh_layers.py"
    assert main(["compile", str(spec_file), "-o", str(out_py)]) == 0
    code = out_py.read_text()
    assert "require_runtime(" in code
    spec = importlib.util.spec_from_file_location("tanh_layers_for_the_runtime_check", out_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # this runtime: it imports
    assert module.Tanh().SPEC == "tanh.fpi"
    from fpidsl.interface import RUNTIME_INTERFACE

    out_py.write_text(code.replace(f"require_runtime({RUNTIME_INTERFACE},", f"require_runtime({RUNTIME_INTERFACE + 1},"))
    done = subprocess.run([sys.executable, str(out_py)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"runtime interface {RUNTIME_INTERFACE + 1}" in done.stderr
    assert "regenerate it with `fpidsl compile`" in done.stderr
