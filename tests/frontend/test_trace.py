"""fpidsl.trace: PyTorch maps traced by torch.fx into compiled layers (fpidsl/tracing)."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.compiler import check_source
from fpidsl.source import Source
from fpidsl.tracing import UntraceableError, trace_map

DT = torch.float64


class Dense(nn.Module):
    """Linear, LayerNorm, Sequential, a raw parameter, methods, views with x.shape[0], indexing, a fixed float."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.GELU(approximate="tanh"))
        self.W = nn.Parameter(0.1 * torch.randn(8, 8))
        self.ln = nn.LayerNorm(8)

    def forward(self, x, z, k=0.5):
        h = F.relu(self.fc(x)) + z @ self.W
        h = self.seq(h).view(x.shape[0], 2, 4).transpose(1, 2).reshape(-1, 8)
        return (k * torch.tanh(self.ln(h)) + z.mean(dim=-1, keepdim=True) + x[:, None, :][:, 0] * 0.1
                - 0.05 * x.pow(2).sum(1, keepdim=True).sqrt())


class Conv(nn.Module):
    """Conv2d, ConvTranspose2d, GroupNorm, activation modules, cat, permute, flatten."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.act = nn.SiLU()

    def forward(self, x, z):
        h = self.act(self.gn(self.c1(torch.cat([x, z], dim=1))))
        h = self.up(F.leaky_relu(self.down(h), 0.2))
        flat = h.permute(0, 2, 3, 1).flatten(1)
        return 0.4 * torch.sigmoid(flat).reshape(x.shape) + 0.1 * z.clamp(-1.0, 1.0)


def gradient_step(x, a, w):
    """A function (not a module): an energy's gradient step written out, with softplus, exp, where, softmax, and
    sizes read from shapes (in arithmetic and in a slice)."""
    e = torch.where(x > 0, x, 0.5 * x)
    n = a.shape[-1]
    return (x - 0.3 * (x - a) * (2.0 / n) - 0.1 * F.softplus(e * w) + 0.05 * torch.softmax(x, dim=-1)
            - 0.01 * torch.exp(-x ** 2) + 0.01 * torch.cat([a, a], dim=-1)[:, : a.shape[-1]])


def _examples(n=3):
    torch.manual_seed(0)
    return {
        "dense": (Dense().to(DT), torch.randn(n, 8, dtype=DT), (torch.randn(n, 8, dtype=DT), 0.3)),
        "conv": (Conv().to(DT), torch.randn(n, 1, 6, 6, dtype=DT), (torch.randn(n, 1, 6, 6, dtype=DT),)),
        "function": (gradient_step, torch.randn(n, 5, dtype=DT),
                     (torch.randn(n, 5, dtype=DT), torch.randn(5, dtype=DT))),
    }


@pytest.mark.parametrize("case", ["dense", "conv", "function"])
def test_the_compiled_step_is_the_map_at_another_batch_size(case):
    f, x, args = _examples()[case]
    traced = trace_map(f, x, args)
    check_source(Source("t.fpi", traced.spec.text))  # the written spec checks clean
    torch.manual_seed(1)
    x2 = torch.randn(5, *x.shape[1:], dtype=DT)  # another batch size than the example's
    args2 = [torch.randn(5, *a.shape[1:], dtype=DT) if isinstance(a, torch.Tensor) and a.shape[0] == 3 else a
             for a in args]
    got = traced.layer.step(x2, *traced.arguments(args2), *traced.tensors())
    torch.testing.assert_close(got, f(x2, *args2), rtol=1e-12, atol=1e-12)


def test_the_batch_is_the_symbol_B_and_shapes_from_x_shape_are_symbolic():
    f, x, args = _examples()["dense"]
    text = trace_map(f, x, args).spec.text
    assert "state x : [B, 8]" in text and "input z : [B, 8]" in text
    assert "reshape(seq_2, [B, 2, 4])" in text  # view(x.shape[0], 2, 4)
    assert "reshape(transpose_v, [B, 8])" in text  # reshape(-1, 8)
    assert "0.3 * " in text  # the float argument is fixed to its example value


def test_modules_are_param_modules_and_other_tensors_raw_params():
    f, x, args = _examples()["conv"]
    text = trace_map(f, x, args).spec.text
    for line in ("param c1 : Conv2d(2, 4, [3, 3], padding=[1, 1])",
                 "param down : Conv2d(4, 4, [3, 3], stride=[2, 2], padding=[1, 1], bias=false)",
                 "param up : ConvTranspose2d(4, 1, [4, 4], stride=[2, 2], padding=[1, 1])",
                 "param gn : GroupNorm(2, 4)"):
        assert line in text
    g, x, args = _examples()["function"]
    assert "input w : [5]" in trace_map(g, x, args).spec.text  # an argument without the batch


def test_from_module_copies_or_shares_the_weights():
    f, x, (z, k) = _examples()["dense"]
    Layer = fpidsl.trace(f, x, z, k)
    copied, shared = Layer.from_module(f), Layer.from_module(f, share=True)
    assert shared.fc.weight is f.fc.weight and shared.W is f.W
    assert copied.fc.weight is not f.fc.weight and torch.equal(copied.fc.weight, f.fc.weight)
    assert copied.fc.weight.dtype == DT
    fresh = Layer()
    assert not torch.equal(fresh.fc.weight.to(DT), f.fc.weight)


def test_the_traced_layer_has_the_maps_fixed_point_and_derivatives():
    f, x, (z, k) = _examples(n=2)["dense"]
    layer = fpidsl.trace(f, x, z, k).from_module(f, share=True, solve={"tol": 1e-12}, backward={"tol": 1e-12})
    z = z.detach().requires_grad_()
    x_hat = layer(z)
    torch.testing.assert_close(x_hat, f(x_hat, z, k), rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (z,))
    assert torch.autograd.gradgradcheck(layer, (z,))


def test_a_traced_layer_pickles():
    f, x, (z, k) = _examples()["dense"]
    layer = fpidsl.trace(f, x, z, k).from_module(f)
    again = pickle.loads(pickle.dumps(layer))
    torch.testing.assert_close(again(z), layer(z))


def test_a_function_closing_over_a_module_and_a_tensor():
    f, x, (z, k) = _examples()["dense"]
    shift = torch.randn(8, dtype=DT)
    traced = trace_map(lambda x: 0.5 * f(x, z, k) + shift, x, ())
    assert "state x : [3, 8]" in traced.spec.text  # z has the batch and is no argument: the batch is a number
    params = traced.tensors()
    assert any(p is shift for p in params) and any(p is f.fc.weight for p in params)
    torch.testing.assert_close(traced.layer.step(x, *params), 0.5 * f(x, z, k) + shift)


class Unsupported(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1) * 0.1


class ValueBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return 0.5 * x
        return -0.5 * x


class Counter(nn.Module):
    """Changes its map at every call: fx records the first call's branch, the check sees the others'."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return 0.5 * x if self.calls == 1 else 0.25 * x + 1


def test_an_operation_with_no_primitive_is_named_with_where_it_is_written():
    with pytest.raises(UntraceableError, match=r"torch\.cumsum has no primitive \(at .*test_trace\.py:\d+\)"):
        trace_map(Unsupported(), torch.randn(2, 3, dtype=DT), (), externs=False)


class Outside(nn.Module):
    """A function, a method and modules with no primitive: each an extern (autograd VJP)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3).eval()  # eval mode: running statistics, samples apart
        self.dilated = nn.Conv1d(1, 1, 3, padding=2, dilation=2)

    def forward(self, x, z):
        h = 0.2 * torch.cumsum(torch.tanh(self.fc(x)), dim=1) + 0.3 * self.bn(z) * x.sin()
        return h + 0.1 * self.dilated(x[:, None, :])[:, 0] + 0.1 * x.cumprod(dim=-1).tanh()


def _outside_layer():
    torch.manual_seed(0)
    f = Outside().to(DT)
    x, z = torch.randn(2, 3, dtype=DT), torch.randn(2, 3, dtype=DT)
    traced = trace_map(f, x, (z,))
    layer = traced.layer.from_module(f, share=True, solve={"tol": 1e-10}, backward={"tol": 1e-10})
    return f, traced, layer, z.requires_grad_()


@pytest.mark.slow  # gradgradcheck through four externs: nested autograd in every backward iteration (about 8 s)
def test_externs_of_a_traced_layer_are_exact_to_second_order():
    f, traced, layer, z = _outside_layer()
    assert torch.autograd.gradgradcheck(layer, (z,))


def test_operations_with_no_primitive_become_externs_with_exact_derivatives():
    f, traced, layer, z = _outside_layer()
    text = traced.spec.text
    for line in ("param cumsum_fn : extern [B, 3] -> [B, 3]", "param bn : extern [B, 3] -> [B, 3]",
                 "param dilated : extern [B, 1, 3] -> [B, 1, 3]", "param cumprod_fn : extern [B, 3] -> [B, 3]",
                 "# cumsum_fn (extern): torch.cumsum(#0, dim=1), derivatives by autograd",
                 "# cumprod_fn (extern): #0.cumprod(dim=-1)"):
        assert line in text
    check_source(Source("t.fpi", text))
    assert layer.bn.op is f.bn and traced.layer.from_module(f).bn.op is not f.bn
    x_hat = layer(z)
    torch.testing.assert_close(x_hat, f(x_hat, z), rtol=0, atol=1e-8)
    assert torch.autograd.gradcheck(layer, (z,))


def test_control_flow_on_values_does_not_trace():
    with pytest.raises(UntraceableError, match="torch.fx cannot trace the map"):
        trace_map(ValueBranch(), torch.randn(2, 3, dtype=DT), ())


def test_a_map_that_fx_records_wrongly_is_refused():
    with pytest.raises(UntraceableError, match="the traced map differs from the map by"):
        trace_map(Counter(), torch.randn(2, 3, dtype=DT), ())


@pytest.mark.parametrize("module, message", [
    (nn.Conv2d(1, 1, 3, padding=2, dilation=2), "Conv2d with groups, dilation or padding_mode"),
    (nn.Softplus(threshold=5), "softplus with a threshold other than 20"),
    (nn.Dropout(0.5), "dropout in training mode"),
])
def test_forms_outside_the_table_are_refused_or_externs(module, message):
    x = torch.randn(2, 1, 5, 5, dtype=DT)
    f = nn.Sequential(module).to(DT)
    with pytest.raises(UntraceableError, match=message):
        trace_map(f, x, (), externs=False)
    if isinstance(module, nn.Dropout):  # an extern, but random: the check sees another map
        with pytest.raises(UntraceableError, match="the traced map differs from the map"):
            trace_map(f, x, ())
    else:
        assert "param fn0 : extern [2, 1, 5, 5] -> [2, 1, " in trace_map(f, x, ()).spec.text  # the module "0"


@pytest.mark.parametrize("f, name", [
    (lambda x: 0.5 * torch.softmax(x, 1, torch.float32), "softmax"),
    (lambda x: 0.5 * x.softmax(1, torch.float32), "softmax"),
    (lambda x: 0.5 * torch.log_softmax(x, 1, torch.float32), "log_softmax"),
    (lambda x: 0.5 * x.log_softmax(1, torch.float32), "log_softmax"),
    (lambda x: 0.5 * F.softmax(x, 1, dtype=torch.float32), "softmax"),
])
def test_a_softmax_dtype_given_by_position_is_refused_not_dropped(f, name):
    """torch.softmax(x, dim, dtype) passes the dtype third, where F.softmax has _stacklevel: it is still a dtype
    (once bound as _stacklevel and dropped, then a RuntimeError from the numeric check)."""
    with pytest.raises(UntraceableError, match=rf"^{name} with a dtype \(at .*test_trace\.py:\d+\)"):
        trace_map(f, torch.randn(2, 3, dtype=DT), (), externs=False)


def test_a_map_that_changes_the_shape_is_refused():
    with pytest.raises(UntraceableError, match=r"the map returns \[2, 3\] \(float64\) for a state of "
                                               r"\[2, 4\] \(float64\)"):
        trace_map(lambda x: x[:, :3], torch.randn(2, 4, dtype=DT), ())


def test_a_map_that_returns_integers_is_refused():
    """Not a crash of the agreement check (torch.finfo of an integer dtype: `fpidsl trace` said "a bug in
    fpidsl")."""
    with pytest.raises(UntraceableError, match=r"the map returns \[2, 4\] \(int64\) for a state of "
                                               r"\[2, 4\] \(float64\): .*in floating point"):
        trace_map(lambda x: x.long(), torch.randn(2, 4, dtype=DT), ())


def test_in_place_operations_are_refused():
    def f(x):
        y = x * 0.5
        y.add_(1.0)
        return y

    with pytest.raises(UntraceableError, match=r"\.add_\(\) has no primitive"):
        trace_map(f, torch.randn(2, 3, dtype=DT), ())
