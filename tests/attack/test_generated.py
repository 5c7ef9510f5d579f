"""The standing attack, generated half: random valid specs (tests/attack/generate.py) in both front-ends.

For each: checking gives no exception other than fpidsl's (and, the spec being valid, none at all); the spec
compiles, loads and runs forward and backward; its gradients match autograd through the unrolled iteration
of the layer's own map (which converges: the maps are contractions); and each sample's result does not
depend on the rest of the batch. Bounded in time: a few dozen examples, well under a minute.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpidsl.loader import module_from_source
from fpidsl.compiler import check_source, compile_source
from fpidsl.errors import FpiError, FpiErrors, render
from fpidsl.runtime.layer import bind_dims
from fpidsl.source import Source
from tests.attack.generate import specs

# FPIDSL_ATTACK_EXAMPLES=500 runs a longer, random (not derandomized) attack locally
EXAMPLES = int(os.environ.get("FPIDSL_ATTACK_EXAMPLES", "12"))
UNROLL = 400


def compiled_layer(source: Source):
    try:
        check_source(source)
    except (FpiError, FpiErrors) as exc:  # an fpidsl error, but the spec is valid: a false refusal
        errors = exc.errors if isinstance(exc, FpiErrors) else [exc]
        pytest.fail("a valid spec was refused:\n" + "\n".join(render(e, source) for e in errors) + "\n" + source.text)
    code = compile_source(source)
    module = module_from_source(code, f"<generated {abs(hash(source.text))}>", "fpidsl_generated")
    return module.LAYERS["G"]


def unrolled(layer, inputs: tuple[torch.Tensor, ...]):
    """The layer's outputs by plain iteration of its map, differentiable by autograd."""
    cls = type(layer)
    values = tuple(inputs) + tuple(layer.parameter_tensors())
    dims = bind_dims(cls.INPUTS, dict(zip(cls.INPUTS, inputs)), "G")
    states = tuple(layer.init_states(dims, values[0], *values))
    for _ in range(UNROLL):
        nxt = cls.step(states if len(states) > 1 else states[0], *values)
        states = nxt if isinstance(nxt, tuple) else (nxt,)
    out = layer.outputs(states, *values)
    return out if isinstance(out, tuple) else (out,)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@settings(max_examples=EXAMPLES, deadline=None, derandomize="FPIDSL_ATTACK_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs(), st.sampled_from(["fpi", "yaml"]), st.integers(0, 2**31 - 1))
def test_generated_specs_check_compile_run_and_differentiate(spec, fmt, seed):
    text = spec.fpi() if fmt == "fpi" else spec.yaml()
    cls = compiled_layer(Source(f"gen.{fmt}", text))
    torch.manual_seed(seed % 1000)
    tight = {"tol": 1e-12, "max_iter": 1000, "on_fail": "raise"}
    layer = cls(solve=tight, backward=tight).double()
    a = torch.randn(3, spec.n, dtype=torch.float64, requires_grad=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = as_tuple(layer(a))
    weights = [torch.randn_like(o) for o in out]
    loss = sum((w * o).sum() for w, o in zip(weights, out))
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, [a, *params], allow_unused=True)

    # against autograd through the unrolled iteration of the same map
    reference = unrolled(layer, (a,))
    for o, r in zip(out, reference):
        torch.testing.assert_close(o, r, atol=1e-9, rtol=1e-8, msg=lambda m: f"{m}\n{text}")
    ref_loss = sum((w * r).sum() for w, r in zip(weights, reference))
    ref_grads = torch.autograd.grad(ref_loss, [a, *params], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        g = torch.zeros_like(r) if g is None and r is not None else g
        r = torch.zeros_like(g) if r is None and g is not None else r
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-8, rtol=1e-7, msg=lambda m: f"{m}\n{text}")

    # batch independence: sample 1 alone gives what it gave in the batch of 3
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = as_tuple(layer(a[1:2].detach()))
    for o, s in zip(out, alone):
        torch.testing.assert_close(o[1:2].detach(), s, atol=1e-9, rtol=1e-8, msg=lambda m: f"{m}\n{text}")
