"""The zoo's models (specs/zoo/) written as plain PyTorch maps and solved by ``fpidsl.fixed_point``: the traced
path gives the autograd path's numbers, and ``trace_status`` says how each map traced.

monDEQ, Hopfield, ISTA and Sinkhorn are in tests/runtime/test_fixed_point_trace.py; here are the others, each
written the natural torch way (modules, ``F.*``, ``torch.sparse.mm``), not in the spec's words. A case records how
it is expected to trace: fully (every operation a primitive), with externs (the named operations run as
themselves, derivatives by autograd), or not at all (``fixed_point`` falls back to ``f``, silently).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.tracing import trace_status
from ..zoo.test_zoo import ZOO_TABLE
from .helpers import as_tuple, smooth_loss
from .test_fixed_point_trace import _entry

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 3000, "on_fail": "raise"}


def soft_threshold(v, t):
    return torch.sign(v) * torch.relu(v.abs() - t)


def shrunk(module: nn.Module, scale: float) -> nn.Module:
    """``module`` with its weights scaled by ``scale`` (a contraction at initialisation), in float64."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                p.mul_(scale)
    return module.to(DT)


class LISTA(nn.Module):
    """LISTA (Gregor & LeCun 2010): x <- S_theta(W_e y + S x), one threshold per code entry (S x: x @ S.T)."""

    def __init__(self, m=8, n=5):
        super().__init__()
        self.We = nn.Linear(m, n, bias=False)
        self.S = nn.Parameter(0.1 * torch.randn(n, n))
        self.theta = nn.Parameter(torch.full((n,), 0.05))

    def forward(self, x, y):
        return soft_threshold(self.We(y) + x @ self.S.T, self.theta)


class ImplicitEuler(nn.Module):
    """One implicit Euler step of dy/dt = f(y): y1 = y0 + h f(y1), f a two-layer MLP."""

    def __init__(self, d=4, hidden=16, h=0.5):
        super().__init__()
        self.fc1, self.fc2, self.h = nn.Linear(d, hidden), nn.Linear(hidden, d), h

    def forward(self, y1, y0):
        return y0 + self.h * self.fc2(torch.tanh(self.fc1(y1)))


class BoxQP(nn.Module):
    """Projected gradient on ½xᵀQx + U(a)ᵀx over the box [-1, 1]ᴺ, Q = LLᵀ + εI (the gradient written out)."""

    def __init__(self, d=4, n=5, eps=0.5, eta=0.4):
        super().__init__()
        self.L = nn.Parameter(0.3 * torch.randn(n, n))
        self.U = nn.Linear(d, n)
        self.eps, self.eta = eps, eta

    def forward(self, x, a):
        Q = self.L @ self.L.T + self.eps * torch.eye(self.L.shape[0], dtype=x.dtype)
        return torch.clamp(x - self.eta * (x @ Q + self.U(a)), -1, 1)


class IGNN(nn.Module):
    """Implicit graph network (Gu et al. 2020) on a batch of dense graphs: W X A + Omega U A with the nodes as rows,
    A^T X W^T + A^T U Omega^T; the rows of V above |.|_1 = κ < 1 scaled down to κ."""

    def __init__(self, d=3, h=6, kappa=0.9):
        super().__init__()
        self.V = nn.Parameter(0.3 * torch.randn(h, h))
        self.Omega = nn.Linear(d, h, bias=False)
        self.kappa = kappa

    def weight(self):
        return self.V * (self.kappa / self.V.abs().sum(dim=1, keepdim=True)).clamp(0, 1)

    def forward(self, X, A, U):
        At = A.transpose(1, 2)
        return torch.relu(At @ X @ self.weight().T + At @ self.Omega(U))


class SparseIGNN(IGNN):
    """The IGNN on one graph whose adjacency is a sparse COO tensor: the nodes are the batch. The map is given
    the transposed adjacency ``At`` (a sparse argument: ``torch.sparse.mm(At, X)`` traces to spmm)."""

    def forward(self, X, At, U):
        return torch.relu(torch.sparse.mm(At, X) @ self.weight().T + torch.sparse.mm(At, self.Omega(U)))


class MDEQCell(nn.Module):
    """MDEQ's BasicBlock (Bai, Koltun & Kolter 2020): GN3(relu(z + GN2(x + drop(conv2(relu(GN1(conv1 z))))))),
    bias-free convolutions; its (spatial, variational) dropout in eval mode, the identity."""

    def __init__(self, c=4, hidden=8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.gn1, self.gn2, self.gn3 = nn.GroupNorm(2, hidden), nn.GroupNorm(2, c), nn.GroupNorm(2, c)
        self.drop = nn.Dropout(0.2)

    def forward(self, z, x):
        return self.gn3(F.relu(z + self.gn2(x + self.drop(self.conv2(F.relu(self.gn1(self.conv1(z))))))))


class Residual(nn.Module):
    """One resolution's MDEQ BasicBlock (without its dropout, as in eval mode) given its injection (or none), with
    its last GN given as weight and bias (``F.group_norm``)."""

    def __init__(self, c, hidden, last_weight=1.0):
        super().__init__()
        self.conv_a = nn.Conv2d(c, hidden, 3, padding=1, bias=False)
        self.conv_b = nn.Conv2d(hidden, c, 3, padding=1, bias=False)
        self.gn_a, self.gn_b = nn.GroupNorm(2, hidden), nn.GroupNorm(2, c)
        self.w, self.b = nn.Parameter(torch.full((c,), last_weight)), nn.Parameter(torch.zeros(c))

    def forward(self, z, x=None):
        y = self.conv_b(F.relu(self.gn_a(self.conv_a(z))))
        return F.group_norm(F.relu(z + self.gn_b(y if x is None else x + y)), 2, self.w, self.b)


class MDEQTwoScale(nn.Module):
    """MDEQ's module with two resolutions: the input injected at the fine one only, fused by a strided
    convolution and GN down, a 1x1 convolution, GN and nearest upsampling up, then relu -> 1x1 conv -> GN."""

    def __init__(self, c=4, hidden=8):
        super().__init__()
        self.block1, self.block2 = Residual(c, hidden), Residual(c, hidden, 0.05)
        self.down, self.down_gn = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(2, c)
        self.up, self.up_gn = nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(2, c)
        self.post1, self.post1_gn = nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(1, c)
        self.post2, self.post2_gn = nn.Conv2d(c, c, 1, bias=False), nn.GroupNorm(1, c)
        with torch.no_grad():
            self.up_gn.weight.fill_(0.1)
            self.post1_gn.weight.fill_(0.1)

    def forward(self, zs, x):
        z1, z2 = zs
        f1, f2 = self.block1(z1, x), self.block2(z2)
        up = F.interpolate(self.up_gn(self.up(f2)), scale_factor=2, mode="nearest")
        return (self.post1_gn(self.post1(F.relu(f1 + up))),
                self.post2_gn(self.post2(F.relu(f2 + self.down_gn(self.down(f1))))))


class DEQFlow(nn.Module):
    """DEQ-Flow's update (Bai et al. 2022): a ConvGRU on the correlation looked up at the current flow."""

    def __init__(self, c=4, hidden=6, motion=4, side=6):
        super().__init__()
        self.enc = nn.Conv2d(3, motion, 3, padding=1)
        self.convz, self.convr, self.convq = (nn.Conv2d(hidden + motion + c, hidden, 3, padding=1) for _ in range(3))
        self.head = nn.Conv2d(hidden, 2, 3, padding=1)
        self.px = 2 / (side - 1)
        self.scale = c ** 0.5  # RAFT's correlation / sqrt(C)

    def forward(self, h, f1, f2, ctx, coords):
        flow = self.head(h)
        target = coords + self.px * flow.permute(0, 2, 3, 1)
        corr = (f1 * F.grid_sample(f2, target, align_corners=True)).sum(dim=1, keepdim=True) / self.scale
        x = torch.cat([F.relu(self.enc(torch.cat([corr, flow], dim=1))), ctx], dim=1)
        hx = torch.cat([h, x], dim=1)
        zg, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], dim=1)))
        return (1 - zg) * h + zg * q


class DEQTransformer(nn.Module):
    """The DEQ-Transformer cell (Bai, Kolter & Koltun 2019): the input injected into q, k, v only, through its own
    projection ``inj`` of sqrt(D) emb(tokens); causal attention with the residual at z; a ReLU feed-forward;
    post-norm LayerNorms without affine parameters (nn.LayerNorm(elementwise_affine=False)). The attention is
    written with tensor ops (a bias-free QKV projection, chunk, reshape, softmax)."""

    def __init__(self, vocab=11, width=8, heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.inj = nn.Linear(width, 3 * width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)
        self.ff1, self.ff2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.ln1 = nn.LayerNorm(width, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(width, elementwise_affine=False)
        self.width, self.heads, self.length = width, heads, 6

    def forward(self, z, tokens):
        return self.cell(z, self.emb(tokens))

    def heads_of(self, w, part):
        """q, k or v (part 0, 1, 2) of the projections w [B, T, 3D], split into heads: [B, heads, T, D / heads]."""
        d = self.width
        return w[:, :, part * d:(part + 1) * d].reshape(-1, self.length, self.heads, d // self.heads).transpose(1, 2)

    def attention(self, w):
        q, k, v = (self.heads_of(w, i) for i in range(3))
        t = self.length
        mask = torch.triu(torch.full((t, t), -1e9, dtype=w.dtype), diagonal=1)
        p = torch.softmax(q @ k.transpose(-1, -2) / (self.width // self.heads) ** 0.5 + mask, dim=-1)
        return (p @ v).transpose(1, 2).reshape(-1, t, self.width)

    def cell(self, z, embedded):
        w = self.qkv(z) + self.inj(self.width ** 0.5 * embedded)
        h = self.ln1(z + self.out(self.attention(w)))
        return self.ln2(h + self.ff2(F.relu(self.ff1(h))))


class EmbeddedTransformer(DEQTransformer):
    """The DEQ-Transformer cell given the embedded tokens (``emb(tokens)``, float) instead of the token ids."""

    def forward(self, z, embedded):
        return self.cell(z, embedded)


class TransformerSDPA(DEQTransformer):
    """The DEQ-Transformer cell with ``F.scaled_dot_product_attention`` (causal) for the attention, given the
    embedded tokens."""

    def attention(self, w):
        q, k, v = (self.heads_of(w, i) for i in range(3))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a.transpose(1, 2).reshape(-1, self.length, self.width)

    def forward(self, z, embedded):
        return self.cell(z, embedded)


class ICNN(nn.Module):
    """Gradient descent on an input-convex network's energy (Amos, Xu & Kolter 2017), step 0.5.

    E(y) = softplus(w1)·softplus(W0 y + U0 x) + u1(x) + ½μ|y|², so ∇E = (sigmoid(W0 y + U0 x) softplus(w1)) W0
    + μy, written out: ``torch.autograd.grad`` inside the map cannot be traced by torch.fx (see ICNNByAutograd)."""

    def __init__(self, d=4, hidden=8, mu=1.0):
        super().__init__()
        self.W0, self.U0 = nn.Linear(d, hidden), nn.Linear(d, hidden, bias=False)
        self.w1 = nn.Parameter(torch.randn(hidden))
        self.u1 = nn.Linear(d, 1)
        self.mu, self.step = mu, 0.5

    def energy_gradient(self, y, x):
        return (torch.sigmoid(self.W0(y) + self.U0(x)) * F.softplus(self.w1)) @ self.W0.weight + self.mu * y

    def forward(self, y, x):
        return y - self.step * self.energy_gradient(y, x)


class ICNNByAutograd(ICNN):
    """The same descent with ∇E taken by autograd: torch.fx cannot trace ``torch.autograd.grad``."""

    def energy(self, y, x):
        z1 = F.softplus(self.W0(y) + self.U0(x))
        return (F.softplus(self.w1) * z1).sum(-1) + self.u1(x)[:, 0] + 0.5 * self.mu * y.square().sum(-1)

    def forward(self, y, x):
        with torch.enable_grad():
            y = y if y.requires_grad else y.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.energy(y, x).sum(), y, create_graph=True)
        return y - self.step * g


@dataclass
class Case:
    """A zoo model as a PyTorch map: ``f``, its start, its arguments, the input and the weight differentiated
    (``wrt``: an argument's position and a parameter's name), and how it traces: ``externs`` (the extern names
    expected; empty: fully), or ``falls_back`` (the reason's words)."""

    f: Callable
    x0: object
    args: tuple
    wrt: tuple[int | None, str]
    externs: set[str] = field(default_factory=set)
    falls_back: str | None = None


def _cases() -> dict[str, Case]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    b = 2
    normal, z4 = ZOO_TABLE.normal, lambda *s: torch.zeros(b, *s, dtype=DT)  # noqa: E731
    graphs, sparse = ZOO_TABLE.directed_graphs(g, b, 5), ZOO_TABLE.sparse_graph(g, 7).t().coalesce()  # A^T
    return {
        "lista": Case(LISTA().to(DT), z4(5), (normal(g, b, 8),), (0, "S")),
        "implicit_euler": Case(shrunk(ImplicitEuler(), 0.5), None, (normal(g, b, 4),), (0, "fc1.weight")),
        "box_qp": Case(BoxQP().to(DT), z4(5), (normal(g, b, 4, scale=2.0),), (0, "L")),
        "ignn": Case(IGNN().to(DT), z4(5, 6), (graphs, normal(g, b, 5, 3)), (1, "V")),  # .max(): a primitive
        "ignn_sparse": Case(SparseIGNN().to(DT), torch.zeros(7, 6, dtype=DT), (sparse, normal(g, 7, 3)),
                            (1, "V")),  # torch.sparse.mm on a sparse argument: spmm, A an input sparse [7, 7]
        "mdeq": Case(shrunk(MDEQCell(), 0.3).eval(), z4(4, 4, 4), (normal(g, b, 4, 4, 4),), (0, "conv1.weight")),
        "mdeq_two_scale": Case(shrunk(MDEQTwoScale(), 0.3), (z4(4, 4, 4), z4(4, 2, 2)), (normal(g, b, 4, 4, 4),),
                               (0, "down.weight")),  # F.avg_pool2d, F.interpolate: primitives
        "deq_flow": Case(shrunk(DEQFlow(), 0.3), z4(6, 6, 6),
                         (*(normal(g, b, 4, 6, 6) for _ in range(3)), ZOO_TABLE.pixel_grid(b, 6)),
                         (1, "convq.weight")),  # F.grid_sample: a primitive
        "deq_transformer": Case(shrunk(DEQTransformer(), 0.5).eval(), z4(6, 8),
                                (torch.randint(0, 11, (b, 6), generator=g),), (None, "qkv.weight")),
        # tokens: input tokens : int [B, 6], self.emb(tokens) the Embedding module (issue 18)
        "deq_transformer_embedded": Case(shrunk(EmbeddedTransformer(), 0.5).eval(), z4(6, 8), (normal(g, b, 6, 8),),
                                         (0, "qkv.weight")),
        "deq_transformer_sdpa": Case(shrunk(TransformerSDPA(), 0.5), z4(6, 8), (normal(g, b, 6, 8),),
                                     (0, "qkv.weight"), externs={"scaled_dot_product_attention_fn"}),
        "icnn": Case(shrunk(ICNN(), 0.5), z4(4), (normal(g, b, 4),), (0, "W0.weight")),
        "icnn_autograd": Case(shrunk(ICNNByAutograd(), 0.5), z4(4), (normal(g, b, 4),), (0, "W0.weight"),
                              falls_back="torch.fx cannot trace the map"),
    }


def _start(case: Case):
    return case.args[0].clone() if case.x0 is None else case.x0


CASES = _cases()


def _solve_and_differentiate(case: Case, trace: bool):
    """The fixed point and the gradients of a scalar loss w.r.t. the case's input (when it has one) and weight."""
    position, weight = case.wrt
    args = tuple(a.detach().clone().requires_grad_(i == position) for i, a in enumerate(case.args))
    w = dict(case.f.named_parameters())[weight]
    x = fpidsl.fixed_point(case.f, _start(case), *args, trace=trace, backward=TIGHT, **TIGHT)
    wrt = (w,) if position is None else (args[position], w)
    return x, torch.autograd.grad(smooth_loss(x), wrt)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_zoo_model_written_in_pytorch_traces_as_expected_and_agrees_with_autograd(name):
    case = CASES[name]
    traced, why = trace_status(case.f, _start(case), *case.args)
    if case.falls_back is None:
        assert traced is not None, why
        assert set(traced.spec.externs) == case.externs, traced.spec.text
    else:
        assert traced is None and why.startswith(f"not traced: {case.falls_back}"), why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a mismatch nor a fallback says anything
        x_on, g_on = _solve_and_differentiate(case, True)
    assert set(_entry(case.f)) == {case.falls_back is None}  # the solve used the compiled map, or f
    x_off, g_off = _solve_and_differentiate(case, False)
    with torch.no_grad():  # a fixed point indeed
        for a, b in zip(as_tuple(case.f(x_off, *case.args)), as_tuple(x_off)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for a, b in zip(as_tuple(x_on), as_tuple(x_off)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for a, b in zip(g_on, g_off):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_the_icnn_gradient_written_out_is_autograds():
    torch.manual_seed(1)
    written, by_autograd = ICNN().to(DT), ICNNByAutograd().to(DT)
    by_autograd.load_state_dict(written.state_dict())
    y, x = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(written(y, x), by_autograd(y, x), rtol=0, atol=1e-14)


class Pools(nn.Module):
    """torch's pooling and resampling functions with their options: each maps onto a primitive."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, z):
        down = F.max_pool2d(self.conv(x), 2) + F.avg_pool2d(x, 3, stride=2, padding=1)
        up = F.interpolate(down, scale_factor=2, mode="bilinear", align_corners=True)
        return 0.3 * torch.tanh(up + F.interpolate(F.avg_pool2d(x, 2), scale_factor=2)) + z


def test_functional_pools_and_resampling_trace_onto_the_primitives():
    g = torch.Generator().manual_seed(5)
    f = shrunk(Pools(), 0.5)
    z = ZOO_TABLE.normal(g, 2, 2, 4, 4).requires_grad_()
    traced, why = trace_status(f, torch.zeros_like(z), z)
    assert traced is not None and traced.spec.externs == {}, why
    for name in ("max_pool2d(", "avg_pool2d(", "interpolate("):
        assert name in traced.spec.text
    on = fpidsl.fixed_point(f, torch.zeros_like(z), z, backward=TIGHT, **TIGHT)
    off = fpidsl.fixed_point(f, torch.zeros_like(z), z, trace=False, backward=TIGHT, **TIGHT)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-10)
    weight = f.conv.weight
    grads_on = torch.autograd.grad(smooth_loss(on), (z, weight))
    grads_off = torch.autograd.grad(smooth_loss(off), (z, weight))
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        assert a.abs().sum() > 0


def test_max_and_min_over_every_element_or_elementwise_trace_onto_primitives():
    g = torch.Generator().manual_seed(6)

    def f(x, z, W):  # a global scale from every element, an elementwise max and min
        scale = 0.5 / (1 + W.abs().max())
        return torch.min(torch.max(scale * torch.tanh(x @ W) + z, -z.abs()), z.abs() + 1) + 0.1 * x.min()

    z = ZOO_TABLE.normal(g, 3, 4).requires_grad_()
    W = ZOO_TABLE.normal(g, 4, 4).requires_grad_()
    traced, why = trace_status(f, torch.zeros_like(z), z, W)
    assert traced is not None and traced.spec.externs == {}, why
    assert "maximum(" in traced.spec.text and "minimum(" in traced.spec.text and "max(" in traced.spec.text
    on = fpidsl.fixed_point(f, torch.zeros_like(z), z, W, backward=TIGHT, **TIGHT)
    off = fpidsl.fixed_point(f, torch.zeros_like(z), z, W, trace=False, backward=TIGHT, **TIGHT)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-10)
    grads_on = torch.autograd.grad(smooth_loss(on), (z, W))
    grads_off = torch.autograd.grad(smooth_loss(off), (z, W))
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
