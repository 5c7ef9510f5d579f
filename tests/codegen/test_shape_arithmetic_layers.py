"""Compiled layers whose declared shapes compute sizes from symbols: a two-scale layer with a state at half the
input's resolution ([B, 3, H/2, W/2]), its 2x2 averages and nearest upsampling written with reshape, permute,
mean and cat only, against a hand-written torch oracle (avg_pool2d, einsum, repeat_interleave) to second order;
call-time checks of computed sizes with positioned messages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fpidsl
from fpidsl.runtime.layer import LayerInputError

from ..runtime.helpers import assert_orders_close, derivatives

TIGHT = {"tol": 1e-13, "max_iter": 2000, "on_fail": "raise"}
STEPS = 120  # plain iterations of the oracle's map: 0.5 * tanh(...) contracts by 1/2 at least

TWO_SCALE = """\
layer TwoScale {
  input x : [B, 3, H, W]
  state u : [B, 3, H, W]
  state v : [B, 3, H/2, W/2]
  param w : tensor [3, 3] = normal(0, 0.4)

  let blocks = reshape(u, [B, 3, H/2, 2, W/2, 2])
  let down = mean(mean(blocks, dim=5), dim=3)
  let mixed = permute(permute(v, [0, 2, 3, 1]) @ w, [0, 3, 1, 2])
  let cells = reshape(mixed, [B, 3, H/2, 1, W/2, 1])
  let up = reshape(cat([cat([cells, cells], dim=3), cat([cells, cells], dim=3)], dim=5), [B, 3, H, W])
  update u = 0.5 * tanh(x + up)
  update v = 0.5 * tanh(down + mixed)
  output u, v
}
"""


def oracle_step(u, v, x, w):
    """The same map written with torch's own pooling, einsum and repeat_interleave."""
    mixed = torch.einsum("bchw,cd->bdhw", v, w)
    up = mixed.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return 0.5 * torch.tanh(x + up), 0.5 * torch.tanh(F.avg_pool2d(u, 2) + mixed)


def oracle(x, w):
    b, c, h, wd = x.shape
    u, v = torch.zeros_like(x), x.new_zeros(b, c, h // 2, wd // 2)
    for _ in range(STEPS):
        u, v = oracle_step(u, v, x, w)
    return u, v


@pytest.fixture(scope="module")
def two_scale(tmp_path_factory):
    spec = tmp_path_factory.mktemp("shapes") / "two_scale.fpi"
    spec.write_text(TWO_SCALE)
    return fpidsl.load(spec)


def test_the_emitted_reshape_sizes_come_from_the_argument(two_scale):
    import inspect

    source = inspect.getsource(two_scale)
    assert "_ops.reshape(u, shape=(u.shape[0], 3, u.shape[2] // 2, 2, u.shape[3] // 2, 2))" in source
    assert "STATES = {'u': ('B', 3, 'H', 'W'), 'v': ('B', 3, 'H/2', 'W/2')}" in source


def test_reshape_targets_are_written_from_the_argument_s_sizes():
    from fpidsl.codegen.sizes import reshape_target
    from fpidsl.ir.shapes import ShapeCtx, dim_add, dim_exact_div, dim_mul

    ctx = ShapeCtx()
    half, t1 = dim_exact_div("H", 2, ctx), dim_add("T", 1)
    assert reshape_target(("B", half, t1), ("B", "H", dim_mul("T", "B")), "v") == (
        "(v.shape[0], 2 * v.shape[1], v.shape[0] * v.shape[2] - v.shape[0])")
    assert reshape_target(("B", half, t1), (dim_exact_div(dim_mul(3, "H"), 4, ctx), "K"), "v") == (
        "(3 * v.shape[1] // 2, -1)")  # K is not given by v's sizes: the one -1
    chw = dim_exact_div(dim_mul("C", dim_mul("H", "W")), 4, ctx)
    assert reshape_target(("B", "C", "H", "W"), ("B", 4, chw), "v") == (
        "(v.shape[0], 4, v.shape[1] * v.shape[2] * v.shape[3] // 4)")
    with pytest.raises(ValueError):
        reshape_target(("B", dim_mul("N", "M")), ("B", "N", "M"), "v")


def test_a_two_scale_layer_matches_its_torch_oracle_to_second_order(two_scale):
    torch.manual_seed(0)
    layer = two_scale(solve=TIGHT, backward=TIGHT).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    u, v = layer(x)
    assert u.shape == (2, 3, 4, 6) and v.shape == (2, 3, 2, 3)
    want_u, want_v = oracle(x, layer.w)
    torch.testing.assert_close(u, want_u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v, want_v, rtol=1e-10, atol=1e-12)
    wu, wv = torch.randn_like(u), torch.randn_like(v)
    params = [x, layer.w]

    def loss(outputs):
        return (wu * outputs[0]).sum() + (wv * outputs[1] ** 2).sum()

    got = derivatives(lambda: loss(layer(x)), params, order=2)
    want = derivatives(lambda: loss(oracle(x, layer.w)), params, order=2)
    assert_orders_close(got, want, rtol=1e-7)
    assert all(g.abs().max() > 0 for g in got[1])


@pytest.mark.slow  # about 3 s
def test_gradcheck_and_gradgradcheck_in_float64(two_scale):
    torch.manual_seed(1)
    layer = two_scale(solve=TIGHT, backward=TIGHT).double()
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_an_odd_size_is_a_positioned_error_at_call_time(two_scale):
    layer = two_scale().double()
    with pytest.raises(LayerInputError) as info:
        layer(torch.randn(2, 3, 5, 4, dtype=torch.float64))
    assert "H = 5 is not divisible by 2 (required by the size at two_scale.fpi:4:20)" in str(info.value)
    with pytest.raises(LayerInputError, match=r"W = 3 is not divisible by 2 \(required by the size at "
                                              r"two_scale.fpi:4:25\)"):
        layer(torch.randn(2, 3, 4, 3, dtype=torch.float64))


def test_a_batch_of_no_samples_reshapes_with_explicit_sizes(two_scale):
    u, v = two_scale().double()(torch.randn(0, 3, 4, 4, dtype=torch.float64))
    assert u.shape == (0, 3, 4, 4) and v.shape == (0, 3, 2, 2)


PRODUCT = """\
layer Flat {
  input t : [T, D]
  input y : [B, T*D + 1]
  state s : [B, T*D + 1]
  update s = 0.5 * tanh(s + y)
}
"""


def test_an_input_size_computed_from_symbols_is_checked_at_call_time(tmp_path):
    spec = tmp_path / "flat.fpi"
    spec.write_text(PRODUCT)
    layer = fpidsl.load(spec)(solve=TIGHT).double()
    t, y = torch.zeros(2, 3, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    s = torch.zeros_like(y)
    for _ in range(STEPS):
        s = 0.5 * torch.tanh(s + y)
    torch.testing.assert_close(layer(t, y), s, rtol=1e-10, atol=1e-12)
    with pytest.raises(LayerInputError) as info:
        layer(t, torch.randn(4, 8, dtype=torch.float64))
    assert str(info.value) == ("Flat (flat.fpi): input 'y' is declared [B, D*T+1]: dimension 1 must be D*T+1 = 7 "
                               "(D = 3, T = 2), got shape [4, 8]")


def test_the_yaml_form_takes_the_same_shape_strings(tmp_path, two_scale):
    spec = tmp_path / "two_scale.yaml"
    spec.write_text(
        "fpi: 1\nlayers:\n  Down:\n    inputs: {x: \"[B, 3, H, W]\"}\n"
        "    states: {v: {shape: \"[B, 3, H/2, W/2]\", init: zeros}}\n"
        "    lets:\n      - blocks: \"reshape(x, [B, 3, H/2, 2, W/2, 2])\"\n"
        "    updates: {v: \"0.5 * tanh(v + mean(mean(blocks, dim=5), dim=3))\"}\n")
    layer = fpidsl.load(spec)(solve=TIGHT).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    v = torch.zeros(2, 3, 2, 3, dtype=torch.float64)
    for _ in range(STEPS):
        v = 0.5 * torch.tanh(v + F.avg_pool2d(x, 2))
    torch.testing.assert_close(layer(x), v, rtol=1e-10, atol=1e-12)
    with pytest.raises(LayerInputError, match=r"H = 3 is not divisible by 2 \(required by the size at "
                                              r"two_scale.yaml:5:"):
        layer(torch.randn(2, 3, 3, 6, dtype=torch.float64))
