"""Every zoo model under torch.func (float64): ``torch.func.grad`` through ``functional_call`` equals
``torch.autograd.grad`` (once a saved shape came back from functorch as a tuple and grid_sample's VJP called
``requires_grad_``, both failing); ``vmap`` over the batch equals the per-sample loop; and a call under vmap leaves
nothing of the transform on the layer (once its last fixed point, a BatchedTensor, stayed on it and a later
``torch.save`` failed)."""
from __future__ import annotations

import io

import pytest
import torch
from torch.func import functional_call, grad, vmap

from .test_zoo import IDS, MODELS, build

SETTINGS = {"tol": 1e-12, "max_iter": 3000}
BATCH = 3


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _call(layer, inputs, params=None):
    torch.manual_seed(5)  # dropout's seeds: the same masks for both sides
    return _first(layer(*inputs) if params is None else functional_call(layer, params, tuple(inputs)))


def _batched(inputs) -> list[int]:
    """The dense inputs whose dimension 0 is the batch."""
    return [k for k, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.layout == torch.strided
            and x.dim() > 0 and x.shape[0] == BATCH]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_torch_func_grad_is_autograds(model, train):
    layer = build(model, solve=SETTINGS, backward=SETTINGS).train(train)
    inputs = model.inputs(torch.Generator().manual_seed(1), BATCH)
    params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}
    weight = torch.randn_like(_call(layer, inputs))

    def loss(p):
        return (weight * _call(layer, inputs, p)).sum()

    got = grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()), allow_unused=True, materialize_grads=True)
    for name, w in zip(params, want):
        torch.testing.assert_close(got[name], w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_vmap_is_the_per_sample_loop_and_leaves_nothing_on_the_layer(model):
    layer = build(model, solve=SETTINGS, backward=SETTINGS).eval()
    inputs = model.inputs(torch.Generator().manual_seed(1), BATCH)
    mapped = _batched(inputs)
    if not mapped:
        pytest.skip("no dense input carries the batch (a sparse graph and its node features)")

    def one(*rows):
        return _call(layer, [rows[mapped.index(k)].unsqueeze(0) if k in mapped else x
                             for k, x in enumerate(inputs)]).squeeze(0)

    got = vmap(one)(*(inputs[k] for k in mapped))
    want = torch.cat([_call(layer, [x[j:j + 1] if k in mapped else x for k, x in enumerate(inputs)])
                      for j in range(BATCH)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    vmap(one)(*(inputs[k] for k in mapped))  # the last call is under vmap
    kept = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in kept)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_call(again, inputs), _call(layer, inputs), rtol=1e-12, atol=1e-14)
