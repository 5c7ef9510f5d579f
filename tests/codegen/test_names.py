"""User names never collide with what the emitted code uses itself (issue 16, points 2 and 4)."""
from __future__ import annotations

import keyword

import pytest
import torch

import fpidsl
from fpidsl.codegen.namespace import EMITTER_NAMES
from fpidsl.compiler import check_source
from fpidsl.errors import FpiErrors
from fpidsl.passes.check_python_names import RESERVED
from fpidsl.source import Source


USABLE = sorted(n for n in EMITTER_NAMES if not keyword.iskeyword(n) and n not in ("_", "like"))


def _spec(names: list[str]) -> str:
    """A layer whose inputs, lets and state use every identifier the emitter uses; the map reads each let,
    and its gradient needs every piece (so ``vjp_args``'s ``needs`` matters)."""
    lets = "\n".join(f"  let {n} = tanh(0.3 * x + {i + 1} * 0.01 * needs_in)" for i, n in enumerate(names))
    total = " + ".join(names)
    return f"""
layer States {{
  input needs_in : [B, 3]
  input like : [B, 3]
  state x : [B, 3] = zeros
  param W : tensor [3, 3] = normal(0, 0.2)
{lets}
  update x = 0.1 * ({total}) @ W + like
  output x
}}
"""


def test_a_layer_named_with_every_emitter_identifier_compiles_and_gets_exact_gradients(tmp_path):
    path = tmp_path / "names.fpi"
    path.write_text(_spec(USABLE))
    m = fpidsl.load(str(path))(solve={"tol": 1e-12, "max_iter": 500},
                               backward={"tol": 1e-12, "max_iter": 500}).double()
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    like = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def unrolled(z, like, W):
        x = torch.zeros(4, 3, dtype=torch.float64)
        for _ in range(200):
            x = m.step(x, z, like, W)
        return x

    torch.autograd.gradcheck(lambda z, like: m(z, like), (z, like))
    for needs in ((True, False), (False, True), (True, True)):
        args = [t for t, n in zip((z, like), needs) if n]
        got = torch.autograd.grad(m(z, like).square().sum(), args)
        want = torch.autograd.grad(unrolled(z, like, m.W).square().sum(), args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_a_let_named_needs_gets_its_own_name_in_vjp_args():
    from fpidsl.codegen.emit import emit_module

    import ast

    code = emit_module(check_source(Source("n.fpi", _spec(["needs", "saved", "c", "states"]))))
    functions = [f for f in ast.walk(ast.parse(code)) if isinstance(f, ast.FunctionDef)]
    assert {"step", "prepare", "vjp_state", "vjp_args", "outputs", "init_states"} <= {f.name for f in functions}
    for f in functions:
        arguments = {a.arg for a in f.args.args}
        stored = {n.id for n in ast.walk(f) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        assert not arguments & stored, f"{f.name} rebinds its argument(s) {arguments & stored}"


@pytest.mark.parametrize("name, message", [
    ("class", "is a Python keyword"),
    ("lambda", "is a Python keyword"),
    ("_hoisted", "names starting with '_'"),
    ("_forward_hooks", "names starting with '_'"),
    ("__builtins__", "names starting with '_'"),
    ("hoist", "would replace the compiled layer's own attribute"),
    ("iterate", "would replace the compiled layer's own attribute"),
    ("SAMPLEWISE", "would replace the compiled layer's own attribute"),
    ("HOIST_BATCHED", "would replace the compiled layer's own attribute"),
    ("training", "would replace the compiled layer's own attribute"),
])
def test_params_that_cannot_be_attributes_are_refused_with_a_position(name, message):
    text = f"layer L {{\n  input a : [B, 2]\n  state x : [B, 2] = zeros\n  param {name} : tensor [2, 2] = zeros\n" \
           f"  update x = 0.5 * x @ {name} + a\n}}\n"
    with pytest.raises(FpiErrors) as info:
        check_source(Source("p.fpi", text))
    (err,) = info.value.errors
    assert message in err.message
    assert (err.span.line, err.span.col) == (4, 3)
    assert type(err).__name__ == "NameErr"


def test_a_layer_named_like_a_python_internal_loads(tmp_path):
    path = tmp_path / "dunder.fpi"
    path.write_text("layer __builtins__ {\n  input a : [B, 2]\n  state x : [B, 2] = zeros\n"
                    "  update x = 0.5 * x + a\n}\n")
    cls = fpidsl.load(str(path), name="__builtins__")
    out = cls()(torch.ones(3, 2))
    torch.testing.assert_close(out, torch.full((3, 2), 2.0), rtol=1e-4, atol=1e-4)


def test_the_reserved_attribute_list_covers_every_public_attribute_of_a_compiled_layer():
    """A new attribute of the runtime's CompiledLayer (or of the emitted class) must be added to RESERVED, or a
    param of that name would silently replace it."""
    cls = fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")
    layer = cls()
    public = {n for n in dir(layer) if not n.startswith("_")}
    params = {n.split(".")[0] for n, _ in layer.named_parameters()}
    missing = sorted(public - RESERVED - params)
    assert not missing, f"add to fpidsl/passes/check_python_names.py: {missing}"
