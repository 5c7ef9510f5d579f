"""torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, functional_call, jvp) and forward-mode AD
(torch.autograd.forward_ad) over fixed_point and over a compiled layer: exact against the same transforms
applied to unrolled iteration, in float64."""
import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
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
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        a, b = a.detach(), b.detach()
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
        assert err <= rtol, f"relative error {err:.3g}"


def g(x, a, W):
    return torch.tanh(x @ W.T + a)


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = 0.2 * torch.randn(4, 4, generator=gen, dtype=DTYPE)
    a = torch.randn(3, 4, generator=gen, dtype=DTYPE)
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
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transforms_over_fixed_point_match_unrolled(name):
    a, W = data()
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
    ):
        got, want = transform(F), transform(U)
        if isinstance(got, dict):
            got, want = tuple(got.values()), tuple(want.values())
        elif isinstance(got, tuple) and isinstance(got[0], dict):
            got = (*got[0].values(), got[1])
            want = (*want[0].values(), want[1])
        close(got, want)


def test_compiled_layer_forward_ad(layer):
    params = {k: v.detach() for k, v in layer.named_parameters()}
    a, _ = data(7)
    da = torch.cos(a)
    with forward_ad.dual_level():
        got = forward_ad.unpack_dual(layer(forward_ad.make_dual(a, da))).tangent
    want = jvp(lambda a: layer_unrolled(layer, params, a), (a,), (da,))[1]
    close(got, want)
