"""Contraction analysis: the static Lipschitz bound (`fpidsl check --lipschitz`) and the run-time estimate of
‖∂g/∂x‖ at the fixed point, against exact values and against each other."""
from __future__ import annotations

import io
import math

import torch

import fpidsl
from fpidsl.cli import main
from fpidsl.compiler import check_source
from fpidsl.lipschitz_report import initial_weights, report_lipschitz
from fpidsl.passes.lipschitz import bound_layer, spectral_norm
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


# --------------------------------------------------------------------------- the bound against an empirical oracle

def _bounds_and_jacobian_norms(tmp_path, text, name, sizes, points=20, scales=(0.1, 1.0, 5.0)):
    """The static bounds of layer ``name`` (by state, and ``"joint"``) and the largest ‖∂g/∂x‖₂ found at random
    points, of g in each state alone (a column block of the Jacobian) and in all states together, with the
    layer's initial weights (seed 0) in float64. ``sizes``: the symbolic dimensions."""
    path = tmp_path / f"{name}.fpi"
    path.write_text(text)
    checked = check_source(Source(str(path), text))
    bounds = {("joint" if b.joint else b.state): b for b in bound_layer(checked.graphs[name],
                                                                         initial_weights(checked, name))}
    torch.manual_seed(0)
    cls = fpidsl.load(str(path), name=name)
    layer = cls().double()
    params = tuple(p.detach() for p in layer.parameter_tensors())
    shapes = [tuple(sizes.get(d, d) for d in shape) for shape in cls.STATES.values()]
    counts = [math.prod(s) for s in shapes]
    offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
    gen = torch.Generator().manual_seed(3)
    worst = {s: 0.0 for s in cls.STATES} | {"joint": 0.0}
    for scale in scales:
        for _ in range(points):
            inputs = [torch.randn(tuple(sizes.get(d, d) for d in shape), generator=gen, dtype=torch.float64)
                      for shape in cls.INPUTS.values()]

            def step(flat):
                xs = tuple(p.reshape(s) for p, s in zip(torch.split(flat, counts), shapes))
                out = cls.step(xs if len(xs) > 1 else xs[0], *inputs, *params)
                return torch.cat([o.reshape(-1) for o in (out if isinstance(out, tuple) else (out,))])

            x = scale * torch.randn(offsets[-1], generator=gen, dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(step, x)
            worst["joint"] = max(worst["joint"], float(torch.linalg.matrix_norm(jac, 2)))
            for i, state in enumerate(cls.STATES):
                block = jac[:, offsets[i]:offsets[i + 1]]
                worst[state] = max(worst[state], float(torch.linalg.matrix_norm(block, 2)))
    return bounds, worst


BROADCAST = {
    # a [B, 1] value of the state spread over 8 columns: each of its changes counted 8 times
    "sum": ("0.3 * sum(x, dim=1, keepdim=true) + z", ""),
    "slice": ("0.3 * x[:, 0:1] + z", ""),
    "max": ("0.3 * maximum(max(x, dim=1, keepdim=true), z)", ""),
    "logsumexp": ("0.3 * logsumexp(x, dim=1, keepdim=true) + z", ""),
    "param": ("x[:, 0:1] * w + z", "  param w : tensor [8] = normal(0, 1)\n"),
    "divide": ("sum(x, dim=1, keepdim=true) / 4 + z", ""),
}


def test_a_broadcast_value_counts_each_of_its_copies(tmp_path):
    """``0.3 * sum(x, dim=1, keepdim=true) + z`` with x ``[B, 8]`` is ``0.3 * 1 1ᵀ x``: norm 2.4 (it diverges), not
    the 0.3 * sqrt(8) = 0.85 that adding the bounds of the terms without their copies gave."""
    for key, (body, params) in BROADCAST.items():
        text = (f"layer Bc {{\n  input z : [B, 8]\n  state x : [B, 8]\n{params}  update x = {body}\n}}\n")
        bounds, worst = _bounds_and_jacobian_norms(tmp_path, text, "Bc", {"B": 1})
        assert worst["x"] <= bounds["x"].value * (1 + 1e-9), (key, bounds["x"].value, worst["x"])
    text = "layer Bc {\n  input z : [B, 8]\n  state x : [B, 8]\n  update x = " + BROADCAST["sum"][0] + "\n}\n"
    bounds, worst = _bounds_and_jacobian_norms(tmp_path, text, "Bc", {"B": 1}, points=1)
    assert abs(worst["x"] - 2.4) < 1e-9 and abs(bounds["x"].value - 2.4) < 1e-9
    out = io.StringIO()
    assert report_lipschitz(check_source(Source("bc.fpi", text)), out) == 1
    assert "the Lipschitz bound of g in x is 2.4 at the initial weights" in out.getvalue()


def test_a_mean_spread_back_along_a_symbolic_dimension_keeps_a_bound(tmp_path):
    """A mean over the batch (or over H, W) broadcast back along it moves no more than its input: the bound stays
    finite and above the Jacobian's norm; a sum over the batch spread back has none."""
    cases = [
        ("  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.3 * tanh(x) + 0.2 * mean(x, dim=0, keepdim=true) + a\n",
         {"B": 4}, 0.5),
        ("  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.5 * (x - mean(x, dim=0)) + a\n", {"B": 4}, 1.0),
        ("  input a : [B, 2, H, W]\n  state x : [B, 2, H, W]\n"
         "  update x = 0.5 * x - 0.25 * unsqueeze(mean(x, dim=[2, 3]), 2)[:, :, :, None] + a\n",
         {"B": 1, "H": 3, "W": 4}, 0.75),
    ]
    for body, sizes, expected in cases:
        text = "layer M {\n" + body + "}\n"
        bounds, worst = _bounds_and_jacobian_norms(tmp_path, text, "M", sizes, points=5)
        assert abs(bounds["x"].value - expected) < 1e-9, (body, bounds["x"].value)
        assert worst["x"] <= bounds["x"].value * (1 + 1e-9), (body, worst["x"])
    summed = "layer S {\n  input a : [B, 3]\n  state x : [B, 3]\n  update x = 0.1 * sum(x, dim=0, keepdim=true) + a\n}\n"
    (bound,) = bound_layer(check_source(Source("s.fpi", summed)).graphs["S"], {})
    assert bound.value == math.inf and "broadcast along the symbolic dimension B" in bound.reason


TWO_STATES = """layer Two {
  input a : [B, 3]
  state x : [B, 3]
  state y : [B, 3]
  update x = 0.75 * x + 0.75 * y + a
  update y = 0.75 * x + 0.75 * y + a
}
"""


def test_several_states_are_bounded_together(tmp_path):
    """Each update reads both states with factor 0.75: g in x alone moves both updates (0.75 sqrt 2 = 1.06), and
    in both states together its norm is 1.5 (the iterations diverge); the largest bound of one update in one
    state, 0.75, was reported before as "a contraction in x" and "in y"."""
    bounds, worst = _bounds_and_jacobian_norms(tmp_path, TWO_STATES, "Two", {"B": 1}, points=2)
    assert abs(bounds["x"].value - 0.75 * math.sqrt(2)) < 1e-9 and abs(bounds["y"].value - 0.75 * math.sqrt(2)) < 1e-9
    assert abs(bounds["joint"].value - 1.5) < 1e-9 and bounds["joint"].state == "x, y together"
    assert abs(worst["joint"] - 1.5) < 1e-9 and abs(worst["x"] - 0.75 * math.sqrt(2)) < 1e-9
    out = io.StringIO()
    assert report_lipschitz(check_source(Source("two.fpi", TWO_STATES)), out) == 3
    assert "two.fpi:3:3: warning: layer Two: the Lipschitz bound of g in its states x, y together is 1.5" in out.getvalue()
    # a nonlinear pair, and an update whose unbounded term is multiplied by a zero param (0 * inf is no bound
    # of nan, which the largest over the updates dropped)
    layers = {
        "Pair": ("  input a : [B, 3]\n  state x : [B, 3]\n  state y : [B, 2]\n"
                 "  param A : tensor [3, 2] = normal(0, 0.8)\n  param C : tensor [2, 3] = normal(0, 0.8)\n"
                 "  update x = 0.5 * tanh(y @ C) + 0.4 * x + a\n  update y = sin(x @ A) + 0.2 * y\n"),
        "Zero": ("  input a : [B, 3]\n  state x : [B, 3]\n  state y : [B, 3]\n  param b : tensor [3]\n"
                 "  update x = 0.5 * x + a\n  update y = b * exp(x) + 3 * x\n"),
    }
    for name, body in layers.items():
        bounds, worst = _bounds_and_jacobian_norms(tmp_path, f"layer {name} {{\n{body}}}\n", name, {"B": 1})
        for key, value in worst.items():
            assert value <= bounds[key].value * (1 + 1e-9), (name, key, bounds[key].value, value)
    assert abs(bounds["x"].value - math.sqrt(0.5 ** 2 + 3 ** 2)) < 1e-9


def test_the_weight_norm_is_exact_not_a_power_iteration_estimate():
    """Power iteration from a fixed start approaches the norm from below (and stops at a smaller singular value
    when the start is orthogonal to the top one): a 512 x 512 weight scaled to norm 1.0003 was reported as
    "a contraction (bound 1 < 1)"."""
    text = ("layer S {\n  input z : [B, 512]\n  state x : [B, 512]\n"
            "  param fc : Linear(512, 512, bias=false, init_scale=0.8684)\n  update x = fc(x) + z\n}\n")
    checked = check_source(Source("s.fpi", text))
    weights = initial_weights(checked, "S")
    (bound,) = bound_layer(checked.graphs["S"], weights)
    exact = torch.linalg.matrix_norm(next(iter(weights.values())).double(), 2).item()
    assert exact > 1 and exact <= bound.value <= exact * (1 + 1e-9)
    out = io.StringIO()
    assert report_lipschitz(checked, out) == 1 and "g in x is 1.00027" in out.getvalue()
    assert abs(spectral_norm(torch.tensor([[1.0, -1.0], [0.5, 0.5]])) - math.sqrt(2)) < 1e-9


def test_a_computed_convolution_weight_has_no_bound():
    text = ("layer C {\n  input z : [B, 2, 5, 5]\n  state x : [B, 2, 5, 5]\n  param W : tensor [2, 2, 3, 3] = normal(0, 1)\n"
            "  update x = conv2d(x, 0.5 * W, padding=[1, 1]) + z\n}\n")
    checked = check_source(Source("c.fpi", text))
    (bound,) = bound_layer(checked.graphs["C"], initial_weights(checked, "C"))
    assert bound.value == math.inf and "computed from params" in bound.reason
