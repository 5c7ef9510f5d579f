"""`check` sees everything `compile` and `load` would reject (issue 16, point 6): random calls of every built-in,
with arguments of every kind (tensors of several shapes and indexings, numbers, dims, shapes with symbols),
either fail at check with fpidsl's errors only, or compile, load and run forward and backward."""
from __future__ import annotations

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpidsl.loader import module_from_source
from fpidsl.compiler import check_source, compile_source
from fpidsl.errors import FpiError, FpiErrors
from fpidsl.ir.primitives import BUILTINS
from fpidsl.source import Source

HEAD = ("layer L {\n  input a : [B, 3]\n  input m : [B, 2, 3]\n  input c : [B, C]\n  state x : [B, 3] = zeros\n"
        "  state z : [B, 2, 3] = zeros\n")
TENSORS = ["x", "a", "m", "z", "c", "x[:, 0]", "m[:, 1]", "z[..., 0]", "x[0]", "m[0, 1]", "reshape(m, [B, 6])",
           "z[:, None]", "x[:, None, :]", "m[:, :, ::2]", "x[..., -1:]", "reshape(c, [B, C, 1])", "c[:, -1]"]
NUMBERS = ["0", "1", "-1", "2", "0.5", "-2", "3", "1e-3", "tanh(0.5)"]
DIMS = ["0", "1", "-1", "2", "-2", "3", "-4", "[0, 1]", "[1, 2]", "[-1, 1]", "[0]", "[2, 1]", "[0, 1, 2]",
        "[1, 0, 2]", "[2, 0, 1]", "[1, 1]"]
SHAPES = ["[B, 6]", "[B, 2, 3]", "[B, 3, 2]", "[6, B]", "[-1]", "[B, -1]", "[B, C]", "[C, B]", "[B, C, -1]",
          "[-1, 3]", "[B, 1, 3]", "[B, 3]"]
PRIMS = sorted(name for name in BUILTINS if name != "grad")


@st.composite
def calls(draw) -> str:
    prim = BUILTINS[draw(st.sampled_from(PRIMS))]
    tensor = st.sampled_from(TENSORS + NUMBERS[:2])

    def value(kind: str) -> str:
        if kind == "shape":
            return draw(st.sampled_from(SHAPES))
        if kind in ("dims", "dim", "pair"):
            return draw(st.sampled_from(DIMS))
        if kind == "int":
            return draw(st.sampled_from(NUMBERS[:6]))
        if kind == "number":
            return draw(st.sampled_from(NUMBERS))
        if kind == "bool":
            return draw(st.sampled_from(["true", "false"]))
        return draw(st.sampled_from(["none", "tanh", "x"]))

    if prim.variadic:
        items = draw(st.lists(st.sampled_from(TENSORS), min_size=1, max_size=3))
        dim = f", dim={value('dim')}" if draw(st.booleans()) else ""
        return f"{prim.name}([{', '.join(items)}]{dim})"
    args = [draw(tensor) for _ in prim.inputs]
    kwargs = [f"{a.name}={value(a.kind)}" for a in prim.attrs if a.required or draw(st.booleans())]
    return f"{prim.name}({', '.join(args + kwargs)})"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(calls(), st.sampled_from(["{}", "tanh({})", "{} * 2", "{}[..., 0]", "sum({}, dim=-1)"]))
def test_what_checks_clean_compiles_loads_and_runs(call, around):
    text = (HEAD + f"  let h = {around.format(call)}\n  update x = 0.5 * x + a + 0.1 * tanh(sum(h))\n"
            "  update z = 0.5 * z + m * 0.1 * tanh(mean(h))\n}\n")
    source = Source("p.fpi", text)
    try:
        check_source(source)
    except (FpiError, FpiErrors):
        return
    module = module_from_source(compile_source(source), "<primitive call>", "fpidsl_primitive_call")
    layer = module.LAYERS["L"](solve={"max_iter": 30}, backward={"max_iter": 30}).double()
    inputs = [torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 4, dtype=torch.float64, requires_grad=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer(*inputs)
        sum(o.sum() for o in out).backward()
    assert all(i.grad is not None for i in inputs[:2])
