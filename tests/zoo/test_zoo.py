"""The model zoo (specs/zoo/, table in examples/zoo_models.py): each model checks clean, is formatted, compiles and
loads; its fixed point satisfies the paper's equation written in plain torch; the first and second derivatives of a
nonlinear loss of it, in one input and one parameter, equal autograd through plain iteration of the same map
(float64, relative error <= 1e-7); and a few Adam steps on a teacher-student toy task (fit the outputs of the same
layer with other weights) lower the loss. docs/ZOO.md shows every spec and the iteration table of
examples/zoo_report.py."""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch.nn import functional as F

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


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_derivatives_match_unrolled_autograd(model, train):
    """In training mode: with dropout, parameter_tensors() after a call hold that call's mask seeds, so the oracle
    iterates the map with the same masks as the solve it is compared with. In eval mode (no masks; a dropout
    layer's backward once failed there) likewise."""
    layer = build(model, solve=TIGHT, backward=TIGHT).train(train)
    inputs = ZOO_TABLE.requiring_grad(model.inputs(torch.Generator().manual_seed(1), 3))
    out = layer(*inputs)
    assert bool(layer.stats.forward.converged.all())
    torch.testing.assert_close(out, unrolled_outputs(layer, inputs, model.unroll), rtol=1e-10, atol=1e-12)
    named = {**dict(zip(type(layer).INPUTS, inputs)), **dict(layer.named_parameters())}
    wrt = [named[name] for name in model.wrt]
    got = derivatives(lambda: smooth_loss(layer(*inputs)), wrt, order=2)
    want = derivatives(lambda: smooth_loss(unrolled_outputs(layer, inputs, model.unroll)), wrt, order=2)
    assert_orders_close(got, want, rtol=1e-7)
    assert all(bool(w.abs().max() > 0) for w in want[1]), "a second derivative is zero: the check would not see it"


def test_the_mdeq_cells_dropout_holds_one_mask_per_solve():
    """Variational dropout: the training-mode fixed point is one of the map with that call's mask (the seeds that
    parameter_tensors() hold after the call), not of the map with another call's mask, nor the eval-mode one."""
    model = next(m for m in MODELS if m.key == "mdeq")
    layer = build(model, solve=TIGHT)
    (x,) = model.inputs(torch.Generator().manual_seed(4), 3)
    with torch.no_grad():
        z = layer(x)
        values = (x, *layer.parameter_tensors())
        torch.testing.assert_close(type(layer).step(z, *values), z, rtol=1e-10, atol=1e-12)
        layer(x)  # a new call: new seeds
        moved = type(layer).step(z, x, *layer.parameter_tensors()) - z
        assert moved.abs().max() > 1e-3
        assert (layer.eval()(x) - z).abs().max() > 1e-3


def _soft_threshold(v, t):
    return torch.sign(v) * torch.relu(v.abs() - t)


def _mondeq(m, x):
    """The equilibrium z = relu(W z + U x + b) itself (not the splitting), with the spec's m = 0.5."""
    z = m(x)
    w = 0.5 * torch.eye(6, dtype=z.dtype) - m.A.T @ m.A + m.B - m.B.T
    return z, torch.relu(z @ w.T + m.U(x))


def _hopfield(m, y, q):
    xi, keys = m(y, q), m.WK(y)
    p = torch.softmax(0.5 * (keys @ xi[:, :, None])[..., 0], dim=-1)
    return xi, (keys.transpose(1, 2) @ p[:, :, None])[..., 0]


def _ista(m, y):
    """The lasso's optimality: A^T (y - A x) = lam sign(x) where x != 0, and lies in [-lam, lam] where x = 0."""
    x = m(y)
    r = (y - x @ m.A.T) @ m.A
    return r, torch.where(x != 0, 0.1 * torch.sign(x), r.clamp(-0.1, 0.1))


def _lista(m, y):
    x = m(y)
    return x, _soft_threshold(m.We(y) + x @ m.S.T, m.theta)  # S x


def _sinkhorn(m, u, v):
    """The entropic plan's conditions: marginals 1/N and 1/M, and log P + C / eps = (f_i + g_j) / eps."""
    plan = m(u, v)
    logits = plan.log() + (m.P(u)[:, :, None] - m.P(v)[:, None]).square().sum(-1) / 0.5
    additive = logits - logits[:, :1] - logits[:, :, :1] + logits[:, :1, :1]
    got = torch.cat([plan.sum(2), plan.sum(1), additive.flatten(1)], dim=1)
    return got, torch.cat([torch.full_like(plan.sum(2), 1 / 5), torch.full_like(plan.sum(1), 1 / 4),
                           torch.zeros_like(additive.flatten(1))], dim=1)


def _implicit_euler(m, y0):
    y1 = m(y0)
    return y1, y0 + 0.5 * m.fc2(torch.tanh(m.fc1(y1)))


def _icnn(m, x):
    """grad_y E(x, y) = 0 at the output, E written in torch and differentiated by autograd."""
    y = m(x).detach().requires_grad_()
    energy = (F.softplus(m.w1) * F.softplus(m.W0(y) + m.U0(x))).sum() \
        + m.u1(x).sum() + 0.5 * y.square().sum()
    (grad,) = torch.autograd.grad(energy, y)
    return grad, torch.zeros_like(grad)


def _qp(m, a):
    """KKT of the box QP: the gradient Q x + p is 0 inside the box, <= 0 at x = 1 and >= 0 at x = -1."""
    x = m(a)
    grad = x @ (m.L @ m.L.T + 0.5 * torch.eye(5, dtype=x.dtype)) + m.U(a)
    return grad, torch.where(x >= 1, grad.clamp(max=0), torch.where(x <= -1, grad.clamp(min=0), 0 * grad))


def _ignn_weight(m):
    """W: the rows of V whose l1 norm is above kappa = 0.9 scaled down to it, the others kept."""
    return m.V * (0.9 / m.V.abs().sum(1, keepdim=True)).clamp(max=1)


def _ignn(m, adjacency, features):
    """Gu et al.'s X = relu(W X A + Omega U A) with the nodes as rows: A^T X W^T + A^T U Omega^T (A directed)."""
    out = m(adjacency, features)
    (x,) = m._last_states
    at = adjacency.transpose(1, 2)
    fixed = torch.relu(at @ x @ _ignn_weight(m).T + at @ m.Omega(features))
    return torch.cat([x.flatten(), out.flatten()]), torch.cat([fixed.flatten(), m.readout(x.mean(1)).flatten()])


def _ignn_sparse(m, adjacency, features):
    out = m(adjacency, features)
    (x,) = m._last_states
    at = adjacency.to_dense().T
    fixed = torch.relu(at @ x @ _ignn_weight(m).T + at @ m.Omega(features))
    return torch.cat([x.flatten(), out.flatten()]), torch.cat([fixed.flatten(), m.readout(x).flatten()])


def _mdeq(m, x):
    """MDEQ's BasicBlock with torch's own modules (nn.Conv2d, nn.GroupNorm) at the fixed point, in eval mode (no
    dropout): GN3(relu(z + GN2(x + conv2(relu(GN1(conv1 z))))))."""
    z = m.eval()(x)
    return z, m.gn3(torch.relu(z + m.gn2(x + m.conv2(torch.relu(m.gn1(m.conv1(z)))))))


def _mdeq_two_scale(m, x):
    """MDEQ's blocks (input at the fine scale only) and fusion (GN in the up and down paths, relu -> 1x1 conv -> GN
    after the sum), in eval mode."""
    z1, z2 = m.eval()(x)
    f1 = m.gn1c(torch.relu(z1 + m.gn1b(x + m.conv1b(torch.relu(m.gn1a(m.conv1a(z1)))))))
    f2 = F.group_norm(torch.relu(z2 + m.gn2b(m.conv2b(torch.relu(m.gn2a(m.conv2a(z2)))))), 2, m.gn2c_w, m.gn2c_b)
    up = F.interpolate(F.group_norm(m.up(f2), 2, m.up_w, m.up_b), scale_factor=2, mode="nearest")
    new1 = F.group_norm(m.post1(torch.relu(f1 + up)), 1, m.post1_w, m.post1_b)
    new2 = m.post2_gn(m.post2(torch.relu(f2 + m.down_gn(m.down(f1)))))
    return torch.cat([z1.flatten(), z2.flatten()]), torch.cat([new1.flatten(), new2.flatten()])


def _deq_flow(m, f1, f2, ctx, coords):
    """RAFT's GRU step with the lookup by F.grid_sample, at the fixed point; the output is head(h)."""
    flow = m(f1, f2, ctx, coords)
    (h,) = m._last_states
    target = coords + 2 / 5 * flow.permute(0, 2, 3, 1)
    corr = (f1 * F.grid_sample(f2, target, align_corners=True)).sum(1, keepdim=True) / 2  # / sqrt(C)
    x = torch.cat([torch.relu(m.enc(torch.cat([corr, flow], 1))), ctx], 1)
    zg, r = torch.sigmoid(m.convz(torch.cat([h, x], 1))), torch.sigmoid(m.convr(torch.cat([h, x], 1)))
    q = torch.tanh(m.convq(torch.cat([r * h, x], 1)))
    return torch.cat([h.flatten(), flow.flatten()]), torch.cat([((1 - zg) * h + zg * q).flatten(), m.head(h).flatten()])


def _deq_transformer(m, tokens):
    """DEQ-Transformer's cell at the fixed point, with torch's F.scaled_dot_product_attention (causal) and
    F.layer_norm: q, k, v from W_qkv z + inj(sqrt(D) emb(tokens)), h = LN(z + O(attn)), z = LN(h + FF(h))."""
    out = m(tokens)
    (z,) = m._last_states
    b, t, d = z.shape
    w = m.qkv(z) + m.inj(8 ** 0.5 * m.emb(tokens))
    q, k, v = (part.reshape(b, t, 2, d // 2).transpose(1, 2) for part in w.chunk(3, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
    h = F.layer_norm(z + m.out(a), (d,))
    fixed = F.layer_norm(h + m.ff2(torch.relu(m.ff1(h))), (d,))
    return torch.cat([z.flatten(), out.flatten()]), torch.cat([fixed.flatten(), m.logits(z).flatten()])


PAPERS_EQUATIONS = {"mondeq": _mondeq, "hopfield": _hopfield, "ista": _ista, "lista": _lista, "sinkhorn": _sinkhorn,
                    "implicit_euler": _implicit_euler, "icnn": _icnn, "qp": _qp, "ignn": _ignn, "mdeq": _mdeq,
                    "mdeq_two_scale": _mdeq_two_scale, "deq_flow": _deq_flow,
                    "ignn_sparse": _ignn_sparse, "deq_transformer": _deq_transformer}


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_the_fixed_point_satisfies_the_papers_equation_written_in_torch(model):
    """An oracle independent of the compiler: the paper's equation (or optimality conditions) at the output."""
    layer = build(model, solve=TIGHT, backward=TIGHT)
    got, want = PAPERS_EQUATIONS[model.key](layer, *model.inputs(torch.Generator().manual_seed(3), 4))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_a_few_training_steps_lower_the_loss(model):
    """Fit the outputs of a teacher (the same layer, other weights) on 16 samples with 8 Adam steps. A layer with
    dropout: teacher and student in training mode with the same masks (the same seed before every call), so the
    loss measures the weights and not the masks' noise (MDEQ's spatial dropout zeroes whole channels)."""
    raise_on_fail = {"on_fail": "raise"}
    student = build(model, seed=0, solve=raise_on_fail, backward=raise_on_fail)
    inputs = model.inputs(torch.Generator().manual_seed(2), 16)
    dropped = any(type(student).BATCHED_PARAMS)  # dropout's per-sample seeds

    def call(layer):
        torch.manual_seed(7)
        return as_tuple(layer(*inputs))

    with torch.no_grad():
        teacher = build(model, seed=1)
        targets = call(teacher.train(dropped))
    optimizer = torch.optim.Adam(student.parameters(), lr=model.lr)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = sum(F.mse_loss(o, t) for o, t in zip(call(student), targets))
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
