"""Variational dropout, ``dropout(x, p=0.1, spatial=false)``: one mask per forward solve, held fixed over every
forward and backward iteration of that solve; the identity in eval mode. This is the idea of the variational
("weight-tied") dropout of DEQ-Transformer and MDEQ (locuslab/deq ``VariationalHidDropout``, locuslab/mdeq
``lib/modules/optimizations.py`` ``VariationalHidDropout2d``): a mask reset once per solve, not per iteration. By
default the mask is drawn per element. With ``spatial=true`` it is drawn per (sample, channel), of shape
``[B, C, 1, ...]`` broadcast over the remaining dims, so every pixel of a channel shares one value: MDEQ's
``VariationalHidDropout2d(spatial=True)`` (``m = zeros_like(x[:, :, :1, :1]).bernoulli_(1 - p)``). The masks
are not torch's ``bernoulli_`` draws: they are hashed from per-sample seeds (below), with the same keep rate.

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
    if attrs.get("spatial", False) and len(x) < 2:
        raise ctx.fail(f"dropout with spatial=true draws one mask value per (sample, channel), so its argument "
                       f"needs a channel dimension 1, found {fmt_shape(x)}", attr="spatial",
                       hint="spatial dropout is for values [B, C, ...] (channels in dimension 1)")
    return tuple(x)
