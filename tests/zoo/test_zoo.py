"""The model zoo (specs/zoo/, table in examples/zoo_models.py): each model checks clean, compiles and loads; its
fixed point and the first and second derivatives of a nonlinear loss of it, in one input and one parameter, equal
autograd through plain iteration of the same map (float64, relative error <= 1e-7); and a few Adam steps on a
teacher-student toy task (fit the outputs of the same layer with other weights) lower the loss."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

import fpidsl
from fpidsl.cli import main
from fpidsl.loader import load_module

from ..codegen.helpers import unrolled_outputs
from ..conftest import ROOT
from ..runtime.helpers import as_tuple, assert_orders_close, derivatives, smooth_loss


def _zoo_table():
    spec = importlib.util.spec_from_file_location("zoo_models", ROOT / "examples" / "zoo_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("zoo_models", module)
    spec.loader.exec_module(module)
    return module


ZOO_TABLE = _zoo_table()
MODELS = ZOO_TABLE.MODELS
IDS = [m.key for m in MODELS]
TIGHT = {"tol": 1e-13, "max_iter": 2000, "on_fail": "raise"}


def build(model, seed: int = 0, **settings):
    """The model's layer in float64, its parameters drawn with ``seed``."""
    torch.manual_seed(seed)
    return fpidsl.load(model.path, name=model.layer)(**settings).double()


def test_every_zoo_spec_checks_clean_is_formatted_and_every_layer_is_in_the_table(capsys):
    specs = sorted(ZOO_TABLE.ZOO.glob("*.fpi"))
    assert main(["check", *map(str, specs)]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.count(": ok (") == len(specs), out
    assert main(["fmt", "--check", *map(str, specs)]) == 0, "the zoo's specs are in the canonical layout (fpidsl fmt)"
    layers = {(path.name, name) for path in specs for name in load_module(path).LAYERS}
    tabled = {(m.spec, m.layer) for m in MODELS}
    assert layers == tabled, layers ^ tabled


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_derivatives_match_unrolled_autograd(model):
    layer = build(model, solve=TIGHT, backward=TIGHT)
    inputs = tuple(t.requires_grad_() for t in model.inputs(torch.Generator().manual_seed(1), 3))
    out = layer(*inputs)
    assert bool(layer.stats.forward.converged.all())
    torch.testing.assert_close(out, unrolled_outputs(layer, inputs, model.unroll), rtol=1e-10, atol=1e-12)
    wrt = [inputs[list(type(layer).INPUTS).index(model.wrt_input)], dict(layer.named_parameters())[model.param]]
    got = derivatives(lambda: smooth_loss(layer(*inputs)), wrt, order=2)
    want = derivatives(lambda: smooth_loss(unrolled_outputs(layer, inputs, model.unroll)), wrt, order=2)
    assert_orders_close(got, want, rtol=1e-7)
    assert all(bool(w.abs().max() > 0) for w in want[1]), "a second derivative is zero: the check would not see it"


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_a_few_training_steps_lower_the_loss(model):
    """Fit the outputs of a teacher (the same layer, other weights) on 16 samples with 8 Adam steps."""
    raise_on_fail = {"on_fail": "raise"}
    student = build(model, seed=0, solve=raise_on_fail, backward=raise_on_fail)
    inputs = model.inputs(torch.Generator().manual_seed(2), 16)
    with torch.no_grad():
        targets = as_tuple(build(model, seed=1)(*inputs))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(o, t) for o, t in zip(as_tuple(student(*inputs)), targets))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_zoo_md_shows_every_spec_and_the_reports_table(tmp_path):
    """docs/ZOO.md holds each spec file verbatim and the iteration table examples/zoo_report.py prints."""
    text = (ROOT / "docs" / "ZOO.md").read_text(encoding="utf-8")
    for path in sorted(ZOO_TABLE.ZOO.glob("*.fpi")):
        assert f"```fpi\n{path.read_text(encoding='utf-8').rstrip()}\n```" in text, f"ZOO.md does not show {path.name}"
    for model in MODELS:
        assert f"](img/zoo/{model.key}.png)" in text and (ROOT / "docs" / "img" / "zoo" / f"{model.key}.png").is_file()


@pytest.mark.slow
def test_zoo_md_iteration_table_is_the_reports(tmp_path):
    text = (ROOT / "docs" / "ZOO.md").read_text(encoding="utf-8")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from zoo_report import report
    finally:
        sys.path.remove(str(ROOT / "examples"))
    table = "\n".join(report(tmp_path))
    assert table in text, f"docs/ZOO.md's iteration table is not what examples/zoo_report.py prints:\n{table}"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{m.key}.png" for m in MODELS)
