"""Faults found by a probe matrix of higher-order and transformed derivatives through fixed_point (torch.func hessian,
jacfwd/jacrev compositions, jvp of grad, vmap of grad, autograd twice, forward over reverse; maps of the usual layers),
each against the same transform of unrolled iteration in float64:

- a compiled layer with an extern (a traced map with ``torch.cumsum``, say) failed under ``torch.func.grad`` /
  ``hessian`` / ``jacrev`` and under forward-mode AD over ``autograd.grad`` ("an autograd.Function ... must override
  the setup_context staticmethod": the extern's nested VJP);
- ``torch.func.hessian`` (and ``jacfwd(jacrev)``, ``jacrev(jacfwd)``) with respect to the weight or bias of an
  eval-mode ``BatchNorm2d``, an affine ``InstanceNorm2d``, or a ``linalg.solve`` map failed ("output with shape
  [2, 2, 4, 4] doesn't match the broadcast shape [2, 2, 2, 4, 4]") where the unrolled map's hessian works: the
  tangent rule differentiated torch's double backward under vmap instead of using the forward-mode rules;
- the derived backward of indexing (``h[:, :4]``, the slices of ``split`` / ``chunk``) in a compiled layer wrote a
  batched cotangent into unbatched zeros, which ``vmap`` refuses ("vmap: inplace arithmetic ... is not possible"):
  ``hessian`` / ``jacrev`` over a traced map (or a spec) that slices failed;
- a map first met inside a ``vmap`` was never traced afterwards (the trace's random start failed under vmap, and the
  failure stayed in the trace cache).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import fpidsl
from fpidsl.tracing import trace_status

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 1000, "on_fail": "raise"}
SETTINGS = {**TIGHT, "backward": TIGHT}
STEPS = 150  # contraction factors below 0.5: 0.5^150 ~ 1e-45


def close(got, want, rtol=1e-8):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        a, b = a.detach(), b.detach()
        assert b.abs().max() > 1e-6, "a zero derivative: the comparison would not see a fault"
        err = float((a - b).abs().max() / b.abs().max())
        assert err <= rtol, f"relative error {err:.3g}"


class DEQ(nn.Module):
    """``fixed_point(cell, 0, z)``, or ``steps`` plain iterations of the cell (the oracle)."""

    def __init__(self, cell, steps=None, trace=True):
        super().__init__()
        self.cell, self.steps, self.trace = cell, steps, trace

    def forward(self, z):
        if self.steps is None:
            return fpidsl.fixed_point(self.cell, torch.zeros_like(z), z, trace=self.trace, **SETTINGS)
        x = torch.zeros_like(z)
        for _ in range(self.steps):
            x = self.cell(x, z)
        return x


class Wrap(nn.Module):
    """``fixed_point(cell, x0, z)`` with ``x0`` made outside any transform (so that fixed_point asks for the trace
    there too)."""

    def __init__(self, cell, x0):
        super().__init__()
        self.cell, self.x0 = cell, x0

    def forward(self, z):
        return fpidsl.fixed_point(self.cell, self.x0, z, **SETTINGS)


def loss(x, U):
    return (torch.sin(2 * x) * U).sum()


# ----------------------------------------------------------------------------------------------------------------
# A compiled layer with an extern, under torch.func and under forward over reverse


class CumsumCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x, z):
        return 0.5 * torch.tanh(torch.cumsum(self.lin(x) + z, -1) / 4)


def _extern_layer():
    torch.manual_seed(0)
    cell = CumsumCell()
    z = torch.randn(2, 4, dtype=DT)
    Layer = fpidsl.trace(cell, torch.zeros_like(z), z)
    assert any("extern" in line for line in Layer.TRACED.spec.text.splitlines())
    return cell, Layer.from_module(cell, solve=TIGHT, backward=TIGHT), z


TRANSFORMS = {
    "grad": lambda L, z: grad(L)(z),
    "hessian": lambda L, z: hessian(L)(z),
    "jacrev_jacrev": lambda L, z: jacrev(jacrev(L))(z),
    "vmap_grad": lambda L, z: vmap(grad(lambda zi: L(zi[None])))(z),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_torch_func_over_a_compiled_layer_with_an_extern(name):
    cell, layer, z = _extern_layer()
    U = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    got = TRANSFORMS[name](lambda z: loss(layer(z), U[: z.shape[0]]), z)
    want = TRANSFORMS[name](lambda z: loss(DEQ(cell, STEPS)(z), U[: z.shape[0]]), z)
    close(got, want)


def test_forward_over_reverse_of_a_traced_map_with_an_extern_and_a_dual_parameter():
    """The Hessian-vector product in the weight by autograd.grad inside forward_ad.dual_level, the weight a dual
    swapped into the module by functional_call: the traced map (its extern's nested VJPs) as the map itself."""
    torch.manual_seed(0)
    cell = CumsumCell()
    z = torch.randn(2, 4, dtype=DT)
    W = cell.lin.weight.detach().clone()
    V = torch.randn(W.shape, generator=torch.Generator().manual_seed(2), dtype=DT)

    def hvp(module):
        with fwAD.dual_level():
            Wd = fwAD.make_dual(W.clone().requires_grad_(), V)
            x = functional_call(module, {"cell.lin.weight": Wd}, (z,))
            (g,) = torch.autograd.grad(torch.sin(x).sum(), Wd)
            return fwAD.unpack_dual(g).tangent

    deq = DEQ(cell)
    assert trace_status(cell, torch.zeros_like(z), z)[1].startswith("traced")
    close(hvp(deq), hvp(DEQ(cell, STEPS)))


# ----------------------------------------------------------------------------------------------------------------
# torch.func.hessian with respect to a norm's weight or bias (and linalg.solve's matrix)


def _affine(norm):
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.3 * torch.randn_like(norm.bias))
    return norm


class NormCell(nn.Module):
    def __init__(self, kind):
        super().__init__()
        if kind == "batch_norm_eval":
            self.norm = _affine(nn.BatchNorm2d(2).double())
            with torch.no_grad():
                self.norm.running_mean.copy_(0.2 * torch.randn(2))
                self.norm.running_var.copy_(1.0 + 0.3 * torch.rand(2))
            self.norm.eval()
        else:
            self.norm = _affine(nn.InstanceNorm2d(2, affine=True).double())

    def forward(self, x, z):
        return 0.5 * torch.tanh(self.norm(0.4 * x + z))


class SolveCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.P = nn.Parameter(0.3 * torch.randn(4, 4, dtype=DT))
        self.c = nn.Parameter(0.3 * torch.randn(4, dtype=DT))

    def forward(self, x, z):
        A = 2 * torch.eye(4, dtype=x.dtype) + self.P
        return 0.5 * torch.tanh(torch.linalg.solve(A, (x + z).unsqueeze(-1)).squeeze(-1) + self.c)


# (cell, names of the parameters the derivatives are taken in, state shape); torch's own transforms of the
# unrolled map are right in these (the probe checked them against central differences of the gradient)
CASES = {
    "batch_norm_eval-weight": (lambda: NormCell("batch_norm_eval"), ["norm.weight"], (2, 2, 4, 4)),
    "batch_norm_eval-weight-bias": (lambda: NormCell("batch_norm_eval"), ["norm.weight", "norm.bias"], (2, 2, 4, 4)),
    "instance_norm-bias": (lambda: NormCell("instance_norm"), ["norm.bias"], (2, 2, 4, 4)),
    "linalg_solve-bias": (SolveCell, ["c"], (2, 4)),
}
SECOND = {
    "hessian": hessian,
    "jacfwd_jacrev": lambda f: jacfwd(jacrev(f)),
}


@pytest.mark.parametrize("second", list(SECOND))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trace", [False, True], ids=["autograd_path", "trace"])
def test_forward_over_reverse_in_a_weight_of_a_norm_or_solve_map(case, second, trace):
    build, names, shape = CASES[case]
    torch.manual_seed(0)
    cell = build()
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=gen, dtype=DT)
    U = torch.randn(shape, generator=gen, dtype=DT)
    theta = {f"cell.{n}": dict(cell.named_parameters())[n].detach().clone() for n in names}

    def L(module):
        return lambda th: loss(functional_call(module, th, (z,)), U)

    if trace:  # traced at a plain call, the start made outside the transform: its trace serves the transform
        module = Wrap(cell, torch.zeros_like(z))
        module(z)
        assert trace_status(cell, torch.zeros_like(z), z)[1].startswith("traced")
    else:
        module = DEQ(cell, trace=False)
    got = SECOND[second](L(module))(theta)
    want = SECOND[second](L(DEQ(cell, STEPS)))(theta)
    close(got, want)


def test_jacrev_of_jacfwd_in_the_weight_of_an_eval_batch_norm():
    torch.manual_seed(0)
    cell = NormCell("batch_norm_eval")
    gen = torch.Generator().manual_seed(1)
    z, U = torch.randn(2, 2, 4, 4, generator=gen, dtype=DT), torch.randn(2, 2, 4, 4, generator=gen, dtype=DT)
    W = cell.norm.weight.detach().clone()

    def L(module):
        return lambda w: loss(functional_call(module, {"cell.norm.weight": w}, (z,)), U)

    close(jacrev(jacfwd(L(DEQ(cell, trace=False))))(W), jacrev(jacfwd(L(DEQ(cell, STEPS))))(W))


# ----------------------------------------------------------------------------------------------------------------
# The trace cache and torch.func


class TanhCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x, z):
        return 0.5 * torch.tanh(self.lin(x) + z)


def test_a_map_first_met_inside_vmap_is_traced_at_a_plain_call_later():
    torch.manual_seed(0)
    cell = TanhCell()
    z = torch.randn(2, 4, dtype=DT)
    x0 = torch.zeros_like(z)
    W = cell.lin.weight.detach().clone()

    def L(module):
        return lambda w: torch.sin(functional_call(module, {"cell.lin.weight": w}, (z,))).sum()

    want = hessian(L(DEQ(cell, STEPS)))(W)
    close(hessian(L(Wrap(cell, x0)))(W), want)  # the first call, inside jacfwd's vmap: not traced there
    status = trace_status(cell, x0, z)[1]
    assert status.startswith("traced"), status
    close(hessian(L(Wrap(cell, x0)))(W), want)  # now with the trace made outside


class SliceCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8).double()

    def forward(self, x, z):
        h = self.lin(x) + z
        a, b = h.chunk(2, -1)
        return 0.4 * torch.tanh(torch.cat([h[:, 6:], h[:, :6]], 1) + 0.5 * torch.cat([b, a], -1))


@pytest.mark.parametrize("second", list(SECOND))
def test_torch_func_over_a_traced_map_that_slices(second):
    torch.manual_seed(0)
    cell = SliceCell()
    gen = torch.Generator().manual_seed(1)
    z, U = torch.randn(2, 8, generator=gen, dtype=DT), torch.randn(2, 8, generator=gen, dtype=DT)
    module = Wrap(cell, torch.zeros_like(z))
    module(z)
    assert "extern" not in trace_status(cell, torch.zeros_like(z), z)[0].spec.text
    theta = {"cell.lin.bias": cell.lin.bias.detach().clone()}

    def L(module):
        return lambda th: loss(functional_call(module, th, (z,)), U)

    close(SECOND[second](L(module))(theta), SECOND[second](L(DEQ(cell, STEPS)))(theta))
