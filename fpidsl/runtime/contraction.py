"""An estimate of the contraction factor of a map at its fixed point: the spectral norm of ∂f/∂x at x̂, per
sample (or of the whole state, for a map that mixes samples), by power iteration on JᵀJ with one Jacobian-vector
and one vector-Jacobian product a step (no Jacobian is formed). Below 1: the forward and backward iterations
converge locally, at that rate."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _per_sample_norm(parts: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum(p.flatten(1).square().sum(1) for p in parts))


def _whole_norm(parts: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(sum(p.square().sum() for p in parts)).reshape(1)


def contraction_factor(f: Callable, x_hat: Tensor | tuple[Tensor, ...], *args, iters: int = 30,
                       seed: int = 0, per_sample: bool = True) -> Tensor:
    """‖∂f/∂x(x̂)‖₂ per sample (dimension 0 of the states), estimated by ``iters`` power-iteration steps.

    With ``per_sample`` (the default), ``f(x, *args)`` must treat samples independently, so the batched products
    are the per-sample ones; a map that mixes samples (a graph's nodes as the batch, a batch norm) has one
    Jacobian over the whole state: ``per_sample=False`` gives its norm, a tensor of one element. The estimate
    approaches the norm from below."""
    single = isinstance(x_hat, Tensor)
    xs = (x_hat,) if single else tuple(x_hat)
    xs = tuple(x.detach() for x in xs)
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) for x in xs)
    norm_of = _per_sample_norm if per_sample else _whole_norm
    sigma = torch.zeros(xs[0].shape[0] if per_sample else 1, dtype=xs[0].dtype, device=xs[0].device)
    with torch.enable_grad():
        x_in = tuple(x.clone().requires_grad_() for x in xs)
        out = f(x_in[0] if single else x_in, *args)
        out = (out,) if single else tuple(out)
        # J v by the double-VJP trick: u -> Jᵀu is linear in u, and d/du <Jᵀu, v> = J v.
        u = tuple(torch.zeros_like(o, requires_grad=True) for o in out)
        jt_u = torch.autograd.grad(out, x_in, u, create_graph=True)
        for _ in range(iters):
            norm = norm_of(v).clamp_min(torch.finfo(xs[0].dtype).tiny)
            v = tuple(p / norm.view(-1, *([1] * (p.dim() - 1))) for p in v)
            jv = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            sigma = norm_of(jv)
            v = torch.autograd.grad(out, x_in, jv, retain_graph=True)
    return sigma.detach()
