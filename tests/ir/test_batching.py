"""Sample mixing is decided from the primitives' declared batch rules (fpidsl/ir/batching.py), never from how an
index is spelled: a layer that mixes samples is solved jointly, and its fixed points match plain iteration of the
whole batch."""
from __future__ import annotations

import textwrap

import pytest
import torch

import fpidsl
from fpidsl.compiler import check_source
from fpidsl.ir.batching import MIXED, batch_axes
from fpidsl.ir.primitives import PRIMITIVES
from fpidsl.source import Source

HEAD = """
layer L {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param W : tensor [4, 4] = normal(0, 0.3)
"""


def _lowered(body: str):
    text = HEAD + textwrap.indent(textwrap.dedent(body).strip(), "  ") + "\n}\n"
    checked = check_source(Source("mix.fpi", text))
    return checked.lowered(lint=True)["L"], text


SAMPLEWISE = [
    "update x = tanh(0.5 * x @ W + a)",
    "update x = tanh(0.5 * x + a[:, 0:1])",
    "update x = tanh(0.5 * x + a[..., 1:2])",
    "update x = tanh(0.5 * transpose(transpose(x, 0, 1), 0, 1) + a)",
    "update x = tanh(0.5 * x + sum(a, dim=-1, keepdim=true))",
    "update x = tanh(0.5 * reshape(reshape(x, [B, 2, 2]), [B, 4]) + a)",
    "update x = 0.5 * softmax(x, dim=1) + a",
    "update x = tanh(0.5 * flatten(reshape(x, [B, 2, 2])) + a)",
    "update x = tanh(0.5 * transpose(W @ transpose(x, 0, 1), 0, 1) + a)",
    "update x = tanh(0.1 * reshape(reshape(x, [B, 2, 2]) @ reshape(a, [B, 2, 2]), [B, 4]) + a)",
    # issue 13: reductions along the sample's own dims, shape ops that keep the batch axis apart
    "update x = tanh(0.5 * x * max(x, dim=1, keepdim=true) + a)",
    "update x = tanh(0.5 * x - min(reshape(x, [B, 2, 2]), dim=[1, 2], keepdim=true)[:, 0] + a)",
    "update x = tanh(0.5 * x / (1 + norm(x, dim=-1, keepdim=true)) + a)",
    "update x = tanh(0.1 * x * prod(x, dim=1, keepdim=true) + a)",
    "update x = tanh(0.5 * x * var(x, dim=1, keepdim=true) + a)",
    "update x = tanh(0.5 * reshape(permute(permute(reshape(x, [B, 2, 2]), [2, 0, 1]), [1, 2, 0]), [B, 4]) + a)",
    "update x = tanh(0.5 * reshape(triu(reshape(x, [B, 2, 2])) + tril(reshape(x, [B, 2, 2]), diagonal=-1), [B, 4]) + a)",
    "update x = tanh(0.5 * sum(unsqueeze(x, -1), dim=-1) + sum(unsqueeze(a, dim=1), dim=1))",
    "update x = tanh(where(a, 0.5 * x, 0.2 * x) + a)",
    # issue 13: comparisons (elementwise masks) and `None` index items (new size-1 dims move the batch axis)
    "update x = tanh(0.5 * x * (x > 0) + a * (a <= x) - 0.1 * (x != a))",
    "update x = tanh(where(x >= a, 0.5 * x, 0.2 * x) + a)",
    "update x = tanh(0.5 * sum(x[:, None] * a[:, :, None], dim=1) + a)",
    "update x = tanh(0.5 * x[None][0] + a)",
    "update x = tanh(0.5 * x[None, :, None][0, :, 0] + a)",
    "update x = tanh(0.5 * sum(x[..., None], dim=-1) + a[None, ...][0])",
    # issue 13: padding the sample's own dims (and its adjoint, a slice, in the backward)
    "update x = tanh(0.5 * pad(x, [1, 2])[:, 1:5] + a)",
    # issue 13: a solve per sample, or with a shared matrix and the samples as its columns; einsum letters
    "update x = 0.5 * solve(3 * eye(4) + unsqueeze(a, -1) * unsqueeze(a, 1), x) + a",
    "update x = 0.5 * transpose(solve(3 * eye(4) + W, transpose(x, 0, 1)), 0, 1) + a",
    'update x = tanh(einsum("bi,ij->bj", x, W) + a)',
    'update x = tanh(0.5 * einsum("bi,bj->bi", x, a) + a)',
    'update x = tanh(einsum("ij,bj->bi", W, x) + einsum("...i,i->...i", a, sum(W, dim=0)))',
]

MIXING = [
    # the defect of issue 16: `v[..., i]` on a value whose only dimension is the batch selects a sample
    "let v = sum(x, dim=-1)\nupdate x = tanh(0.5 * x + a * v[..., 0])",
    "let v = sum(x, dim=1)\nupdate x = tanh(0.5 * x + a * v[0])",
    "update x = tanh(0.5 * x + a * mean(x, dim=0))",
    "update x = 0.5 * softmax(x, dim=0) + a",
    "update x = tanh(0.5 * x @ (transpose(x, 0, 1) @ x) * 0.1 + a)",
    "update x = tanh(0.5 * x + reshape(reshape(x, [4, B]), [B, 4]))",
    "let v = sum(x, dim=-1)\nupdate x = tanh(0.5 * x + a * sum(v))",
    "update x = tanh(0.5 * x + a * flatten(x, 0, 1)[0])",
    "let v = sum(x, dim=-1)\nlet u = sum(a, dim=-1, keepdim=true)\nupdate x = tanh(0.5 * x + sum(u * v, dim=1, keepdim=true))",
    # issue 13: reductions over the batch, triangles of a matrix whose rows are the samples
    "update x = tanh(0.5 * x * max(x, dim=0) + a)",
    "update x = tanh(0.5 * x * min(x, dim=[0, 1], keepdim=true) + a)",
    "update x = tanh(0.5 * x / (1 + norm(x)) + a)",
    "update x = tanh(0.5 * x * var(x, dim=0, keepdim=true) + a)",
    "update x = tanh(0.5 * tril(x) + a)",
    "update x = tanh(0.5 * reshape(transpose(triu(transpose(reshape(x, [B, 2, 2]), 0, 1)), 0, 1), [B, 4]) + a)",
    "update x = tanh(0.5 * x + a * sum(permute(x, [1, 0]), dim=1))",
    "update x = tanh(where(sum(x, dim=0), x, a) * 0.5)",
    # issue 13: a mask against a batch statistic; an integer after a `None` item reads the batch axis
    "update x = tanh(0.5 * x * (x > mean(x, dim=0)) + a)",
    "update x = tanh(0.5 * x[None, 0] + a)",
    "update x = tanh(0.5 * x[None][:, 1:2][0, 0] + a)",
    # issue 13: padding along the batch axis shifts the samples
    "update x = tanh(0.5 * pad(x, [0, 0, 1, 0])[0:-1] + a)",
    # issue 13: an einsum letter that carries the batch and is summed over (b, or c of a second batched operand)
    'update x = tanh(0.5 * einsum("bi,cj->bj", x, a) + a)',
    'update x = tanh(0.1 * einsum("bi,bj->j", x, a) + a)',
    'update x = tanh(0.1 * einsum("bi,ci->bc", x, a) @ x + a)',
]


@pytest.mark.parametrize("body", SAMPLEWISE)
def test_samplewise_maps_are_recognised(body):
    lowered, _ = _lowered(body)
    assert lowered.samplewise is True


@pytest.mark.parametrize("body", MIXING)
def test_maps_that_mix_samples_are_solved_jointly(body):
    lowered, _ = _lowered(body)
    assert lowered.samplewise is False


def test_an_ellipsis_index_of_a_batch_vector_gives_the_fixed_point_of_plain_iteration(tmp_path):
    """The issue's case: with v of shape [B], v[..., 0] reads sample 0. Dropping finished samples used to change
    which sample that is, so the reported fixed points were wrong (and marked converged)."""
    lowered, text = _lowered("let v = sum(x, dim=-1)\nupdate x = tanh(0.5 * x + a * v[..., 0] * 0.2 + a)")
    spec = tmp_path / "mix.fpi"
    spec.write_text(text)
    cls = fpidsl.load(str(spec))
    assert cls.SAMPLEWISE is False
    torch.manual_seed(0)
    m = cls(solve={"tol": 1e-12, "max_iter": 500}).double()
    for trial in range(20):
        # samples of very different sizes converge at different iterations
        a = torch.randn(7, 4, dtype=torch.float64) * torch.logspace(-3, 0, 7, dtype=torch.float64)[:, None]
        got = m(a)
        x = torch.zeros(7, 4, dtype=torch.float64)
        for _ in range(2000):
            x = m.step(x, a, *m.parameter_tensors())
        torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-10)


def test_a_mixing_layer_is_judged_as_one_problem_so_every_sample_gets_its_gradient(tmp_path):
    """Samples coupled along a path (sample i reads i - 1 and i + 1): the gradient of sample 0's output reaches
    sample 7 through 7 couplings. When each sample was judged alone, samples whose adjoint was still 0 were
    'converged' at once and held there: the gradient was off by 2.9e-3 (its largest entry is 0.33)."""
    text = ("layer G {\n  input P : [N, N]\n  input u : [N, 4]\n  state x : [N, 4]\n"
            "  param W : tensor [4, 4] = normal(0, 0.2)\n  update x = tanh(P @ (x @ W) + u)\n}\n")
    spec = tmp_path / "path.fpi"
    spec.write_text(text)
    torch.manual_seed(0)
    layer = fpidsl.load(str(spec))(solve={"tol": 1e-12, "max_iter": 500}, backward={"tol": 1e-12, "max_iter": 500})
    layer = layer.double()
    assert type(layer).SAMPLEWISE is False
    path = torch.diag(torch.full((7,), 0.5, dtype=torch.float64), 1)
    path = path + path.T
    u = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    got, = torch.autograd.grad(layer(path, u)[0, 0], u)
    x = torch.zeros(8, 4, dtype=torch.float64)
    for _ in range(400):
        x = torch.tanh(path @ (x @ layer.W) + u)
    want, = torch.autograd.grad(x[0, 0], u)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_every_primitive_declares_how_samples_flow():
    for name, prim in PRIMITIVES.items():
        assert callable(prim.batch), f"{name} has no batch rule"


def test_the_batch_axis_follows_transposes_and_integer_indices():
    lowered, _ = _lowered("let y = transpose(reshape(x, [B, 2, 2]), 0, 2)\nupdate x = tanh(reshape(transpose(y, 0, 2), [B, 4]) + a)")
    g = lowered.step
    axes = batch_axes(g)
    ys = [n for n in g.nodes() if g.node(n).get("name") == "y"]
    assert [axes[n] for n in ys] == [2]
    assert MIXED not in axes.values()


def test_the_batch_axis_follows_permute_and_unsqueeze():
    lowered, _ = _lowered("let y = permute(unsqueeze(reshape(x, [B, 2, 2]), -2), [2, 3, 0, 1])\n"
                          "update x = tanh(reshape(permute(y, [2, 3, 0, 1]), [B, 4]) + a)")
    g = lowered.step
    axes = batch_axes(g)
    ys = [n for n in g.nodes() if g.node(n).get("name") == "y"]
    assert [axes[n] for n in ys] == [2]
    assert MIXED not in axes.values()


def test_normalisations_are_per_sample_unless_they_normalize_over_the_batch_axis():
    """group_norm normalizes dims 1.., layer_norm its trailing ``shape``: per-sample with the batch on a leading
    dim that is not normalized, mixing when the batch is normalized over or the weight is batched."""
    gn, ln, gm = PRIMITIVES["group_norm"].batch, PRIMITIVES["layer_norm"].batch, PRIMITIVES["group_mean"].batch
    x4 = ("B", 4, 3, 3)
    gn_attrs = {"groups": 2, "channels": 4, "eps": 1e-5}
    assert gn([0, None, None], [x4, (4,), (4,)], x4, gn_attrs) == 0
    assert gn([None, None, None], [x4, (4,), (4,)], x4, gn_attrs) is None
    assert gn([1, None, None], [(4, "B", 3), (4,), (4,)], (4, "B", 3), gn_attrs) is MIXED
    assert gn([0, 0, None], [x4, ("B",), (4,)], x4, gn_attrs) is MIXED
    assert gm([0], [x4], x4, {"groups": 2}) == 0 and gm([2], [(3, 4, "B")], (3, 4, "B"), {"groups": 2}) is MIXED
    assert ln([0], [("B", 3, 4)], ("B", 3, 4), {"shape": (3, 4), "eps": 1e-5}) == 0
    assert ln([1], [(2, "B", 4)], (2, "B", 4), {"shape": (4,), "eps": 1e-5}) == 1
    assert ln([1], [(2, "B", 4)], (2, "B", 4), {"shape": ("B", 4), "eps": 1e-5}) is MIXED
    assert ln([0], [("B", 4)], ("B", 4), {"shape": ("B", 4), "eps": 1e-5}) is MIXED


def test_solve_einsum_and_spmm_move_or_mix_the_batch_axis():
    """solve: batch dims and b's columns are independent, A's matrix dims and b's rows mix; einsum: the batch follows
    its letter to the output, and mixes when that letter is summed; spmm: x's rows mix (IGNN's nodes), its columns
    do not, and a sparse matrix is never per sample."""
    solve, einsum, spmm = (PRIMITIVES[p].batch for p in ("solve", "einsum", "spmm"))
    assert solve([0, 0], [("B", 3, 3), ("B", 3)], ("B", 3), {}) == 0
    assert solve([None, 1], [(3, 3), (3, "B")], (3, "B"), {}) == 1  # samples as columns of b
    assert solve([None, 0], [(3, 3), ("B", 3, 2)], ("B", 3, 2), {}) == 0
    assert solve([None, 1], [(1, 3, 3), (2, "B")], (2, "B"), {}) is MIXED  # b's rows (a vector of length B)
    assert solve([1, None], [(2, "B", "B"), ("B",)], (2, "B"), {}) is MIXED  # A's rows
    assert solve([0, None], [("B", 2, 3, 3), (3, 1)], ("B", 2, 3, 1), {}) == 0  # broadcast batch dims
    eq = {"equation": "bi,ij->bj"}
    assert einsum([0, None], [("B", 3), (3, 4)], ("B", 4), eq) == 0
    assert einsum([1, None], [(3, "B"), ("B", 4)], (3, 4), eq) is MIXED  # i is summed
    assert einsum([0, 1], [("B", 3), (3, "B")], ("B", "B"), eq) is MIXED  # two letters carry it
    assert einsum([None, 1], [(2, 3), (3, "B")], (2, "B"), {"equation": "bi,ij->bj"}) == 1
    assert einsum([1, None], [(2, "B", 3), (3, 4)], (2, "B", 4), {"equation": "...ij,jk->...ik"}) == 1
    assert einsum([0, None], [("B", 2, 3, 4), (2, 4, 5)], ("B", 2, 3, 5), {"equation": "...ij,...jk->...ik"}) == 0
    assert einsum([None, 0], [(2, 3, 4), ("B", 1, 4, 5)], ("B", 2, 3, 5), {"equation": "...ij,...jk->...ik"}) == 0
    assert einsum([0], [("B", 3)], (3, "B"), {"equation": "bi->ib"}) == 1
    assert spmm([None, 1], [("N", "N"), ("N", "B")], ("N", "B"), {"transpose": False}) == 1
    assert spmm([None, 0], [("N", "N"), ("N", 4)], ("N", 4), {"transpose": True}) is MIXED
    assert spmm([MIXED, None], [("N", "N"), ("N", 4)], ("N", 4), {"transpose": False}) is MIXED


def test_indexing_and_resampling_rules():
    """gather keeps the samples where x and the index have them, off the gathered dim; index_select needs a
    sample-free index; an Embedding follows its index; pools, resampling and grid_sample work on trailing dims."""
    gather, select, emb = (PRIMITIVES[p].batch for p in ("gather", "index_select", "embedding"))
    assert gather([0, 0], [("B", 5, 3), ("B", 2, 3)], ("B", 2, 3), {"dim": 1}) == 0
    assert gather([0, None], [("B", 5), ("B", 2)], ("B", 2), {"dim": 0}) is MIXED  # gathers among the samples
    assert gather([0, 1], [("B", 5), (5, "B")], (5, "B"), {"dim": 1}) is MIXED
    assert PRIMITIVES["gather_backward"].batch([0, 0, 0], [("B", 2), ("B", 2), ("B", 5)], ("B", 5), {"dim": 1}) == 0
    assert select([0, None], [("B", 5, 3), (4,)], ("B", 4, 3), {"dim": 1}) == 0
    assert select([0, None], [("B", 5), (4,)], (4, 5), {"dim": 0}) is MIXED
    assert select([None, 0], [(5, 3), ("B",)], ("B", 3), {"dim": 0}) is MIXED  # a batched index: judged mixing
    assert emb([0, None], [("B", "T"), (10, 4)], ("B", "T", 4), {}) == 0
    assert emb([1, None], [("T", "B"), (10, 4)], ("T", "B", 4), {}) == 1
    assert PRIMITIVES["embedding_backward"].batch([0, 0, None], [("B", 3, 4), ("B", 3), (10, 4)], (10, 4), {}) \
        is MIXED  # the table's gradient sums over the samples
    pool = {"kernel": (2, 2), "stride": None, "padding": (0, 0)}
    for prim in ("avg_pool2d", "max_pool2d"):
        assert PRIMITIVES[prim].batch([0], [("B", 2, 4, 4)], ("B", 2, 2, 2), pool) == 0
        assert PRIMITIVES[prim].batch([2], [(1, 2, "B", 4)], (1, 2, "B/2", 2), pool) is MIXED
    assert PRIMITIVES["max_pool2d_backward"].batch([0, 0], [("B", 2, 2, 2), ("B", 2, 4, 4)], ("B", 2, 4, 4), pool) == 0
    grid = PRIMITIVES["grid_sample"].batch
    assert grid([0, 0], [("B", 2, 4, 4), ("B", 3, 3, 2)], ("B", 2, 3, 3), {}) == 0
    assert grid([1, None], [(1, "B", 4, 4), (1, 3, 3, 2)], (1, "B", 3, 3), {}) is MIXED
    assert PRIMITIVES["grid_sample_vjp"].batch([0, 0, 0], [("B", 2, 3, 3), ("B", 2, 4, 4), ("B", 3, 3, 2)],
                                               ("B", 2, 4, 4), {"path": (0,)}) == 0
    assert PRIMITIVES["pad"].batch([0], [("B", 4)], ("B", 6), {"pad": (1, 1)}) == 0
    assert PRIMITIVES["pad"].batch([0], [("B", 4)], ("B+2", 4), {"pad": (0, 0, 1, 1)}) is MIXED


def test_extern_and_dropout_rules():
    """An extern keeps samples apart only when declared samplewise (its VJP in the parameters sums over them);
    dropout's x and its per-sample seeds share axis 0."""
    ext, vjp, drop = PRIMITIVES["extern"].batch, PRIMITIVES["extern_vjp"].batch, PRIMITIVES["dropout"].batch
    shapes = [(), ("P",), ("B", 4)]
    sw = {"samplewise": True}
    assert ext([None, None, 0], shapes, ("B", 4), sw) == 0
    assert ext([None, None, 0], shapes, ("B", 4), {"samplewise": False}) is MIXED
    assert ext([None, None, None], [(), ("P",), (4,)], (4,), sw) is None
    assert ext([None, None, None], [(), ("P",), (4,)], ("B", 4), sw) is MIXED  # sized by the batch, from nothing
    assert vjp([None, None, 0, 0], shapes + [("B", 4)], ("B", 4), {**sw, "chain": (2,)}) == 0
    assert vjp([None, None, 0, 0], shapes + [("B", 4)], ("P",), {**sw, "chain": (1,)}) is MIXED
    assert drop([0, 0], [("B", 4), ("B",)], ("B", 4), {}) == 0
    assert drop([1, 0], [(4, "B"), ("B",)], (4, "B"), {}) is MIXED
