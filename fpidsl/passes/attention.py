"""``param attn : MultiheadAttention(dim, heads, bias=true)`` and its calls ``attn(q, k, v)``, ``attn(q, k, v,
mask=m)``, lowered to existing primitives (``index``, ``reshape`` of the weights, ``einsum``, ``softmax``,
``add``, ``mul``), so that no VJP rule of its own is needed and derivatives of every order come from theirs.

The params are named like ``torch.nn.MultiheadAttention``'s (the module the compiled layer holds, with
``batch_first=True``): ``attn.in_proj_weight [3 dim, dim]``, ``attn.in_proj_bias [3 dim]``,
``attn.out_proj.weight [dim, dim]``, ``attn.out_proj.bias [dim]``; so a ``state_dict`` of an
``nn.MultiheadAttention(dim, heads, batch_first=True)`` loads as it is. With ``d = dim / heads``, q ``[B, T, dim]``
and k, v ``[B, S, dim]``:

    Q = einsum("bte,hde->bhtd", q, W_q as [heads, d, dim]) + b_q as [heads, 1, d]      (K, V alike)
    A = softmax(einsum("bhtd,bhsd->bhts", Q, K) / sqrt(d) + mask, dim=-1)
    out = einsum("bhtd,ehd->bte", einsum("bhts,bhsd->bhtd", A, V), W_o as [dim, heads, d]) + b_o

``mask`` is added to the scores, as torch's float ``attn_mask`` is: ``[T, S]`` (or anything that broadcasts to
``[B, heads, T, S]``), 0 where attention is allowed and a large negative number where it is not; a causal mask is
``-1e9 * triu(ones([T, T]), diagonal=1)``. A bool input ``m`` (``input m : bool [T, S]``) is torch's bool
``attn_mask``: true where attention is not allowed (lowered to ``where(m, -1e9, 0)``).
"""
from __future__ import annotations

import math

from ..ir import linalg
from ..ir.graph import ModuleSpec

KIND = "MultiheadAttention"
MASKED = -1e9  # the score a bool mask gives where it is true (masked out), as torch's bool attn_mask does
ROLES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def param_shapes(spec: ModuleSpec) -> dict[str, tuple[int, ...]]:
    """The params of an attention module, named as in ``torch.nn.MultiheadAttention`` (no biases without bias)."""
    e = spec.in_size
    shapes = {"in_proj_weight": (3 * e, e), "in_proj_bias": (3 * e,), "out_proj.weight": (e, e), "out_proj.bias": (e,)}
    return {role: s for role, s in shapes.items() if spec.bias or "bias" not in role}


def lower(call, spec: ModuleSpec, params: dict[str, str], q, k, v, mask, span):
    """The output node of ``attn(q, k, v[, mask])``; ``call(prim, args, attrs)`` adds a node (args: node ids),
    ``params`` maps each role to its param node."""
    e, h = spec.in_size, spec.groups
    d = e // h

    def einsum(equation, *operands):
        return call("einsum", list(operands), {"equation": str(linalg.parse(equation))})

    def rows(node, i, n):  # rows i*n .. (i+1)*n of a weight or bias
        from ..ir.primitives import SliceSpec

        return call("index", [node], {"index": (SliceSpec(i * n, (i + 1) * n),)})

    heads = []
    for i, x in enumerate((q, k, v)):
        w = call("reshape", [rows(params["in_proj_weight"], i, e)], {"shape": (h, d, e)})
        y = einsum("bte,hde->bhtd", x, w)
        if spec.bias:
            y = call("add", [y, call("reshape", [rows(params["in_proj_bias"], i, e)], {"shape": (h, 1, d)})], {})
        heads.append(y)
    scores = call("mul", [einsum("bhtd,bhsd->bhts", heads[0], heads[1]), _const(call, 1 / math.sqrt(d))], {})
    if mask is not None:
        scores = call("add", [scores, mask], {})
    weights = call("softmax", [scores], {"dim": -1})
    context = einsum("bhts,bhsd->bhtd", weights, heads[2])
    out = einsum("bhtd,ehd->bte", context, call("reshape", [params["out_proj.weight"]], {"shape": (e, h, d)}))
    if spec.bias:
        out = call("add", [out, params["out_proj.bias"]], {})
    return out


def _const(call, value: float):
    return call("const", [], {"value": value})
