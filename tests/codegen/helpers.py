"""Checks shared by the tests of compiled layers that use one language form each."""
from __future__ import annotations

import pytest
import torch

from fpidsl.compiler import check_source
from fpidsl.errors import FpiError, FpiErrors
from fpidsl.runtime.layer import bind_dims
from fpidsl.source import Source

from ..runtime.helpers import derivatives

TIGHT = {"tol": 1e-13, "max_iter": 2000, "on_fail": "raise"}
UNROLL = 200


def tight_layer(tmp_path, name: str, text: str):
    """The first layer of spec ``text`` (written to ``tmp_path / name``), in float64, solved to ``TIGHT`` both ways,
    its weights drawn from seed 0."""
    import fpidsl

    path = tmp_path / name
    path.write_text(text)
    torch.manual_seed(0)
    return fpidsl.load(path)(solve=TIGHT, backward=TIGHT).double()

# A one-state layer around an expression `body` of h = fc(cat([x, a])) (and a, x): the map is 0.5 * tanh(body).
ONE_STATE_SPEC = """
layer L {{
  input a : [B, 4]
  state x : [B, 4] = zeros
  param fc : Linear(8, 4, init_scale=0.4)
  let h = fc(cat([x, a], dim=-1))
  update x = 0.5 * tanh({body})
}}
"""


def unrolled(layer, a, steps: int = UNROLL):
    """The layer's map iterated ``steps`` times from zeros, recorded by autograd."""
    x = torch.zeros_like(a)
    for _ in range(steps):
        x = type(layer).step(x, a, *layer.parameter_tensors())
    return x


def unrolled_outputs(layer, inputs, steps: int = UNROLL):
    """What ``layer(*inputs)`` returns, with the fixed point replaced by ``steps`` plain iterations of the layer's
    map from the layer's own start (any number of inputs and states), recorded by autograd."""
    cls = type(layer)
    bound = layer.bind(tuple(inputs), {})
    values = tuple(bound[n] for n in cls.INPUTS) + tuple(layer.parameter_tensors())
    states = tuple(layer.init_states(bind_dims(cls.INPUTS, bound, cls.SPEC), layer._float_like(values), *values))
    for _ in range(steps):
        new = cls.step(states if len(states) > 1 else states[0], *values)
        states = new if isinstance(new, tuple) else (new,)
    return layer.outputs(states, *values)


def assert_matches_unrolled_autograd(layer, a) -> None:
    """The fixed point, and its first and second derivatives in the input and every parameter, equal autograd
    through plain iteration (float64); gradcheck and gradgradcheck pass on two samples."""
    params = [a, *layer.parameters()]
    weight = torch.randn(a.shape, dtype=a.dtype)
    torch.testing.assert_close(layer(a), unrolled(layer, a), rtol=1e-10, atol=1e-12)
    got = derivatives(lambda: (weight * layer(a)).sum(), params, order=2)
    want = derivatives(lambda: (weight * unrolled(layer, a)).sum(), params, order=2)
    for k, (g_order, w_order) in enumerate(zip(got, want), start=1):
        for g, w in zip(g_order, w_order):
            torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9, msg=lambda m: f"order {k}: {m}")
    assert any(g.abs().max() > 0 for g in got[1]), "the second derivatives are all zero: the test would not see them"
    small = a[:2].detach().requires_grad_()
    assert torch.autograd.gradcheck(layer, (small,))
    assert torch.autograd.gradgradcheck(layer, (small,))


def assert_body_matches_unrolled_autograd(body: str, tmp_path) -> None:
    """``ONE_STATE_SPEC`` around ``body``, compiled and loaded in float64, against unrolled autograd."""
    import fpidsl

    spec = tmp_path / "body.fpi"
    spec.write_text(ONE_STATE_SPEC.format(body=body))
    torch.manual_seed(0)
    layer = fpidsl.load(spec)(solve=TIGHT, backward=TIGHT).double()
    assert_matches_unrolled_autograd(layer, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))


def the_one_error(text: str):
    """The single error that checking ``text`` reports (a mistake gives one error, not a cascade)."""
    with pytest.raises((FpiError, FpiErrors)) as info:
        check_source(Source("bad.fpi", text))
    errors = info.value.errors if isinstance(info.value, FpiErrors) else [info.value]
    assert len(errors) == 1, errors
    return errors[0]
