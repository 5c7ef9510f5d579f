"""The convolution kernels the emitted code calls (fpidsl/runtime/ops.py) choose among equivalent forms by shape;
every form against PyTorch's own convolution and its autograd, to the second order, in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fpidsl.runtime import ops

CASES = [  # (in channels, out channels, kernel, stride, padding)
    (16, 1, 3, 1, 1),   # one output channel: depthwise and summed
    (1, 16, 3, 1, 1),
    (2, 16, 3, 1, 1),
    (4, 1, 5, 1, 2),
    (3, 1, 3, 2, 1),    # strided, one output channel
    (3, 4, 3, 2, 1),    # strided: the transposed convolution
    (5, 2, 3, 1, 0),
    (1, 1, 3, 1, 1),
]


def _tensors(cin, cout, k, bias=True):
    torch.manual_seed(cin * 100 + cout * 10 + k)
    x = torch.randn(2, cin, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.slow
@pytest.mark.parametrize("cin,cout,k,stride,pad", CASES)
def test_conv2d_is_torch_conv2d(cin, cout, k, stride, pad):
    x, w, b = _tensors(cin, cout, k)
    got = ops.conv2d(x, w, b, stride=(stride, stride), padding=(pad, pad))
    torch.testing.assert_close(got, F.conv2d(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)
    f = lambda x, w, b: ops.conv2d(x, w, b, stride=(stride, stride), padding=(pad, pad))  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.slow
@pytest.mark.parametrize("cin,cout,k,stride,pad", CASES)
def test_conv2d_input_grad_is_autograds(cin, cout, k, stride, pad):
    x, w, _ = _tensors(cin, cout, k, bias=False)
    y = F.conv2d(x, w, None, stride, pad)
    ct = torch.randn_like(y, requires_grad=True)
    (want,) = torch.autograd.grad(y, x, ct, create_graph=True)
    got = ops.conv2d_input_grad(ct, w, x, stride=(stride, stride), padding=(pad, pad))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    f = lambda ct, w: ops.conv2d_input_grad(ct, w, x, stride=(stride, stride), padding=(pad, pad))  # noqa: E731
    assert torch.autograd.gradcheck(f, (ct, w))
    assert torch.autograd.gradgradcheck(f, (ct, w))
