"""Issue 13, indexing and resampling: int / bool inputs, gather, index_select, Embedding, pad, avg_pool2d,
max_pool2d, interpolate and grid_sample in compiled layers, against torch oracles (the same map written with
torch.nn.functional and iterated by hand) and gradcheck / gradgradcheck in float64; the mistakes as one positioned
error each; the call-time dtype checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.compiler import check_source
from fpidsl.errors import ShapeErr, TypeErr
from fpidsl.frontend.ast_compare import strip_spans
from fpidsl.frontend.parser import parse_fpi
from fpidsl.frontend.yaml_loader import parse_yaml
from fpidsl.runtime.layer import LayerInputError
from fpidsl.source import Source
from fpidsl.tools.fmt import format_source
from fpidsl.tools.yaml_convert import to_yaml

from ..runtime.helpers import derivatives
from .helpers import the_one_error, tight_layer

TOKENS = """
layer Tokens {
  input a : [B, T, 4]
  input tokens : int [B, T]
  input pick : int [B, K]
  input rows : int [R]
  input keep : bool [B, T, 4]
  state x : [B, T, 4]
  param emb : Embedding(10, 4, init_scale=0.5)
  param fc : Linear(4, 4, init_scale=0.3)
  let e = emb(tokens)
  update x = tanh(fc(where(keep, x, 0.5 * a)) + e)
  output x, gather(x, 1, pick[:, :, None]), index_select(x, 1, rows)
}
"""

IMAGES = """
layer Scales {
  input a : [B, 2, H, W]
  state x : [B, 2, H, W]
  param conv : Conv2d(2, 2, 3, padding=1, init_scale=0.4)
  let coarse = avg_pool2d(x, 2)
  let fine = tanh(conv(interpolate(coarse, scale_factor=2, mode=bilinear)))
  let peak = max_pool2d(pad(x, [1, 1, 1, 1], value=0.25), 3, stride=1)
  update x = 0.4 * tanh(fine + 0.5 * interpolate(max_pool2d(x, 2), scale_factor=2) + 0.3 * peak) + a
}
"""

SAMPLING = """
layer Warp {
  input a : [B, 2, H, W]
  input grid : [B, H, W, 2]
  state x : [B, 2, H, W]
  update x = 0.4 * tanh(grid_sample(x, grid, padding_mode=border) + 0.5 * grid_sample(a, grid)) + a
}
"""


def _load(tmp_path, text: str, name: str):
    return tight_layer(tmp_path, f"{name}.fpi", text)


def _iterate(step, x, n: int = 80):
    for _ in range(n):
        x = step(x)
    return x


# --------------------------------------------------------------------------- int / bool inputs, Embedding, gather


def _token_inputs(gen):
    B, T, K = 2, 4, 2
    a = torch.randn(B, T, 4, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 10, (B, T), generator=gen)
    pick = torch.randint(0, T, (B, K), generator=gen)
    rows = torch.tensor([3, 0, 3])
    keep = torch.rand(B, T, 4, generator=gen) < 0.5
    return a, tokens, pick, rows, keep


def test_embedding_gather_and_index_select_match_torch(tmp_path):
    layer = _load(tmp_path, TOKENS, "tokens")
    assert isinstance(layer.emb, nn.Embedding) and layer.emb.weight.shape == (10, 4)
    assert set(layer.state_dict()) == {"emb.weight", "fc.weight", "fc.bias"}
    assert type(layer).INDEX_INPUTS == {"tokens": "int", "pick": "int", "rows": "int", "keep": "bool"}
    a, tokens, pick, rows, keep = _token_inputs(torch.Generator().manual_seed(1))
    x, gathered, selected = layer(a, tokens, pick, rows, keep)
    e = layer.emb(tokens)
    want = _iterate(lambda x: torch.tanh(layer.fc(torch.where(keep, x, 0.5 * a)) + e), torch.zeros_like(a))
    torch.testing.assert_close(x, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gathered, torch.gather(want, 1, pick[:, :, None]))
    torch.testing.assert_close(selected, want[:, rows])


def test_token_layer_derivatives_match_unrolled_iteration_and_gradcheck(tmp_path):
    """First and second derivatives in the float input and every parameter (the embedding table included) equal
    autograd through 80 plain iterations of the torch oracle; gradcheck and gradgradcheck in the float input."""
    layer = _load(tmp_path, TOKENS, "tokens")
    a, tokens, pick, rows, keep = _token_inputs(torch.Generator().manual_seed(2))
    a.requires_grad_()
    params = [a, *layer.parameters()]
    weights = [torch.randn(s, dtype=torch.float64) for s in ((2, 4, 4), (2, 2, 1), (2, 3, 4))]

    def loss(outputs):
        return sum((w * o).sum() for w, o in zip(weights, outputs))

    def oracle():
        e = layer.emb(tokens)
        x = _iterate(lambda x: torch.tanh(layer.fc(torch.where(keep, x, 0.5 * a)) + e), torch.zeros_like(a))
        return x, torch.gather(x, 1, pick[:, :, None]), x[:, rows]

    got = derivatives(lambda: loss(layer(a, tokens, pick, rows, keep)), params, order=2)
    want = derivatives(lambda: loss(oracle()), params, order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda m: f"order {k}: {m}")
    assert all(g.abs().max() > 0 for g in got[1]), "a second derivative is zero: the test would not see it"
    small = a[:2].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: layer(a, tokens[:2], pick[:2], rows, keep[:2]), (small,))
    assert torch.autograd.gradgradcheck(lambda a: layer(a, tokens[:2], pick[:2], rows, keep[:2]), (small,))


def test_the_embedding_table_gets_its_gradient_by_rows(tmp_path):
    """Only the rows that tokens name get a gradient, each the sum over its occurrences (torch's own layer)."""
    layer = _load(tmp_path, TOKENS, "tokens")
    a, tokens, pick, rows, keep = _token_inputs(torch.Generator().manual_seed(3))
    layer(a, tokens, pick, rows, keep)[0].sum().backward()
    unused = sorted(set(range(10)) - set(tokens.flatten().tolist()))
    assert torch.all(layer.emb.weight.grad[unused] == 0)
    assert torch.all(layer.emb.weight.grad[tokens.flatten()].abs().sum(-1) > 0)


DESCENT = """
layer Descent {
  input a : [B, 4]
  input t : int [B, 3]
  state x : [B, 4]
  param W : tensor [4, 4] = normal(0, 0.3)
  energy E = 0.5 * sum(square(x - a), dim=-1) + 0.2 * sum(square(tanh(gather(x @ W, 1, t))), dim=-1)
  descend x on E step 0.5
}
"""


def test_an_energy_through_gather_descends_and_differentiates_twice(tmp_path):
    """FPI_GD through gather: grad(E, x) holds gather_backward, the backward map gather again; against autograd
    of the same descent iterated by hand, and gradgradcheck."""
    layer = _load(tmp_path, DESCENT, "descent")
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 4, (3, 3), generator=gen)

    def oracle():
        def step(x):
            energy = (0.5 * (x - a).square().sum(-1) + 0.2 * torch.tanh(torch.gather(x @ layer.W, 1, t)).square()
                      .sum(-1)).sum()
            (g,) = torch.autograd.grad(energy, x, create_graph=True)
            return x - 0.5 * g
        return _iterate(step, torch.zeros_like(a).requires_grad_())  # a leaf, so that the first step has a gradient

    torch.testing.assert_close(layer(a, t), oracle(), rtol=1e-10, atol=1e-12)
    params = [a, layer.W]
    got = derivatives(lambda: layer(a, t).square().sum(), params, order=2)
    want = derivatives(lambda: oracle().square().sum(), params, order=2)
    for g_order, w_order in zip(got, want):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)
    small = a[:2].detach().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: layer(a, t[:2]), (small,))


MASK_AS_NUMBERS = """
layer Masked {
  input a : [B, 4]
  input keep : bool [B, 4]
  state x : [B, 4]
  update x = 0.5 * tanh(x) + a + 0.1 * where(keep, 1, 0) - where(keep, 0.3, 0.7) / 3
}
"""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_where_of_a_bool_mask_and_two_numbers_is_in_the_layers_dtype(tmp_path, dtype):
    """torch makes where(mask, 1, 0) in the default dtype: in a float64 layer 0.1 * it was rounded to float32
    (an error of 1e-9, silently). It is made in the first state's dtype."""
    layer = _load(tmp_path, MASK_AS_NUMBERS, "Masked").to(dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=gen, dtype=dtype)
    keep = torch.rand(3, 4, generator=gen) > 0.5
    x = layer(a, keep)
    assert x.dtype == dtype
    k = keep.to(dtype)
    shift = a + 0.1 * k - (0.3 * k + 0.7 * (1 - k)) / 3
    atol = 1e-11 if dtype == torch.float64 else 1e-5  # the solve's tolerance; float32's 0.1 is 1.5e-9 off
    torch.testing.assert_close(x, 0.5 * torch.tanh(x) + shift, rtol=0, atol=atol)
    torch.testing.assert_close(_iterate(lambda v: 0.5 * torch.tanh(v) + shift, torch.zeros_like(a), 200), x,
                               rtol=0, atol=atol)


def test_index_inputs_are_per_sample_in_the_batch_analysis():
    lowered = check_source(Source("t.fpi", TOKENS)).lowered()["Tokens"]
    assert lowered.samplewise


# --------------------------------------------------------------------------- pools, padding, interpolation


def _scales_oracle(layer, a):
    conv = layer.conv

    def step(x):
        coarse = F.avg_pool2d(x, 2)
        fine = torch.tanh(conv(F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)))
        peak = F.max_pool2d(F.pad(x, [1, 1, 1, 1], value=0.25), 3, stride=1)
        pooled = F.interpolate(F.max_pool2d(x, 2), scale_factor=2, mode="nearest")
        return 0.4 * torch.tanh(fine + 0.5 * pooled + 0.3 * peak) + a

    return _iterate(step, torch.zeros_like(a))


def test_pools_padding_and_interpolation_match_torch(tmp_path):
    layer = _load(tmp_path, IMAGES, "scales")
    assert [tuple(a[:2]) for a in type(layer).ASSUMPTIONS] == [("H", 2), ("W", 2)]
    a = torch.randn(2, 2, 6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(layer(a), _scales_oracle(layer, a), rtol=1e-10, atol=1e-12)


def test_pools_padding_and_interpolation_pass_gradgradcheck(tmp_path):
    layer = _load(tmp_path, IMAGES, "scales")
    a = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(layer, (a,))
    assert torch.autograd.gradgradcheck(layer, (a,))


def test_an_odd_size_breaks_the_pooling_assumption_at_call_time(tmp_path):
    layer = _load(tmp_path, IMAGES, "scales")
    with pytest.raises(LayerInputError, match="not divisible by 2"):
        layer(torch.zeros(1, 2, 5, 4, dtype=torch.float64))


TWO_SCALES = """
layer TwoScale {
  input a : [B, 2, H, W]
  state fine : [B, 2, H, W]
  state coarse : [B, 2, H/2, W/2]
  param down : Conv2d(2, 2, 3, padding=1, init_scale=0.3)
  update coarse = 0.4 * tanh(down(avg_pool2d(fine, 2)) + max_pool2d(fine, 2))
  update fine = 0.4 * tanh(interpolate(coarse, scale_factor=2) + pad(fine, [1, 1, 1, 1])[:, :, 1:-1, 1:-1]) + a
}
"""


def test_a_state_declared_at_half_the_size_is_reached_by_pooling(tmp_path):
    """Declared shapes with symbolic arithmetic ([B, 2, H/2, W/2]) meet the pools' exact symbolic sizes."""
    layer = _load(tmp_path, TWO_SCALES, "two_scale")
    a = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def step(states):
        fine, coarse = states
        return (0.4 * torch.tanh(F.interpolate(coarse, scale_factor=2) + fine) + a,
                0.4 * torch.tanh(layer.down(F.avg_pool2d(fine, 2)) + F.max_pool2d(fine, 2)))

    want = _iterate(step, (torch.zeros_like(a), torch.zeros(2, 2, 2, 3, dtype=torch.float64)))
    for got, w in zip(layer(a), want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
    small = a[:1, :, :2, :2].clone().requires_grad_()
    assert torch.autograd.gradgradcheck(layer, (small,))


# --------------------------------------------------------------------------- grid_sample


def _warp_inputs(seed: int, batch: int = 2, size: int = 3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, 2, size, size, generator=gen, dtype=torch.float64)
    grid = 1.2 * (2 * torch.rand(batch, size, size, 2, generator=gen, dtype=torch.float64) - 1)
    return a, grid


def test_grid_sample_matches_torch(tmp_path):
    layer = _load(tmp_path, SAMPLING, "warp")
    a, grid = _warp_inputs(6)

    def step(x):
        return 0.4 * torch.tanh(F.grid_sample(x, grid, padding_mode="border", align_corners=False)
                                + 0.5 * F.grid_sample(a, grid, align_corners=False)) + a

    torch.testing.assert_close(layer(a, grid), _iterate(step, torch.zeros_like(a)), rtol=1e-10, atol=1e-12)


def test_grid_sample_derivatives_in_x_and_grid_pass_gradgradcheck(tmp_path):
    """Through the backward fixed point and grid_sample_vjp (torch.autograd inside one primitive): first and second
    derivatives in the sampled input and in the grid."""
    layer = _load(tmp_path, SAMPLING, "warp")
    a, grid = _warp_inputs(7, batch=1, size=2)
    a.requires_grad_(), grid.requires_grad_()
    assert torch.autograd.gradcheck(layer, (a, grid))
    assert torch.autograd.gradgradcheck(layer, (a, grid))


@pytest.mark.slow  # about 9 s: gradgradcheck through three levels of nested autograd
def test_an_energy_through_grid_sample_differentiates_twice(tmp_path):
    """FPI_GD through grid_sample: the step holds grid_sample_vjp, so the gradient takes it one level deeper and the
    second derivative two (torch's own double backward of grid_sample under the nested autograd)."""
    layer = _load(tmp_path, """
layer Sampled {
  input a : [B, 1, H, W]
  input grid : [B, H, W, 2]
  state x : [B, 1, H, W]
  energy E = 0.5 * sum(square(x - a), dim=[1, 2, 3]) + 0.1 * sum(square(grid_sample(x, grid)), dim=[1, 2, 3])
  descend x on E step 0.5
}
""", "sampled")
    a, grid = _warp_inputs(12, batch=1, size=2)
    a, grid = a[:, :1].requires_grad_(), grid.requires_grad_()
    assert torch.autograd.gradcheck(layer, (a, grid))
    assert torch.autograd.gradgradcheck(layer, (a, grid))


def test_the_backward_map_calls_grid_sample_vjp(tmp_path):
    from fpidsl.compiler import compile_source

    source = compile_source(Source("warp.fpi", SAMPLING))
    assert "_ops.grid_sample_vjp(" in source and "torch.autograd" not in source


# --------------------------------------------------------------------------- mistakes, one positioned error each

HEAD = """layer L {
  input a : [B, 4]
  input t : int [B, 3]
  input m : bool [B, 4]
  state x : [B, 4]
  param emb : Embedding(6, 4)
"""

BAD = [
    # (body, kind, line, col, fragment)
    ("  update x = x + t[:, 0:1]\n", TypeErr, 7, 18, "this value (from the int input t) is an index and cannot be"),
    ("  update x = relu(m) * x\n", TypeErr, 7, 19, "the bool input m is an index and cannot be an argument of relu"),
    ("  update x = gather(x, 1, a)\n", TypeErr, 7, 27, "gather expects an int input as its index, found the input a"),
    ("  update x = sum(emb(a), dim=1)\n", TypeErr, 7, 22, "Embedding(6, 4) expects an int input as its index"),
    ("  update x = where(t, x, a)\n", TypeErr, 7, 20, "the int input t is an index and cannot be an argument of where"),
    ("  update x = x\n  output t\n", TypeErr, 8, 10, "cannot be an output"),
    ("  update x = index_select(x, 1, t)\n", ShapeErr, 7, 33, "index_select needs a 1-D index, found shape [B, 3]"),
    ("  update x = avg_pool2d(x, 2)\n", ShapeErr, 7, 25, "expects a 4-D input [N, C, H, W]"),
    ("  update x = pad(x, [1, 1, 1])[:, 0:4]\n", ShapeErr, 7, 21, "a pair [left, right] per padded dimension"),
    ("  update x = interpolate(x[:, None, :, None], scale_factor=0)[:, 0, :, 0]\n", ShapeErr, 7, 60,
     "a positive integer, found 0"),
]


@pytest.mark.parametrize("body, kind, line, col, fragment", BAD, ids=[b[0].strip() for b in BAD])
def test_mistakes_are_one_positioned_error(body, kind, line, col, fragment):
    error = the_one_error(HEAD + body + "}\n")
    assert isinstance(error, kind), error
    assert (error.span.line, error.span.col) == (line, col), error
    assert fragment in error.message, error.message


def test_a_computed_index_is_one_error_at_the_arithmetic():
    error = the_one_error(HEAD + "  update x = gather(x, 1, t[:, 0:1] * 2)[:, 0:1] + x\n}\n")
    assert isinstance(error, TypeErr) and (error.span.line, error.span.col) == (7, 27)
    assert "this value (from the int input t) is an index and cannot be an argument of *" in error.message


def test_a_symbolic_kernel_is_one_error_at_the_size():
    error = the_one_error("layer L {\n  input a : [B, 2, H, W]\n  state x : [B, 2, H, W]\n"
                          "  update x = interpolate(avg_pool2d(x, [H, 1]), size=[H, W]) + a\n}\n")
    assert isinstance(error, TypeErr) and (error.span.line, error.span.col) == (4, 41)
    assert "kernel of avg_pool2d must be an integer or a pair [a, b] of integers, but found the symbolic dimension " \
           "H, whose size is known only when the layer is called" in error.message


def test_an_interpolation_size_is_written_from_the_input_s_own_sizes(tmp_path):
    """size=[H, W] of a [B, 2, H/2, W/2] state: the emitted code computes it from that tensor's sizes; a size that
    the tensor does not give (another input's K) is an error at the size."""
    layer = _load(tmp_path, """
layer Up {
  input a : [B, 2, H, W]
  state x : [B, 2, H, W]
  state c : [B, 2, H/2, W/2]
  update c = 0.5 * tanh(avg_pool2d(x, 2))
  update x = 0.5 * tanh(interpolate(c, size=[H, W], mode=bilinear)) + a
}
""", "up")
    a = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)

    def step(states):
        x, c = states
        return (0.5 * torch.tanh(F.interpolate(c, size=(4, 6), mode="bilinear", align_corners=False)) + a,
                0.5 * torch.tanh(F.avg_pool2d(x, 2)))

    want = _iterate(step, (torch.zeros_like(a), torch.zeros(2, 2, 2, 3, dtype=torch.float64)))
    for got, w in zip(layer(a), want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
    error = the_one_error("layer L {\n  input a : [B, 2, H, W]\n  input b : [B, 2, K, K]\n  state x : [B, 2, K, K]\n"
                          "  update x = 0.5 * tanh(interpolate(a, size=[K, K])) + b\n}\n")
    assert isinstance(error, ShapeErr) and (error.span.line, error.span.col) == (5, 45)
    assert "size of interpolate may use only the sizes of x [B, 2, H, W], found K" in error.message


# --------------------------------------------------------------------------- call-time checks


def test_a_float_tensor_for_an_int_input_is_named_at_call_time(tmp_path):
    layer = _load(tmp_path, TOKENS, "tokens")
    a, tokens, pick, rows, keep = _token_inputs(torch.Generator().manual_seed(8))
    with pytest.raises(LayerInputError, match=r"input 'tokens' is declared int \(indices\) but got a tensor of "
                                              r"dtype float64: pass tokens.long\(\)"):
        layer(a, tokens.double(), pick, rows, keep)
    with pytest.raises(LayerInputError, match=r"input 'keep' is declared bool \(a mask\) but got a tensor of dtype "
                                              r"float64: pass keep != 0"):
        layer(a, tokens, pick, rows, keep.double())
    with pytest.raises(LayerInputError, match=r"input 'a' has dtype int64; the layer computes in floating point: "
                                              r"pass a.to\(torch.float64\), or declare it `input a : int \[...\]`"):
        layer(a.long(), tokens, pick, rows, keep)


def test_an_index_out_of_range_names_the_call_and_the_range(tmp_path):
    layer = _load(tmp_path, TOKENS, "tokens")
    a, tokens, pick, rows, keep = _token_inputs(torch.Generator().manual_seed(10))
    with pytest.raises(IndexError, match=r"an Embedding of 10 rows: an index is outside 0\.\.9"):
        layer(a, tokens + 10, pick, rows, keep)
    with pytest.raises(IndexError, match=r"index_select along dim 1: an index is outside 0\.\.3"):
        layer(a, tokens, pick, rows - 4, keep)


# --------------------------------------------------------------------------- the other front-ends and tools


def test_int_inputs_in_yaml_fmt_and_unparse():
    source = Source("t.fpi", TOKENS)
    yaml_text = to_yaml(source, parse_fpi(source))
    assert 'tokens: "int [B, T]"' in yaml_text and 'keep: "bool [B, T, 4]"' in yaml_text
    from_yaml = parse_yaml(Source("t.yaml", yaml_text, "yaml"))
    assert strip_spans(from_yaml) == strip_spans(parse_fpi(source))
    formatted = format_source(Source("t.fpi", TOKENS))
    assert "  input tokens : int [B, T]\n" in formatted and "  input keep : bool [B, T, 4]\n" in formatted


def test_a_yaml_int_input_error_points_into_the_yaml_file():
    text = 'fpi: 1\nlayers:\n  L:\n    inputs: {t: "int [B, 3]", a: "[B, 4]"}\n    states: {x: "[B, 4]"}\n' \
           '    updates: {x: "x + t"}\n'
    with pytest.raises(Exception) as info:
        check_source(Source("t.yaml", text, "yaml"))
    errors = getattr(info.value, "errors", [info.value])
    assert len(errors) == 1 and isinstance(errors[0], TypeErr)
    assert (errors[0].span.line, errors[0].span.col) == (6, 23)
