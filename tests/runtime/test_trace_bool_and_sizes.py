"""The trace of bool masks (comparisons) and of integers computed from the batch size (probe h51, findings 1-3).

torch computes on bool tensors in its own way: ``bool + bool`` is a logical or (``True + True`` is ``True``), ``~``,
``&``, ``|``, ``^`` are logical, ``mask * 0.3`` is in torch's default dtype (float32). The layer holds a comparison
as a 0/1 mask in the state's float dtype: each of these is written so that the layer computes torch's numbers, or
runs as an extern on the map's own dtypes. An integer computed from the batch size that is no ``a * B + b``
(``x.shape[0] // 2``) is refused, not frozen at the example's value.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.cli import main
from fpidsl.tracing import UntraceableError, trace_status
from fpidsl.tracing.api import check_agrees, trace_map

DT = torch.float64
TIGHT = dict(tol=1e-12, max_iter=400, backward={"tol": 1e-12, "max_iter": 400})


class Map(nn.Module):
    """``fn(self, x, z)`` with a small linear layer (its weight gets a gradient too)."""

    def __init__(self, fn, width=4):
        super().__init__()
        self.fn = fn
        self.fc = nn.Linear(width, width).double()
        with torch.no_grad():
            self.fc.weight.mul_(0.3)

    def forward(self, x, z):
        return self.fn(self, x, z)


def _solve(f, z, trace):
    z = z.clone().requires_grad_()
    x = fpidsl.fixed_point(f, torch.zeros_like(z), z, trace=trace, **TIGHT)
    wrt = [z, *f.parameters()]
    loss = (torch.sin(x) * torch.linspace(-1, 1, x.numel(), dtype=DT).view_as(x)).sum() + (x ** 3).sum()
    grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    total = sum((g * g).sum() for g in grads)
    second = torch.autograd.grad(total, wrt, allow_unused=True) if total.requires_grad else [None] * len(wrt)
    return x.detach(), [g.detach() for g in grads], [torch.zeros_like(w) if s is None else s for s, w in zip(second, wrt)]


def _agrees(f, z):
    """The traced solve (the compiled plan: trace_status says traced) gives the autograd path's value, gradients
    and second-order gradients."""
    status = trace_status(f, torch.zeros_like(z), z)[1]
    assert status.startswith("traced"), status
    on, off = _solve(f, z, True), _solve(f, z, False)
    torch.testing.assert_close(on[0], off[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(on[1] + on[2], off[1] + off[2]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    return on[0]


# --------------------------------------------------------------------------- finding 1: bool + bool


def _or_gate(m, x, z):
    gate = (x > 2.5) + (x > 3.0)  # torch: a logical or, a bool tensor
    return 0.2 * torch.tanh(x) * gate + z


def test_bool_plus_bool_is_a_logical_or_as_in_torch():
    """h51 finding 1: where both masks held, the traced map had 2 (0.2 off the fixed point, no warning)."""
    torch.manual_seed(0)
    z = 3.2 + 0.1 * torch.randn(3, 4, dtype=DT)
    f = Map(_or_gate)
    traced, _ = trace_status(f, torch.zeros_like(z), z)
    assert "maximum(gt, gt_1)" in traced.spec.text
    x = _agrees(f, z)
    assert torch.allclose(x, _or_gate(f, x, z), atol=1e-10)  # a fixed point of the map itself


@pytest.mark.parametrize("gate", [
    lambda x: torch.add(x > 0.2, x < -0.3),
    lambda x: (x > 0.2) + (x > 0.4) + (x < -0.3),
    lambda x: ((x > 0.2) + (x > 0.4)).double(),
    lambda x: torch.cat([x[:, :2] > 0.2, x[:, 2:] > 0.4], 1) + (x > 0.6),
], ids=["torch.add", "three", "double", "cat"])
def test_other_sums_of_bools_are_logical_ors(gate):
    z = torch.tensor([[1.5, -1.0, 2.0, 1.2], [-1.5, 1.1, -0.9, 1.3]], dtype=DT)  # fixed points away from the cuts
    _agrees(Map(lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * gate(x) + z), z)


def test_bool_minus_bool_is_refused_as_torch_refuses_it():
    f = Map(lambda m, x, z: 0.3 * torch.tanh(x) * ((x > 0.1) - (x > 0.3)) + z)
    z = torch.randn(2, 4, dtype=DT)
    with pytest.raises(UntraceableError, match="Subtraction"):
        fpidsl.trace(f, torch.zeros_like(z), z)


@pytest.mark.parametrize("fn", [
    lambda m, x, z: torch.tanh(m.fc(x)) * ((x > 0.2) * 0.3) + z,             # float32 in torch
    lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * ((x > 0.2) + 0.1) + z,       # float32
    lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * ((x > 0.2).sum(1, keepdim=True) / 3) + z,  # int64 / 3: float32
    lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * torch.where(x > 0.2, 1.0, 0.3) + z,         # float32
    lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * (x[:, :3] > 0.2).float().mean(1, keepdim=True) + z,
], ids=["mask*0.3", "mask+0.1", "sum/3", "where-numbers", "float-mean"])
def test_a_mask_promoted_to_float32_gives_torchs_numbers(fn):
    """torch computes these in its default dtype (float32), where the layer's mask is float64: the operation runs
    as an extern on the map's dtypes, and the compiled map gives the map's numbers exactly (they were 1e-9 off)."""
    f = Map(fn)
    z = torch.tensor([[0.9, -0.8, 0.5, 1.2], [1.5, 0.7, -1.1, 0.05]], dtype=DT)
    traced = trace_map(f, torch.zeros_like(z), [z])
    x = z + 0.1
    got = traced.layer.step(x, z, *traced.tensors())
    torch.testing.assert_close(got, f(x, z), rtol=0, atol=1e-15)
    _agrees(f, z)


def test_integer_arithmetic_on_masks_agrees():
    z = torch.tensor([[0.9, -0.8, 0.5, 1.2], [1.5, 0.7, -1.1, 0.05]], dtype=DT)
    _agrees(Map(lambda m, x, z: 0.1 * torch.tanh(m.fc(x)) * ((x > 0.2) + 1) * (x > 0.2).sum(1, keepdim=True)
                + 0.1 * (x > 0.4) ** 2 + z), z)


def test_the_check_compares_at_the_first_iterate():
    """The agreement check also evaluates at f(x0), the solver's first iterate, at the arguments' scale: a map
    that differs from the traced one only above a threshold that x0 = 0 and its perturbation do not reach is
    caught there (the check of h51's finding 1 passed at 0 and at N(0, 1))."""
    torch.manual_seed(0)
    z = 3.2 + 0.1 * torch.randn(3, 4, dtype=DT)
    x0 = torch.zeros_like(z)

    def below(x, z):
        return 0.2 * torch.tanh(x) * (x > 2.5) + z

    def above(x, z):  # another map above 3.0 only
        return below(x, z) + 0.2 * torch.tanh(x) * (x > 3.0)

    traced = trace_map(below, x0, [z])
    check_agrees(traced, below, x0, [z])
    with pytest.raises(UntraceableError, match="differs from the map"):
        check_agrees(traced, above, x0, [z])


# --------------------------------------------------------------------------- finding 3: ~ & | ^ on masks

_Z = torch.tensor([[0.45, -0.9, 1.5, 0.45], [-0.5, 0.45, 1.3, 1.6]], dtype=DT)  # fixed points away from 0.1, 0.8


@pytest.mark.parametrize("gate", [
    lambda x: ~(x > 0.1),
    lambda x: (x > 0.1) & (x < 0.8),
    lambda x: (x > 0.8) | (x < 0.1),
    lambda x: (x > 0.1) ^ (x < 0.8),
    lambda x: (x > 0.1).bitwise_not(),
    lambda x: torch.bitwise_and(x > 0.1, x < 0.8),
    lambda x: torch.logical_not(x > 0.1),
    lambda x: torch.logical_and(x > 0.1, x < 0.8),
    lambda x: torch.logical_or(x > 0.8, torch.relu(x - 0.1)),  # numbers as truth values (x > 0.1)
    lambda x: (x > 0.1).logical_xor(x < 0.8),
], ids=["invert", "and", "or", "xor", "bitwise_not", "bitwise_and", "logical_not", "logical_and", "logical_or",
        "logical_xor"])
def test_logical_operations_on_masks_trace_and_agree(gate):
    """h51 finding 3: fpidsl.trace crashed with a raw torch TypeError / NotImplementedError (an extern of ``~`` fed
    the layer's float mask), and trace_status said "a bug in fpidsl"."""
    f = Map(lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * gate(x) + z)
    Layer = fpidsl.trace(f, torch.zeros_like(_Z), _Z)
    assert not Layer.TRACED.spec.externs
    _agrees(f, _Z)


@pytest.mark.parametrize("gate", [
    lambda x: (x > 0.1).long() & 1,                               # an integer & : an extern on int64
    lambda x: (x > 0.1).sum(1, keepdim=True) % 2,                 # an integer % of a count
    lambda x: (x > 0.1).sum(1, keepdim=True) & 1,                 # an integer & of a count (int64 in torch)
    lambda x: torch.isnan(x) | (x > 0.1),                         # an extern that gives a mask
], ids=["long-and", "sum-mod", "sum-and", "isnan-or"])
def test_externs_get_masks_as_the_map_does(gate):
    """An extern given a mask gets the map's bool (or int64) tensor, not the layer's 0/1 floats, and a bool result
    comes back as a mask."""
    f = Map(lambda m, x, z: 0.3 * torch.tanh(m.fc(x)) * gate(x) + z)
    Layer = fpidsl.trace(f, torch.zeros_like(_Z), _Z)
    assert Layer.TRACED.spec.externs
    _agrees(f, _Z)


# --------------------------------------------------------------------------- finding 2: sizes from the batch


class SwapHalves(nn.Module):
    """h51's reproducer: pairs sample i with sample i + B // 2."""

    def __init__(self, half=lambda x: x.shape[0] // 2):
        super().__init__()
        self.fc = nn.Linear(3, 3).double()
        self.half = half

    def forward(self, x, z):
        half = self.half(x)
        return 0.5 * torch.tanh(self.fc(torch.cat([x[half:], x[:half]], 0))) + z


@pytest.mark.parametrize("half, reason", [
    (lambda x: x.shape[0] // 2, r"x.shape\[0\] // 2"),
    (lambda x: x.size(0) // 2, r"x.shape\[0\] // 2"),
    (lambda x: x.numel() // 6, r"x.shape\[0\] // 2"),
    (lambda x: x[::3].shape[0], "no size a \\* B \\+ b"),          # 2 at batch 4 and 5, 3 at 9
    (lambda x: x.shape[0] * x.shape[0] - 15, "product of two"),
], ids=["shape//2", "size//2", "numel//6", "stride-3", "B*B"])
def test_an_integer_from_the_batch_that_is_no_affine_size_is_refused(half, reason):
    """h51 finding 2: ``x.shape[0] // 2`` was 2 at batch 4 and 5, kept as the constant 2: the layer was another map
    at batch 6 (0.77 off the module's fixed point)."""
    m = SwapHalves(half)
    z = torch.randn(4, 3, dtype=DT)
    with pytest.raises(UntraceableError, match=reason):
        fpidsl.trace(m, torch.zeros_like(z), z)
    status = trace_status(m, torch.zeros_like(z), z)[1]
    assert status.startswith("not traced") and "a * B + b" in status and "bug in fpidsl" not in status
    a = fpidsl.fixed_point(m, torch.zeros_like(z), z, tol=1e-12)  # falls back: the map's own numbers
    b = fpidsl.fixed_point(m, torch.zeros_like(z), z, tol=1e-12, trace=False)
    assert torch.equal(a, b)


def test_affine_sizes_still_follow_the_batch():
    """``x.view(2 * B, 2)``, ``x.shape[0] + 1 - 1`` are a * B + b: the layer is right at other batch sizes."""
    class Roll(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4).double()

        def forward(self, x, z):
            h = torch.cat([x[1:], x[:1]], 0).view(x.shape[0] * 2, 2).reshape(x.size(0) + 1 - 1, -1)
            return 0.5 * torch.tanh(self.fc(h)) + z

    m = Roll()
    Layer = fpidsl.trace(m, torch.zeros(4, 4, dtype=DT), torch.randn(4, 4, dtype=DT))
    assert "[B, 4]" in Layer.TRACED.spec.text
    layer = Layer.from_module(m, solve={"tol": 1e-12, "max_iter": 400})
    for batch in (1, 4, 7):
        z = torch.randn(batch, 4, dtype=DT)
        want = fpidsl.fixed_point(m, torch.zeros_like(z), z, trace=False, tol=1e-12, max_iter=400)
        torch.testing.assert_close(layer(z), want, rtol=1e-9, atol=1e-9)


def test_cli_refuses_an_integer_from_the_batch(tmp_path, capsys):
    path = tmp_path / "halves.py"
    path.write_text("import torch\n\n"
                    "def halves(x, z):\n"
                    "    half = x.shape[0] // 2\n"
                    "    return 0.5 * torch.tanh(torch.cat([x[half:], x[:half]], 0)) + z\n")
    assert main(["trace", f"{path}:halves", "--shape", "x=4,3", "--shape", "z=4,3"]) == 1
    assert "x.shape[0] // 2" in capsys.readouterr().err


def test_why_a_closure_over_a_models_attribute_is_not_traced():
    """torchdeq's `lambda z: self.f(z, x)` and a tensor folded by torch.fx at trace time got one message naming
    neither (a helper's probe of a torchdeq port): now it says what the map reads and what to do."""
    from fpidsl.tracing import trace_status

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.fc(z) + x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = Cell()

    model, x = Model(), torch.randn(3, 4)
    traced, why = trace_status(lambda z: model.f(z, x), torch.zeros_like(x))
    assert not traced and "reads a Cell module" in why and "fixed_point(self.f, z0, x)" in why
    w = torch.randn(4, 4)

    def g(z, x):
        return torch.tanh(z @ (w / w.norm()).T + x)

    traced, why = trace_status(g, torch.zeros(3, 4), x)
    assert not traced and "tensor of shape [4, 4] that torch.fx computed while tracing" in why
