"""The forward iteration with its state-free part hoisted (fpidsl/passes/hoist.py): ``iterate(x, *hoist(args))``
against ``step(x, args)`` on every shipped layer, the graph rewrites on their own, and fixed points solved with
and without hoisting."""
from __future__ import annotations

import glob

import pytest
import torch

import fpidsl
from fpidsl.loader import load_module
from fpidsl.compiler import check_source
from fpidsl.passes.differentiate import expand_grads
from fpidsl.passes.hoist import distribute_over_cat, split_step, state_dependent
from fpidsl.frontend.read import decode_source

SPECS = sorted(glob.glob("specs/*.fpi") + glob.glob("tests/specs/*.fpi") + glob.glob("benchmarks/specs/*.fpi"))
SIZES = {"B": 3}


def _layers():
    for path in SPECS:
        for name in load_module(path).LAYERS:
            yield pytest.param(path, name, id=f"{path.rsplit('/', 1)[-1]}:{name}")


def _shape(shape, default=8):
    return tuple(d if isinstance(d, int) else SIZES.get(d, default) for d in shape)


def _random_args(m):
    inputs = tuple(torch.randn(_shape(s), dtype=torch.float64) for s in m.INPUTS.values())
    states = tuple(torch.randn(_shape(s), dtype=torch.float64) for s in m.STATES.values())
    return inputs, states


def _graph(text: str, name: str | None = None):
    checked = check_source(decode_source("t.fpi", text.encode()))
    graphs = checked.graphs
    return expand_grads(graphs[name] if name else next(iter(graphs.values())))


@pytest.mark.parametrize("path,name", list(_layers()))
def test_iterate_on_hoisted_values_is_the_step(path, name):
    torch.manual_seed(0)
    m = fpidsl.load(path, name)().double()
    if m.HOIST_BATCHED is None:  # nothing worth hoisting: the class has no hoisted form, the solver runs step
        assert not hasattr(type(m), "hoist") and not hasattr(type(m), "iterate") and m._hoisted is None
        return
    inputs, states = _random_args(m)
    args = (*inputs, *m.parameter_tensors())
    x = states[0] if len(states) == 1 else states
    want = type(m).step(x, *args)
    values = type(m).hoist(*args)
    assert len(values) == len(m.HOIST_BATCHED)
    got = type(m).iterate(x, *values)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    # the values flagged batched are the ones that follow the samples: slicing them is hoisting the slice
    if m.SAMPLEWISE:
        keep = torch.tensor([2, 0])
        flags = m._batched(tuple(m.parameter_tensors()))
        sliced = tuple(a.index_select(0, keep) if b else a for a, b in zip(inputs, flags))
        again = type(m).hoist(*sliced, *m.parameter_tensors())
        for v, w, batched in zip(values, again, m.HOIST_BATCHED):
            torch.testing.assert_close(v.index_select(0, keep) if batched else v, w, rtol=1e-12, atol=1e-12)


def test_the_shipped_layers_hoist_their_input_share_of_a_linear_layer():
    assert fpidsl.load("specs/bibtex.fpi", "BibtexNN").HOIST_BATCHED is not None
    assert fpidsl.load("specs/bibtex.fpi", "BibtexGD").HOIST_BATCHED is not None
    # one state channel and one input channel: a split convolution would be slower (CONV_SPLIT_SHARE)
    assert fpidsl.load("specs/denoise.fpi").HOIST_BATCHED is None


def test_distribute_splits_by_runs_of_state_dependent_pieces():
    g = _graph("layer L {\n  input a : [B, 3]\n  state x : [B, 2]\n  param fc : Linear(7, 2)\n"
               "  update x = tanh(fc(cat([x, a, square(x)], dim=-1)))\n}\n")
    d = distribute_over_cat(g)
    calls = [d.node(n) for n in d.nodes() if d.node(n)["op"] == "call"]
    linears = [c for c in calls if c["prim"] == "linear"]
    assert len(linears) == 3 and not any(c["prim"] == "cat" for c in calls)
    slices = sorted((c["attrs"]["index"][1].lo, c["attrs"]["index"][1].hi) for c in calls if c["prim"] == "index")
    assert slices == [(0, 2), (2, 5), (5, 7)]
    with_bias = [n for n in d.nodes() if d.node(n).get("prim") == "linear" and len(d.args(n)) == 3]
    assert len(with_bias) == 1 and with_bias[0] not in state_dependent(d)  # the bias goes with the input's share
    d.lint()


def test_a_cat_of_state_pieces_only_is_left_alone():
    g = _graph("layer L {\n  input a : [B, 2]\n  state x : [B, 2]\n  param fc : Linear(4, 2)\n"
               "  update x = tanh(fc(cat([x, square(x)], dim=-1))) + a\n}\n")
    assert distribute_over_cat(g) is g


def test_no_hoisting_when_only_leaves_are_read():
    text = "layer L {\n  input a : [B, 2]\n  state x : [B, 2]\n  param fc : Linear(2, 2)\n" \
           "  update x = tanh(fc(x)) + a\n}\n"
    parts = split_step(_graph(text))
    assert parts is not None and not parts.worthwhile


def test_a_conv_transpose_over_channels_is_distributed(tmp_path):
    spec = tmp_path / "up.fpi"
    spec.write_text("layer Up {\n  input z : [B, 3, H, W]\n  state x : [B, 1, H, W] = zeros\n"
                    "  param down : Conv2d(1, 1, 3, stride=2, padding=1)\n"
                    "  param up : ConvTranspose2d(4, 1, 4, stride=2, padding=1, init_scale=0.1)\n"
                    "  update x = down(up(cat([x, z], dim=1)))\n}\n")
    cls = fpidsl.load(str(spec))
    assert cls.HOIST_BATCHED is not None
    torch.manual_seed(0)
    m = cls().double()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    args = (z, *m.parameter_tensors())
    torch.testing.assert_close(cls.iterate(x, *cls.hoist(*args)), cls.step(x, *args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_fixed_points_with_and_without_hoisting_agree(method):
    """Per-sample stopping drops finished samples: the hoisted values must follow them."""
    torch.manual_seed(0)
    settings = {"tol": 1e-11, "max_iter": 500, "method": method, "on_fail": "raise"}
    m = fpidsl.load("specs/bibtex.fpi", "BibtexNN")(solve=settings, backward=settings).double()
    with torch.no_grad():
        m.fc2.weight.mul_(30)  # samples that converge at different iterations
    x = torch.randn(6, 1836, dtype=torch.float64)
    x[:3] *= 3
    assert m._hoisted is not None
    hoisted = m(x)
    iters = m.stats.forward.iterations.clone()
    assert len(set(iters.tolist())) > 1
    m._hoisted = None
    plain = m(x)
    torch.testing.assert_close(hoisted, plain, rtol=0, atol=1e-10)
    # the same iterations, up to a residual that rounding puts on the other side of tol
    assert (iters - m.stats.forward.iterations).abs().max() <= 1


def test_gradients_of_a_hoisted_layer_match_the_plain_one():
    torch.manual_seed(0)
    settings = {"tol": 1e-12, "max_iter": 500, "on_fail": "raise"}
    m = fpidsl.load("specs/bibtex.fpi", "BibtexNN")(solve=settings, backward=settings).double()
    x = torch.randn(4, 1836, dtype=torch.float64, requires_grad=True)
    grads = []
    for hoist in (True, False):
        if not hoist:
            m._hoisted = None
        out = m(x)
        grads.append(torch.autograd.grad(out.square().sum(), (x, m.fc1.weight)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_hoisted_needs_every_tensor_as_an_argument():
    from fpidsl.runtime.fixed_point import Hoisted, fixed_point

    f = torch.nn.Linear(2, 2)
    h = Hoisted(lambda a: (a,), lambda x, a: x, (True,))
    with pytest.raises(ValueError, match="hoisted"):
        fixed_point(f, torch.zeros(1, 2), hoisted=h)
