"""What happens between a forward and its backward on the autograd path (``trace=False``, or a map that does not
trace): a tensor the map reads besides its arguments, one that does not require grad, edited in place before the
backward (the backward evaluates the map again where it reads it: it must raise, like autograd for what it saved, not
give the gradient of another map); and a backward run under ``torch.inference_mode()`` (the right gradients, as the
traced path gives them)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpidsl import fixed_point

from .helpers import DTYPE, TIGHT, TIGHT_BACKWARD, generator, max_rel_err, randn, rel_err, unrolled

EDITED = "modified by an inplace operation"
ADVICE = "Clone it before editing it in place"
MODES = [{}, {"mode": "jfb"}, {"mode": "phantom", "k": 3, "tau": 0.8}]


def _weight(gen: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DTYPE))[0]
    return (0.5 * q).requires_grad_()


def _fp(f, *args, backward=None, trace=False):
    return fixed_point(f, torch.zeros(4, 6, dtype=DTYPE), *args, **TIGHT, trace=trace,
                       backward={**TIGHT_BACKWARD, **(backward or {})})


Z_GLOBAL = torch.randn(4, 6, generator=generator(7), dtype=DTYPE)


def _global_map(W):
    return lambda x: torch.tanh(x @ W.T + Z_GLOBAL)


class _BufCell(nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.register_buffer("shift", torch.randn(6, generator=gen, dtype=DTYPE))
        self.plain = torch.randn(6, generator=gen, dtype=DTYPE)

    def forward(self, x):
        return torch.tanh(x @ self.W.T + self.shift * self.plain)


def _cases(gen: torch.Generator):
    """(name, map, the tensors to differentiate, the in-place edit, a fragment of the message)."""
    W = _weight(gen)
    z = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    yield "closure", (lambda x: torch.tanh(x @ W.T + z)), [W], (lambda: z.add_(1.0)), "variable 'z' captured by"
    yield "global", _global_map(W), [W], (lambda: Z_GLOBAL.mul_(1.0)), "global 'Z_GLOBAL' read by"
    cfg = {"s": torch.randn(6, generator=gen, dtype=DTYPE)}
    yield "dict", (lambda x: torch.tanh(x @ W.T + cfg["s"])), [W], (lambda: cfg["s"].add_(1.0)), "entry 's' of"
    lst = [torch.randn(6, generator=gen, dtype=DTYPE)]
    yield "list", (lambda x: torch.tanh(x @ W.T + lst[0])), [W], (lambda: lst[0].add_(1.0)), "entry 0 of"
    m = _BufCell(gen)
    yield "buffer", m, [m.W], (lambda: m.shift.mul_(3.0)), "buffer 'shift' of _BufCell"
    m2 = _BufCell(gen)
    yield "attribute", m2, [m2.W], (lambda: m2.plain.mul_(3.0)), "attribute 'plain' of _BufCell"
    frozen = nn.Linear(6, 6).to(DTYPE).requires_grad_(False)
    with torch.no_grad():  # from the generator, not torch's global one (a random init could stop contracting)
        frozen.weight.copy_(0.4 * _weight(gen))
        frozen.bias.copy_(torch.randn(6, generator=gen, dtype=DTYPE))
    U = _weight(gen)
    yield ("frozen parameter", (lambda x: torch.tanh(x @ U.T + frozen(x))), [U], (lambda: frozen.weight.mul_(0.5)),
           "parameter 'weight' of Linear (not requiring grad)")


CASES = [c[0] for c in _cases(generator(0))]


@pytest.mark.parametrize("mode", MODES, ids=["implicit", "jfb", "phantom"])
@pytest.mark.parametrize("case", CASES)
def test_an_edit_in_place_before_the_backward_raises(case, mode):
    name, f, params, edit, where = next(c for c in _cases(generator(0)) if c[0] == case)
    y = _fp(f, backward=mode)
    with torch.no_grad():
        edit()
    with pytest.raises(RuntimeError, match=EDITED) as info:
        torch.autograd.grad(y.sin().sum(), params)
    assert where in str(info.value) and ADVICE in str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_no_edit_gives_the_unrolled_gradient(case):
    name, f, params, edit, where = next(c for c in _cases(generator(0)) if c[0] == case)
    expected = torch.autograd.grad(unrolled(f, torch.zeros(4, 6, dtype=DTYPE), (), 200).sin().sum(), params)
    got = torch.autograd.grad(_fp(f).sin().sum(), params)
    assert max_rel_err(got, expected) < 1e-9


def test_a_clone_edited_before_the_backward_keeps_the_gradient():
    gen = generator(1)
    W = _weight(gen)
    z = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    f = lambda x: torch.tanh(x @ W.T + z)  # noqa: E731
    expected = torch.autograd.grad(unrolled(f, torch.zeros(4, 6, dtype=DTYPE), (), 200).sin().sum(), W)[0]
    y = _fp(f)
    z2 = z.clone()
    z2.add_(1.0)
    assert rel_err(torch.autograd.grad(y.sin().sum(), W)[0], expected) < 1e-9


@pytest.mark.parametrize("where", ["closure", "dict", "buffer"])
def test_a_tensor_replaced_before_the_backward_raises(where):
    gen = generator(10)
    W = _weight(gen)
    z = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    cfg = {"s": z}
    m = _BufCell(gen)
    maps = {"closure": lambda x: torch.tanh(x @ W.T + z), "dict": lambda x: torch.tanh(x @ W.T + cfg["s"]), "buffer": m}
    y = _fp(maps[where])
    if where == "closure":
        z = z + 1.0
    elif where == "dict":
        cfg["s"] = cfg["s"] + 1.0
    else:
        m.shift = m.shift + 1.0
    with pytest.raises(RuntimeError, match="was replaced by another value"):
        torch.autograd.grad(y.sin().sum(), [W] if where != "buffer" else [m.W])


def test_an_edit_after_the_backward_is_fine():
    gen = generator(2)
    W = _weight(gen)
    z = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    y = _fp(lambda x: torch.tanh(x @ W.T + z))
    (g,) = torch.autograd.grad(y.sin().sum(), W)
    z.add_(1.0)
    y2 = _fp(lambda x: torch.tanh(x @ W.T + z))
    expected = torch.autograd.grad(unrolled(lambda x: torch.tanh(x @ W.T + z), torch.zeros(4, 6, dtype=DTYPE), (),
                                            200).sin().sum(), W)[0]
    assert rel_err(torch.autograd.grad(y2.sin().sum(), W)[0], expected) < 1e-9
    assert rel_err(g, expected) > 1e-3  # the two maps differ


def test_an_edit_between_a_first_and_a_second_backward_raises():
    gen = generator(3)
    W = _weight(gen)
    z = torch.randn(4, 6, generator=gen, dtype=DTYPE)
    y = _fp(lambda x: torch.tanh(x @ W.T + z))
    (g,) = torch.autograd.grad(y.sin().sum(), W, create_graph=True)
    z.add_(1.0)
    with pytest.raises(RuntimeError, match=EDITED) as info:
        torch.autograd.grad(g.square().sum(), W)
    assert "variable 'z' captured by" in str(info.value)


class _NormCell(nn.Module):
    """A map with a batch norm: in training mode each evaluation writes its running statistics (the map's own
    writes, not an edit)."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.norm = nn.BatchNorm1d(6).to(DTYPE)
        self.a = torch.randn(4, 6, generator=gen, dtype=DTYPE)

    def forward(self, x):
        return torch.tanh(x @ self.W.T + self.norm(self.a))


def test_the_maps_own_writes_do_not_raise():
    m = _NormCell(generator(4))
    y = _fp(m)
    grads = torch.autograd.grad(y.sin().sum(), list(m.parameters()))
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


class _Keeping(nn.Module):
    """A map that keeps its last input as an attribute (``self.last = x``), which a later call replaces."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.last = torch.zeros(())

    def forward(self, x, a):
        self.last = x.detach()
        return torch.tanh(x @ self.W.T + a)


def test_a_tensor_the_map_replaces_itself_does_not_raise_after_a_second_call():
    """Two calls, then one backward: the second call's evaluations replaced ``last`` (read by the map) after the
    first call's forward; the first call's check took it as the map's own (it replaced it in its forward too)."""
    gen = generator(12)
    m = _Keeping(gen)
    a1, a2 = randn(4, 6, gen=gen, grad=False), randn(4, 6, gen=gen, grad=False)
    (grad,) = torch.autograd.grad((_fp(m, a1).sin().sum() + _fp(m, a2).sin().sum()), [m.W])
    (one,) = torch.autograd.grad(_fp(m, a1).sin().sum(), [m.W])
    (two,) = torch.autograd.grad(_fp(m, a2).sin().sum(), [m.W])
    torch.testing.assert_close(grad, one + two, rtol=1e-10, atol=1e-12)


class _Counting(nn.Module):
    """A map that counts its evaluations in a buffer through ``.data`` (which keeps the buffer's version, as batch
    norm's kernels may): only the capture check's putting it back (a copy) bumps the version."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.a = torch.randn(4, 6, generator=gen, dtype=DTYPE)
        self.register_buffer("calls", torch.zeros((), dtype=DTYPE))

    def forward(self, x):
        self.calls.data.add_(1.0)
        return torch.tanh(x @ self.W.T + self.a + 0.0 * self.calls)


def test_a_write_that_keeps_the_version_does_not_raise():
    m = _Counting(generator(11))
    expected = torch.autograd.grad(unrolled(m, torch.zeros(4, 6, dtype=DTYPE), (), 200).sin().sum(), m.W)[0]
    y = _fp(m)
    assert rel_err(torch.autograd.grad(y.sin().sum(), m.W)[0], expected) < 1e-9


def test_an_edit_of_running_statistics_read_in_eval_mode_raises():
    m = _NormCell(generator(5)).eval()
    y = _fp(m)
    with torch.no_grad():
        m.norm.running_mean.add_(1.0)
    with pytest.raises(RuntimeError, match=EDITED) as info:
        torch.autograd.grad(y.sin().sum(), m.W)
    assert "buffer 'norm.running_mean' of _NormCell" in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# A backward run under torch.inference_mode()


class _Cell(nn.Module):
    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.U = nn.Linear(6, 6).to(DTYPE)

    def forward(self, x, a):
        return torch.tanh(x @ self.W.T + self.U(a))


def _grads_under_inference_mode(trace: bool, mode: dict) -> list:
    torch.manual_seed(0)
    m = _Cell(generator(6))
    a = randn(4, 6, gen=generator(7))
    y = _fp(m, a, backward=mode, trace=trace)
    loss = y.sin().sum()
    with torch.inference_mode():
        loss.backward()
    return [a.grad, *(p.grad for p in m.parameters())]


@pytest.mark.parametrize("mode", MODES, ids=["implicit", "jfb", "phantom"])
def test_a_backward_under_inference_mode_gives_the_traced_gradients(mode):
    expected = _grads_under_inference_mode(True, mode)
    got = _grads_under_inference_mode(False, mode)
    assert all(g is not None for g in expected)
    assert all(g is not None for g in got), "a gradient is missing"
    assert max_rel_err(got, expected) < 1e-9


def test_a_backward_under_inference_mode_gives_the_unrolled_gradients():
    m = _Cell(generator(8))
    a = randn(4, 6, gen=generator(9))
    expected = torch.autograd.grad(unrolled(m, torch.zeros(4, 6, dtype=DTYPE), (a,), 200).sin().sum(),
                                   [a, *m.parameters()])
    loss = _fp(m, a, trace=False).sin().sum()
    with torch.inference_mode():
        got = torch.autograd.grad(loss, [a, *m.parameters()])
    assert max_rel_err(got, expected) < 1e-9


class _WithHead(nn.Module):
    """The usual DEQ model: the solve of a bound method, then a batch norm head (training mode) after it, whose
    statistics the map never reads; and a dict of which the map reads one entry and the loop logs in another."""

    def __init__(self, gen: torch.Generator):
        super().__init__()
        self.W = nn.Parameter(_weight(gen).detach())
        self.head = nn.Sequential(nn.Linear(6, 6).to(DTYPE), nn.BatchNorm1d(6, dtype=DTYPE))
        self.info = {"shift": torch.randn(6, generator=gen, dtype=DTYPE), "calls": torch.zeros((), dtype=DTYPE)}

    def _f(self, x, a):
        return torch.tanh(x @ self.W.T + a + self.info["shift"])

    def forward(self, a):
        z = fixed_point(self._f, torch.zeros_like(a), a, **TIGHT, trace=False, backward=TIGHT_BACKWARD)
        self.info["calls"].add_(1.0)
        self.last = z.detach()
        return self.head(z)


def test_what_the_map_does_not_read_is_not_watched():
    """The capture walk finds every tensor the model holds (the head's ``num_batches_tracked``, bumped by the head
    after the solve; the logging entry); only what an evaluation of the map read is watched: these raised."""
    gen = generator(13)
    model = _WithHead(gen).train()
    a = randn(4, 6, gen=gen, grad=False)
    (grad,) = torch.autograd.grad(model(a).sin().sum(), [model.W])
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    y = model(a)
    with torch.no_grad():
        model.info["shift"].add_(1.0)  # what it does read still raises
    with pytest.raises(RuntimeError, match=EDITED):
        torch.autograd.grad(y.sin().sum(), [model.W])
