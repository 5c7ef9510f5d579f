"""Spatial variational dropout, `dropout(x, p, spatial=true)` (MDEQ's VariationalHidDropout2d(spatial=True)): one
mask value per (sample, channel), of shape [B, C, 1, ...], the same at every pixel and at every forward and backward
iteration of a solve; the identity in eval mode; exact derivatives of first and second order with the mask fixed;
a bad value of the option is a positioned error."""
from __future__ import annotations

import pytest
import torch

from fpidsl.cli import main
from fpidsl.runtime import ops

from ..runtime.helpers import derivatives
from .helpers import the_one_error, tight_layer
from .test_dropout import seeded

SPEC = """
layer Spatial {
  input a : [B, 3, H, W]
  state x : [B, 3, H, W] = zeros
  param c : Conv2d(6, 3, 3, padding=1, init_scale=0.3)
  update x = 0.5 * tanh(dropout(c(cat([x, a], dim=1)), p=0.25, spatial=true) + a)
}
"""
P = 0.25


def load(tmp_path, text: str = SPEC):
    return tight_layer(tmp_path, "spatial.fpi", text)


def by_hand(layer, a, steps: int = 200):
    """The map in torch with the mask of the layer's last call, [B, 3, 1, 1] broadcast over the pixels."""
    mask = ops.dropout_mask(a, layer._call_seeds, p=P, key=0, spatial=True)
    x = torch.zeros_like(a)
    for _ in range(steps):
        x = 0.5 * torch.tanh(mask * layer.c(torch.cat([x, a], 1)) + a)
    return x


def test_the_mask_is_one_value_per_sample_and_channel_with_keep_rate_one_minus_p():
    x = torch.ones(400, 16, 5, 7, dtype=torch.float64)
    seeds = torch.randint(0, 2**31 - 1, (400,), generator=torch.Generator().manual_seed(0))
    mask = ops.dropout_mask(x, seeds, p=P, key=0, spatial=True)
    assert mask.shape == (400, 16, 1, 1)
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - P)}
    assert abs((mask == 0).double().mean().item() - P) < 0.01
    applied = ops.dropout(x, seeds, p=P, key=0, spatial=True)
    assert applied.shape == x.shape
    flat = applied.flatten(2)
    assert torch.equal(flat, flat[:, :, :1].expand_as(flat))  # the same value at every pixel of a channel
    assert not torch.equal(mask[0], mask[1])  # samples draw their own masks
    elementwise = ops.dropout_mask(x, seeds, p=P, key=0)
    assert elementwise.shape == x.shape and not torch.equal(
        elementwise.flatten(2), elementwise.flatten(2)[:, :, :1].expand(-1, -1, 35))


def test_the_fixed_point_is_that_of_the_map_with_one_mask_for_every_iteration(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    x = seeded(layer, a)
    torch.testing.assert_close(x, by_hand(layer, a), rtol=1e-10, atol=1e-12)
    assert len(layer._call_seeds._fpidsl_dropout_masks) == 1  # made once for the solve, then reused
    (mask,) = layer._call_seeds._fpidsl_dropout_masks.values()
    assert mask.shape == (3, 3, 1, 1)
    with torch.no_grad():  # a fixed point of the map with this mask, at every pixel
        torch.testing.assert_close(0.5 * torch.tanh(mask * layer.c(torch.cat([x, a], 1)) + a), x,
                                   rtol=1e-10, atol=1e-12)
    assert not torch.allclose(x, layer.eval()(a))


def test_eval_mode_is_the_identity(tmp_path):
    layer = load(tmp_path).eval()
    plain = load(tmp_path, SPEC.replace("dropout(c(cat([x, a], dim=1)), p=0.25, spatial=true)",
                                        "c(cat([x, a], dim=1))")).eval()
    plain.load_state_dict(layer.state_dict())
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(a), plain(a), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ops.dropout(a, None, p=P, spatial=True), a, rtol=0, atol=0)


def test_derivatives_of_first_and_second_order_with_the_mask_fixed(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: seeded(layer, v), (a,))
    assert torch.autograd.gradgradcheck(lambda v: seeded(layer, v), (a,))
    params = [a, *layer.parameters()]
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    got = derivatives(lambda: (w * seeded(layer, a)).sum(), params, order=2)
    want = derivatives(lambda: (w * by_hand(layer, a)).sum(), params, order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, v in zip(g_order, w_order):
            torch.testing.assert_close(g, v, rtol=1e-7, atol=1e-9, msg=lambda m: f"order {k}: {m}")


def test_the_vjp_of_spatial_dropout_is_the_same_mask():
    seeds = torch.randint(0, 2**31 - 1, (2,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.dropout(v, seeds, p=0.5, key=2, spatial=True), (x,))


@pytest.mark.parametrize("value, col, kind, fragment", [
    ("1", 72, "type", "spatial of dropout must be true or false"),
    ("yes", 72, "type", "spatial of dropout must be true or false"),
])
def test_a_bad_value_of_spatial_is_a_positioned_error(value, col, kind, fragment):
    error = the_one_error(SPEC.replace("spatial=true", f"spatial={value}"))
    assert (error.kind, error.span.line, error.span.col) == (kind, 6, col)
    assert fragment in error.message


def test_spatial_needs_a_channel_dimension():
    error = the_one_error(SPEC.replace("input a : [B, 3, H, W]\n  state x : [B, 3, H, W] = zeros\n  param c : "
                                       "Conv2d(6, 3, 3, padding=1, init_scale=0.3)\n  update x = 0.5 * tanh("
                                       "dropout(c(cat([x, a], dim=1)), p=0.25, spatial=true) + a)",
                                       "input a : [B]\n  state x : [B] = zeros\n"
                                       "  update x = 0.5 * tanh(dropout(x, spatial=true) + a)"))
    assert (error.kind, error.span.line) == ("shape", 5)
    assert "needs a channel dimension 1" in error.message


def test_fpidsl_check_rejects_a_bad_value_with_its_position(tmp_path, capsys):
    path = tmp_path / "bad.fpi"
    path.write_text(SPEC.replace("spatial=true", "spatial=2"))
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:6:72: error: spatial of dropout must be true or false" in err, err
