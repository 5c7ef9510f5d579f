"""The zoo's specs against the reference implementations they claim to be, written again here in plain PyTorch from
the papers' reference code (not from the specs): each reference is given the compiled layer's own parameter tensors
(``named_parameters``: so the gradients flow into the same leaves), iterated from zeros to its fixed point in
float64 under autograd, and compared with the layer's output and with the gradients of a nonlinear loss in every
parameter and float input.

* DEQ-Transformer: locuslab/deq DEQ-Sequence/models/deq_transformer.py (WeightShareSelfAttention,
  WeightSharePositionwiseFF, DEQTransformerLM._forward), channels first [B, D, T] as there, without the relative
  positional terms (which the spec leaves out, as its header says).
* MDEQ: locuslab/mdeq lib/models/mdeq_core.py (BasicBlock, DownsampleModule, UpsampleModule, MDEQModule's fusion and
  post_fuse_layers, the zero injection of the coarse resolution) and lib/modules/optimizations.py
  (VariationalHidDropout2d with spatial=True: the mask [B, C, 1, 1], expanded over the pixels).
* IGNN: SwiftieH/IGNN graphclassification/functions.py (inn_pred: X of shape [H, N], nodes as columns, W X A) and
  layers.py (b_Omega = Omega_1 U A), on a directed row-normalised graph, where A and A^T differ.
* LISTA: Gregor & LeCun 2010, Z <- h_theta(W_e X + S Z) with codes as columns.
* Sinkhorn: the textbook log-domain iteration (Peyre & Cuturi 2019, remark 4.23), alternating f and g, no
  normalisation.
* DEQ-Flow: RAFT's CorrBlock (the correlation volume fmap1^T fmap2 / sqrt(C), bilinear lookup at coords1, radius 0,
  one level) and ConvGRU (locuslab/deq-flow code.v.2.0/core/corr.py and update.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fpidsl
from fpidsl.runtime import ops

from .test_zoo import MODELS, TIGHT, ZOO_TABLE

DT = torch.float64


def model(key):
    return next(m for m in MODELS if m.key == key)


def build(key, seed=0):
    torch.manual_seed(seed)
    m = model(key)
    return fpidsl.load(m.path, name=m.layer)(solve=TIGHT, backward=TIGHT).double()


def iterate(step, x0, k):
    """k plain iterations of ``step`` from ``x0`` (a tensor or a tuple), under autograd."""
    x = x0
    for _ in range(k):
        x = step(x)
    return x


def loss_of(outputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.manual_seed(123)
    return sum((torch.sin(o) * torch.randn(o.shape, dtype=o.dtype)).sum() + 0.3 * o.square().sum() for o in outputs)


def assert_same(layer, inputs, reference, rtol=1e-8, call=None):
    """The layer's outputs equal the reference's, and so do the gradients of a loss in every parameter and float
    input. ``call(*inputs)`` calls the layer (by default the layer itself)."""
    params = dict(layer.named_parameters())
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    wrt = leaves + list(params.values())
    got_out = (call or layer)(*inputs)
    want_out = reference(params, *inputs)
    for g, w in zip(got_out if isinstance(got_out, tuple) else (got_out,),
                    want_out if isinstance(want_out, tuple) else (want_out,)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11)
    got = torch.autograd.grad(loss_of(got_out), wrt, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(loss_of(want_out), wrt, allow_unused=True, materialize_grads=True)
    names = [f"input {k}" for k in range(len(leaves))] + list(params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-10, msg=lambda m: f"{name}: {m}")
    return got_out


def floats(inputs):
    return tuple(t.requires_grad_() if t.layout == torch.strided and t.is_floating_point() else t for t in inputs)


# --------------------------------------------------------------------------- DEQ-Transformer


def deq_transformer_reference(p, tokens, n_head=2, k=400):
    """DEQTransformerLM's cell (post-norm, no mems, no positional terms), channels first as in the reference."""
    d_model = p["qkv.weight"].shape[1]
    d_head = d_model // n_head
    word_emb = p["emb.weight"][tokens] * d_model ** 0.5                       # AdaptiveEmbedding's emb_scale
    u1s = F.conv1d(word_emb.transpose(1, 2), p["inj.weight"][:, :, None], p["inj.bias"])  # inject_conv
    bsz, qlen = tokens.shape

    def func(z1ss):  # RelPartialLearnableDecoderLayer.forward: dec_attn, then pos_ff
        w_heads = F.conv1d(z1ss, p["qkv.weight"][:, :, None])                   # qkv_net, no bias
        w_heads = w_heads + u1s                                                 # input injection
        w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=1)
        w_head_q = w_head_q.view(bsz, n_head, d_head, qlen)
        w_head_k = w_head_k.view(bsz, n_head, d_head, qlen)
        w_head_v = w_head_v.view(bsz, n_head, d_head, qlen)
        attn_score = torch.einsum("bndi,bndj->bnij", w_head_q, w_head_k) * (1 / d_head ** 0.5)
        attn_mask = torch.triu(torch.ones(qlen, qlen), diagonal=1) > 0
        attn_score = attn_score.masked_fill(attn_mask[None, None], -float("inf"))
        attn_prob = F.softmax(attn_score, dim=-1)
        attn_vec = torch.einsum("bnij,bndj->bndi", attn_prob, w_head_v).contiguous().view(bsz, d_model, qlen)
        attn_out = F.conv1d(attn_vec, p["out.weight"][:, :, None], p["out.bias"])  # o_net
        out = F.layer_norm((attn_out + z1ss).transpose(1, 2), (d_model,)).transpose(1, 2)
        inp = out.transpose(1, 2)                                               # WeightSharePositionwiseFF
        relu_out1 = F.relu(F.linear(inp, p["ff1.weight"], p["ff1.bias"]))
        out2 = F.linear(relu_out1, p["ff2.weight"], p["ff2.bias"])
        return F.layer_norm(out2 + inp, (d_model,)).transpose(1, 2)

    z = iterate(func, torch.zeros(bsz, d_model, qlen, dtype=DT), k)
    return F.linear(z.transpose(1, 2), p["logits.weight"], p["logits.bias"])


def test_deq_transformer_is_the_reference_cell():
    layer = build("deq_transformer").eval()
    tokens = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_same(layer, (tokens,), deq_transformer_reference)


# --------------------------------------------------------------------------- MDEQ


def basic_block(p, prefix, x, injection, mask, groups=2, last=None):
    """mdeq_core.BasicBlock.forward (conv3x3 without bias; VariationalHidDropout2d: mask.expand_as(x) * x)."""
    out = F.conv2d(x, p[f"{prefix[0]}.weight"], padding=1)
    out = F.group_norm(out, groups, p[f"{prefix[1]}.weight"], p[f"{prefix[1]}.bias"])
    out = F.relu(out)
    out = F.conv2d(out, p[f"{prefix[2]}.weight"], padding=1)
    out = (out if mask is None else mask.expand_as(out) * out) + injection
    out = F.group_norm(out, groups, p[f"{prefix[3]}.weight"], p[f"{prefix[3]}.bias"])
    out = out + x
    w, b = last if last is not None else (p[f"{prefix[4]}.weight"], p[f"{prefix[4]}.bias"])
    return F.group_norm(F.relu(out), groups, w, b)


def mdeq_reference(p, x, mask=None, k=300):
    names = ("conv1", "gn1", "conv2", "gn2", "gn3")
    return iterate(lambda z: basic_block(p, names, z, x, mask), torch.zeros_like(x), k)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mdeq_is_the_basic_block_with_spatial_variational_dropout(train):
    layer = build("mdeq").train(train)
    (x,) = floats(model("mdeq").inputs(torch.Generator().manual_seed(1), 3))

    def seeded(*inputs):  # the same seeds, hence the same masks, for every call
        torch.manual_seed(11)
        return layer(*inputs)

    mask = None
    if train:
        seeded(x)
        mask = ops.dropout_mask(x, layer._call_seeds, p=0.2, key=0, spatial=True)
        assert mask.shape == (3, 4, 1, 1)  # as VariationalHidDropout2d's zeros_like(x[:, :, :1, :1])
        assert set(mask.unique().tolist()) <= {0.0, 1 / 0.8}
    assert_same(layer, (x,), lambda p, x: mdeq_reference(p, x, mask), call=seeded)


def mdeq_two_scale_reference(p, x, k=200):
    """MDEQModule.forward with two branches: blocks, then fuse_layers (DownsampleModule: conv3x3 stride 2 + GN;
    UpsampleModule: conv1x1 + GN + nearest upsampling), then post_fuse_layers (relu, conv1x1, GN with
    NUM_GROUPS // 2 groups); the injection x at the fine resolution and zeros at the coarse one."""
    injection = [x, torch.zeros(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2, dtype=DT)]

    def module(zs):
        blocks = [basic_block(p, ("conv1a", "gn1a", "conv1b", "gn1b", "gn1c"), zs[0], injection[0], None),
                  basic_block(p, ("conv2a", "gn2a", "conv2b", "gn2b", None), zs[1], injection[1], None,
                              last=(p["gn2c_w"], p["gn2c_b"]))]
        down = F.group_norm(F.conv2d(blocks[0], p["down.weight"], stride=2, padding=1), 2,
                            p["down_gn.weight"], p["down_gn.bias"])
        up = F.interpolate(F.group_norm(F.conv2d(blocks[1], p["up.weight"]), 2, p["up_w"], p["up_b"]),
                           scale_factor=2, mode="nearest")
        fused = [blocks[0] + up, blocks[1] + down]
        return (F.group_norm(F.conv2d(F.relu(fused[0]), p["post1.weight"]), 1, p["post1_w"], p["post1_b"]),
                F.group_norm(F.conv2d(F.relu(fused[1]), p["post2.weight"]), 1, p["post2_gn.weight"],
                             p["post2_gn.bias"]))

    return iterate(module, tuple(torch.zeros_like(i) for i in injection), k)


def test_mdeq_two_scale_is_mdeqs_module():
    layer = build("mdeq_two_scale").eval()
    inputs = floats(model("mdeq_two_scale").inputs(torch.Generator().manual_seed(1), 3))
    assert_same(layer, inputs, mdeq_two_scale_reference)


# --------------------------------------------------------------------------- IGNN


def ignn_weight(V, kappa=0.9):
    """Each row of V with l1 norm above kappa scaled down to kappa, the others kept."""
    norms = V.abs().sum(dim=1, keepdim=True)
    return torch.where(norms > kappa, V * kappa / norms, V)


def inn_pred(W, A, B, k=300):
    """functions.ImplicitFunction.inn_pred: X of shape [H, N] (nodes as columns), X <- relu((A^T (W X)^T)^T + B)."""
    At = A.T
    X = torch.zeros_like(B)
    for _ in range(k):
        X = F.relu((At @ (W @ X).T).T + B)
    return X


def test_ignn_is_the_reference_iteration_on_a_directed_graph():
    layer = build("ignn").eval()
    gen = torch.Generator().manual_seed(1)
    A = ZOO_TABLE.directed_graphs(gen, 3, 6)
    assert not torch.allclose(A, A.transpose(1, 2))
    U = ZOO_TABLE.normal(gen, 3, 6, 3).requires_grad_()

    def reference(p, A, U):
        W = ignn_weight(p["V"])
        states = []
        for a, u in zip(A, U):  # one graph at a time, nodes as columns
            support_1 = p["Omega.weight"] @ u.T                 # Omega_1 U, U of shape [D, N]
            b_omega = (a.T @ support_1.T).T                     # layers.py: support_1 = Omega_1 U A
            states.append(inn_pred(W, a, b_omega).T)
        X = torch.stack(states)
        return F.linear(X.mean(1), p["readout.weight"], p["readout.bias"])

    assert_same(layer, (A, U), reference)
    with torch.no_grad():  # the old A X W^T is another layer on this graph
        (x,) = layer._last_states
        w = ignn_weight(layer.V)
        old = F.relu(A @ x @ w.T + layer.Omega(U))
        assert (old - x).abs().max() > 1e-2


def test_ignn_sparse_is_the_reference_iteration_on_a_directed_graph():
    layer = build("ignn_sparse").eval()
    gen = torch.Generator().manual_seed(1)
    A = ZOO_TABLE.sparse_graph(gen, 9)
    U = ZOO_TABLE.normal(gen, 9, 3).requires_grad_()

    def reference(p, A, U):
        a = A.to_dense()
        X = inn_pred(ignn_weight(p["V"]), a, (a.T @ (U @ p["Omega.weight"].T)).T).T
        return F.linear(X, p["readout.weight"], p["readout.bias"])

    assert_same(layer, (A, U), reference)


def test_the_ignn_weight_never_scales_a_row_up():
    layer = build("ignn")
    with torch.no_grad():
        layer.V.mul_(0.02)  # every row inside the ball: W = V
        layer.V[0].mul_(500.0)  # one row far outside: scaled down to kappa, the others kept
        A = ZOO_TABLE.directed_graphs(torch.Generator().manual_seed(0), 1, 6)
        U = ZOO_TABLE.normal(torch.Generator().manual_seed(0), 1, 6, 3)
        layer(A, U)
        (x,) = layer._last_states
        W = ignn_weight(layer.V)
        torch.testing.assert_close(W[1:], layer.V[1:], rtol=0, atol=0)
        assert abs(float(W[0].abs().sum()) - 0.9) < 1e-12
        torch.testing.assert_close(x, F.relu(A.transpose(1, 2) @ x @ W.T + A.transpose(1, 2) @ layer.Omega(U)),
                                   rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- LISTA, Sinkhorn


def test_lista_is_gregor_and_lecuns_with_s_acting_on_columns():
    layer = build("lista").eval()
    (y,) = floats(model("lista").inputs(torch.Generator().manual_seed(1), 4))

    def reference(p, y):
        X = y.T                                                # signals as columns
        Z = torch.zeros(p["S"].shape[0], X.shape[1], dtype=DT)
        B = p["We.weight"] @ X
        theta = p["theta"][:, None]
        for _ in range(200):
            C = B + p["S"] @ Z                                 # S Z
            Z = torch.sign(C) * F.relu(C.abs() - theta)
        return Z.T

    assert_same(layer, (y,), reference)


def test_sinkhorn_is_the_log_domain_iteration():
    layer = build("sinkhorn").eval()
    assert layer.P.bias is None
    inputs = floats(model("sinkhorn").inputs(torch.Generator().manual_seed(1), 3))

    def reference(p, u, v, eps=0.5):
        pu, pv = u @ p["P.weight"].T, v @ p["P.weight"].T
        C = torch.cdist(pu, pv) ** 2
        n, m = C.shape[1:]
        f = torch.zeros(C.shape[:2], dtype=DT)
        log_a, log_b = -torch.log(torch.tensor(float(n), dtype=DT)), -torch.log(torch.tensor(float(m), dtype=DT))
        for _ in range(400):
            g = eps * log_b - eps * torch.logsumexp((f[:, :, None] - C) / eps, 1)
            f = eps * log_a - eps * torch.logsumexp((g[:, None] - C) / eps, 2)
        return torch.exp((f[:, :, None] + g[:, None] - C) / eps)

    assert_same(layer, inputs, reference, rtol=1e-7)


# --------------------------------------------------------------------------- DEQ-Flow


def raft_lookup(fmap1, fmap2, coords1):
    """CorrBlock with one level and radius 0: corr = fmap1^T fmap2 / sqrt(C) as a volume [B*H*W, 1, H, W],
    sampled bilinearly (align_corners) at each pixel's target coords1 (in pixels, (x, y))."""
    b, c, h, w = fmap1.shape
    corr = torch.matmul(fmap1.view(b, c, h * w).transpose(1, 2), fmap2.view(b, c, h * w)) / c ** 0.5
    corr = corr.reshape(b * h * w, 1, h, w)
    xg = 2 * coords1[..., 0] / (w - 1) - 1
    yg = 2 * coords1[..., 1] / (h - 1) - 1
    grid = torch.stack([xg, yg], dim=-1).reshape(b * h * w, 1, 1, 2)
    return F.grid_sample(corr, grid, align_corners=True).view(b, h, w, 1).permute(0, 3, 1, 2)


def test_deq_flow_is_rafts_lookup_and_conv_gru():
    layer = build("deq_flow").eval()
    f1, f2, ctx, coords = floats(model("deq_flow").inputs(torch.Generator().manual_seed(1), 2))

    def reference(p, f1, f2, ctx, coords, k=200):
        side = f1.shape[-1]
        pixels = (coords + 1) * (side - 1) / 2  # coords0, in pixels

        def conv(name, x):
            return F.conv2d(x, p[f"{name}.weight"], p[f"{name}.bias"], padding=1)

        def gru(h):  # update.py ConvGRU.forward
            flow = conv("head", h)
            corr = raft_lookup(f1, f2, pixels + flow.permute(0, 2, 3, 1))
            x = torch.cat([F.relu(conv("enc", torch.cat([corr, flow], 1))), ctx], 1)
            hx = torch.cat([h, x], dim=1)
            z = torch.sigmoid(conv("convz", hx))
            r = torch.sigmoid(conv("convr", hx))
            q = torch.tanh(conv("convq", torch.cat([r * h, x], dim=1)))
            return (1 - z) * h + z * q

        h = iterate(gru, torch.zeros(f1.shape[0], 6, side, side, dtype=DT), k)
        return conv("head", h)

    got = assert_same(layer, (f1, f2, ctx, coords), reference, rtol=1e-7)
    assert got.abs().max() > 1e-3
