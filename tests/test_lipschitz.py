"""Contraction analysis: the static Lipschitz bound (`fpidsl check --lipschitz`) and the run-time estimate of
‖∂g/∂x‖ at the fixed point, against exact values and against each other."""
from __future__ import annotations

import io

import torch

import fpidsl
from fpidsl.cli import main
from fpidsl.compiler import check_source
from fpidsl.lipschitz_report import initial_weights, report_lipschitz
from fpidsl.passes.lipschitz import bound_layer
from fpidsl.source import Source

LINEAR = ("layer Lin {\n  input z : [B, 3]\n  state x : [B, 3]\n  param A : tensor [3, 3] = normal(0, 0.3)\n"
          "  update x = x @ transpose(A, 0, 1) + z\n}\n")
TANH = ("layer T {\n  input z : [B, 4]\n  state x : [B, 4]\n  param fc : Linear(8, 4, init_scale=SCALE)\n"
        "  update x = tanh(fc(cat([x, z], dim=-1)))\n}\n")


def test_linear_map_bound_is_the_spectral_norm(tmp_path):
    checked = check_source(Source("lin.fpi", LINEAR))
    weights = initial_weights(checked, "Lin")
    (bound,) = bound_layer(checked.graphs["Lin"], weights)
    A = next(iter(weights.values())).double()
    assert abs(bound.value - torch.linalg.matrix_norm(A, 2).item()) < 1e-8
    # the run-time estimate of a linear map is its norm too
    path = tmp_path / "lin.fpi"
    path.write_text(LINEAR)
    torch.manual_seed(0)
    layer = fpidsl.load(str(path))().double()
    factor = layer.contraction(torch.randn(3, 3, dtype=torch.float64), iters=200)
    expected = torch.linalg.matrix_norm(layer.A.detach(), 2)
    assert torch.allclose(factor, expected.expand(3), rtol=1e-6)
    assert layer.stats.contraction is factor


def test_static_bound_is_above_the_estimate_at_the_fixed_point(tmp_path):
    path = tmp_path / "t.fpi"
    path.write_text(TANH.replace("SCALE", "1.5"))
    checked = check_source(Source(str(path), path.read_text()))
    (bound,) = bound_layer(checked.graphs["T"], initial_weights(checked, "T"))
    torch.manual_seed(0)
    layer = fpidsl.load(str(path))(solve={"tol": 1e-10}).double()
    factor = layer.contraction(torch.randn(5, 4, dtype=torch.float64))
    assert (factor <= bound.value + 1e-9).all() and (factor > 0).all()


def test_contraction_report_and_warnings(tmp_path):
    out = io.StringIO()
    big = check_source(Source("big.fpi", TANH.replace("SCALE", "20")))
    assert report_lipschitz(big, out) == 1
    text = out.getvalue()
    assert "big.fpi:3:3: warning: layer T: the Lipschitz bound of g in x is" in text
    assert "hint: use a smaller init_scale, norm=spectral" in text
    out = io.StringIO()
    assert report_lipschitz(check_source(Source("small.fpi", TANH.replace("SCALE", "0.1"))), out) == 0
    assert "g is a contraction in x at the initial weights" in out.getvalue()


def test_gradient_layers_say_why_there_is_no_bound(capsys):
    assert main(["check", "--lipschitz", "specs/box_projection.fpi"]) == 0
    out = capsys.readouterr().out
    assert "layer BoxProjectionNN: g is a contraction in x" in out
    assert "because: grad at 22:3: the gradient of an energy needs a curvature bound" in out


MIXING = """layer Mix {
  input a : [N, 3]
  param A : tensor[3, 3]
  state x : [N, 3]
  update x = 0.3 * tanh(x @ A) + 0.2 * mean(x, dim=0, keepdim=true) + a
}
"""


def test_the_estimate_of_a_layer_that_mixes_samples_is_the_whole_states_norm(tmp_path):
    """A row-mixing map has one Jacobian over all rows: per-row estimates of it would be wrong numbers."""
    path = tmp_path / "mix.fpi"
    path.write_text(MIXING)
    torch.manual_seed(0)
    cls = fpidsl.load(str(path))
    assert cls.SAMPLEWISE is False
    layer = cls().double()
    with torch.no_grad():
        layer.A.copy_(torch.randn(3, 3, dtype=torch.float64))
    a = torch.randn(4, 3, dtype=torch.float64)
    factor = layer.contraction(a, iters=300)
    x_hat = layer(a).detach()
    values = (a, *[p.detach() for p in layer.parameter_tensors()])
    jac = torch.autograd.functional.jacobian(lambda x: type(layer).step(x, *values), x_hat).reshape(12, 12)
    assert factor.shape == (1,)
    assert torch.allclose(factor, torch.linalg.matrix_norm(jac, 2).reshape(1), rtol=1e-8)


NORMS = {
    "layer_norm": ("layer N {\n  input z : [B, 6]\n  state x : [B, 6]\n  param W : tensor [6] = normal(0, 0.5)\n"
                   "  param b : tensor [6] = normal(0, 1)\n  update x = layer_norm(x, [6], W, b, eps=0.01) + z\n}\n"),
    "group_norm": ("layer N {\n  input z : [B, 4, 3]\n  state x : [B, 4, 3]\n  param W : tensor [4] = normal(0, 0.5)\n"
                   "  update x = group_norm(x, 2, W, eps=0.01) + z\n}\n"),
}


def test_normalization_bound_is_max_weight_over_root_eps_and_holds(tmp_path):
    """max |W| / sqrt(eps), and the exact Jacobian norm at random points (some near zero variance, where it is
    largest) stays below it."""
    for name, text in NORMS.items():
        checked = check_source(Source("n.fpi", text))
        weights = initial_weights(checked, "N")
        (bound,) = bound_layer(checked.graphs["N"], weights)
        path = tmp_path / f"{name}.fpi"
        path.write_text(text)
        layer = fpidsl.load(str(path))().double()
        with torch.no_grad():
            for mine, theirs in zip(layer.parameters(), weights.values(), strict=True):
                mine.copy_(theirs)  # the params in the order of the spec, both
        assert abs(bound.value - float(layer.W.detach().abs().max()) / 0.1) < 1e-6 * bound.value, name
        shape = (1, 6) if name == "layer_norm" else (1, 4, 3)
        gen = torch.Generator().manual_seed(0)
        for scale in (1.0, 0.1, 0.01):
            x = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
            step = lambda x: layer.step(x, torch.zeros(shape, dtype=torch.float64), *layer.parameter_tensors())
            jac = torch.autograd.functional.jacobian(step, x).reshape(x.numel(), x.numel())
            assert torch.linalg.matrix_norm(jac, 2) <= bound.value * (1 + 1e-9), (name, scale)
