"""Every primitive's VJP rule, built as a graph and run by the interpreter, against torch.autograd of the
ops function (first order for all, second order for representative ones); ops against the table."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest
import torch

from fpidsl.ir.derivatives import ZERO_DERIVATIVE
from fpidsl.ir.primitives import AUXILIARY
from fpidsl.ir.primitives import PRIMITIVES, REQUIRED, SliceSpec
from fpidsl.runtime import ops

from .helpers import PrimGraph, assert_same_grad, call_op, grads_or_none, rand

S = SliceSpec


@dataclass(frozen=True)
class Case:
    prim: str
    shapes: tuple
    attrs: dict = field(default_factory=dict)
    domains: tuple = ()  # per input: "any" (default), "positive", "nonzero", "ties" (values in {-1, 0, 1}),
    #                      "zeros" (about a third of the entries 0), "zero_row" (its first row 0)
    tie: bool = False    # make the second input equal the first in about half of the entries

    def __str__(self) -> str:
        attrs = ",".join(f"{k}={v}" for k, v in self.attrs.items())
        return f"{self.prim}{list(map(list, self.shapes))}{attrs}{'-tie' if self.tie else ''}"


def _c(prim, *shapes, domains=(), tie=False, **attrs):
    return Case(prim, tuple(tuple(s) for s in shapes), attrs, tuple(domains), tie)


CONV = {"stride": (2, 2), "padding": (1, 1)}
NORM_CASES = [
    _c("group_norm", [2, 4, 3, 2], [4], [4], groups=2, channels=4, eps=1e-5),
    _c("group_norm", [3, 6], [6], [6], groups=3, channels=6, eps=1e-3),
    _c("group_norm", [2, 4, 3], groups=4, channels=4, eps=1e-5), _c("group_norm", [2, 4, 5], groups=1, channels=4),
    _c("group_norm", [2, 4, 3, 2], [4], groups=2),  # the function form: channels none (x's own), a weight only
    _c("layer_norm", [3, 5], [5], [5], shape=(5,), eps=1e-5), _c("layer_norm", [2, 3, 4], [3, 4], [3, 4], shape=(3, 4)),
    _c("layer_norm", [2, 3, 4], shape=(4,), eps=1e-4), _c("layer_norm", [3, 4], shape=(3, 4)),
    _c("group_mean", [2, 4, 3], groups=2), _c("group_mean", [3, 6], groups=6),
]
CONSTRUCTOR_CASES = [  # the one input gives the dtype only: no derivative
    _c("eye", [2, 3], n=3), _c("zeros", [2, 3], shape=(4, 1)), _c("ones", [3], shape=(2,)),
    _c("full", [2, 3], shape=(2, 2), value=-0.5), _c("arange", [2, 3], n=4),
]
# issue 13: linear algebra ("invertible": a well-conditioned square matrix), a tensor exponent, sparse products
# ("sparse": a sparse COO matrix, about half zeros, which gets no gradient by design)
LINALG_CASES = [
    _c("power", [2, 3], [2, 3], domains=("positive",)), _c("power", [2, 3], [3], domains=("positive",)),
    _c("power", [3, 1], [1, 4], domains=("positive",)),
    _c("solve", [3, 3], [3], domains=("invertible",)), _c("solve", [3, 3], [3, 2], domains=("invertible",)),
    _c("solve", [2, 3, 3], [2, 3], domains=("invertible",)), _c("solve", [1, 3, 3], [2, 3], domains=("invertible",)),
    _c("solve", [3, 3], [2, 3, 2], domains=("invertible",)),
    _c("einsum", [2, 3], [3, 4], equation="bi,ij->bj"), _c("einsum", [2, 3, 4], [2, 5, 4], equation="btd,bsd->bts"),
    _c("einsum", [2, 3], equation="bi->b"), _c("einsum", [2, 3], [4], equation="bi,j->bij"),
    _c("einsum", [2, 1, 3, 4], [5, 4, 6], equation="...ij,...jk->...ik"), _c("einsum", [3, 4], [4], [5], equation="ij,j,k->ik"),
    _c("einsum", [2, 3], [2, 3], equation="bi,bi->"), _c("einsum", [3, 4], equation="ij->ji"),
    _c("einsum", [2, 3], [5, 3], equation="...i,ji->...j"), _c("einsum", [3], [], equation="i,->i"),
    _c("einsum", [2, 1, 4], [3, 5], equation="...ij,kl->...kj"), _c("einsum", [4], [2, 3, 4], equation="j,...ij->...i"),
    _c("spmm", [4, 4], [4, 3], domains=("sparse",)), _c("spmm", [4, 5], [4, 2], domains=("sparse",), transpose=True),
]
# issue 13: indexing and resampling ("indexN": int64 indices in [0, N), which get no gradient; "grid": sampling
# places in [-1.1, 1.1], some outside the image)
INDEXING_CASES = [
    _c("gather", [3, 4], [3, 2], domains=("any", "index4"), dim=1),
    _c("gather", [4, 3], [2, 3], domains=("any", "index4"), dim=0),
    _c("gather", [2, 5, 3], [2, 4, 3], domains=("any", "index5"), dim=-2),
    _c("index_select", [3, 4], [5], domains=("any", "index4"), dim=1),
    _c("index_select", [4, 2, 3], [3], domains=("any", "index4"), dim=0),
    _c("embedding", [2, 3], [6, 4], domains=("index6",)), _c("embedding", [5], [3, 2], domains=("index3",)),
    _c("pad", [2, 3, 4], pad=(1, 2)), _c("pad", [2, 3, 4, 5], pad=(1, 0, 2, 1), value=0.5),
    _c("pad", [3, 4], pad=(0, 0, 1, 1)),
    _c("avg_pool2d", [2, 3, 6, 5], kernel=(2, 2)),
    _c("avg_pool2d", [1, 2, 7, 7], kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    _c("avg_pool2d", [2, 2, 5, 6], kernel=(2, 3), stride=(1, 2)),
    _c("max_pool2d", [2, 3, 6, 5], kernel=(2, 2)),
    _c("max_pool2d", [1, 2, 7, 7], kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    _c("max_pool2d", [2, 2, 5, 6], kernel=(2, 3), stride=(1, 2)),
    _c("interpolate", [2, 3, 3, 4], scale_factor=2), _c("interpolate", [2, 3, 3, 4], scale_factor=3, mode="bilinear"),
    _c("interpolate", [1, 2, 4, 3], size=(5, 7), mode="bilinear", align_corners=True),
    _c("interpolate", [1, 2, 4, 3], size=(6, 5)),
    _c("grid_sample", [2, 3, 4, 5], [2, 3, 3, 2], domains=("any", "grid")),
    _c("grid_sample", [1, 2, 4, 4], [1, 2, 5, 2], domains=("any", "grid"), padding_mode="border", align_corners=True),
    _c("grid_sample", [1, 2, 4, 4], [1, 3, 2, 2], domains=("any", "grid"), padding_mode="reflection"),
    _c("grid_sample", [1, 2, 4, 4], [1, 3, 2, 2], domains=("any", "grid"), mode="nearest"),
    # their auxiliary primitives
    _c("gather_backward", [3, 2], [3, 2], [3, 4], domains=("any", "index4"), dim=1),
    _c("index_select_backward", [3, 5], [5], [3, 4], domains=("any", "index4"), dim=1),
    _c("embedding_backward", [2, 3, 4], [2, 3], [6, 4], domains=("any", "index6")),
    _c("avg_pool2d_backward", [2, 3, 3, 2], [2, 3, 6, 5], kernel=(2, 2)),
    _c("avg_pool2d_backward", [1, 2, 4, 4], [1, 2, 7, 7], kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    _c("max_pool2d_backward", [2, 3, 3, 2], [2, 3, 6, 5], kernel=(2, 2)),
    _c("max_pool2d_select", [2, 3, 6, 5], [2, 3, 6, 5], kernel=(2, 2)),
    _c("max_pool2d_select", [1, 2, 7, 7], [1, 2, 7, 7], kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    _c("interpolate_like", [2, 3, 3, 4], [2, 3, 6, 8]),
    _c("interpolate_like", [2, 3, 3, 4], [1, 1, 5, 7], mode="bilinear"),
    _c("interpolate_backward", [2, 3, 6, 8], [2, 3, 3, 4]),
    _c("interpolate_backward", [1, 2, 5, 7], [1, 2, 4, 3], mode="bilinear", align_corners=True),
    _c("grid_sample_vjp", [2, 3, 3, 3], [2, 3, 4, 5], [2, 3, 3, 2], domains=("any", "any", "grid"), path=(0,)),
    _c("grid_sample_vjp", [2, 3, 3, 3], [2, 3, 4, 5], [2, 3, 3, 2], domains=("any", "any", "grid"), path=(1,)),
    _c("grid_sample_vjp", [1, 3, 3, 2], [1, 2, 3, 3], [1, 2, 4, 4], [1, 3, 3, 2], domains=("any", "any", "any", "grid"),
       path=(1, 2)),
]
CASES = [
    _c("add", [3, 4], [3, 4]), _c("add", [2, 3, 4], [4]), _c("add", [3, 1], [1, 4]), _c("add", [3, 4], []),
    _c("sub", [2, 3], [3]), _c("sub", [1, 3], [2, 1]),
    _c("mul", [2, 3], [2, 3]), _c("mul", [2, 1, 4], [3, 1]), _c("mul", [3], []),
    _c("div", [2, 3], [3], domains=("any", "nonzero")), _c("div", [2, 1], [2, 3], domains=("any", "nonzero")),
    _c("matmul", [4], [4]), _c("matmul", [3, 4], [4]), _c("matmul", [4], [2, 4, 3]),
    _c("matmul", [2, 3, 4], [4, 5]), _c("matmul", [2, 1, 3, 4], [5, 4, 2]), _c("matmul", [3, 4], [4, 2]),
    _c("pow", [2, 3], exponent=2), _c("pow", [2, 3], exponent=3), _c("pow", [2, 3], exponent=0),
    _c("pow", [2, 3], exponent=1), _c("pow", [2, 3], exponent=0.5, domains=("positive",)),
    _c("pow", [2, 3], exponent=-1.5, domains=("positive",)),
    _c("neg", [2, 3]), _c("relu", [3, 4]), _c("leaky_relu", [3, 4], slope=0.2), _c("tanh", [3, 4]),
    _c("sigmoid", [3, 4]), _c("softplus", [3, 4], beta=1.0), _c("softplus", [3, 4], beta=2.5),
    _c("elu", [3, 4], alpha=0.7), _c("exp", [3, 4]), _c("log", [3, 4], domains=("positive",)),
    _c("sqrt", [3, 4], domains=("positive",)), _c("square", [3, 4]), _c("abs", [3, 4]), _c("sin", [3, 4]),
    _c("cos", [3, 4]), _c("clamp", [4, 5], lo=-0.5, hi=0.3),
    _c("minimum", [3, 4], [3, 4]), _c("minimum", [2, 3], [3]), _c("minimum", [3, 4], [3, 4], tie=True),
    _c("maximum", [3, 4], [3, 4]), _c("maximum", [2, 1], [1, 3]), _c("maximum", [3, 4], [3, 4], tie=True),
    _c("sum", [2, 3, 4], dim=None), _c("sum", [2, 3, 4], dim=1), _c("sum", [2, 3, 4], dim=(0, 2), keepdim=True),
    _c("sum", [2, 3, 4], dim=-1, keepdim=False), _c("sum", [2, 3], dim=None, keepdim=True),
    _c("mean", [2, 3, 4], dim=None), _c("mean", [2, 3, 4], dim=(0, -1)), _c("mean", [2, 3, 4], dim=1, keepdim=True),
    _c("softmax", [3, 5], dim=1), _c("softmax", [2, 3, 4], dim=-1), _c("softmax", [2, 3, 4], dim=0),
    _c("logsumexp", [3, 5], dim=1), _c("logsumexp", [2, 3, 4], dim=(0, 2), keepdim=True),
    _c("cat", [2, 3], [2, 4], dim=1), _c("cat", [1, 3], [2, 3], [3, 3], dim=0), _c("cat", [2, 2, 1], [2, 2, 3], dim=-1),
    _c("reshape", [2, 6], shape=(3, 4)), _c("reshape", [2, 3, 4], shape=(6, -1)), _c("reshape", [2, 3], shape=(-1,)),
    _c("transpose", [2, 3, 4], dim0=0, dim1=2), _c("transpose", [3, 4], dim0=-1, dim1=0),
    _c("flatten", [2, 3, 4], start=1, end=-1), _c("flatten", [2, 3, 4], start=0, end=1),
    _c("index", [3, 4], index=(1,)), _c("index", [3, 4], index=(S(), S(1, 3))),
    _c("index", [2, 3, 4], index=(Ellipsis, 0)), _c("index", [5, 4], index=(S(0, None, 2), -1)),
    _c("index", [5, 4], index=(S(1, -1),)),
    _c("linear", [5, 3], [4, 3], [4]), _c("linear", [3], [4, 3], [4]), _c("linear", [2, 5, 3], [4, 3]),
    _c("conv2d", [2, 3, 7, 6], [4, 3, 3, 3], [4], **CONV),
    _c("conv2d", [2, 3, 5, 5], [4, 3, 2, 3], stride=(1, 1), padding=(0, 0)),
    _c("conv2d", [1, 2, 6, 7], [3, 2, 3, 3], [3], stride=(2, 1), padding=(0, 1)),
    _c("conv_transpose2d", [2, 3, 4, 5], [3, 2, 3, 3], [2], stride=(2, 2), padding=(1, 1), output_padding=(1, 0)),
    _c("conv_transpose2d", [2, 3, 4, 4], [3, 2, 4, 4], stride=(2, 2), padding=(1, 1), output_padding=(0, 0)),
    _c("conv_transpose2d", [1, 2, 3, 3], [2, 3, 2, 2], [3], stride=(1, 1), padding=(0, 0), output_padding=(0, 0)),
    # auxiliary primitives
    _c("relu_mask", [3, 4]), _c("leaky_relu_mask", [3, 4], slope=0.1), _c("sign", [3, 4]),
    _c("clamp_mask", [3, 4], lo=-0.2, hi=0.4), _c("greater_mask", [2, 3], [3]),
    _c("greater_mask", [3, 4], [3, 4], tie=True), _c("ones_like", [2, 3]), _c("zeros_like", [2, 3]),
    _c("count", [2, 3, 4], dim=(0, 2)), _c("count", [2, 3], dim=None),
    _c("elu_grad", [3, 4], alpha=0.7),
    _c("unsqueeze", [2, 3], dim=(0, 2)), _c("unsqueeze", [2, 3], dim=2),
    _c("expand_as", [3, 1], [2, 3, 4]), _c("expand_as", [], [2, 3]),
    _c("reshape_as", [2, 6], [3, 4]),
    _c("index_backward", [3], [4, 3], index=(1,)),
    _c("index_backward", [3, 2], [5, 4], index=(S(0, None, 2), S(1, 3))),
    _c("cat_part", [2, 7], [2, 3], [2, 4], dim=1, item=1),
    _c("cat_part", [6, 2], [1, 2], [2, 2], [3, 2], dim=0, item=1),
    _c("linear_weight_grad", [5, 4], [5, 3]), _c("linear_weight_grad", [2, 5, 4], [2, 5, 3]),
    _c("linear_weight_grad", [4], [3]),
    _c("conv2d_input_grad", [2, 4, 4, 3], [4, 3, 3, 3], [2, 3, 7, 6], **CONV),
    _c("conv2d_input_grad", [2, 4, 3, 3], [4, 3, 3, 3], [2, 3, 5, 5], stride=(1, 1), padding=(0, 0)),
    _c("conv2d_weight_grad", [2, 4, 4, 3], [2, 3, 7, 6], kernel=(3, 3), **CONV),
    _c("conv2d_weight_grad", [1, 3, 4, 3], [1, 2, 6, 5], kernel=(3, 3), stride=(1, 1), padding=(0, 0)),
    # issue 13: element-wise
    _c("gelu", [3, 4]), _c("gelu", [3, 4], approximate="tanh"), _c("silu", [3, 4]), _c("erf", [3, 4]),
    _c("reciprocal", [3, 4], domains=("nonzero",)),
    _c("where", [3, 4], [3, 4], [3, 4], domains=("zeros",)), _c("where", [3, 1], [4], [3, 4], domains=("zeros",)),
    _c("where", [4], [3, 4], [], domains=("zeros",)),
    # issue 13: comparisons (0/1 masks, no derivative), with ties so that == and <= see equal entries
    _c("less", [2, 3], [3]), _c("less_equal", [3, 4], [3, 4], tie=True), _c("greater", [3, 1], [1, 4]),
    _c("greater_equal", [3, 4], [], tie=True), _c("equal", [3, 4], [3, 4], tie=True),
    _c("not_equal", [2, 3], [2, 3], tie=True),
    # issue 13: reductions
    _c("max", [2, 3, 4], dim=1), _c("max", [2, 3, 4], dim=(0, 2), keepdim=True),
    _c("max", [3, 5], dim=-1, domains=("ties",)), _c("max", [3, 5], dim=(0, 1), domains=("ties",)),
    _c("min", [2, 3, 4], dim=-1, keepdim=True), _c("min", [4, 5], dim=0, domains=("ties",)),
    _c("norm", [3, 4], dim=1), _c("norm", [2, 3, 4], dim=None), _c("norm", [3, 4], dim=0, p=1),
    _c("norm", [2, 3, 4], dim=(1, 2), p=3, keepdim=True), _c("norm", [3, 4], dim=1, p=2.5),
    _c("norm", [3, 4], dim=1, domains=("zero_row",)),
    _c("prod", [2, 3, 4], dim=1), _c("prod", [3, 4], dim=-1, keepdim=True), _c("prod", [3, 1], dim=1),
    _c("prod", [4, 5], dim=1, domains=("zeros",)), _c("prod", [3, 2], dim=1),
    _c("var", [2, 3, 4], dim=1), _c("var", [2, 3, 4], dim=(0, 2), keepdim=True, correction=0),
    # issue 13: shapes
    _c("permute", [2, 3, 4], dims=(2, 0, 1)), _c("permute", [2, 3, 4], dims=(-1, 0, 1)),
    _c("unsqueeze", [2, 3], dim=-1), _c("unsqueeze", [2, 3], dim=(-1, 0)),
    _c("triu", [3, 4], diagonal=1), _c("triu", [2, 4, 3]), _c("tril", [2, 3, 4], diagonal=-1), _c("tril", [4, 4]),
    # issue 13: auxiliary
    _c("equal_mask", [2, 3], [3]), _c("equal_mask", [3, 4], [3, 4], tie=True),
    _c("safe_div", [2, 3], [3], domains=("any", "nonzero")), _c("safe_div", [3, 4], [3, 1], domains=("any", "zeros")),
    _c("select", [3, 4], [3, 4]), _c("select", [2, 3], [3]), _c("select", [3, 1], [3, 4]),
    # issue 13: dropout (x times its mask; the seeds, integers in practice, have no derivative)
    _c("dropout", [3, 4], [3], p=0.3, key=1), _c("dropout", [2, 3, 2], [2], p=0.5, key=0),
    # issue 13: normalisation modules, constructors
    *NORM_CASES, *CONSTRUCTOR_CASES, *LINALG_CASES, *INDEXING_CASES,
]

SECOND_ORDER = [
    _c("linear", [5, 3], [4, 3], [4]), _c("linear", [2, 5, 3], [4, 3]),
    _c("conv2d", [2, 3, 7, 6], [4, 3, 3, 3], [4], **CONV),
    _c("conv_transpose2d", [2, 3, 4, 5], [3, 2, 3, 3], [2], stride=(2, 2), padding=(1, 1), output_padding=(1, 0)),
    _c("relu", [3, 4]), _c("sigmoid", [3, 4]), _c("tanh", [3, 4]), _c("elu", [3, 4], alpha=0.7),
    _c("softmax", [3, 5], dim=1), _c("logsumexp", [2, 3, 4], dim=(0, 2), keepdim=False),
    _c("sum", [2, 3, 4], dim=1), _c("mean", [2, 3, 4], dim=(0, 2), keepdim=True),
    _c("cat", [2, 3], [2, 4], dim=1), _c("index", [5, 4], index=(S(0, None, 2), -1)),
    _c("pow", [2, 3], exponent=3), _c("pow", [2, 3], exponent=-1.5, domains=("positive",)),
    _c("matmul", [2, 3, 4], [4, 5]), _c("div", [2, 3], [3], domains=("any", "nonzero")),
    _c("maximum", [2, 3], [3]), _c("softplus", [3, 4], beta=2.5),
    _c("gelu", [3, 4]), _c("gelu", [3, 4], approximate="tanh"), _c("silu", [3, 4]), _c("erf", [3, 4]),
    _c("reciprocal", [3, 4], domains=("nonzero",)), _c("where", [3, 1], [4], [3, 4], domains=("zeros",)),
    _c("max", [2, 3, 4], dim=(0, 2), keepdim=True), _c("max", [3, 5], dim=-1, domains=("ties",)),
    _c("min", [4, 5], dim=0, domains=("ties",)), _c("norm", [3, 4], dim=1),
    _c("norm", [2, 3, 4], dim=(1, 2), p=3, keepdim=True), _c("norm", [3, 4], dim=1, p=2.5),
    _c("prod", [2, 3, 4], dim=1), _c("prod", [4, 5], dim=1, domains=("zeros",)), _c("prod", [3, 2], dim=1),
    _c("var", [2, 3, 4], dim=(0, 2), keepdim=True, correction=0), _c("var", [3, 5], dim=1),
    _c("permute", [2, 3, 4], dims=(2, 0, 1)), _c("unsqueeze", [2, 3], dim=(-1, 0)),
    _c("triu", [2, 4, 3], diagonal=1), _c("tril", [2, 3, 4], diagonal=-1),
    _c("safe_div", [3, 4], [3, 1], domains=("any", "zeros")), _c("select", [2, 3], [3]),
    *NORM_CASES,
    _c("power", [2, 3], [3], domains=("positive",)), _c("solve", [3, 3], [3, 2], domains=("invertible",)),
    _c("solve", [1, 3, 3], [2, 3], domains=("invertible",)), _c("einsum", [2, 3, 4], [2, 5, 4], equation="btd,bsd->bts"),
    _c("einsum", [2, 1, 3, 4], [5, 4, 6], equation="...ij,...jk->...ik"), _c("einsum", [2, 3], [4], equation="bi,j->bij"),
    _c("einsum", [2, 3], equation="bi->b"), _c("spmm", [4, 5], [4, 2], domains=("sparse",), transpose=True),
    # issue 13, indexing: the VJP of each linear one is its adjoint partner (gather <-> gather_backward ...);
    # the piecewise-linear ones (pad, the pools, nearest resampling) have zero second derivatives in x, checked
    # here as such; grid_sample's come from torch.autograd (grid_sample_vjp)
    *(case for case in INDEXING_CASES if case.prim in (
        "gather", "index_select", "embedding", "pad", "avg_pool2d", "max_pool2d", "interpolate", "grid_sample",
        "avg_pool2d_backward", "max_pool2d_backward", "max_pool2d_select", "interpolate_backward", "gather_backward",
        "embedding_backward")),
    _c("grid_sample_vjp", [2, 3, 3, 3], [2, 3, 4, 5], [2, 3, 3, 2], domains=("any", "any", "grid"), path=(1,)),
]


def _special(x: torch.Tensor, domain: str, gen: torch.Generator) -> torch.Tensor:
    """The domains that only these tests need (ties for max/min, zeros for prod, where and safe_div, a zero row
    for norm)."""
    if domain == "ties":
        return torch.randint(-1, 2, x.shape, generator=gen).to(x.dtype)
    if domain == "zeros":
        return torch.where(torch.rand(x.shape, generator=gen) < 1 / 3, torch.zeros_like(x), x)
    if domain == "zero_row":
        return torch.cat([torch.zeros_like(x[:1]), x[1:]])
    if domain == "invertible":
        return 0.3 * x + 2 * torch.eye(x.shape[-1], dtype=x.dtype)
    if domain.startswith("index"):
        return torch.randint(0, int(domain[5:]), x.shape, generator=gen)
    if domain == "grid":
        return 1.1 * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1)
    if domain == "sparse":
        return torch.where(torch.rand(x.shape, generator=gen) < 0.5, torch.zeros_like(x), x).to_sparse()
    return x


def _no_sparse_grads(want: list, inputs: list) -> list:
    """A sparse input (spmm's A) gets no gradient by design: autograd's is not compared."""
    return [None if x.layout != torch.strided else w for x, w in zip(inputs, want)]


def _grads(out, inputs: list, cts) -> list:
    """:func:`grads_or_none` over the float inputs; None for an index (an int tensor, never differentiated)."""
    floats = iter(grads_or_none(out, [x for x in inputs if x.is_floating_point()], cts))
    return [next(floats) if x.is_floating_point() else None for x in inputs]


def _leaves(xs: list) -> list:
    return [x.requires_grad_() if x.is_floating_point() else x for x in xs]


def _inputs(case: Case, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    domains = case.domains + ("any",) * (len(case.shapes) - len(case.domains))
    xs = [_special(rand(s, gen, d), d, gen) for s, d in zip(case.shapes, domains)]
    if case.tie:
        xs[1] = torch.where(torch.rand(xs[1].shape, generator=gen) < 0.5, xs[0], xs[1])
    return xs


def _first_order(case: Case):
    """The graph of ``prim(a0, a1, ...)`` and of its VJP with cotangent ``u``."""
    pg = PrimGraph(case.shapes)
    out = pg.call(case.prim, pg.leaves, case.attrs)
    grads = pg.vjp({out: "u"}, pg.leaves)
    return pg, out, [grads[leaf] for leaf in pg.leaves]


def test_every_primitive_has_a_rule_and_a_case():
    assert all(p.vjp is not None for p in PRIMITIVES.values())
    # extern and extern_vjp take a module handle, not a tensor: test_extern_vjp_rule_matches_autograd
    assert {c.prim for c in CASES} == set(PRIMITIVES) - {"grad", "extern", "extern_vjp"}


class _TwoInputs(torch.nn.Module):
    """A module of two inputs for the extern cases: tanh(W [x, z] + b) * z[:, :1]."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3).double()

    def forward(self, x, z):
        return torch.tanh(self.lin(torch.cat([x, z], -1))) * z[:, :1]


@pytest.mark.parametrize("order", [1, 2])
def test_extern_vjp_rule_matches_autograd(order):
    """extern's VJP rule (extern_vjp nodes, and theirs at second order) run by the interpreter against autograd of
    the module, in its flat parameters and both inputs."""
    from fpidsl.runtime.extern import ExternHandle, extern_parameters

    torch.manual_seed(0)
    module = _TwoInputs()
    handle = ExternHandle(module, "f", "t.fpi:1:1", {})
    flat = extern_parameters(module).detach()
    attrs = {"name": "f", "inputs": ((3, 4), (3, 2)), "output": (3, 3), "samplewise": False}
    pg = PrimGraph([(), tuple(flat.shape), (3, 4), (3, 2)])
    out = pg.call("extern", pg.leaves, attrs)
    first = pg.vjp({out: "u"}, pg.leaves)
    assert first[pg.leaves[0]] is None  # the handle has no cotangent
    gen = torch.Generator().manual_seed(1)
    xs = [flat.clone().requires_grad_(), rand((3, 4), gen).requires_grad_(), rand((3, 2), gen).requires_grad_()]
    u = rand((3, 3), gen).requires_grad_()
    env = {"a0": handle, **{f"a{i + 1}": x.detach() for i, x in enumerate(xs)}, "u": u.detach()}
    auto_first = torch.autograd.grad(module_value := handle.apply(xs[0], xs[1:], attrs["inputs"], attrs["output"]),
                                     xs, u, create_graph=True)
    if order == 1:
        got = pg.run(env, [out] + [first[leaf] for leaf in pg.leaves[1:]])
        torch.testing.assert_close(got[out], module_value.detach(), rtol=0, atol=0)
        for leaf, w in zip(pg.leaves[1:], auto_first):
            assert_same_grad(got[first[leaf]], w, f"extern d/d{pg.graph.node(leaf)['name']}")
        return
    vs = [rand(tuple(x.shape), gen) for x in xs]
    u_leaf = pg.graph.inputs["u"]
    second = pg.vjp({first[leaf]: f"v{i}" for i, leaf in enumerate(pg.leaves[1:])}, pg.leaves[1:] + [u_leaf])
    env.update({f"v{i}": v for i, v in enumerate(vs)})
    got = pg.run(env, [g for g in second.values() if g is not None])
    want = grads_or_none(list(auto_first), xs + [u], vs)
    for leaf, w in zip(pg.leaves[1:] + [u_leaf], want):
        g = second[leaf]
        assert_same_grad(got[g] if g is not None else None, w, f"extern second order d/d{pg.graph.node(leaf)['name']}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vjp_matches_autograd(case):
    xs = _leaves(_inputs(case, 0))
    value = call_op(case.prim, xs, case.attrs)
    pg, out, grads = _first_order(case)
    assert pg.graph.shape(out) == (tuple(value.shape) if isinstance(value, torch.Tensor) else ())
    if case.prim in ZERO_DERIVATIVE:
        assert grads == [None] * len(xs)
    env = {f"a{i}": x.detach() for i, x in enumerate(xs)}
    if not isinstance(value, torch.Tensor):  # count: a number
        assert pg.run(env, [out])[out] == value
        return
    u = rand(value.shape, torch.Generator().manual_seed(1))
    got = pg.run({**env, "u": u}, grads + [out])
    # bit for bit against the op on the same (detached) inputs: torch's matmul takes another path, one ulp apart,
    # when its inputs require grad
    torch.testing.assert_close(got[out], call_op(case.prim, list(env.values()), case.attrs), rtol=0, atol=0)
    want = _no_sparse_grads(_grads(value, xs, u), xs)
    for i, (g, w) in enumerate(zip(grads, want)):
        assert_same_grad(got[g] if g is not None else None, w, f"{case} argument {i}")


@pytest.mark.parametrize("case", SECOND_ORDER, ids=str)
def test_vjp_of_vjp_matches_double_backward(case):
    xs = _leaves(_inputs(case, 2))
    pg, out, first = _first_order(case)
    u = rand(pg.graph.shape(out), torch.Generator().manual_seed(3)).requires_grad_()
    live = [i for i, g in enumerate(first) if g is not None]
    gen = torch.Generator().manual_seed(4)
    vs = {i: rand(case.shapes[i], gen) for i in live}
    u_leaf = pg.graph.inputs["u"]
    second = pg.vjp({first[i]: f"v{i}" for i in live}, pg.leaves + [u_leaf])
    env = {f"a{i}": x.detach() for i, x in enumerate(xs)}
    env.update({"u": u.detach(), **{f"v{i}": v for i, v in vs.items()}})
    got = pg.run(env, list(second.values()))

    value = call_op(case.prim, xs, case.attrs)
    floats = [x for x in xs if x.is_floating_point()]
    auto = iter(torch.autograd.grad(value, floats, u, create_graph=True, allow_unused=True))
    auto_first = [next(auto) if x.is_floating_point() else None for x in xs]
    want = _no_sparse_grads(_grads([auto_first[i] for i in live], xs + [u], [vs[i] for i in live]), xs + [u])
    for leaf, w in zip(pg.leaves + [u_leaf], want):
        g = second[leaf]
        assert_same_grad(got[g] if g is not None else None, w, f"{case} d/d{pg.graph.node(leaf)['name']}")


def test_ops_follow_the_table():
    """Each primitive's ops function: positional tensor inputs, keyword-only attributes with the table's
    names and defaults."""
    for name, prim in PRIMITIVES.items():
        fn = getattr(ops, name)
        params = inspect.signature(fn).parameters.values()
        kw = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        assert set(kw) == {a.name for a in prim.attrs}, name
        for attr in prim.attrs:
            if attr.default is not REQUIRED:
                assert kw[attr.name] == attr.default, (name, attr.name)


def test_auxiliary_primitives_are_not_builtins():
    assert all(not PRIMITIVES[p.name].builtin for p in AUXILIARY)


def test_index_accepts_python_slices_and_slice_specs():
    x = torch.arange(20.0).reshape(4, 5)
    a = ops.index(x, index=(S(1, None, 2), Ellipsis, -1))
    b = ops.index(x, index=(slice(1, None, 2), Ellipsis, -1))
    assert torch.equal(a, x[1::2, ..., -1]) and torch.equal(b, a)


def test_where_and_safe_div_take_numbers_where_generated_code_passes_them():
    """A const argument reaches the ops function as a Python number (``where(m, 1, 0)``, the 0 of a derived
    ``where(cond, ct, 0)``): the result keeps the tensors' dtype."""
    c = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64)
    assert torch.equal(ops.where(c, 1, 0), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(ops.where(c, c, 0), c)
    assert torch.equal(ops.where(0, c, -c), -c)
    assert torch.equal(ops.safe_div(c, torch.tensor(0.0, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(ops.safe_div(1.0, c), torch.tensor([-1 / 1.5, 0.0, 0.5], dtype=torch.float64))
