"""fpidsl.trace with int64 and bool tensor arguments (issue 18): declared ``input NAME : int [...]`` / ``bool [...]``,
read as indices (nn.Embedding, F.embedding, gather, index_select) and masks (torch.where); any other use of one
falls back to f itself with f's numbers."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpidsl
from fpidsl.tracing import UntraceableError, trace_map, trace_status

from ..runtime.helpers import assert_trace_agrees

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iter": 2000}


class Tokens(nn.Module):
    """x <- tanh(W x + emb(tokens).mean(1)), tokens int [B, T]."""

    def __init__(self, vocab=10, n=4):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.emb = nn.Embedding(vocab, n)
        with torch.no_grad():
            self.fc.weight.mul_(0.4)

    def forward(self, x, tokens):
        return torch.tanh(self.fc(x) + self.emb(tokens).mean(1))


def _tokens():
    torch.manual_seed(0)
    return Tokens().to(DT), torch.zeros(3, 4, dtype=DT), torch.randint(0, 10, (3, 5))


def test_an_embedding_of_int_tokens_traces_with_an_int_input_and_the_embedding_module():
    f, x0, tokens = _tokens()
    traced, why = trace_status(f, x0, tokens)
    assert traced is not None and why.startswith("traced"), why
    text = traced.spec.text
    assert "input tokens : int [B, 5]" in text and "param emb : Embedding(10, 4)" in text, text
    assert "emb(tokens)" in text and not traced.spec.externs and "extern" not in text, text
    assert traced.spec.sources["emb.weight"] == "emb.weight"


def test_an_embedding_of_int_tokens_agrees_with_autograd_in_values_and_gradients():
    f, x0, tokens = _tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        assert_trace_agrees(f, x0, (tokens,), (f.fc.weight, f.emb.weight), atol_x=1e-10, atol_g=1e-9,
                            backward=TIGHT, **TIGHT)


def test_functional_embedding_gather_and_index_select_are_primitives():
    torch.manual_seed(1)
    W = nn.Parameter(torch.randn(10, 4, dtype=DT))

    def g(x, tokens, pick, rows):
        e = F.embedding(tokens, W).mean(1)
        return torch.tanh(0.4 * x + e + 0.1 * x.gather(1, pick) + 0.1 * torch.index_select(x, 1, rows))

    x0, tokens = torch.zeros(3, 4, dtype=DT), torch.randint(0, 10, (3, 5))
    pick, rows = torch.randint(0, 4, (3, 4)), torch.tensor([3, 0, 0, 1])
    traced = trace_map(g, x0, (tokens, pick, rows), externs=False)
    text = traced.spec.text
    assert "input tokens : int [B, 5]" in text and "input pick : int [B, 4]" in text and \
        "input rows : int [4]" in text, text
    assert "index_select(W, 0, flatten(tokens" in text and "gather(x, 1, pick)" in text and \
        "index_select(x, 1, rows)" in text, text
    assert_trace_agrees(g, x0, (tokens, pick, rows), (W,), atol_x=1e-10, atol_g=1e-9, backward=TIGHT, **TIGHT)


def test_a_bool_mask_argument_in_torch_where_is_a_bool_input():
    torch.manual_seed(2)
    fc = nn.Linear(4, 4).to(DT)
    with torch.no_grad():
        fc.weight.mul_(0.4)

    def masked(x, z, keep):
        return torch.tanh(torch.where(keep, fc(x), 0.3 * x) + z)

    x0, z = torch.zeros(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT, requires_grad=True)
    keep = torch.rand(3, 4) > 0.5
    traced, why = trace_status(masked, x0, z, keep)
    assert traced is not None, why
    assert "input keep : bool [B, 4]" in traced.spec.text and "where(keep, " in traced.spec.text, traced.spec.text
    assert not traced.spec.externs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_trace_agrees(masked, x0, (z, keep), (z, fc.weight), atol_x=1e-10, atol_g=1e-9,
                            backward=TIGHT, **TIGHT)


def _as_number(x, tokens):  # tokens computed with: no primitive reads an index so
    return torch.tanh(0.4 * x + 0.01 * tokens.double().mean(1, keepdim=True))


def _plus_one(x, tokens):  # int arithmetic: an index is not a number
    return torch.tanh(0.4 * x + 0.01 * (tokens[:, :4] + 1))


def _bool_as_float(x, keep):  # a mask used as 0/1 numbers
    return torch.tanh(0.4 * x + 0.1 * keep.to(x.dtype))


def _bool_as_double(x, keep):  # the same, cast another way, through a view
    return torch.tanh(0.4 * x * keep.unsqueeze(-1).double().squeeze(-1) + 0.1 * keep.type_as(x))


def _bool_as_float32(x, keep):  # a float32 mask in a float64 map: a dtype change, refused
    return torch.tanh(0.4 * x + 0.1 * keep.float())


def _other_module(x, tokens):  # an int argument given to a module with no primitive
    return torch.tanh(0.4 * x + 0.01 * nn.functional.one_hot(tokens[:, 0], 4).to(x.dtype))


@pytest.mark.parametrize("f, arg", [(_as_number, "tokens"), (_plus_one, "tokens"), (_bool_as_float32, "keep"),
                                    (_other_module, "tokens")])
def test_an_int_or_bool_argument_used_otherwise_falls_back_with_the_same_numbers(f, arg):
    torch.manual_seed(3)
    x0 = torch.zeros(3, 4, dtype=DT)
    a = torch.randint(0, 4, (3, 5)) if arg == "tokens" else torch.rand(3, 4) > 0.5
    traced, why = trace_status(f, x0, a)
    assert traced is None and "int or bool argument" in why, why
    with pytest.raises(UntraceableError, match="int or bool argument"):
        trace_map(f, x0, (a,))
    z = torch.zeros(3, 4, dtype=DT, requires_grad=True)

    def shifted(x, z, a):
        return f(x, a) + 0.1 * z

    assert trace_status(shifted, x0, z, a)[0] is None  # fixed_point solves with f itself
    x_on = fpidsl.fixed_point(shifted, x0, z, a, **TIGHT)
    x_off = fpidsl.fixed_point(shifted, x0, z, a, trace=False, **TIGHT)
    torch.testing.assert_close(x_on, x_off, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(x_on.sin().sum(), z)[0],
                               torch.autograd.grad(x_off.sin().sum(), z)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("f", [_bool_as_float, _bool_as_double])
def test_a_bool_argument_cast_to_the_states_dtype_is_where_of_it(f):
    """keep.to(x.dtype), keep.double(), keep.type_as(x): 0/1 numbers, written where(keep, 1, 0) (they once fell
    back); values and gradients as the map's own."""
    torch.manual_seed(3)
    x0 = torch.zeros(3, 4, dtype=DT)
    keep = torch.rand(3, 4) > 0.5
    z = torch.randn(3, 4, dtype=DT, requires_grad=True)

    def shifted(x, z, keep):
        return f(x, keep) + 0.1 * z

    traced, why = trace_status(shifted, x0, z, keep)
    assert traced is not None, why
    assert "input keep : bool [B, 4]" in traced.spec.text and "where(keep, 1, 0)" in traced.spec.text
    assert not traced.spec.externs
    assert_trace_agrees(shifted, x0, (z, keep), (z,), atol_x=1e-12, atol_g=1e-11, backward=TIGHT, **TIGHT)


def test_an_int32_argument_and_a_state_stay_refused():
    x0 = torch.zeros(3, 4, dtype=DT)
    with pytest.raises(UntraceableError, match="int64 or bool only"):
        trace_map(lambda x, t: torch.tanh(x) + 0 * x.gather(1, t.long()), x0, (torch.zeros(3, 4, dtype=torch.int32),))
    with pytest.raises(UntraceableError, match="floating-point tensor"):
        trace_map(lambda x: x, torch.zeros(3, 4, dtype=torch.int64), ())


class _TakesComplex(nn.Module):
    def forward(self, x, w):  # a refused argument's position: this line, where the map is defined
        return 0.5 * x


def _takes_int32(x, t):
    return 0.5 * x


def test_a_refused_argument_is_placed_at_the_maps_definition_not_the_call():
    x0 = torch.zeros(3, 4, dtype=DT)
    for f, arg, line in ((_TakesComplex(), torch.zeros(3, 4, dtype=torch.complex64), _TakesComplex.forward),
                         (_takes_int32, torch.zeros(3, 4, dtype=torch.int32), _takes_int32)):
        where = rf"\(at .*test_trace_int_args\.py:{line.__code__.co_firstlineno}\)$"
        with pytest.raises(UntraceableError, match=r"the argument [tw] is a torch\.\w+ tensor .*" + where):
            trace_map(f, x0, (arg,))


def test_an_embedding_with_padding_idx_is_an_extern_and_not_traced():
    torch.manual_seed(4)
    emb = nn.Embedding(10, 4, padding_idx=0).to(DT)

    def f(x, tokens):
        return torch.tanh(0.4 * x + emb(tokens).mean(1))

    x0, tokens = torch.zeros(3, 4, dtype=DT), torch.randint(0, 10, (3, 5))
    traced, why = trace_status(f, x0, tokens)
    assert traced is None and "int or bool argument" in why, why
    with pytest.raises(UntraceableError, match="padding_idx"):
        trace_map(f, x0, (tokens,), externs=False)
