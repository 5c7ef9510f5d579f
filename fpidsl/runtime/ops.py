"""The tensor functions that compiled code calls: one per primitive of the compiler's table.

Calling convention (what generated code writes, ``_ops.<primitive>(<args>, <attr>=<literal>)``):

* tensor inputs are positional, in the table's order; an optional input (``bias``) may be omitted or
  None; ``cat`` takes its tensors as one list. A ``const`` argument may be a Python number where the
  table allows broadcasting (``add``, ``mul``, ``minimum`` ...).
* static attributes are keyword-only, with the table's names and defaults: numbers are ``int`` or
  ``float``, booleans ``bool``, a ``dims`` attribute an ``int``, a tuple of ints or None (all dims),
  a ``pair`` a tuple of two ints, a ``shape`` a tuple of concrete ints (at most one -1: symbolic sizes
  are bound by the caller), an ``index`` a tuple of ints, ``...`` and slices (a Python ``slice`` or any
  object with ``lo``/``hi``/``step`` attributes).

Every function is made of differentiable torch operations, so derivatives of any order work through
it. The masks (``relu_mask`` ...) are piecewise constant: their derivative is zero almost everywhere.
Functions named ``*_like`` / taking a ``like`` argument use it for its shape only.

This module imports only torch (and :mod:`fpidsl.runtime.torch_faults`, which imports only torch): the compiler's
representation of attributes is mirrored, not imported.
"""
from __future__ import annotations

import builtins
import math
import operator
import warnings
import weakref
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .torch_faults import layer_norm_exact

Tensor = torch.Tensor
Dims = int | tuple[int, ...] | None

# --------------------------------------------------------------------------- arithmetic


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b


def div(a, b):
    return a / b


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def pow(x: Tensor, *, exponent: float) -> Tensor:  # noqa: A001 - named after the primitive
    return torch.pow(x, exponent)


def neg(x: Tensor) -> Tensor:
    return -x


def power(a, b):
    """``a ** b`` with a tensor exponent; NaN where ``a`` is negative (the base must be positive)."""
    return torch.pow(a, b)


# --------------------------------------------------------------------------- elementwise


def relu(x: Tensor) -> Tensor:
    return torch.relu(x)


def leaky_relu(x: Tensor, *, slope: float = 0.01) -> Tensor:
    return F.leaky_relu(x, slope)


def tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def sigmoid(x: Tensor) -> Tensor:
    return torch.sigmoid(x)


def softplus(x: Tensor, *, beta: float = 1.0) -> Tensor:
    return F.softplus(x, beta)


def elu(x: Tensor, *, alpha: float = 1.0) -> Tensor:
    return F.elu(x, alpha)


def exp(x: Tensor) -> Tensor:
    return torch.exp(x)


def log(x: Tensor) -> Tensor:
    return torch.log(x)


def sqrt(x: Tensor) -> Tensor:
    return torch.sqrt(x)


def square(x: Tensor) -> Tensor:
    return torch.square(x)


def abs(x: Tensor) -> Tensor:  # noqa: A001
    return torch.abs(x)


def sin(x: Tensor) -> Tensor:
    return torch.sin(x)


def cos(x: Tensor) -> Tensor:
    return torch.cos(x)


def clamp(x: Tensor, *, lo: float, hi: float) -> Tensor:
    return torch.clamp(x, lo, hi)


def gelu(x: Tensor, *, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def silu(x: Tensor) -> Tensor:
    return F.silu(x)


def erf(x: Tensor) -> Tensor:
    return torch.erf(x)


def reciprocal(x: Tensor) -> Tensor:
    return torch.reciprocal(x)


def sign(x: Tensor) -> Tensor:
    return torch.sign(x)


def where(cond, a, b):
    """``a`` where ``cond != 0``, else ``b`` (broadcast; ``a`` or ``b`` may be a number)."""
    like = next(t for t in (cond, a, b) if isinstance(t, Tensor))
    is_mask = isinstance(cond, Tensor) and cond.dtype == torch.bool
    mask = cond if is_mask else torch.as_tensor(cond, device=like.device) != 0
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):  # where(mask, 1, 0): in the mask's float dtype
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        a = torch.as_tensor(a, dtype=dtype, device=like.device)
    return torch.where(mask, a, b)


def _mask(a, b, test) -> Tensor:
    """``test(a, b)`` (broadcast; one side may be a number) as 0/1 in the operands' float dtype."""
    like = next(t for t in (a, b) if isinstance(t, Tensor))
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return test(a, b).to(dtype)


def less(a, b):
    return _mask(a, b, operator.lt)


def less_equal(a, b):
    return _mask(a, b, operator.le)


def greater(a, b):
    return _mask(a, b, operator.gt)


def greater_equal(a, b):
    return _mask(a, b, operator.ge)


def equal(a, b):
    return _mask(a, b, operator.eq)


def not_equal(a, b):
    return _mask(a, b, operator.ne)


def minimum(a, b):
    """torch.minimum, a number taken as a 0-dimensional tensor of the other side's dtype: a tie splits the
    derivative 1/2 - 1/2 in every mode of autograd (the derived VJP's rule; ``clamp_max`` gave the whole 1)."""
    a, b = _tensor_pair(a, b)
    return torch.minimum(a, b)


def maximum(a, b):
    """torch.maximum, as :func:`minimum`."""
    a, b = _tensor_pair(a, b)
    return torch.maximum(a, b)


def _tensor_pair(a, b) -> tuple[Tensor, Tensor]:
    """``a`` and ``b``, a number made a 0-dimensional tensor of the dtype torch's promotion gives the pair."""
    if not isinstance(b, Tensor):
        return a, torch.scalar_tensor(b, dtype=torch.result_type(a, b), device=a.device)
    if not isinstance(a, Tensor):
        return torch.scalar_tensor(a, dtype=torch.result_type(b, a), device=b.device), b
    return a, b


# --------------------------------------------------------------------------- reductions and shapes


def sum(x: Tensor, *, dim: Dims = None, keepdim: bool = False) -> Tensor:  # noqa: A001
    return torch.sum(x, dim=dim, keepdim=keepdim)


def mean(x: Tensor, *, dim: Dims = None, keepdim: bool = False) -> Tensor:
    return torch.mean(x, dim=dim, keepdim=keepdim)


def softmax(x: Tensor, *, dim: int) -> Tensor:
    return torch.softmax(x, dim)


def logsumexp(x: Tensor, *, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    return torch.logsumexp(x, dim, keepdim)


def max(x: Tensor, *, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:  # noqa: A001
    """The largest values along ``dim`` (torch.amax: ties share the gradient evenly)."""
    return torch.amax(x, dim=dim, keepdim=keepdim)


def min(x: Tensor, *, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:  # noqa: A001
    """The smallest values along ``dim`` (torch.amin: ties share the gradient evenly)."""
    return torch.amin(x, dim=dim, keepdim=keepdim)


def norm(x: Tensor, *, dim: Dims = None, p: float = 2, keepdim: bool = False) -> Tensor:
    return torch.linalg.vector_norm(x, ord=p, dim=dim, keepdim=keepdim)


def prod(x: Tensor, *, dim: int, keepdim: bool = False) -> Tensor:
    return torch.prod(x, dim, keepdim=keepdim)


def var(x: Tensor, *, dim: int | tuple[int, ...], keepdim: bool = False, correction: int = 1) -> Tensor:
    return torch.var(x, dim=dim, correction=correction, keepdim=keepdim)


def cat(tensors: Sequence[Tensor], *, dim: int = 0) -> Tensor:
    return torch.cat(tuple(tensors), dim)


def reshape(x: Tensor, *, shape: tuple[int, ...]) -> Tensor:
    return x.reshape(shape)


def transpose(x: Tensor, *, dim0: int, dim1: int) -> Tensor:
    return x.transpose(dim0, dim1)


def flatten(x: Tensor, *, start: int = 1, end: int = -1) -> Tensor:
    return torch.flatten(x, start, end)


def permute(x: Tensor, *, dims: int | tuple[int, ...]) -> Tensor:
    return x.permute(dims if isinstance(dims, tuple) else (dims,))


def triu(x: Tensor, *, diagonal: int = 0) -> Tensor:
    return torch.triu(x, diagonal)


def tril(x: Tensor, *, diagonal: int = 0) -> Tensor:
    return torch.tril(x, diagonal)


def unsqueeze(x: Tensor, *, dim: int | tuple[int, ...]) -> Tensor:
    """Insert size-1 dimensions at ``dim``: positions in the result, negative ones counted from its end."""
    dims = dim if isinstance(dim, tuple) else (dim,)
    rank = x.dim() + len(dims)
    for d in sorted(d % rank for d in dims):
        x = x.unsqueeze(d)
    return x


def _index_item(item: Any) -> Any:
    if isinstance(item, (int, slice)) or item is Ellipsis or item is None:
        return item
    return slice(item.lo, item.hi, item.step)


def _as_index(index: Sequence[Any]) -> tuple:
    if all(isinstance(item, slice) for item in index):  # the emitted code's slices of a weight (each call)
        return tuple(index)
    return tuple(_index_item(item) for item in index)


def index(x: Tensor, *, index: Sequence[Any]) -> Tensor:
    return x[_as_index(index)]


# --------------------------------------------------------------------------- modules


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.linear(x, weight, bias)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride: tuple[int, int] = (1, 1),
           padding: tuple[int, int] = (0, 0)) -> Tensor:
    """``F.conv2d``; on CPU, a convolution to one output channel from several is computed as a depthwise
    convolution summed over the channels (the same numbers, summed in another order): CPU backends are slow on
    a single output channel (``benchmarks/kernels.py``, batch 8 of 64x64, float32, one thread: 16 channels
    0.86 ms against 0.35 ms, 32 channels 1.85 ms against 0.82 ms)."""
    channels = x.shape[1] if x.dim() == 4 else 0
    if weight.shape[0] == 1 and channels > 1 and x.device.type == "cpu":
        per_channel = F.conv2d(x, weight.reshape(channels, 1, *weight.shape[2:]), None, stride, padding, 1, channels)
        out = per_channel.sum(1, keepdim=True)
        return out if bias is None else out + bias.reshape(1, 1, 1, 1)
    return F.conv2d(x, weight, bias, stride, padding)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                     stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                     output_padding: tuple[int, int] = (0, 0)) -> Tensor:
    return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)


# --------------------------------------------------------------------------- constructors: the first argument
# is a tensor of the layer (its first state) whose dtype and device the result takes; its values are not read


def eye(dtype_like: Tensor, *, n: int) -> Tensor:
    return torch.eye(n, dtype=dtype_like.dtype, device=dtype_like.device)


def zeros(dtype_like: Tensor, *, shape: tuple[int, ...]) -> Tensor:
    return torch.zeros(tuple(shape), dtype=dtype_like.dtype, device=dtype_like.device)


def ones(dtype_like: Tensor, *, shape: tuple[int, ...]) -> Tensor:
    return torch.ones(tuple(shape), dtype=dtype_like.dtype, device=dtype_like.device)


def full(dtype_like: Tensor, *, shape: tuple[int, ...], value: float) -> Tensor:
    return torch.full(tuple(shape), float(value), dtype=dtype_like.dtype, device=dtype_like.device)


def arange(dtype_like: Tensor, *, n: int) -> Tensor:
    return torch.arange(n, dtype=dtype_like.dtype, device=dtype_like.device)


# --------------------------------------------------------------------------- linear algebra


def solve(A: Tensor, b: Tensor) -> Tensor:
    """x with A x = b. ``b`` is vectors ``[.., n]`` when it has one dimension or one fewer than A, else
    matrices ``[.., n, k]``; batch dims broadcast. Decided by ranks (as the compiler's shape rule), never by
    torch's size-dependent reading of ``b``: both are given the same rank first."""
    vector = b.dim() == 1 or b.dim() == A.dim() - 1
    rhs = b.unsqueeze(-1) if vector else b
    rank = builtins.max(A.dim(), rhs.dim())
    A = A.reshape((1,) * (rank - A.dim()) + tuple(A.shape))
    rhs = rhs.reshape((1,) * (rank - rhs.dim()) + tuple(rhs.shape))
    x = torch.linalg.solve(A, rhs)
    return x.squeeze(-1) if vector else x


def einsum(*operands: Tensor, equation: str) -> Tensor:
    return torch.einsum(equation, *operands)


_SPARSE_FORMS: dict[int, tuple] = {}  # id of a sparse matrix -> (a weak reference to it, its version, its forms)


def _sparse_forms(A: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A and Aᵀ as CSR matrices, then as coalesced COO ones, made once per sparse tensor (and again after it changes
    in place). On the CPU, torch.sparse.mm took 2.31 ms with a COO matrix, 0.38 ms with CSR and 13.2 ms with the
    transpose of a CSR one (a CSC matrix), which every backward iteration needs (``benchmarks/sparse_graph.py
    --nodes 16000 --threads 1 --products-only``). A gets no gradient (the compiled layer refuses one that requires
    grad), so the forms are made from ``A.detach()``."""
    key = id(A)
    try:
        version = A._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        version = None
    hit = _SPARSE_FORMS.get(key)
    if hit is not None and hit[0]() is A and hit[1] == version and version is not None:
        return hit[2]
    # made outside any torch.func transform (a transform's wrapping of CSR tensors fails); A is data, not traced
    with torch._C._DisableFuncTorch(), warnings.catch_warnings():  # torch calls its CSR support beta (tested here)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        detached = A.detach()
        coo = (detached if detached.layout == torch.sparse_coo else detached.to_sparse_coo()).coalesce()
        coo_t = coo.t().coalesce()
        forms = (coo.to_sparse_csr(), coo_t.to_sparse_csr(), coo, coo_t)
    _SPARSE_FORMS[key] = (weakref.ref(A, lambda _, key=key: _SPARSE_FORMS.pop(key, None)), version, forms)
    return forms


def spmm(A: Tensor, x: Tensor, *, transpose: bool = False) -> Tensor:
    """``A @ x`` (``Aᵀ @ x`` with ``transpose``) for a sparse ``A`` (COO or CSR) and a dense matrix ``x``, with the
    forms of :func:`_sparse_forms`: CSR, or COO inside a torch.func transform (torch.func.grad of a product with a
    CSR matrix fails: "Sparse CSR tensors do not have strides"; grad, vjp, vmap and jacrev work with COO)."""
    forms = _sparse_forms(A)
    in_transform = torch._C._functorch.is_functorch_wrapped_tensor(x)
    return torch.sparse.mm(forms[(2 if in_transform else 0) + (1 if transpose else 0)], x)


def group_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, groups: int,
               channels: int | None = None, eps: float = 1e-5) -> Tensor:
    return F.group_norm(x, groups, weight, bias, eps)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, shape: tuple[int, ...],
               eps: float = 1e-5) -> Tensor:
    """``F.layer_norm``, right at every order where autograd may differentiate it (a layer's outputs, ``unrolled``):
    torch's fused kernel has a wrong third derivative (:func:`fpidsl.runtime.torch_faults.layer_norm_exact`). The
    derived VJP (the solves' backward) has rules of its own."""
    return layer_norm_exact(x, tuple(shape), weight, bias, eps)


def grad(energy: Tensor, state: Tensor) -> Tensor:
    """The gradient of ``energy.sum()`` with respect to ``state``, by autograd (a reference only:
    compiled code has ``grad`` expanded into an explicit graph). ``state`` must require grad."""
    if not state.requires_grad:
        raise ValueError("ops.grad needs a state that requires grad and an energy computed from it")
    (out,) = torch.autograd.grad(energy.sum(), state, create_graph=True, allow_unused=True)
    return torch.zeros_like(state) if out is None else out


# --------------------------------------------------------------------------- auxiliary primitives
# (made by the differentiation pass; see fpidsl.ir.derivatives)


def relu_mask(x: Tensor) -> Tensor:
    """1 where x > 0, else 0 (relu')."""
    return (x > 0).to(x.dtype)


def leaky_relu_mask(x: Tensor, *, slope: float) -> Tensor:
    """1 where x > 0, else ``slope`` (leaky_relu')."""
    return torch.where(x > 0, 1.0, torch.full_like(x, slope))


def elu_grad(x: Tensor, *, alpha: float) -> Tensor:
    """elu'(x): 1 where x > 0, else alpha * exp(x)."""
    return torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(x))


def clamp_mask(x: Tensor, *, lo: float, hi: float) -> Tensor:
    """1 where lo <= x <= hi, else 0 (clamp')."""
    return ((x >= lo) & (x <= hi)).to(x.dtype)


def select(ct: Tensor, mask: Tensor) -> Tensor:
    """``ct`` where ``mask > 0``, else exactly 0, also where ``ct`` is inf or NaN (broadcast): torch's
    ``threshold_backward``, relu's own backward (as fast as a product on the CPU, where ``torch.where`` is ten times
    slower; differentiable in ``ct`` in every mode of autograd)."""
    return torch.ops.aten.threshold_backward(ct, mask, 0)


def greater_mask(a, b):
    """1 where a > b, 1/2 where a == b, 0 where a < b (broadcast): maximum' in a, ties split evenly."""
    like = a if isinstance(a, Tensor) else b
    return (a > b).to(like.dtype) + 0.5 * (a == b).to(like.dtype)


def equal_mask(a, b):
    """1 where a == b, else 0 (broadcast): which elements a max or min reduction picked."""
    like = a if isinstance(a, Tensor) else b
    return (a == b).to(like.dtype)


def safe_div(a, b):
    """a / b where b != 0, else 0 (broadcast): the gradient of a norm, 0 where the norm is 0 (as torch)."""
    if not isinstance(b, Tensor):
        b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), 0.0)


def ones_like(x: Tensor) -> Tensor:
    return torch.ones_like(x)


def zeros_like(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def count(x: Tensor, *, dim: Dims = None) -> float:
    """How many elements ``mean(x, dim)`` averages over (a number)."""
    if dim is None:
        return float(x.numel())
    dims = dim if isinstance(dim, tuple) else (dim,)
    return float(math.prod(x.shape[d] for d in dims))


def _shape(like: Tensor | torch.Size) -> torch.Size:
    """A ``like`` argument is read for its shape only: the emitted backward passes the shape itself where the
    tensor would be kept alive only for it (``shape_only`` in the primitive table). Under torch.func's grad the
    saved shape comes back as a plain tuple."""
    return like.shape if isinstance(like, Tensor) else torch.Size(like)


def expand_as(x: Tensor, like: Tensor | torch.Size) -> Tensor:
    return x.expand(_shape(like))


def reshape_as(x: Tensor, like: Tensor | torch.Size) -> Tensor:
    return x.reshape(_shape(like))


def index_backward(ct: Tensor, like: Tensor | torch.Size, *, index: Sequence[Any]) -> Tensor:
    """Zeros of ``like``'s shape with ``ct`` written at ``like[index]``. The zeros are ``ct.new_zeros``: under
    ``vmap`` (``jacrev``, ``hessian``, a layer's vmap rule) a batched ``ct`` cannot be written into an unbatched
    tensor ("vmap: inplace arithmetic ... is not possible"); ``new_zeros`` of a batched tensor is batched."""
    out = ct.new_zeros(_shape(like))
    out[_as_index(index)] = ct
    return out


def cat_part(ct: Tensor, *parts: Tensor, dim: int, item: int) -> Tensor:
    """The slice of ``ct`` (the cotangent of ``cat(parts, dim)``) that comes from ``parts[item]``."""
    start = 0
    for part in parts[:item]:
        start += part.shape[dim]
    return ct.narrow(dim, start, parts[item].shape[dim])


def group_mean(x: Tensor, *, groups: int) -> Tensor:
    """Each element replaced by the mean of its group: dim 1 cut into ``groups``, with every later dim."""
    grouped = x.reshape(x.shape[0], groups, -1)
    return grouped.mean(-1, keepdim=True).expand(grouped.shape).reshape(x.shape)


def linear_weight_grad(ct: Tensor, x: Tensor) -> Tensor:
    """sum over the batch dims of ct ⊗ x: the weight gradient of ``linear(x, W)``."""
    if ct.dim() == 1:
        return torch.outer(ct, x)
    return torch.matmul(ct.flatten(0, -2).mT, x.flatten(0, -2))


def conv2d_input_grad(ct: Tensor, weight: Tensor, like: Tensor | torch.Size, *, stride: tuple[int, int] = (1, 1),
                      padding: tuple[int, int] = (0, 0)) -> Tensor:
    """The input gradient of ``conv2d(x, weight)`` (x shaped like ``like``).

    With stride 1 it is the convolution (:func:`conv2d`) of ``ct`` with the flipped, transposed kernel, unless
    that convolution would go from few channels to several (more than one): both forms compute the same numbers,
    and on CPU the convolution is the faster except there (``benchmarks/kernels.py``, batch 8 of 64x64, float32,
    one thread: weight 1x16 0.22 ms against 0.80 ms for the transposed convolution, 16x1 0.35 against 0.72 ms;
    a 16x2 weight keeps the transposed convolution, 0.72 ms)."""
    kernel = weight.shape[2:]
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    if (tuple(stride) == (1, 1) and (out_channels <= in_channels or in_channels == 1)
            and all(0 <= p <= k - 1 for p, k in zip(padding, kernel))):
        flipped = weight.transpose(0, 1).flip((2, 3))
        return conv2d(ct, flipped, None, padding=tuple(k - 1 - p for p, k in zip(padding, kernel)))
    extra = tuple((_shape(like)[2 + i] + 2 * padding[i] - weight.shape[2 + i]) % stride[i] for i in range(2))
    return F.conv_transpose2d(ct, weight, None, stride, padding, extra)


def conv2d_weight_grad(ct: Tensor, x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
                       padding: tuple[int, int] = (0, 0)) -> Tensor:
    """The weight gradient of ``conv2d(x, W)`` with output cotangent ``ct``."""
    weight = ct.new_empty(1).expand(ct.shape[1], x.shape[1], *kernel)
    return torch.ops.aten.convolution_backward(
        ct, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1, [False, True, False])[1]


# --------------------------------------------------------------------------- outside modules (fpidsl.runtime.extern)


def extern(module: Any, parameters: Tensor, *args: Tensor, name: str, inputs: tuple, output: tuple,
           samplewise: bool) -> Tensor:
    """The extern module (an ``ExternHandle``) applied to ``args`` with its parameters taken from the flat vector
    ``parameters``; the result is checked against the declared ``output`` shape."""
    return module.apply(parameters, args, inputs, output)


def extern_vjp(module: Any, parameters: Tensor, *args: Tensor, name: str, inputs: tuple, output: tuple,
               samplewise: bool, chain: tuple[int, ...]) -> Tensor:
    """Nested VJPs of the extern (``args``: its inputs, then one cotangent per entry of ``chain``), by
    ``torch.autograd.grad(..., create_graph=True)`` so that the result stays differentiable."""
    return module.vjp(parameters, args, inputs, output, chain)


# --------------------------------------------------------------------------- indexing and resampling (issue 13)
# An ``index`` argument is an integer (int64) tensor: a layer's ``int`` input, never differentiated.


def _in_range(what: str, size: int, run):
    """``run()``, with torch's out-of-range index error (on CPU) restated: which call, and the valid range."""
    try:
        return run()
    except (IndexError, RuntimeError) as exc:
        if "out of" not in str(exc) and "bounds" not in str(exc):
            raise
        raise IndexError(f"{what}: an index is outside 0..{size - 1} (torch: {exc})") from None


def gather(x: Tensor, index: Tensor, *, dim: int) -> Tensor:
    return _in_range(f"gather along dim {dim}", x.shape[dim], lambda: torch.gather(x, dim, index))


def index_select(x: Tensor, index: Tensor, *, dim: int) -> Tensor:
    return _in_range(f"index_select along dim {dim}", x.shape[dim], lambda: torch.index_select(x, dim, index))


def embedding(index: Tensor, weight: Tensor) -> Tensor:
    """Row ``index[...]`` of ``weight`` for every index (``nn.Embedding``)."""
    return _in_range(f"an Embedding of {weight.shape[0]} rows", weight.shape[0], lambda: F.embedding(index, weight))


def gather_backward(ct: Tensor, index: Tensor, like: Tensor | torch.Size, *, dim: int) -> Tensor:
    """The adjoint of ``gather(x, dim, index)`` (x shaped like ``like``): ``ct`` added at the gathered places."""
    return torch.zeros(_shape(like), dtype=ct.dtype, device=ct.device).scatter_add(dim, index, ct)


def index_select_backward(ct: Tensor, index: Tensor, like: Tensor | torch.Size, *, dim: int) -> Tensor:
    """The adjoint of ``index_select(x, dim, index)``: ``ct``'s slices added at the selected places."""
    return torch.zeros(_shape(like), dtype=ct.dtype, device=ct.device).index_add(dim, index, ct)


def embedding_backward(ct: Tensor, index: Tensor, like: Tensor | torch.Size) -> Tensor:
    """The weight gradient of ``embedding(index, W)`` (W shaped like ``like``): each row of ``ct`` added to the
    row its index names."""
    shape = _shape(like)
    rows = ct.reshape(-1, shape[-1])
    return torch.zeros(shape, dtype=ct.dtype, device=ct.device).index_add(0, index.reshape(-1), rows)


def pad(x: Tensor, *, pad: int | tuple[int, ...], value: float = 0.0) -> Tensor:
    """``x`` padded with ``value``: ``pad = (left, right, top, bottom, ...)``, the last dimension first."""
    return F.pad(x, list(pad) if isinstance(pad, tuple) else [pad], value=value)


def avg_pool2d(x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int] | None = None,
               padding: tuple[int, int] = (0, 0)) -> Tensor:
    return F.avg_pool2d(x, kernel, stride or kernel, padding)


def max_pool2d(x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int] | None = None,
               padding: tuple[int, int] = (0, 0)) -> Tensor:
    return F.max_pool2d(x, kernel, stride or kernel, padding)


def avg_pool2d_backward(ct: Tensor, like: Tensor | torch.Size, *, kernel: tuple[int, int],
                        stride: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0)) -> Tensor:
    """The adjoint of ``avg_pool2d`` (input shaped like ``like``): the transposed convolution of every channel
    with the constant kernel 1 / (kh kw)."""
    stride = stride or kernel
    shape = _shape(like)
    n, c, h, w = shape
    weight = torch.full((1, 1, *kernel), 1.0 / (kernel[0] * kernel[1]), dtype=ct.dtype, device=ct.device)
    extra = tuple(size - ((o - 1) * s - 2 * p + k)
                  for size, o, s, p, k in zip((h, w), ct.shape[2:], stride, padding, kernel))
    out = F.conv_transpose2d(ct.reshape(n * c, 1, *ct.shape[2:]), weight, None, stride, padding, extra)
    return out.reshape(shape)


def _argmax_places(x: Tensor, kernel, stride, padding) -> Tensor:
    """Where in each [H * W] plane of ``x`` every window of ``max_pool2d`` takes its maximum (torch's choice)."""
    return F.max_pool2d(x.detach(), kernel, stride or kernel, padding, return_indices=True)[1]


def max_pool2d_backward(ct: Tensor, x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int] | None = None,
                        padding: tuple[int, int] = (0, 0)) -> Tensor:
    """The input gradient of ``max_pool2d(x)``: ``ct`` added at each window's maximum (piecewise constant in x)."""
    places = _argmax_places(x, kernel, stride, padding)
    out = torch.zeros(x.shape[:2] + (x.shape[2] * x.shape[3],), dtype=ct.dtype, device=ct.device)
    return out.scatter_add(2, places.flatten(2), ct.flatten(2)).reshape(x.shape)


def max_pool2d_select(u: Tensor, x: Tensor, *, kernel: tuple[int, int], stride: tuple[int, int] | None = None,
                      padding: tuple[int, int] = (0, 0)) -> Tensor:
    """``u`` (shaped like x) read at each window's maximum of ``x``: the adjoint of :func:`max_pool2d_backward`."""
    places = _argmax_places(x, kernel, stride, padding)
    return u.flatten(2).gather(2, places.flatten(2)).reshape(places.shape)


def _resize(x: Tensor, size, mode: str, align_corners: bool) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=align_corners if mode == "bilinear" else None)


def interpolate(x: Tensor, *, scale_factor: int | None = None, size: tuple[int, int] | None = None,
                mode: str = "nearest", align_corners: bool = False) -> Tensor:
    """``x`` resampled to ``size`` or to ``scale_factor`` times its H and W (always by the output size, so that
    the adjoint, :func:`interpolate_backward`, maps the same places)."""
    target = size if size is not None else (x.shape[2] * scale_factor, x.shape[3] * scale_factor)
    return _resize(x, target, mode, align_corners)


def interpolate_like(x: Tensor, like: Tensor | torch.Size, *, mode: str = "nearest",
                     align_corners: bool = False) -> Tensor:
    """``x`` resampled to the H and W of ``like``."""
    return _resize(x, _shape(like)[2:], mode, align_corners)


def interpolate_backward(ct: Tensor, like: Tensor | torch.Size, *, mode: str = "nearest",
                         align_corners: bool = False) -> Tensor:
    """The adjoint of resampling an input shaped like ``like`` to ``ct``'s H and W (nearest: a sum over the
    places each input pixel was copied to)."""
    out_size, in_size = list(ct.shape[2:]), list(_shape(like))
    if mode == "nearest":
        return torch.ops.aten.upsample_nearest2d_backward(ct, out_size, in_size, None, None)
    return torch.ops.aten.upsample_bilinear2d_backward(ct, out_size, in_size, align_corners, None, None)


def grid_sample(x: Tensor, grid: Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> Tensor:
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _nested_vjp(primal, tensors: Sequence[Tensor], path: tuple[int, ...], create_graph: bool, first=None) -> Tensor:
    """F_path(tensors): F_() = primal(*tensors); F_(p..., k)(u, *rest) = the VJP of F_(p...) at ``rest`` with
    respect to ``rest[k]``, cotangent ``u``. ``first(u, *rest, k)``, when given, is F_(k) itself (the primal's own
    backward, differentiable again), which saves recording the primal."""
    if not path:
        return primal(*tensors)
    u, rest = tensors[0], tensors[1:]
    if len(path) == 1 and first is not None:
        return first(u, *rest, path[0])
    value = _nested_vjp(primal, rest, path[:-1], True, first)
    (grad,) = torch.autograd.grad(value, rest[path[-1]], u, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(rest[path[-1]]) if grad is None else grad


def autograd_vjp(primal, tensors: Sequence[Tensor], path: tuple[int, ...], first=None) -> Tensor:
    """:func:`_nested_vjp` by torch.autograd, differentiable again where autograd records: every argument enters
    as its own view (or a fresh leaf), so a tensor passed at two positions is differentiated at the one asked for."""
    if len(path) == 1 and first is not None:  # the primal's own backward: no graph to record (and none under
        return first(tensors[0], *tensors[1:], path[0])  # torch.func, where requires_grad_ is refused)
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    with torch.enable_grad():
        own = [t.view_as(t) if recording and t.requires_grad else t.detach().requires_grad_() for t in tensors]
        out = _nested_vjp(primal, own, tuple(path), recording, first)
    return out if recording else out.detach()


def grid_sample_vjp(*tensors: Tensor, path: tuple[int, ...], mode: str = "bilinear", padding_mode: str = "zeros",
                    align_corners: bool = False) -> Tensor:
    """The derivatives of :func:`grid_sample` (x and grid the last two tensors, a cotangent before them per
    entry of ``path``): see :func:`autograd_vjp`."""
    def primal(x, grid):
        return grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    def first(u, x, grid, k):  # torch's backward of grid_sample, what autograd of primal would call
        wanted = [k == 0, k == 1]
        return torch.ops.aten.grid_sampler_2d_backward(u, x, grid, _GRID_MODES[mode], _GRID_PADDINGS[padding_mode],
                                                       align_corners, wanted)[k]

    return autograd_vjp(primal, tensors, path, first)


_GRID_MODES = {"bilinear": 0, "nearest": 1}  # aten's enums (GridSamplerInterpolation, GridSamplerPadding)
_GRID_PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}


# --------------------------------------------------------------------------- variational dropout (fpidsl.ir.dropout)

_M31 = (1 << 31) - 1


def dropout_mask(x: Tensor, seeds: Tensor, *, p: float, key: int = 0, spatial: bool = False) -> Tensor:
    """The mask of ``dropout(x)`` for these per-sample ``seeds``: 0 with probability p, else 1 / (1 - p); a
    deterministic function of (seed, key, element position), so every evaluation of the map sees the same mask. A
    counter-based hash on 31-bit integers (int64 arithmetic without overflow, the same on every device).
    ``spatial``: one value per (sample, channel), the mask of shape ``[B, C, 1, ...]`` (MDEQ's
    ``VariationalHidDropout2d(spatial=True)``), which broadcasts over the remaining dims of ``x``."""
    shape = tuple(x.shape[1:])
    if spatial and len(shape) >= 1:
        shape = (shape[0],) + (1,) * (len(shape) - 1)
    per_sample = 1
    for size in shape:
        per_sample *= size
    idx = torch.arange(per_sample, device=x.device, dtype=torch.int64).view((1,) + shape)
    seed = ((seeds.to(torch.int64) + key * 0x3C6EF372) & _M31).view((-1,) + (1,) * (x.dim() - 1))
    h = (seed ^ ((idx * 0x5BD1E995) & _M31)) & _M31
    for _ in range(3):
        h = h ^ (h >> 15)
        h = (h * 0x2C1B3C6D) & _M31
        h = h ^ (h >> 12)
        h = (h * 0x297A2D39) & _M31
    keep = (h.to(torch.float64) / float(1 << 31)) >= p
    return keep.to(x.dtype) / (1.0 - p)


def dropout(x: Tensor, seeds: Tensor | None, *, p: float = 0.1, key: int = 0, spatial: bool = False) -> Tensor:
    """``x`` times its mask (:func:`dropout_mask`); ``x`` itself when ``seeds`` is None (eval mode) or p is 0."""
    if seeds is None or p == 0:
        return x
    return x * _solve_mask(x, seeds, p, key, spatial)


def _solve_mask(x: Tensor, seeds: Tensor, p: float, key: int, spatial: bool = False) -> Tensor:
    """:func:`dropout_mask`, made once per seeds tensor (one per solve, a new one when the running samples are
    sliced) and kept on it: the iterations of a solve reuse the mask instead of hashing again (the mask of a
    [256, 512] value costs about four 512 x 512 products on one CPU thread)."""
    if torch.compiler.is_compiling() or torch._C._functorch.is_batchedtensor(x):
        # under torch.compile (compile=True: the graph computes the mask; dynamo cannot trace the cache) or inside
        # vmap (a mask of that level only): not kept
        return dropout_mask(x, seeds, p=p, key=key, spatial=spatial)
    try:
        cache = seeds.__dict__.setdefault("_fpidsl_dropout_masks", {})
    except AttributeError:  # a tensor subclass or wrapper without a __dict__: no cache
        return dropout_mask(x, seeds, p=p, key=key, spatial=spatial)
    index = (tuple(x.shape), x.dtype, x.device, p, key, spatial)
    mask = cache.get(index)
    if mask is None:
        mask = cache[index] = dropout_mask(x, seeds, p=p, key=key, spatial=spatial)
    return mask
