"""torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, functional_call, jvp) and forward-mode AD
(torch.autograd.forward_ad) over fixed_point and over a compiled layer: exact against the same transforms
applied to unrolled iteration, in float64."""
import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.utils._pytree import tree_leaves
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import fpidsl
from fpidsl.runtime import FixedPoint, fixed_point

from .helpers import DTYPE

# torch's first forward-mode use loads its jvp decompositions through torch.jit.script, which warns
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SETTINGS = {"tol": 1e-13, "max_iter": 500, "backward": {"tol": 1e-13, "max_iter": 500}}
STEPS = 80  # contraction factor < 0.5 below: 0.5^80 ~ 1e-24
RTOL = 1e-10


def close(got, want, rtol=RTOL):
    got, want = tree_leaves(got), tree_leaves(want)  # nested: hessian over two arguments, dicts of parameters
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        a, b = a.detach(), b.detach()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
        assert err <= rtol, f"relative error {err:.3g}"


def g(x, a, W):
    return torch.tanh(x @ W.T + a)


def data(seed=0, n=4):
    gen = torch.Generator().manual_seed(seed)
    W = 0.2 * torch.randn(n, n, generator=gen, dtype=DTYPE)
    a = torch.randn(3, n, generator=gen, dtype=DTYPE)
    return a, W


def fp(a, W):
    return fixed_point(g, torch.zeros_like(a), a, W, **SETTINGS)


def unrolled(a, W):
    x = torch.zeros_like(a)
    for _ in range(STEPS):
        x = g(x, a, W)
    return x


TRANSFORMS = {
    "vmap": lambda F, a, W: vmap(F, in_dims=(0, None))(a.unsqueeze(1).expand(3, 2, 4), W),
    "vmap_params": lambda F, a, W: vmap(F, in_dims=(None, 0))(a, torch.stack([W, 0.5 * W])),
    "grad": lambda F, a, W: grad(lambda a, W: torch.sin(F(a, W)).sum(), argnums=(0, 1))(a, W),
    "jacrev": lambda F, a, W: jacrev(F, argnums=(0, 1))(a, W),
    "jacfwd": lambda F, a, W: jacfwd(F, argnums=(0, 1))(a, W),
    "jvp": lambda F, a, W: jvp(F, (a, W), (torch.cos(a), torch.sin(W))),
    "hessian": lambda F, a, W: hessian(lambda W: torch.sin(F(a, W)).sum())(W),
    "jacrev_jacrev": lambda F, a, W: jacrev(jacrev(lambda W: torch.sin(F(a, W)).sum()))(W),
    "jacrev_of_jvp": lambda F, a, W: jacrev(lambda W: jvp(lambda W: F(a, W), (W,), (torch.ones_like(W),))[1])(W),
    # forward over forward: PyTorch drops a jvp rule's own tangent (pytorch/pytorch#197867); see one_level_down
    "jvp_of_jvp": lambda F, a, W: jvp(lambda a: jvp(lambda a: F(a, W), (a,), (torch.cos(a),))[1], (a,),
                                      (torch.sin(a),)),
    "jvp_of_jvp_of_jvp": lambda F, a, W: jvp(
        lambda a: jvp(lambda a: jvp(lambda a: F(a, W), (a,), (torch.cos(a),))[1], (a,), (torch.sin(a),))[1],
        (a,), (torch.ones_like(a),)),
    "jacfwd_jacfwd": lambda F, a, W: jacfwd(jacfwd(lambda W: torch.sin(F(a, W)).sum()))(W),
    "hessian_wrt_both": lambda F, a, W: hessian(lambda a, W: torch.sin(F(a, W)).sum(), argnums=(0, 1))(a, W),
    "jvp_of_grad": lambda F, a, W: jvp(grad(lambda W: torch.sin(F(a, W)).sum()), (W,), (torch.cos(W),)),
    "jvp_of_jacrev_of_jvp": lambda F, a, W: jvp(
        jacrev(lambda W: jvp(lambda W: F(a, W), (W,), (torch.ones_like(W),))[1]), (W,), (torch.sin(W),)),
}


# The state's width for a transform where 4 is costly. jacfwd(jacfwd(.)) over W solves the tangent problem
# slice by slice under two vmaps (fixed_point's vmap rule: transforms.vmap_by_slices), 1 + 2 W.numel() + W.numel()^2
# solves: 289 at 4 (16 s in a serial run of the suite, its slowest in-process test), 100 at 3 (measured at a
# seventh of the time), through the same rules.
WIDTH = {"jacfwd_jacfwd": 3}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_over_fixed_point_match_unrolled(name):
    a, W = data(n=WIDTH.get(name, 4))
    close(TRANSFORMS[name](fp, a, W), TRANSFORMS[name](unrolled, a, W))


def forward_ad_tangent(F, a, W, da, dW):
    with forward_ad.dual_level():
        out = F(forward_ad.make_dual(a, da), forward_ad.make_dual(W, dW))
        return forward_ad.unpack_dual(out).tangent


def test_forward_ad_matches_unrolled_and_stats_record_the_tangent_solve():
    a, W = data(1)
    da, dW = torch.cos(a), torch.sin(W)
    close(forward_ad_tangent(fp, a, W, da, dW), forward_ad_tangent(unrolled, a, W, da, dW))
    with forward_ad.dual_level():
        x, stats = fixed_point(g, torch.zeros_like(a), forward_ad.make_dual(a, da), W, return_stats=True,
                               **SETTINGS)
    assert stats.tangent.forward.phase == "tangent" and bool(stats.tangent.forward.converged.all())


def test_reverse_over_forward_ad_matches_unrolled():
    a, W = data(2)
    W = W.requires_grad_()

    def loss(F):
        return torch.sin(forward_ad_tangent(F, a, W, torch.cos(a), torch.ones_like(W))).sum()

    close(torch.autograd.grad(loss(fp), W)[0], torch.autograd.grad(loss(unrolled), W)[0])


def gradient_tangent(F, a, W, V):
    """Forward over reverse by hand: ``autograd.grad`` of a loss inside ``forward_ad.dual_level``, ``W`` a dual
    along ``V``; the gradient's tangent is the Hessian-vector product."""
    with forward_ad.dual_level():
        W_dual = forward_ad.make_dual(W.clone().requires_grad_(), V)
        (g_W,) = torch.autograd.grad(torch.sin(F(a, W_dual)).sum(), W_dual)
        primal, tangent = forward_ad.unpack_dual(g_W)
    assert tangent is not None, "the gradient lost its tangent"
    return primal, tangent


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_forward_ad_over_the_backward_gives_the_hessian_vector_product(method):
    a, W = data(4)
    V = torch.cos(W)

    def fp_method(a, W):
        return fixed_point(g, torch.zeros_like(a), a, W, method=method, **SETTINGS)

    close(gradient_tangent(fp_method, a, W, V), gradient_tangent(unrolled, a, W, V))
    hvp = jvp(grad(lambda W: torch.sin(unrolled(a, W)).sum()), (W,), (V,))[1]
    close(gradient_tangent(fp_method, a, W, V)[1], hvp)


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(4, 4).to(DTYPE)
        with torch.no_grad():
            self.lin.weight.mul_(0.3)

    def forward(self, x, a):
        return torch.tanh(self.lin(x) + a)


def test_functional_call_over_a_fixed_point_module():
    cell = Cell()
    layer = FixedPoint(cell, solve={"tol": 1e-13, "max_iter": 500}, backward={"tol": 1e-13, "max_iter": 500})
    params = {k: v.detach() for k, v in layer.named_parameters()}
    a, _ = data(4)
    x0 = torch.zeros_like(a)

    def loss_fp(p):
        return torch.sin(functional_call(layer, p, (x0, a))).sum()

    def loss_unrolled(p):
        x = x0
        for _ in range(STEPS):
            x = functional_call(cell, {k.removeprefix("f."): v for k, v in p.items()}, (x, a))
        return torch.sin(x).sum()

    got, want = grad(loss_fp)(params), grad(loss_unrolled)(params)
    for k in params:
        close(got[k], want[k])


SPEC = """
layer TanhFP {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param fc1 : Linear(8, 6, init_scale=0.3)
  param fc2 : Linear(6, 4, init_scale=0.3)
  let h = tanh(fc1(cat([x, a], dim=-1)))
  update x = tanh(fc2(h))
  output x
  solve { tol = 1e-13, max_iter = 500 }
}
"""


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "tanh_fp.fpi"
    path.write_text(SPEC)
    torch.manual_seed(5)
    return fpidsl.load(str(path))(backward={"tol": 1e-13, "max_iter": 500}).to(DTYPE)


def layer_unrolled(layer, params, a):
    values = tuple(params[n] for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    x = torch.zeros_like(a)
    for _ in range(STEPS):
        x = type(layer).step(x, a, *values)
    return x


def test_compiled_layer_under_torch_func(layer):
    params = {k: v.detach() for k, v in layer.named_parameters()}
    a, _ = data(6)

    def F(p, a):
        return functional_call(layer, p, (a,))

    def U(p, a):
        return layer_unrolled(layer, p, a)

    for transform in (
        lambda F: grad(lambda p, a: torch.sin(F(p, a)).sum(), argnums=(0, 1))(params, a),
        lambda F: jacrev(F, argnums=1)(params, a),
        lambda F: jacfwd(F, argnums=1)(params, a),
        lambda F: vmap(F, in_dims=(None, 0))(params, a.unsqueeze(1).expand(3, 2, 4)),
        lambda F: jvp(lambda a: F(params, a), (a,), (torch.cos(a),)),
        lambda F: hessian(lambda w: torch.sin(F({**params, "fc2.bias": w}, a)).sum())(params["fc2.bias"]),
        lambda F: jacfwd(jacfwd(lambda w: torch.sin(F({**params, "fc2.bias": w}, a)).sum()))(params["fc2.bias"]),
        lambda F: jvp(lambda a: jvp(lambda a: F(params, a), (a,), (torch.cos(a),))[1], (a,), (torch.sin(a),)),
    ):
        got, want = transform(F), transform(U)
        if isinstance(got, dict):
            got, want = tuple(got.values()), tuple(want.values())
        elif isinstance(got, tuple) and isinstance(got[0], dict):
            got = (*got[0].values(), got[1])
            want = (*want[0].values(), want[1])
        close(got, want)


def test_compiled_layer_forward_ad_over_the_backward(layer):
    params = {k: v.detach() for k, v in layer.named_parameters()}
    a, _ = data(8)
    V = torch.sin(params["fc1.weight"])

    def tangent_of_gradient(F):
        with forward_ad.dual_level():
            w = forward_ad.make_dual(params["fc1.weight"].clone().requires_grad_(), V)
            (g_w,) = torch.autograd.grad(torch.sin(F({**params, "fc1.weight": w}, a)).sum(), w)
            return forward_ad.unpack_dual(g_w)

    got = tangent_of_gradient(lambda p, a: functional_call(layer, p, (a,)))
    want = tangent_of_gradient(lambda p, a: layer_unrolled(layer, p, a))
    assert got.tangent is not None
    close(tuple(got), tuple(want))


def test_compiled_layer_forward_ad(layer):
    params = {k: v.detach() for k, v in layer.named_parameters()}
    a, _ = data(7)
    da = torch.cos(a)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(layer(forward_ad.make_dual(a, da))).tangent
    want = jvp(lambda a: layer_unrolled(layer, params, a), (a,), (da,))[1]
    close(got, want)


@pytest.mark.parametrize("loss", ["sum", "mean", "square"])
def test_hessian_of_a_plain_sum_of_the_fixed_point(loss):
    """hessian(lambda W: fp(a, W).sum()) raised inside make_dual (the cotangent of .sum() is an expanded tensor,
    which make_dual writes into; a review's attack): it is the unrolled iteration's now."""
    a, W = data()
    reduce = {"sum": lambda x: x.sum(), "mean": lambda x: x.mean(), "square": lambda x: x.square().sum()}[loss]
    close(hessian(lambda W: reduce(fp(a, W)))(W), hessian(lambda W: reduce(unrolled(a, W)))(W))
