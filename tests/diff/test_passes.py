"""expand_grads and backward_graph on the shipped layers and on small specs, against torch.autograd."""
from __future__ import annotations

import pytest
import torch

from fpidsl.ir.interpret import evaluate
from fpidsl.passes.differentiate import BackwardGraph, backward_graph, expand_grads

from .helpers import assert_same_grad, layers_of, rand, random_env, shipped_layers

LAYERS = shipped_layers()
DIMS = {"B": 3, "H": 6, "W": 8}

# Small layers that exercise what the shipped ones do not: several states, a structurally zero input
# gradient, shared subexpressions, symbolic reshape and cat along the batch, reductions, a GD layer
# whose energy reads an input and a param tensor, and grad of a let.
EXTRA = """
layer TwoStates {
  input a : [B, 4]
  input z : [B, 4]
  state x : [B, 4]
  state y : [B, 4]
  param w : tensor [4] = normal(0, 1)
  let h = tanh(x * w + a)
  update x = 0.5 * h * h + 0.1 * y / (1 + square(a))
  update y = sigmoid(h) - maximum(x, 0.2) + clamp(y, -0.3, 0.3)
  output x + z
}

layer Shapes {
  input a : [B, 6]
  state x : [B, 6]
  param fc : Linear(6, 6)
  let r = reshape(x, [B, 2, 3])
  let s = softmax(transpose(r, 1, 2), dim=-1)
  let t = flatten(s) + logsumexp(r, dim=2, keepdim=true)[:, 0:1, 0] * mean(a, dim=0)
  let u = cat([x, a], dim=0)
  update x = fc(t) * 0.5 + sum(u[0:2, :], dim=0) / 4 - abs(x[..., 2:3]) ** 3 + minimum(elu(x), leaky_relu(a, slope=0.1))
}

layer Energy {
  input a : [B, 5]
  state x : [B, 5]
  param w : tensor [5] = normal(0, 1)
  param m : Linear(5, 3)
  energy E = sum(softplus(m(x * w)), dim=-1) + 0.5 * sum(square(x - a), dim=-1) + mean(log(1 + exp(sin(x) * cos(a))))
  let d = grad(E, x)
  update x = x - 0.1 * d
  output x, d
}
"""
EXTRA_LAYERS = [("extra.fpi", name, g) for name, g in layers_of(EXTRA, "extra.fpi").items()]
ALL = LAYERS + EXTRA_LAYERS
IDS = [f"{spec}:{name}" for spec, name, _ in ALL]
GD = {"BoxProjectionGD": 0.01, "BibtexGD": 1.0}


def _state_values(graph, env) -> dict[str, torch.Tensor]:
    """g_s of the original graph (``grad`` by autograd through ops.grad), by state name."""
    updates = {s: graph.args(info.update)[0] for s, info in graph.states.items()}
    values = evaluate(graph, env, roots=list(updates.values()))
    return {s: values[n] for s, n in updates.items()}


def _leaf_names(graph) -> dict[str, str]:
    keys = {f"state:{s}": s for s in graph.states}
    keys.update((f"input:{n}", n) for n in graph.inputs)
    keys.update((f"param:{n}", n) for n in graph.params)
    return keys


def test_the_shipped_gd_layers_are_covered():
    assert set(GD) <= {name for _, name, _ in LAYERS}


@pytest.mark.parametrize("spec,name,graph", [t for t in ALL if t[1] in GD or t[1] == "Energy"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_expand_grads_is_a_gradient_step(spec, name, graph):
    gen = torch.Generator().manual_seed(10)
    env = random_env(graph, DIMS, gen)
    (state,) = graph.states
    x = env[state]
    energy = next(iter(graph.energies.values()))
    e_val = evaluate(graph, env, roots=[energy])[energy]
    (de,) = torch.autograd.grad(e_val.sum(), x)
    step = GD.get(name, 0.1)
    expanded = expand_grads(graph)
    expanded.lint()
    assert not any(expanded.node(n).get("prim") == "grad" for n in expanded.nodes())
    update = expanded.args(expanded.states[state].update)[0]
    got = evaluate(expanded, {k: v.detach() for k, v in env.items()}, roots=[update])[update]
    torch.testing.assert_close(got, (x - step * de).detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec,name,graph", ALL, ids=IDS)
def test_backward_graph_matches_autograd(spec, name, graph):
    gen = torch.Generator().manual_seed(20)
    env = random_env(graph, DIMS, gen)
    g = _state_values(graph, env)
    cot = {s: rand(v.shape, gen) for s, v in g.items()}
    h = sum((cot[s] * g[s]).sum() for s in g)
    keys = _leaf_names(graph)
    want = dict(zip(keys, torch.autograd.grad(h, [env[n] for n in keys.values()], allow_unused=True)))

    bg = backward_graph(graph)
    bg.lint()
    leaves = {k: v.detach() for k, v in env.items()}
    leaves.update((bg.cotangents[s], c) for s, c in cot.items())
    got = evaluate(bg, leaves, roots=list(bg.grad_of.values()))
    for key in keys:
        node = bg.grad_of.get(key)
        assert_same_grad(got[node] if node is not None else None, want[key], f"{name} {key}")


def test_structurally_zero_gradients_have_no_entry():
    graphs = dict((name, g) for _, name, g in EXTRA_LAYERS)
    bg = backward_graph(graphs["TwoStates"])
    assert "input:z" not in bg.grad_of
    assert {"state:x", "state:y", "input:a", "param:w"} <= set(bg.grad_of)
    assert "  grad input:z = 0" in bg.format()


@pytest.mark.parametrize("spec,name,graph", ALL, ids=IDS)
def test_derived_graphs_are_clean(spec, name, graph):
    """Lint passes, no node is computed twice, nothing is dead, spans point into the spec."""
    for derived in (expand_grads(graph), backward_graph(graph)):
        derived.lint()
        keys = set()
        for nid in derived.nodes():
            data = derived.node(nid)
            assert data["span"].path == graph.span.path
            if data["op"] == "call":
                key = (data["prim"], tuple(derived.args(nid)), repr(sorted(data["attrs"].items())))
                assert key not in keys, f"{nid} duplicates an earlier node"
                keys.add(key)
    bg = backward_graph(graph)
    assert isinstance(bg, BackwardGraph)
    for nid in bg.nodes():
        if bg.node(nid)["op"] in ("call", "const"):
            assert bg.users(nid), f"{nid} is dead"
    assert bg.args(bg.output) == list(bg.grad_of.values())
    for state, c in bg.cotangents.items():
        assert bg.node(c)["name"] == f"c_{state}" and bg.node(c)["role"] == "cotangent"


@pytest.mark.parametrize("spec,name,graph", LAYERS, ids=[f"{s}:{n}" for s, n, _ in LAYERS])
def test_text_forms_are_deterministic(spec, name, graph):
    again = {n: g for s, n, g in shipped_layers() if s == spec}[name]
    assert expand_grads(graph).format() == expand_grads(again).format()
    assert backward_graph(graph).format() == backward_graph(again).format()
    assert backward_graph(graph).format() == backward_graph(expand_grads(graph)).format()


def test_backward_text_form_names_cotangents_and_gradients():
    graph = next(g for _, name, g in LAYERS if name == "BoxProjectionNN")
    text = backward_graph(graph).format()
    assert "  backward h = c_x . g_x\n" in text
    assert "input c_x : [B, 10]" in text
    for key in ("state:x", "input:a", "param:fc1.weight", "param:fc1.bias", "param:fc2.weight", "param:fc2.bias"):
        assert f"  grad {key} = n" in text
    assert "call index(" in text and "{index=[:, 0:10]}" in text


def test_the_original_graph_is_not_changed():
    graph = next(g for _, name, g in LAYERS if name == "BibtexGD")
    before = graph.format()
    backward_graph(graph)
    expand_grads(graph)
    assert graph.format() == before


def test_interpreter_binds_symbolic_reshape_sizes():
    graphs = layers_of(EXTRA, "extra.fpi")
    graph = graphs["Shapes"]
    env = random_env(graph, {"B": 4}, torch.Generator().manual_seed(0))
    reshape = next(n for n in graph.nodes() if graph.node(n).get("prim") == "reshape")
    assert evaluate(graph, env, roots=[reshape])[reshape].shape == (4, 2, 3)
