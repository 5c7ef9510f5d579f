"""Dtype and device checks of a compiled layer's inputs, before anything is computed from them.

Shapes are checked against the spec by :func:`fpidsl.runtime.layer.bind_dims`; here every input must hold
values (not the ``meta`` device), be floating point, and have the dtype and device of the layer's parameters
(of the first input, for a layer without parameters); an ``int`` / ``bool`` input (indices) must be int64 / bool, a
``sparse`` input a sparse COO or CSR tensor that does not require grad, and any other input dense. A mismatch raises
:class:`~fpidsl.runtime.layer.LayerInputError` naming the input and saying how to convert, instead of a raw
torch error from deep inside the emitted code ("mat1 and mat2 must have the same dtype").
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .layer import LayerInputError


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


INDEX_DTYPES = {"int": torch.int64, "bool": torch.bool}
SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def _layout(t: torch.Tensor) -> str:
    return str(t.layout).replace("torch.", "")


def check_sparse_input(name: str, t: torch.Tensor, spec: str) -> None:
    """A ``sparse`` input: a sparse COO or CSR tensor, given no gradient (spmm differentiates in its dense
    operand only), so one that requires grad is refused rather than silently left without one."""
    if t.layout not in SPARSE_LAYOUTS:
        raise LayerInputError(
            f"{spec}: input {name!r} is declared sparse but got a {_layout(t)} tensor: pass {name}.to_sparse() "
            f"(COO) or {name}.to_sparse_csr()")
    if t.requires_grad:
        raise LayerInputError(
            f"{spec}: input {name!r} is sparse and requires grad, but a sparse input gets no gradient (spmm "
            f"differentiates in its dense operand x only): pass {name}.detach()")
    if t.layout == torch.sparse_csr and torch._C._functorch.peek_interpreter_stack() is not None:
        raise LayerInputError(
            f"{spec}: input {name!r} is a CSR matrix inside a torch.func transform, where torch cannot wrap CSR "
            f"tensors (\"Sparse CSR tensors do not have strides\"): pass {name}.to_sparse_coo()")


def check_index_inputs(inputs: Mapping[str, torch.Tensor], index_inputs: Mapping[str, str], spec: str) -> None:
    """An ``int`` input must hold int64 indices and a ``bool`` input booleans; a float tensor there (or an index
    where floats are declared, :func:`check_dtypes_and_devices`) is named with the conversion to write."""
    for name, kind in index_inputs.items():
        t = inputs[name]
        if kind == "sparse":
            check_sparse_input(name, t, spec)
            continue
        want = INDEX_DTYPES[kind]
        if t.dtype != want:
            convert = f"{name}.long()" if kind == "int" else f"{name} != 0"
            raise LayerInputError(
                f"{spec}: input {name!r} is declared {kind} ({'indices' if kind == 'int' else 'a mask'}) but got a "
                f"tensor of dtype {_dtype(t.dtype)}: "
                f"pass {convert}" + (" (a float tensor cannot index)" if t.is_floating_point() else ""))


def check_dtypes_and_devices(inputs: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor], spec: str,
                             index_inputs: Mapping[str, str] | None = None) -> None:
    """Raise :class:`LayerInputError` for an input without values, not floating point, or whose dtype or device
    differs from the parameters' (see the module's doc). ``index_inputs`` (name -> ``int`` / ``bool``) are
    checked by :func:`check_index_inputs` and only for their device here."""
    index_inputs = index_inputs or {}
    check_index_inputs(inputs, index_inputs, spec)
    floats = {name: t for name, t in inputs.items() if index_inputs.get(name) in (None, "sparse")}  # not indices
    for p in params:
        if p.device.type == "meta":
            raise LayerInputError(
                f"{spec}: the layer's parameters are on the meta device (shapes without values): give them "
                "values first (layer.to_empty(device=...) then load_state_dict, or load_state_dict(..., assign=True))")
    target = _dtype(params[0].dtype) if params else "float32"
    for name, t in floats.items():
        if t.device.type == "meta":
            raise LayerInputError(
                f"{spec}: input {name!r} is on the meta device (a shape without values); a fixed point is "
                "computed from values: pass a tensor on the layer's device")
        if t.layout in SPARSE_LAYOUTS and name not in index_inputs:
            raise LayerInputError(
                f"{spec}: input {name!r} is declared dense but got a {_layout(t)} tensor: pass {name}.to_dense(), "
                f"or declare it `input {name} : sparse [...]` and multiply by it with spmm({name}, x)")
        if not (t.is_floating_point() or t.is_complex()):
            raise LayerInputError(
                f"{spec}: input {name!r} has dtype {_dtype(t.dtype)}; the layer computes in floating point: "
                f"pass {name}.to(torch.{target}), or declare it `input {name} : int [...]` if it holds indices")
    if params:
        ref_dtype, ref_device, ref = params[0].dtype, params[0].device, "the layer's parameters are"
    elif floats:
        first = next(iter(floats))
        ref_dtype, ref_device, ref = floats[first].dtype, floats[first].device, f"input {first!r} is"
    else:
        return
    for name, t in inputs.items():
        if name in floats and t.dtype != ref_dtype:
            raise LayerInputError(
                f"{spec}: input {name!r} is {_dtype(t.dtype)} but {ref} {_dtype(ref_dtype)}: convert the input "
                f"({name}.to(torch.{_dtype(ref_dtype)})) or the layer (layer.to(torch.{_dtype(t.dtype)}))")
        if t.device != ref_device:
            raise LayerInputError(
                f"{spec}: input {name!r} is on {t.device} but {ref} on {ref_device}: move the input "
                f"({name}.to({str(ref_device)!r})) or the layer (layer.to({str(t.device)!r}))")
