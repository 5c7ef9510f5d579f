"""Variational dropout, `dropout(x, p)`: one mask per forward solve, held fixed over every forward and backward
iteration of it (against the same map written in torch with that mask: fixed point, first and second derivatives);
the identity in eval mode; a new mask for each solve; the seeds follow their samples when finished ones are dropped."""
from __future__ import annotations

import pytest
import torch

from fpidsl.runtime import ops

from ..runtime.helpers import derivatives
from .helpers import the_one_error, tight_layer

SPEC = """
layer Dropped {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param fc : Linear(8, 4, init_scale=0.5)
  param g : Linear(4, 4, init_scale=0.5)
  update x = 0.5 * tanh(fc(dropout(cat([x, a], dim=-1), p=0.3)) + dropout(g(a), p=0.5))
}
"""
P = 0.3


def load(tmp_path, text: str = SPEC):
    return tight_layer(tmp_path, "dropout.fpi", text)


def seeded(layer, a, seed: int = 5):
    """The layer's output with the seeds of the dropout masks drawn from ``seed``."""
    torch.manual_seed(seed)
    return layer(a)


def by_hand(layer, a, steps: int = 200):
    """The same map written in torch with the masks of the layer's last call, iterated from zeros under autograd."""
    seeds = layer._call_seeds
    m0 = ops.dropout_mask(torch.zeros(a.shape[0], 8, dtype=a.dtype), seeds, p=0.3, key=0)
    m1 = ops.dropout_mask(a, seeds, p=0.5, key=1)
    x = torch.zeros_like(a)
    for _ in range(steps):
        x = 0.5 * torch.tanh(layer.fc(torch.cat([x, a], -1) * m0) + layer.g(a) * m1)
    return x


def test_the_fixed_point_is_that_of_the_map_with_the_solve_s_mask(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(3, 4, dtype=torch.float64)
    x = seeded(layer, a)
    torch.testing.assert_close(x, by_hand(layer, a), rtol=1e-10, atol=1e-12)
    assert len(layer._call_seeds._fpidsl_dropout_masks) == 2  # each mask made once for the solve, then reused
    assert not torch.allclose(x, layer.eval()(a))  # the masks change the map


def test_the_seeds_are_sliced_with_the_samples_that_keep_running(tmp_path):
    """A samplewise layer drops finished samples from the work; the seeds (and the masks) go with their samples."""
    layer = load(tmp_path)
    assert type(layer).SAMPLEWISE and type(layer).BATCHED_PARAMS[-1]
    a = torch.cat([torch.zeros(1, 4), 3 * torch.randn(5, 4)]).double()  # sample 0 converges first
    x = seeded(layer, a)
    iterations = layer.stats.forward.iterations
    assert iterations.min() < iterations.max()
    torch.testing.assert_close(x, by_hand(layer, a), rtol=1e-10, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(a), layer(a))  # eval mode: no seeds to slice


def test_derivatives_match_unrolled_autograd_with_the_same_mask(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    params = [a, *layer.parameters()]
    w = torch.randn(3, 4, dtype=torch.float64)
    got = derivatives(lambda: (w * seeded(layer, a)).sum(), params, order=2)
    want = derivatives(lambda: (w * by_hand(layer, a)).sum(), params, order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, v in zip(g_order, w_order):
            torch.testing.assert_close(g, v, rtol=1e-7, atol=1e-9, msg=lambda m: f"order {k}: {m}")


def test_gradcheck_with_the_seeds_fixed(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: seeded(layer, v), (a,))
    assert torch.autograd.gradgradcheck(lambda v: seeded(layer, v), (a,))


def test_eval_mode_is_the_map_without_dropout(tmp_path):
    layer = load(tmp_path).eval()
    plain = load(tmp_path, SPEC.replace("dropout(cat([x, a], dim=-1), p=0.3)", "cat([x, a], dim=-1)")
                 .replace("dropout(g(a), p=0.5)", "g(a)")).eval()
    plain.load_state_dict(layer.state_dict())
    a = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(a), plain(a), rtol=1e-13, atol=1e-15)  # plain hoists fc: ulps apart


def test_eval_mode_derivatives_are_those_of_the_map_without_dropout(tmp_path):
    """In eval mode the seeds are None, a constant argument of the solve: the backward once took that None for a
    saved tensor's place and failed (StopIteration)."""
    layer = load(tmp_path).eval()
    plain = load(tmp_path, SPEC.replace("dropout(cat([x, a], dim=-1), p=0.3)", "cat([x, a], dim=-1)")
                 .replace("dropout(g(a), p=0.5)", "g(a)")).eval()
    plain.load_state_dict(layer.state_dict())
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    got = derivatives(lambda: (w * layer(a)).sum(), [a, *layer.parameters()], order=2)
    want = derivatives(lambda: (w * plain(a)).sum(), [a, *plain.parameters()], order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, v in zip(g_order, w_order):
            torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-11, msg=lambda m: f"order {k}: {m}")


def test_each_solve_draws_its_own_mask(tmp_path):
    layer = load(tmp_path)
    a = torch.randn(3, 4, dtype=torch.float64)
    first = layer(a)
    seeds = layer._call_seeds.clone()
    second = layer(a)
    assert not torch.equal(seeds, layer._call_seeds) and not torch.allclose(first, second)
    torch.testing.assert_close(seeded(layer, a, 9), seeded(layer, a, 9), rtol=0, atol=0)  # torch.manual_seed fixes it


def test_the_mask_drops_a_fraction_p_and_scales_the_rest():
    x = torch.ones(64, 500, dtype=torch.float64)
    mask = ops.dropout_mask(x, torch.randint(0, 2**31 - 1, (64,)), p=P, key=0)
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - P)}
    assert abs((mask == 0).double().mean().item() - P) < 0.01
    assert not torch.equal(mask[0], mask[1])  # samples get their own masks


@pytest.mark.parametrize("body, col, fragment", [
    ("dropout(x, p=1.5)", 27, "p of dropout must be a number in [0, 1), found 1.5"),
    ("x + dropout(x[0, :], p=0.1)", 26, "its argument's dimension 0 must be the batch B, found [4]"),
])
def test_mistakes_are_positioned(body, col, fragment):
    error = the_one_error(SPEC.replace(
        "0.5 * tanh(fc(dropout(cat([x, a], dim=-1), p=0.3)) + dropout(g(a), p=0.5))", body))
    assert (error.kind, error.span.line, error.span.col) == ("shape", 7, col)
    assert fragment in error.message


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_randomness_decides_whether_slices_share_a_mask(tmp_path, randomness):
    """torch.func.vmap's ``randomness``: "same" gives every slice the same masks (identical inputs, identical
    outputs, each that of the layer called alone with those seeds), "different" draws each slice its own."""
    layer = load(tmp_path).train()
    a = torch.randn(1, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).expand(3, 1, 4)
    torch.manual_seed(7)
    out = torch.func.vmap(layer, randomness=randomness)(a.clone())
    spread = float((out - out[:1]).abs().max().detach())
    if randomness == "same":
        assert spread == 0.0
        torch.testing.assert_close(out[0], by_hand(layer, a[0]), rtol=1e-10, atol=1e-12)  # the last call's masks
    else:
        assert spread > 1e-3
