"""Issue 13's new built-ins in compiled layers: a small layer using each one checks, compiles, loads, and its fixed
point and its first and second derivatives match autograd through the unrolled iteration of its own map (float64);
gradcheck and gradgradcheck pass on the compiled layer. Their errors point at the argument at fault."""
from __future__ import annotations

import pytest

from fpidsl.compiler import check_source
from fpidsl.errors import ShapeErr, TypeErr
from fpidsl.source import Source

from .helpers import ONE_STATE_SPEC, assert_body_matches_unrolled_autograd, the_one_error

BODIES = {
    "gelu": "gelu(h)",
    "gelu-tanh": "gelu(h, approximate=tanh)",
    "silu": "silu(h)",
    "erf": "erf(h)",
    "sign": "sign(a) * h",
    "reciprocal": "reciprocal(2 + sigmoid(h))",
    "where": "where(relu(a), h, 0.5 * h)",
    "max": "h - max(h, dim=1, keepdim=true)",
    "min": "h * min(h, dim=-1, keepdim=true)",
    "norm": "h / (1 + norm(h, dim=1, keepdim=true))",
    "norm-p3": "h * norm(h, dim=-1, p=3, keepdim=true)",
    "prod": "h * prod(h, dim=1, keepdim=true)",
    "var": "h * var(h, dim=1, keepdim=true)",
    "permute": "reshape(permute(reshape(h, [B, 2, 2]), [0, 2, 1]), [B, 4])",
    "unsqueeze": "sum(unsqueeze(h, -1) * unsqueeze(a, dim=1), dim=-1)",
    "triu": "reshape(triu(reshape(h, [B, 2, 2])), [B, 4])",
    "tril": "reshape(tril(reshape(h, [B, 2, 2]), diagonal=-1), [B, 4]) + h",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BODIES))
def test_a_layer_with_the_builtin_matches_unrolled_autograd(name, tmp_path):
    assert_body_matches_unrolled_autograd(BODIES[name], tmp_path)


def _error(body: str):
    text = ONE_STATE_SPEC.format(body=body)
    return the_one_error(text), text


BAD = [
    # (body, error kind, the text the error points at, a fragment of its message)
    ("gelu(h, approximate=exact)", ShapeErr, "exact", "approximate of gelu must be none or tanh, found exact"),
    ("h * norm(h, dim=1, p=0.5, keepdim=true)", ShapeErr, "0.5", "p of norm must be a number of at least 1"),
    ("h * prod(h, dim=0, keepdim=true)", ShapeErr, "0", "needs a dimension of known size, found B"),
    ("h * var(h, dim=1, keepdim=true, correction=4)", ShapeErr, "4",
     "var over 4 elements with correction=4 divides by 0"),
    ("reshape(permute(reshape(h, [B, 2, 2]), [0, 2]), [B, 4])", ShapeErr, "[0, 2]",
     "permute needs one dim per dimension of [B, 2, 2] (3)"),
    ("sum(unsqueeze(h, 3), dim=-1)", ShapeErr, "3", "dim=3 is out of range for unsqueeze"),
    ("triu(sum(h, dim=1, keepdim=true))[:, 0:1] + h", None, None, None),  # valid: [B, 1] is a matrix
    ("sum(triu(h, diagonal=1), dim=1, keepdim=true) + tril(sum(h, dim=1))", ShapeErr, "sum(h, dim=1)",
     "tril needs a tensor of at least 2 dimensions"),
    ("where(h, a, reshape(h, [B, 2, 2]))", ShapeErr, "reshape(h, [B, 2, 2])", "which do not broadcast"),
    ("max(h, keepdim=true) + h", TypeErr, None, "max needs dim"),
]


@pytest.mark.parametrize("body, kind, at, fragment", BAD, ids=[b for b, *_ in BAD])
def test_mistakes_with_the_new_builtins_are_one_positioned_error(body, kind, at, fragment):
    if kind is None:
        check_source(Source("ok.fpi", ONE_STATE_SPEC.format(body=body)))
        return
    error, text = _error(body)
    assert isinstance(error, kind), error
    assert fragment in error.message, error.message
    assert error.span.line == 7, error.span  # the update line of _spec
    line = text.splitlines()[error.span.line - 1]
    if at is not None:  # the first occurrence of `at` in the body
        assert error.span.col - 1 == line.index(at, line.index(body)), (error.span, at)


def test_max_and_gelu_are_builtins_not_did_you_mean_hints():
    """Before issue 13, `max` got "did you mean `softmax`?" and `gelu` "did you mean `elu`?"."""
    check_source(Source("ok.fpi", ONE_STATE_SPEC.format(body="gelu(h) + max(h, dim=1, keepdim=true) + min(h, dim=1, keepdim=true)")))
    error, _ = _error("maxx(h, dim=1) + h")
    assert "unknown function maxx" in error.message and "max" in (error.hint or "")
