"""Variational dropout, ``dropout(x, p=0.1)``: one mask per forward solve, held fixed over every forward and
backward iteration of that solve (as in MDEQ and DEQ-Transformer); the identity in eval mode.

The mask is not a random draw inside g (g must be the same map at every iteration): it is a deterministic function
of a per-sample seed and the position of each element (:func:`fpidsl.runtime.ops.dropout_mask`, a counter-based
hash). The seeds are one leaf of the graph, the param ``dropout.seeds`` of shape ``[B]`` (B the states' batch
dimension), drawn by the layer once per call (``fpidsl.runtime.layer.dropout_seeds``, from torch's generator, so
``torch.manual_seed`` fixes them) and passed to the fixed point like every argument: the forward iterations, the
hoisted part, the backward map and the derivatives of every order all read the same seeds, hence the same mask.
Each ``dropout`` call of a layer has its own ``key``, so two calls draw independent masks. In eval mode the seeds
are None and ``dropout`` returns x. The seeds are the one param batched on axis 0 (``batching.batch_axes``; the
layer's ``BATCHED_PARAMS``): a samplewise layer slices them with the samples still running.
"""
from __future__ import annotations

from .shapes import fmt_dim, fmt_shape

DROPOUT = "dropout"
SEEDS = "dropout.seeds"  # the param of the per-sample seeds (a dot: never a user's name)


def dropout_shape(shapes, attrs, ctx):
    """The shape of ``x``, whose dimension 0 must be the samples the seeds are drawn for."""
    x, seeds = shapes
    p = attrs["p"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ctx.fail(f"p of dropout must be a number in [0, 1), found {p}", attr="p",
                       hint="the probability that an element is zeroed (the others are scaled by 1 / (1 - p))")
    if not x or x[0] != seeds[0]:
        raise ctx.fail(f"dropout draws one mask per sample, so its argument's dimension 0 must be the batch "
                       f"{fmt_dim(seeds[0])}, found {fmt_shape(x)}", arg=0,
                       hint="apply dropout to a value with one row per sample ([B, ...])")
    return tuple(x)
