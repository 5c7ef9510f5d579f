"""The primitive table: every primitive's shape rule on a table of cases, and its failures."""
from __future__ import annotations

import pytest

from fpidsl.ir.primitives import BUILTINS, MODULE_KINDS, PRIMITIVES, SliceSpec
from fpidsl.ir.shapes import ShapeCtx, ShapeRuleError, dim_add, dim_floordiv

H2 = dim_floordiv("H", 2, ShapeCtx())
UNARY = ["relu", "tanh", "sigmoid", "exp", "log", "sqrt", "square", "abs", "sin", "cos", "neg", "silu", "erf", "sign",
         "reciprocal"]

CASES = [
    *[(p, [("B", 10)], {}, ("B", 10)) for p in UNARY],
    ("leaky_relu", [("B", 3)], {"slope": 0.2}, ("B", 3)),
    ("softplus", [("B", 3)], {}, ("B", 3)),
    ("elu", [("B", 3)], {}, ("B", 3)),
    ("clamp", [("B", 3)], {"lo": -1, "hi": 1}, ("B", 3)),
    ("pow", [("B", 3)], {"exponent": 2}, ("B", 3)),
    ("add", [("B", 10), ()], {}, ("B", 10)),
    ("sub", [("B", 1), (10,)], {}, ("B", 10)),
    ("mul", [(), ()], {}, ()),
    ("div", [("B", 10), ("B", 1)], {}, ("B", 10)),
    ("minimum", [("B", 10), (10,)], {}, ("B", 10)),
    ("maximum", [(), ("B",)], {}, ("B",)),
    ("matmul", [("B", 10), (10, 5)], {}, ("B", 5)),
    ("matmul", [(10,), (10,)], {}, ()),
    ("matmul", [(10,), (10, 5)], {}, (5,)),
    ("matmul", [("B", 4, 10), (10,)], {}, ("B", 4)),
    ("matmul", [("B", 4, 10), (1, 10, 3)], {}, ("B", 4, 3)),
    ("sum", [("B", 10)], {"dim": -1}, ("B",)),
    ("sum", [("B", 10)], {}, ()),
    ("sum", [("B", 3, 4)], {"dim": (1, 2)}, ("B",)),
    ("mean", [("B", 3, 4)], {"dim": (-1, 1), "keepdim": True}, ("B", 1, 1)),
    ("mean", [("B", 10)], {"dim": None, "keepdim": True}, (1, 1)),
    ("logsumexp", [("B", 10)], {"dim": 1}, ("B",)),
    ("softmax", [("B", 10)], {"dim": -1}, ("B", 10)),
    ("cat", [("B", 1, "H"), ("B", 2, "H")], {"dim": 1}, ("B", 3, "H")),
    ("cat", [("B", "N"), ("B", "N")], {"dim": -1}, ("B", "N*2")),
    ("reshape", [("B", 12)], {"shape": ("B", 3, 4)}, ("B", 3, 4)),
    ("reshape", [("B", 12)], {"shape": ("B", -1, 2)}, ("B", 6, 2)),
    ("reshape", [("B", 4, "H", "W")], {"shape": ("B", -1)}, ("B", "4*H*W")),
    ("transpose", [("B", 3, 4)], {"dim0": 1, "dim1": -1}, ("B", 4, 3)),
    ("flatten", [("B", 2, 3, 4)], {"start": 1}, ("B", 24)),
    ("flatten", [("B", 2, 3, 4)], {"start": 0, "end": 1}, ("2*B", 3, 4)),
    ("flatten", [()], {}, (1,)),
    ("index", [("B", 10)], {"index": (SliceSpec(), 0)}, ("B",)),
    ("index", [("B", 10)], {"index": (Ellipsis, SliceSpec(0, 3))}, ("B", 3)),
    ("index", [("B", 10)], {"index": (Ellipsis, -1)}, ("B",)),
    ("index", [("B", 10)], {"index": (SliceSpec(None, -1),)}, ("B-1", 10)),
    ("index", [("B", 10)], {"index": (SliceSpec(), SliceSpec(1, None, 2))}, ("B", 5)),
    ("index", [("B", 10, 3)], {"index": (1,)}, (10, 3)),
    ("linear", [("B", 20), (32, 20), (32,)], {}, ("B", 32)),
    ("linear", [("B", "N", 20), (32, 20)], {}, ("B", "N", 32)),
    ("conv2d", [("B", 2, "H", "W"), (32, 2, 3, 3), (32,)], {"stride": (1, 1), "padding": (1, 1)},
     ("B", 32, "H", "W")),
    ("conv2d", [("B", 2, 28, 28), (8, 2, 5, 5)], {"stride": (1, 1), "padding": (0, 0)}, ("B", 8, 24, 24)),
    ("conv2d", [("B", 4, "H", "W"), (4, 4, 3, 3)], {"stride": (2, 2), "padding": (1, 1)}, ("B", 4, H2, "W/2")),
    ("conv_transpose2d", [("B", 4, H2, "W"), (4, 2, 4, 4), (2,)],
     {"stride": (2, 2), "padding": (1, 1), "output_padding": (0, 0)}, ("B", 2, "H", "2*W")),
    ("conv_transpose2d", [("B", 4, 7, 7), (4, 2, 3, 3)],
     {"stride": (2, 2), "padding": (1, 1), "output_padding": (1, 1)}, ("B", 2, 14, 14)),
    ("grad", [("B",), ("B", 10)], {}, ("B", 10)),
    ("grad", [(), ("B", 10)], {}, ("B", 10)),
    # issue 13
    ("gelu", [("B", 3)], {}, ("B", 3)),
    ("gelu", [("B", 3)], {"approximate": "tanh"}, ("B", 3)),
    ("where", [("B", 4), ("B", 4), ()], {}, ("B", 4)),
    ("where", [("B", 1), (4,), ("B", 4)], {}, ("B", 4)),
    ("max", [("B", 3, 4)], {"dim": 1}, ("B", 4)),
    ("max", [("B", 3, 4)], {"dim": (1, 2), "keepdim": True}, ("B", 1, 1)),
    ("min", [("B", 3, 4)], {"dim": -1}, ("B", 3)),
    ("norm", [("B", 3, 4)], {}, ()),
    ("norm", [("B", 3, 4)], {"dim": -1, "p": 1, "keepdim": True}, ("B", 3, 1)),
    ("prod", [("B", 3, 4)], {"dim": 1}, ("B", 4)),
    ("prod", [("B", 3)], {"dim": -1, "keepdim": True}, ("B", 1)),
    ("var", [("B", 3, 4)], {"dim": (1, 2)}, ("B",)),
    ("var", [("B", "N")], {"dim": 1, "correction": 0, "keepdim": True}, ("B", 1)),
    ("permute", [("B", 3, 4)], {"dims": (0, 2, 1)}, ("B", 4, 3)),
    ("permute", [("B", 3, "H")], {"dims": (-1, 0, -2)}, ("H", "B", 3)),
    ("permute", [("B",)], {"dims": 0}, ("B",)),
    ("unsqueeze", [("B", 3)], {"dim": 1}, ("B", 1, 3)),
    ("unsqueeze", [("B", 3)], {"dim": -1}, ("B", 3, 1)),
    ("unsqueeze", [("B", 3)], {"dim": (0, -1)}, (1, "B", 3, 1)),
    ("unsqueeze", [()], {"dim": 0}, (1,)),
    ("triu", [("B", 4, 4)], {}, ("B", 4, 4)),
    ("tril", [(3, 5)], {"diagonal": -1}, (3, 5)),
    ("group_norm", [("B", 4, "H", "W"), (4,), (4,)], {"groups": 2, "channels": 4}, ("B", 4, "H", "W")),
    ("group_norm", [("B", 6)], {"groups": 3, "channels": 6, "eps": 1e-3}, ("B", 6)),
    ("layer_norm", [("B", "T", 8), (8,), (8,)], {"shape": (8,)}, ("B", "T", 8)),
    ("layer_norm", [("B", 3, 4)], {"shape": (3, 4), "eps": 1e-4}, ("B", 3, 4)),
    ("group_norm", [("B", 4, "H"), (4,)], {"groups": 2}, ("B", 4, "H")),  # the function form: channels none
    ("eye", [("B", 4)], {"n": 3}, (3, 3)),
    ("zeros", [("B", 4)], {"shape": (2, 5)}, (2, 5)),
    ("ones", [("B", 4)], {"shape": (4,)}, (4,)),
    ("full", [("B", 4)], {"shape": (1, 4), "value": 0.5}, (1, 4)),
    # issue 13: linear algebra, a tensor exponent, arange, sparse products
    ("arange", [("B", 4)], {"n": 5}, (5,)),
    ("power", [("B", 3), ("B", 1)], {}, ("B", 3)),
    ("solve", [(4, 4), ("B", 4, 2)], {}, ("B", 4, 2)),
    ("solve", [("B", "N", "N"), ("B", "N")], {}, ("B", "N")),
    ("solve", [(1, 4, 4), ("B", 4)], {}, ("B", 4)),
    ("solve", [(4, 4), (4,)], {}, (4,)),
    ("einsum", [("B", 3), (3, 5)], {"equation": "bi,ij->bj"}, ("B", 5)),
    ("einsum", [("B", "T", 4), ("B", "S", 4)], {"equation": "btd,bsd->bts"}, ("B", "T", "S")),
    ("einsum", [("B", 2, 3, 4), (4, 5)], {"equation": "...ij,jk->...ik"}, ("B", 2, 3, 5)),
    ("einsum", [("B", 3)], {"equation": "bi->b"}, ("B",)),
    ("spmm", [("N", "N"), ("N", 8)], {}, ("N", 8)),
    ("spmm", [("N", "M"), ("N", 8)], {"transpose": True}, ("M", 8)),
    # issue 13: indexing and resampling (symbolic sizes exact where they are: H/2 under an assumption, 2*H)
    ("gather", [("B", "N", 4), ("B", "N", 2)], {"dim": 2}, ("B", "N", 2)),
    ("gather", [("B", 10), ("B", 3)], {"dim": -1}, ("B", 3)),
    ("gather", [(5, 10), (2, 10)], {"dim": 1}, (2, 10)),
    ("index_select", [("B", 10, 4), ("K",)], {"dim": 1}, ("B", "K", 4)),
    ("embedding", [("B", "T"), (1000, 64)], {}, ("B", "T", 64)),
    ("pad", [("B", 3, "H", "W")], {"pad": (1, 2, 0, 3)}, ("B", 3, dim_add("H", 3), dim_add("W", 3))),
    ("pad", [("B", 5)], {"pad": (2, 0), "value": -1.0}, ("B", 7)),
    ("avg_pool2d", [("B", 3, "H", "W")], {"kernel": (2, 2)}, ("B", 3, H2, "W/2")),
    ("avg_pool2d", [("B", 3, 7, 7)], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1)}, ("B", 3, 4, 4)),
    ("max_pool2d", [("B", 3, "H", 9)], {"kernel": (2, 3)}, ("B", 3, H2, 3)),
    ("interpolate", [("B", 3, "H", "W")], {"scale_factor": 2}, ("B", 3, "2*H", "2*W")),
    ("interpolate", [("B", 3, "H", "W")], {"size": (8, 6), "mode": "bilinear"}, ("B", 3, 8, 6)),
    ("grid_sample", [("B", 3, "H", "W"), ("B", "K", 1, 2)], {}, ("B", 3, "K", 1)),
    # an extern module: handle [], flat parameters [P], then its inputs (fpidsl/ir/extern.py)
    ("dropout", [("B", 4, 3), ("B",)], {"p": 0.2, "key": 1}, ("B", 4, 3)),
    ("extern", [(), ("P",), ("B", 4), ("B", 2)], {"name": "f", "inputs": (("B", 4), ("B", 2)), "output": ("B", 3), "samplewise": False}, ("B", 3)),
]


def _dims(shape):
    """Test shapes may write derived dims as text: "N*2", "4*H*W", "B-1", "W/2"."""
    from fpidsl.ir import shapes as S

    def one(d):
        if not isinstance(d, str) or d.isidentifier():
            return d
        for op, fn in (("-", S.dim_sub), ("*", S.dim_mul), ("/", None)):
            if op in d:
                left, right = d.rsplit(op, 1) if op != "*" else d.split(op, 1)
                if op == "/":
                    return S.dim_floordiv(one(left), int(right), ShapeCtx())
                conv = [int(p) if p.isdigit() else one(p) for p in (left, right)]
                return fn(*conv)
        raise AssertionError(d)

    return tuple(one(d) for d in shape)


def run(prim, shapes, attrs):
    p = PRIMITIVES[prim]
    ctx = ShapeCtx(callee=prim)
    return p.shape([_dims(s) for s in shapes], p.with_defaults(attrs), ctx), ctx


@pytest.mark.parametrize("prim, shapes, attrs, expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_shape_rule(prim, shapes, attrs, expected):
    out, _ = run(prim, shapes, attrs)
    assert out == _dims(expected)


CORE = set("""add sub mul div matmul pow neg relu leaky_relu tanh sigmoid softplus elu exp log sqrt square abs sin
cos clamp minimum maximum sum mean softmax logsumexp cat reshape transpose flatten index linear conv2d
conv_transpose2d grad
gelu silu erf sign reciprocal where max min norm prod var permute unsqueeze triu tril
group_norm layer_norm eye zeros ones full
arange power solve einsum spmm
gather index_select embedding pad avg_pool2d max_pool2d interpolate grid_sample extern dropout""".split())


def test_every_primitive_has_a_case():
    assert CORE <= set(PRIMITIVES)  # later passes may register auxiliary primitives
    assert {c[0] for c in CASES} == CORE


def test_strided_conv_records_assumptions():
    _, ctx = run("conv2d", [("B", 4, "H", "W"), (4, 4, 3, 3)], {"stride": (2, 2), "padding": (1, 1)})
    assert ctx.assumptions == [("H", 2), ("W", 2)]


FAILURES = [
    ("add", [("B", 10), ("B", 20)], {}, "do not broadcast: 10 vs 20 in dimension -1"),
    ("mul", [("B", 10), (10, 10)], {}, "B vs 10"),
    ("matmul", [("B", 10), (5, 3)], {}, "(10 vs 5)"),
    ("matmul", [(), (3,)], {}, "at least one dimension"),
    ("sum", [("B", 10)], {"dim": 2}, "dim=2 is out of range"),
    ("sum", [("B", 10)], {"dim": (1, -1)}, "appears twice"),
    ("softmax", [("B", 10)], {"dim": -3}, "out of range"),
    ("cat", [("B", 1, "H", "W"), ("B", 1, "H", 4)], {"dim": 1}, "4 vs W in dimension 3"),
    ("cat", [("B", 1), ("B",)], {"dim": 1}, "same rank"),
    ("cat", [(), ()], {"dim": 0}, "scalars"),
    ("reshape", [("B", 10)], {"shape": ("B", 3, 3)}, "cannot turn [B, 10] (10*B elements) into [B, 3, 3]"),
    ("reshape", [("B", 10)], {"shape": ("B", -1, 3)}, "cannot infer the -1"),
    ("reshape", [("B", 10)], {"shape": (-1, -1)}, "at most one -1"),
    ("reshape", [("B", 10)], {"shape": ("B", 0)}, "must be positive"),
    ("transpose", [("B", 10)], {"dim0": 0, "dim1": 2}, "dim1=2 is out of range"),
    ("flatten", [("B", 2, 3)], {"start": 2, "end": 1}, "comes after"),
    ("index", [("B", 10)], {"index": (SliceSpec(), SliceSpec(0, 12))}, "slice 0:12 out of range for dimension of size 10"),
    ("index", [("B", 10)], {"index": (SliceSpec(), 10)}, "index 10 out of range for dimension of size 10"),
    ("index", [("B", 10)], {"index": (SliceSpec(), SliceSpec(5, 3))}, "slice 5:3 is empty"),
    ("index", [("B", 10)], {"index": (0, 0, 0)}, "too many indices"),
    ("index", [("B", 10)], {"index": (Ellipsis, Ellipsis)}, "only one ..."),
    ("index", [("B", 10)], {"index": (SliceSpec(None, None, 0),)}, "step must be positive"),
    ("linear", [("B", 30), (32, 20)], {}, "expects 20 input features, but its argument has shape [B, 30]"),
    ("linear", [(), (32, 20)], {}, "scalar"),
    ("conv2d", [("B", 3, "H", "W"), (32, 2, 3, 3)], {"stride": (1, 1), "padding": (1, 1)},
     "expects 2 input channels, but its argument has shape [B, 3, H, W]"),
    ("conv2d", [("B", 2, 10), (32, 2, 3, 3)], {"stride": (1, 1), "padding": (1, 1)}, "expects a 4-D input"),
    ("conv2d", [("B", 2, 2, 2), (32, 2, 5, 5)], {"stride": (1, 1), "padding": (0, 0)}, "cannot slide a kernel"),
    ("conv_transpose2d", [("B", 2, "H", "W"), (4, 2, 3, 3)],
     {"stride": (1, 1), "padding": (0, 0), "output_padding": (0, 0)}, "expects 4 input channels"),
]

# issue 13: each failure names the argument or attribute it is about (the error is positioned there)
POSITIONED_FAILURES = [
    ("dropout", [("B", 4), ("B",)], {"p": 1.0, "key": 0}, "p", "p of dropout must be a number in [0, 1), found 1.0"),
    ("dropout", [(4, "B"), ("B",)], {"p": 0.1, "key": 0}, 0, "its argument's dimension 0 must be the batch B"),
    ("extern", [(), ("P",), ("B", 4), ("B", 3)], {"name": "f", "inputs": (("B", 4), ("B", 2)), "output": ("B", 3), "samplewise": False}, 3,
     "argument 2 of f (declared extern ([B, 4], [B, 2]) -> [B, 3]) must have shape [B, 2], found [B, 3]"),
    ("extern", [(), ("P",), ("B", 4)], {"name": "f", "inputs": (("B", 4), ("B", 2)), "output": ("B", 3), "samplewise": False}, None, "f (declared extern ([B, 4], [B, 2]) -> [B, 3]) takes 2 arguments, but 1 was given"),
    ("gelu", [("B", 3)], {"approximate": "exact"}, "approximate", "approximate of gelu must be none or tanh, found exact"),
    ("where", [("B", 4), ("B", 3), ()], {}, 1, "[B, 4], [B, 3] and [], which do not broadcast: 4 vs 3 in dimension -1"),
    ("where", [("B", 4), ("B", 4), (3,)], {}, 2, "[B, 4], [B, 4] and [3], which do not broadcast: 4 vs 3 in dimension -1"),
    ("max", [("B", 3)], {"dim": 2}, "dim", "dim=2 is out of range for max"),
    ("min", [("B", 3)], {"dim": (1, -1)}, "dim", "appears twice"),
    ("norm", [("B", 3)], {"dim": 1, "p": 0.5}, "p", "p of norm must be a number of at least 1, found 0.5"),
    ("prod", [("B", 3)], {"dim": 0}, "dim", "needs a dimension of known size, found B"),
    ("prod", [("B", 300)], {"dim": 1}, "dim", "prod along a dimension of 300 elements (at most 256)"),
    ("var", [("B", 1)], {"dim": 1}, "correction", "var over 1 element with correction=1 divides by 0"),
    ("var", [("B", 3)], {"dim": 1, "correction": -1}, "correction", "at least 0"),
    ("permute", [("B", 3, 4)], {"dims": (0, 1)}, "dims", "permute needs one dim per dimension of [B, 3, 4] (3)"),
    ("permute", [("B", 3, 4)], {"dims": (0, 2, -1)}, "dims", "permute lists dimension 2 twice (2 and -1) in [0, 2, -1]"),
    ("permute", [("B", 3)], {"dims": (0, 2)}, "dims", "dims=2 is out of range"),
    ("permute", [("B", 3)], {"dims": (1, 1)}, "dims", "permute lists dimension 1 twice in [1, 1]"),
    ("unsqueeze", [("B", 3)], {"dim": 3}, "dim", "dim=3 is out of range for unsqueeze"),
    ("unsqueeze", [("B", 3)], {"dim": (1, -3)}, "dim", "appears twice"),
    ("triu", [("B",)], {}, 0, "triu needs a tensor of at least 2 dimensions"),
    ("tril", [()], {}, 0, "tril needs a tensor of at least 2 dimensions"),
    ("group_norm", [("B", 6, "H")], {"groups": 2, "channels": 4}, 0,
     "expects 4 channels (dimension 1), but its argument has shape [B, 6, H]"),
    ("group_norm", [("B",)], {"groups": 1, "channels": 4}, 0, "expects an input [N, C, ...] of at least 2"),
    ("group_norm", [("B", 6)], {"groups": 4, "channels": 6}, "groups", "6 channels cannot be split into 4 groups"),
    ("group_norm", [("B", 4), (3,), (4,)], {"groups": 2, "channels": 4}, 1, "expects its weight of shape [4], found [3]"),
    ("layer_norm", [("B", 3, 4)], {"shape": (4, 3)}, 0,
     "normalizes over trailing dimensions [4, 3], but its argument has shape [B, 3, 4]"),
    ("layer_norm", [(4,)], {"shape": (3, 4)}, 0, "normalizes over trailing dimensions [3, 4]"),
    ("layer_norm", [("B", 4), (4,), (3,)], {"shape": (4,)}, 2, "expects its bias of shape [4], found [3]"),
    ("group_norm", [("B", "C", "H")], {"groups": 2}, 0, "needs a known number of channels (dimension 1)"),
    ("group_norm", [("B", 4, "H"), (3,)], {"groups": 2}, 1, "expects its weight of shape [4], found [3]"),
    ("group_norm", [("B", 4)], {"groups": 2, "eps": 0}, "eps", "group_norm needs an eps above 0, found 0"),
    ("layer_norm", [("B", 4)], {"shape": (4,), "eps": -1e-3}, "eps", "needs an eps above 0, found -0.001"),
    ("layer_norm", [("B", 4)], {"shape": ()}, "shape", "trailing dimensions of known positive sizes, found []"),
    ("layer_norm", [("B", "N")], {"shape": ("N",)}, "shape", "of known positive sizes, found [N]"),
    ("eye", [("B", 4)], {"n": 0}, "n", "eye(n) needs a positive size, found 0"),
    ("zeros", [("B", 4)], {"shape": ("B", 4)}, "shape", "the sizes of zeros must be numbers (or consts), found B"),
    ("full", [("B", 4)], {"shape": (2, 0), "value": 1.0}, "shape", "the sizes of full must be positive"),
    ("arange", [("B", 4)], {"n": 0}, "n", "arange(n) needs a positive size, found 0"),
    ("power", [("B", 3), ("B", 4)], {}, None, "[B, 3] and [B, 4], which do not broadcast: 3 vs 4"),
    ("solve", [("B", 3, 4), ("B", 3)], {}, 0, "solve needs a square matrix A of shape [.., n, n], found [B, 3, 4]"),
    ("solve", [("N",), ("N",)], {}, 0, "square matrix"),
    ("solve", [(3, 3), ()], {}, 1, "right-hand side b of at least one dimension"),
    ("solve", [("B", 3, 3), ("B", 4)], {}, 1, "needs b of shape [.., 3], found [B, 4] (4 vs 3)"),
    ("solve", [(3, 3), ("B", 4, 2)], {}, 1, "needs b of shape [.., 3, k], found [B, 4, 2]"),
    ("solve", [("B", 3, 3), ("C", 3, 1)], {}, 1, "batch dims of solve's A [B, 3, 3] and b [C, 3, 1] do not broadcast"),
    ("einsum", [("B", 3)], {"equation": "bi,ij->bj"}, "equation", "names 2 operands, but 1 were given"),
    ("einsum", [("B", 3), (3, 4, 5)], {"equation": "bi,ij->bj"}, 1,
     "operand 1 of einsum has shape [3, 4, 5] (3 dims), but its subscripts ij name 2"),
    ("einsum", [("B", 3), (4, 5)], {"equation": "bi,ij->bj"}, 1, "letter i is 3 in operand 0 but 4 in operand 1"),
    ("einsum", [("B", "N"), ("M", 5)], {"equation": "bi,ij->bj"}, 1, "letter i is N in operand 0 but M in operand 1"),
    ("einsum", [(2, 3), (4, 5)], {"equation": "...i,...j->...ij"}, 1, "the `...` dims of operand 1 of einsum ([4]) do not broadcast"),
    ("einsum", [("B",)], {"equation": "...ij->...i"}, 0, "subscripts ...ij name 2 or more"),
    ("spmm", [("N", "N", 2), ("N", 3)], {}, 0, "spmm needs a sparse matrix A [N, M], found [N, N, 2]"),
    ("spmm", [("N", "N"), ("N",)], {}, 1, "spmm needs a dense matrix x of 2 dims, found [N]"),
    ("spmm", [("N", "M"), ("N", 3)], {}, 1, "A x with A of shape [N, M] needs x of shape [M, D], found [N, 3]"),
    ("gather", [("B", 4), ("B",)], {"dim": 1}, 1, "gather needs an index of the rank of x"),
    ("gather", [("B", 4, 3), ("B", 2, 5)], {"dim": 1}, 1, "(5 vs 3 in dimension 2)"),
    ("gather", [("B", 4), ("C", 2)], {"dim": 1}, 1, "larger than x outside dim 1"),
    ("gather", [("B", 4), ("B", 2)], {"dim": 2}, "dim", "dim=2 is out of range for gather"),
    ("index_select", [("B", 4), ("B", 2)], {"dim": 1}, 1, "index_select needs a 1-D index, found shape [B, 2]"),
    ("pad", [("B", 3)], {"pad": (1, 1, 1)}, "pad", "a pair [left, right] per padded dimension"),
    ("pad", [("B", 3)], {"pad": (1, 1, 1, 1, 1, 1)}, "pad", "at most 2 pairs for [B, 3]"),
    ("pad", [("B", 3)], {"pad": (-1, 0)}, "pad", "pad sizes must be at least 0, found [-1, 0]"),
    ("avg_pool2d", [("B", 3, 4)], {"kernel": (2, 2)}, 0, "expects a 4-D input [N, C, H, W], found shape [B, 3, 4]"),
    ("avg_pool2d", [("B", 3, 4, 4)], {"kernel": (2, 2), "padding": (2, 0)}, "padding",
     "padding of avg_pool2d must be between 0 and half the kernel (1), found 2"),
    ("max_pool2d", [("B", 3, 2, 2)], {"kernel": (3, 3)}, 0, "cannot slide a kernel of size 3"),
    ("max_pool2d", [("B", 3, 4, 4)], {"kernel": (2, 2), "stride": (0, 1)}, "stride", "a positive kernel and stride"),
    ("interpolate", [("B", 3, 4, 4)], {}, None, "one of scale_factor=s (a positive integer) and size=[h, w]"),
    ("interpolate", [("B", 3, 4, 4)], {"scale_factor": 2, "size": (3, 3)}, "scale_factor", "one of scale_factor"),
    ("interpolate", [("B", 3, 4, 4)], {"scale_factor": 0}, "scale_factor", "a positive integer, found 0"),
    ("interpolate", [("B", 3, 4, 4)], {"scale_factor": 2, "mode": "cubic"}, "mode",
     "mode of interpolate must be nearest or bilinear, found cubic"),
    ("interpolate", [("B", 3, 4, 4)], {"scale_factor": 2, "align_corners": True}, "align_corners",
     "align_corners applies to mode=bilinear only"),
    ("interpolate", [("B", 3, 4, 4)], {"size": (0, 2)}, "size", "size of interpolate must be positive"),
    ("grid_sample", [("B", 3, 4, 4), ("B", 5, 5, 3)], {}, 1, "needs a grid [N, H_out, W_out, 2] with the N of x"),
    ("grid_sample", [("B", 3, 4, 4), ("C", 5, 5, 2)], {}, 1, "found [C, 5, 5, 2]"),
    ("grid_sample", [("B", 3, 4, 4), ("B", 5, 5, 2)], {"padding_mode": "wrap"}, "padding_mode",
     "padding_mode of grid_sample must be zeros or border or reflection, found wrap"),
]


@pytest.mark.parametrize("prim, shapes, attrs, where, fragment", POSITIONED_FAILURES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(POSITIONED_FAILURES)])
def test_new_shape_rule_failures_are_positioned(prim, shapes, attrs, where, fragment):
    with pytest.raises(ShapeRuleError) as info:
        run(prim, shapes, attrs)
    assert fragment in info.value.message
    assert (info.value.attr if isinstance(where, str) else info.value.arg) == where


@pytest.mark.parametrize("prim, shapes, attrs, fragment", FAILURES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(FAILURES)])
def test_shape_rule_failure(prim, shapes, attrs, fragment):
    with pytest.raises(ShapeRuleError) as info:
        run(prim, shapes, attrs)
    assert fragment in info.value.message


def test_signatures_and_table():
    assert BUILTINS["sum"].signature() == "sum(x, dim=none, keepdim=false)"
    assert BUILTINS["cat"].signature() == "cat([tensors, ...], dim=0)"
    assert BUILTINS["clamp"].signature() == "clamp(x, lo, hi)"
    assert BUILTINS["gelu"].signature() == "gelu(x, approximate=none)"
    assert BUILTINS["norm"].signature() == "norm(x, dim=none, p=2, keepdim=false)"
    assert BUILTINS["var"].signature() == "var(x, dim, keepdim=false, correction=1)"
    assert BUILTINS["where"].signature() == "where(cond, a, b)"
    assert PRIMITIVES["linear"].min_args == 2 and PRIMITIVES["linear"].max_args == 3
    assert PRIMITIVES["cat"].max_args is None
    assert MODULE_KINDS["Conv2d"].signature() == \
        "Conv2d(in, out, kernel, stride=[1, 1], padding=[0, 0], bias=true, init_scale=none, norm=none)"
    language = ("relu leaky_relu tanh sigmoid softplus elu exp log sqrt square abs sin cos clamp minimum maximum "
                "sum mean softmax logsumexp cat reshape transpose flatten grad "
                "gelu silu erf sign reciprocal where max min norm prod var permute unsqueeze triu tril").split()
    assert set(language) <= set(BUILTINS)


def _ops_call(prim, x, **attrs):
    from fpidsl.runtime import ops

    return getattr(ops, PRIMITIVES[prim].op)(x, **attrs)


@pytest.mark.parametrize("prim, attrs", [("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("erf", {})])
def test_the_declared_lipschitz_constant_is_the_largest_slope(prim, attrs):
    """Issue 13's element-wise entries: the constant bounds |f'| everywhere, and is tight (within 0.1%)."""
    import torch

    x = torch.linspace(-12, 12, 48_001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(_ops_call(prim, x, **attrs).sum(), x)
    steepest = float(slope.abs().max())
    assert steepest <= PRIMITIVES[prim].lipschitz <= steepest * 1.001


@pytest.mark.parametrize("prim, attrs", [
    ("max", {"dim": 1}), ("min", {"dim": (1, 2), "keepdim": True}), ("permute", {"dims": (2, 0, 1)}),
    ("unsqueeze", {"dim": -1}), ("triu", {"diagonal": 1}), ("tril", {}),
])
def test_the_declared_lipschitz_constant_bounds_the_change(prim, attrs):
    """|f(x) - f(y)| <= L |x - y| (Euclidean) on random pairs, ties included, for the 1-Lipschitz entries."""
    import torch

    gen = torch.Generator().manual_seed(0)
    law = PRIMITIVES[prim].lipschitz
    assert law == 1.0
    for _ in range(200):
        x = torch.randint(-2, 3, (3, 4, 5), generator=gen).double()
        y = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.rand((), generator=gen)
        change = torch.linalg.vector_norm(_ops_call(prim, x, **attrs) - _ops_call(prim, y, **attrs))
        assert change <= law * torch.linalg.vector_norm(x - y) * (1 + 1e-12)


def test_the_norm_bound_is_the_root_of_the_reduced_count():
    """norm names the sum_reduction rule (sqrt of the number of reduced elements): a bound for every p >= 1."""
    import torch

    assert PRIMITIVES["norm"].lipschitz == "sum_reduction"
    gen = torch.Generator().manual_seed(1)
    for p in (1, 1.5, 2, 3):
        worst = 0.0
        for _ in range(200):
            x, y = (torch.randn(3, 6, generator=gen, dtype=torch.float64) for _ in range(2))
            change = torch.linalg.vector_norm(_ops_call("norm", x, dim=1, p=p) - _ops_call("norm", y, dim=1, p=p))
            worst = max(worst, float(change / torch.linalg.vector_norm(x - y)))
        assert worst <= 6 ** 0.5


@pytest.mark.parametrize("prim, attrs, bound", [
    ("pad", {"pad": (1, 2, 0, 1), "value": 0.5}, 1.0), ("avg_pool2d", {"kernel": (2, 2)}, 1.0),
    ("avg_pool2d", {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)}, 1.0),
    ("max_pool2d", {"kernel": (2, 2)}, 1.0), ("max_pool2d", {"kernel": (3, 3), "stride": (1, 1)}, 3.0),
    ("interpolate", {"scale_factor": 2}, 2.0),
])
def test_the_resampling_bounds_hold(prim, attrs, bound):
    """|f(x) - f(y)| <= L |x - y| for the bounds that pad, the pools and nearest interpolation declare (a constant
    or the rule of passes/lipschitz.py: the root of the window overlap, the scale), on random pairs with ties."""
    import torch

    from fpidsl.passes.lipschitz import RULES

    law = PRIMITIVES[prim].lipschitz
    if isinstance(law, str):  # the rule reads the node's attributes
        class _Graph:
            def node(self, nid):
                return {"attrs": PRIMITIVES[prim].with_defaults(attrs)}

        law = RULES[law](_Graph(), {}, "n", [1.0], prim)[0]
    assert law == bound
    gen = torch.Generator().manual_seed(2)
    for _ in range(100):
        x = torch.randint(-2, 3, (2, 2, 6, 6), generator=gen).double()
        y = x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * torch.rand((), generator=gen)
        change = torch.linalg.vector_norm(_ops_call(prim, x, **attrs) - _ops_call(prim, y, **attrs))
        assert change <= law * torch.linalg.vector_norm(x - y) * (1 + 1e-12)
