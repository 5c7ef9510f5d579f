"""Outside modules (`param f : extern ...`): a user's nn.Module inside g, with exact derivatives of every order
(against the same map written with Linear params, and against unrolled autograd), registered as a submodule, its
output shape checked at call time, and clear errors for a missing, wrong or misspelt module."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fpidsl
from fpidsl.runtime.extern import ExternError, ExternFunction

from .helpers import TIGHT, assert_matches_unrolled_autograd, the_one_error

EXTERN_SPEC = """
layer WithExtern {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param f : extern ([B, 4], [B, 4]) -> [B, 4]
  update x = 0.5 * f(x, a)
}
"""

LINEAR_SPEC = """
layer WithLinear {
  input a : [B, 4]
  state x : [B, 4] = zeros
  param l1 : Linear(8, 6)
  param l2 : Linear(6, 4)
  update x = 0.5 * tanh(l2(tanh(l1(cat([x, a], dim=-1)))))
}
"""


class MLP(nn.Module):
    """The map of LINEAR_SPEC's update, as an outside module."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 6)
        self.l2 = nn.Linear(6, 4)

    def forward(self, x, a):
        return torch.tanh(self.l2(torch.tanh(self.l1(torch.cat([x, a], -1)))))


def load(tmp_path, text: str, name: str = "spec.fpi"):
    path = tmp_path / name
    path.write_text(text)
    return fpidsl.load(path)


@pytest.fixture()
def pair(tmp_path):
    """The extern layer and the Linear layer with the same weights, in float64."""
    torch.manual_seed(0)
    mlp = MLP().double()
    ext = load(tmp_path, EXTERN_SPEC)(f=mlp, solve=TIGHT, backward=TIGHT).double()
    lin = load(tmp_path, LINEAR_SPEC, "linear.fpi")(solve=TIGHT, backward=TIGHT).double()
    lin.load_state_dict({k: v for k, v in mlp.state_dict().items()})
    return ext, lin, mlp


def test_the_module_is_a_submodule(pair):
    ext, _, mlp = pair
    assert ext.f is mlp
    assert list(ext.state_dict()) == ["f.l1.weight", "f.l1.bias", "f.l2.weight", "f.l2.bias"]
    assert {id(p) for p in ext.parameters()} == {id(p) for p in mlp.parameters()}
    assert ext.float().f.l1.weight.dtype == torch.float32  # .to reaches it


def test_extern_equals_the_same_map_written_with_linear_params(pair):
    ext, lin, mlp = pair
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ext(a), lin(a), rtol=1e-12, atol=1e-13)
    w = torch.randn(3, 4, dtype=torch.float64)
    for order in (1, 2):
        got = _derivatives(ext, a, list(mlp.parameters()), w, order)
        want = _derivatives(lin, a, [lin.l1.weight, lin.l1.bias, lin.l2.weight, lin.l2.bias], w, order)
        for g, v in zip(got, want):
            torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-11)


def _derivatives(layer, a, params, w, order):
    """d/d(a, params) of sum(w * layer(a)); order 2: of the squared norm of the first derivative in a."""
    (ga,) = torch.autograd.grad((w * layer(a)).sum(), a, create_graph=True)
    if order == 1:
        return [ga, *torch.autograd.grad((w * layer(a)).sum(), params)]
    return list(torch.autograd.grad((ga ** 2).sum(), [a, *params]))


def test_gradcheck_and_gradgradcheck(pair):
    ext, _, _ = pair
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ext, (a,))
    assert torch.autograd.gradgradcheck(ext, (a,))


def test_the_fixed_point_and_its_derivatives_match_unrolled_autograd(pair):
    ext, _, _ = pair
    assert_matches_unrolled_autograd(ext, torch.randn(3, 4, dtype=torch.float64, requires_grad=True))


def test_an_optimizer_trains_the_module(pair):
    ext, _, mlp = pair
    before = mlp.l1.weight.detach().clone()
    opt = torch.optim.SGD(ext.parameters(), lr=0.1)
    a = torch.randn(3, 4, dtype=torch.float64)
    ext(a).square().sum().backward()
    opt.step()
    assert not torch.equal(before, mlp.l1.weight)


def test_the_layer_pickles_with_its_module(pair):
    ext, _, _ = pair
    a = torch.randn(3, 4, dtype=torch.float64)
    for clone in (copy.deepcopy(ext), pickle.loads(pickle.dumps(ext))):
        assert clone.f is not ext.f
        torch.testing.assert_close(clone(a), ext(a))


def test_samplewise_is_declared(tmp_path):
    mixed = load(tmp_path, EXTERN_SPEC)
    samplewise = load(tmp_path, EXTERN_SPEC.replace("extern (", "extern samplewise ("), "sw.fpi")
    assert not mixed.SAMPLEWISE and samplewise.SAMPLEWISE


def test_a_samplewise_extern_follows_the_running_samples(tmp_path):
    """Declared samplewise, the extern sees only the samples still running (its output checked against their
    number) and gives the joint solve's fixed points and gradients."""
    torch.manual_seed(0)
    mlp = MLP().double()
    sw = load(tmp_path, EXTERN_SPEC.replace("extern (", "extern samplewise ("), "sw.fpi")(
        f=mlp, solve=TIGHT, backward=TIGHT).double()
    joint = load(tmp_path, EXTERN_SPEC)(f=mlp, solve=TIGHT, backward=TIGHT).double()
    a = torch.cat([torch.zeros(1, 4), 3 * torch.randn(4, 4)]).double().requires_grad_()
    x = sw(a)
    assert sw.stats.forward.iterations.min() < sw.stats.forward.iterations.max()
    torch.testing.assert_close(x, joint(a), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(x.sum(), a)[0], torch.autograd.grad(joint(a).sum(), a)[0],
                               rtol=1e-9, atol=1e-11)


def test_a_function_as_an_extern(tmp_path):
    cls = load(tmp_path, EXTERN_SPEC)
    layer = cls(f=ExternFunction(lambda x, a: torch.tanh(x + a)), solve=TIGHT).double()
    a = torch.randn(3, 4, dtype=torch.float64)
    x = layer(a)
    torch.testing.assert_close(x, 0.5 * torch.tanh(x + a))


# ------------------------------------------------------------------------------------------------ mistakes


def test_a_wrong_output_shape_is_reported_at_the_declaration(tmp_path):
    cls = load(tmp_path, EXTERN_SPEC)
    layer = cls(f=ExternFunction(lambda x, a: torch.cat([x, a], -1))).double()
    with pytest.raises(ExternError, match=r"spec\.fpi:5:3: f is declared to return \[B, 4\] \(B = 3\), but returned "
                                          r"a tensor of shape \[3, 8\]"):
        layer(torch.randn(3, 4, dtype=torch.float64))


POOLING_SPEC = """layer Pooled {
  input a : [B, C, H, W]
  param f : extern samplewise [B, C, H, W] -> [B, C, H/2, W/2]
  state x : [B, C, H/2, W/2]
  update x = 0.5 * tanh(x) + f(a)
}
"""


def test_a_computed_output_size_is_checked_with_its_symbols(tmp_path):
    cls = load(tmp_path, POOLING_SPEC, "pooled.fpi")
    a = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x = cls(f=ExternFunction(lambda v: torch.nn.functional.avg_pool2d(v, 2)), solve=TIGHT).double()(a)
    torch.testing.assert_close(x, 0.5 * torch.tanh(x) + torch.nn.functional.avg_pool2d(a, 2))
    crop = cls(f=ExternFunction(lambda v: v[:, :, :3, :3])).double()
    with pytest.raises(ExternError, match=r"pooled\.fpi:3:3: f is declared to return \[B, C, H/2, W/2\] \(B = 2, "
                                          r"C = 3, H = 8, W = 8\), but returned a tensor of shape \[2, 3, 3, 3\]"):
        crop(a)


def test_constructor_mistakes(tmp_path):
    cls = load(tmp_path, EXTERN_SPEC)
    with pytest.raises(TypeError, match=r"WithExtern \(spec\.fpi:5:3\) needs the module f, declared "
                                        r"`extern \(\[B, 4\], \[B, 4\]\) -> \[B, 4\]`: pass it as WithExtern\(f=module\)"):
        cls()
    with pytest.raises(TypeError, match=r"f must be a torch\.nn\.Module .* got function; wrap a function as "
                                        r"fpidsl\.runtime\.extern\.ExternFunction\(fn\)"):
        cls(f=lambda x, a: x)
    with pytest.raises(TypeError, match=r"WithExtern\(\) has no option 'g'; it takes f, solve, backward"):
        cls(g=MLP())
    with pytest.raises(TypeError, match=r"has no option 'slove' \(did you mean 'solve'\?\)"):
        cls(f=MLP(), slove={})


@pytest.mark.parametrize("body, line, col, fragment", [
    ("update x = f(x)", 6, 14, "f (declared extern ([B, 4], [B, 4]) -> [B, 4]) takes 2 arguments, but 1 was given"),
    ("update x = f(x, a[:, 0:2])", 6, 19, "argument 2 of f (declared extern ([B, 4], [B, 4]) -> [B, 4]) must have "
                                          "shape [B, 4], found [B, 2]"),
    ("update x = f + x", 6, 14, "f is an extern module, not a value"),
    ("update x = f(x, z=a)", 6, 19, "f is an extern module: it takes its inputs by position"),
])
def test_spec_mistakes_are_positioned(body, line, col, fragment):
    text = EXTERN_SPEC.replace("update x = 0.5 * f(x, a)", body)
    error = the_one_error(text)
    assert (error.span.line, error.span.col) == (line, col)
    assert fragment in error.message


def test_a_declared_size_must_be_a_dimension_of_an_input():
    error = the_one_error(EXTERN_SPEC.replace("-> [B, 4]", "-> [B, D]"))
    assert (error.kind, error.span.line, error.span.col) == ("shape", 5, 44)
    assert "the dimension D of extern f is not a dimension of any input" in error.message


# ------------------------------------------------------------------------------------------------ forms and tools

YAML_SPEC = """fpi: 1
layers:
  WithExtern:
    inputs: {a: "[B, 4]"}
    states: {x: {shape: "[B, 4]", init: zeros}}
    params: {f: "extern ([B, 4], [B, 4]) -> [B, 4]"}
    updates: {x: "0.5 * f(x, a)"}
"""


def _without_positions(graph) -> list[str]:
    return [line.split("#")[0].rstrip() for line in graph.format().splitlines()[1:]]


def test_the_yaml_form_gives_the_same_graph():
    from fpidsl.compiler import check_source
    from fpidsl.source import Source

    fpi = check_source(Source("e.fpi", EXTERN_SPEC)).graphs["WithExtern"]
    yaml = check_source(Source("e.yaml", YAML_SPEC)).graphs["WithExtern"]
    assert _without_positions(fpi) == _without_positions(yaml)
    assert "call extern(n2, n3, n1, n0)" in "\n".join(_without_positions(fpi))


def test_fmt_unparse_and_conversion_keep_the_declaration():
    from fpidsl.frontend.parser import parse_fpi
    from fpidsl.source import Source
    from fpidsl.tools import unparse
    from fpidsl.tools.fmt import format_source
    from fpidsl.tools.yaml_convert import convert

    text = "layer L {\n  input a : [B, 4]\n  state x : [B, 4]\n  param f:extern samplewise [B,4]->[B,4]\n" \
           "  update x = f(x)\n}\n"
    formatted = format_source(Source("l.fpi", text))
    assert "  param f : extern samplewise [B, 4] -> [B, 4]\n" in formatted
    decl = parse_fpi(Source("l.fpi", text)).layers[0].decls[2]
    assert unparse.decl(decl) == "param f : extern samplewise [B, 4] -> [B, 4]"
    assert 'f: "extern samplewise [B, 4] -> [B, 4]"' in convert(Source("l.fpi", text), "yaml")


def test_the_language_server_knows_externs():
    from fpidsl.tools.analysis import analyze, completions, hover

    text = EXTERN_SPEC
    line = text.splitlines().index("  param f : extern ([B, 4], [B, 4]) -> [B, 4]") + 1
    shown = hover(analyze("e.fpi", text), (line, 9))
    assert "param **f** : `extern ([B, 4], [B, 4]) -> [B, 4]`" in shown.markdown
    typed = "layer L {\n  param f : "
    assert "extern" in {c.label for c in completions(typed, (2, 13))}


def test_explain_and_the_lipschitz_report_name_the_extern():
    import io

    from fpidsl.compiler import check_source
    from fpidsl.lipschitz_report import report_lipschitz
    from fpidsl.source import Source
    from fpidsl.tools.explain import explain_layer

    checked = check_source(Source("e.fpi", EXTERN_SPEC))
    text = explain_layer(checked, "WithExtern")
    assert "f : extern ([B, 4], [B, 4]) -> [B, 4]  (an nn.Module given at construction)" in text
    out = io.StringIO()
    assert report_lipschitz(checked, out) == 1
    assert "extern at 6:20 has no Lipschitz rule" in out.getvalue()
