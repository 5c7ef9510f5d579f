"""The passes on small specs: what the graphs look like after checking."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fpidsl.compiler import check_file
from fpidsl.ir.graph import TensorInit
from fpidsl.ir.shapes import ShapeCtx, dim_floordiv
from fpidsl.passes.settings import SETTING_KEYS

from .helpers import check, graph, layer, nodes

from ..conftest import shipped_specs


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.name)
def test_shipped_specs_check_clean(path):
    checked = check_file(str(path))
    for g in checked.graphs.values():
        g.lint()
        for info in g.states.values():
            assert g.shape(g.args(info.update)[0]) == info.shape


def test_optical_flow_down_and_up_gives_back_h(root):
    (g,) = check_file(str(root / "specs" / "optical_flow.fpi")).graphs.values()
    (down,) = nodes(g, prim="conv2d")
    (up,) = nodes(g, prim="conv_transpose2d")
    assert g.shape(down) == ("B", 4, dim_floordiv("H", 2, ShapeCtx()), dim_floordiv("W", 2, ShapeCtx()))
    assert g.shape(up) == ("B", 2, "H", "W")
    assert [str(a) for a in g.assumptions] == ["H % 2 == 0", "W % 2 == 0"]


def test_yaml_and_fpi_give_the_same_graph(root):
    fpi = check_file(str(root / "specs" / "denoise.fpi")).graphs["DenoiseNN"].format()
    yml = check_file(str(root / "specs" / "denoise.yaml")).graphs["DenoiseNN"].format()

    def strip(text):
        return re.sub(r"#.*", "", text).rstrip()

    assert strip(fpi).split("\n")[1:-1] == strip(yml).split("\n")[1:-1]  # all but header and output lines


def test_module_lowering():
    g = graph(layer("param fc : Linear(20, 10, bias=false, norm=spectral)\n"
                    "  param cv : Conv2d(1, 4, [3, 5], stride=[1, 2], padding=[1, 2])\n"
                    "  update x = fc(cat([x, a], dim=-1))", ))
    assert g.modules["fc"].bias is False and g.modules["fc"].norm == "spectral"
    assert list(g.params) == ["fc.weight", "cv.weight", "cv.bias"]
    assert g.shape(g.params["cv.weight"]) == (4, 1, 3, 5)
    assert g.modules["cv"].stride == (1, 2) and g.modules["cv"].format() == \
        "Conv2d(1, 4, [3, 5], stride=[1, 2], padding=[1, 2])"
    (lin,) = nodes(g, prim="linear")
    assert len(g.args(lin)) == 2 and g.node(lin)["module"] == "fc"


def test_descend_lowers_to_a_gradient_step():
    g = graph(layer("param w : tensor [10] = ones\n"
                    "  energy E = sum(square(x - a) * w, dim=-1)\n"
                    "  descend x on E step 0.1"))
    info = g.states["x"]
    (sub,) = g.args(info.update)
    assert g.node(sub)["prim"] == "sub"
    x, scaled = g.args(sub)
    assert x == info.node
    step, grad = g.args(scaled)
    assert g.node(step)["value"] == 0.1
    assert g.node(grad)["prim"] == "grad" and g.args(grad) == [g.energies["E"], info.node]
    assert g.shape(grad) == ("B", 10)
    assert g.node(g.params["w"])["init"] == TensorInit("ones")


def test_lets_may_come_in_any_order_and_are_built_once():
    g = graph(layer("update x = h + h\n  let h = relu(k)\n  let k = a * 2"))
    assert list(g.lets) == ["k", "h"]
    assert len(nodes(g, prim="relu")) == 1
    assert g.node(g.lets["h"])["name"] == "h"


def test_consts_fold_and_size_dimensions():
    g = graph("layer L {\n  const N = 5\n  const lr = 0.1 / 2\n  input a : [B, N]\n  state x : [B, N]\n"
              "  param w : tensor [N, N] = normal(0, lr)\n  update x = x - lr * (x @ w - a)\n}\n")
    assert g.shape(g.inputs["a"]) == ("B", 5)
    (c,) = nodes(g, op="const")
    assert g.node(c)["value"] == 0.05
    assert g.node(g.params["w"])["init"] == TensorInit("normal", (0.0, 0.05))


def test_fn_inlining():
    text = ("fn act(u, s) = leaky_relu(u, slope=s) * 2\n"
            "fn block(u) = act(u, 0.1) + act(u, 0.2)\n" + layer("update x = block(x + a)"))
    g = graph(text)
    assert len(nodes(g, prim="add")) == 2  # x + a built once, plus the sum in block
    slopes = [g.node(n)["attrs"]["slope"] for n in nodes(g, prim="leaky_relu")]
    assert slopes == [0.1, 0.2]
    leaky = nodes(g, prim="leaky_relu")[0]
    assert g.node(leaky)["inlined"][0] == "act"
    assert g.node(leaky)["span"].line == 1  # nodes of an fn body point into the body
    assert g.arg_spans(leaky)[0].line == 6  # ... and its parameter to the call-site argument


def test_state_inits():
    g = graph("layer L {\n  input a : [B, 10]\n  param b : tensor [10]\n  state x : [B, 10] = a\n"
              "  state y : [B, 10] = ones\n  state z : [B, 10] = b\n  state u : [B, 10] = -0.5\n"
              "  update x = x\n  update y = y\n  update z = z\n  update u = u\n}\n")
    inits = {n: g.node(i.init) for n, i in g.states.items()}
    assert g.args(g.states["x"].init) == [g.inputs["a"]]
    assert inits["y"]["fill"] == 1 and inits["u"]["fill"] == -0.5
    assert g.args(g.states["z"].init) == [g.params["b"]]  # broadcast to the state's shape


def test_outputs():
    g = graph(layer("update x = a\n  output x, sum(x, dim=-1)"))
    assert [g.shape(n) for n in g.args(g.output)] == [("B", 10), ("B",)]
    g = graph(layer("update x = a\n  state y : [B] = zeros\n  update y = y", head="input a : [B, 10]\n"
                    "  state x : [B, 10]"))
    assert g.args(g.output) == [g.states["x"].node, g.states["y"].node]


def test_grad_anywhere_and_scalar_energies():
    g = graph(layer("energy E = sum(square(x))\n  let g = grad(E, x)\n  update x = x - 0.5 * g"))
    assert g.shape(g.energies["E"]) == ()
    assert g.shape(g.lets["g"]) == ("B", 10)


def test_indexing_and_reshape():
    g = graph(layer("let p = x[:, 0:3]\n  let q = x[..., -1]\n  let r = reshape(x, [B, 2, -1])\n"
                    "  let s = flatten(r)\n  let t = transpose(r, 1, 2)\n  update x = x"))
    assert g.shape(g.lets["p"]) == ("B", 3)
    assert g.shape(g.lets["q"]) == ("B",)
    assert g.shape(g.lets["r"]) == ("B", 2, 5)
    assert g.shape(g.lets["s"]) == ("B", 10)
    assert g.shape(g.lets["t"]) == ("B", 5, 2)


def test_settings():
    g = graph(layer("update x = a\n  solve { method = anderson(m=3, beta=0.5), tol = 1e-8, max_iter = 50,"
                    " on_fail = raise }\n  backward { method = anderson, lam = 0.01, criterion = absolute }"))
    assert g.solve == {"method": "anderson", "m": 3, "beta": 0.5, "tol": 1e-8, "max_iter": 50, "on_fail": "raise"}
    assert g.backward == {"method": "anderson", "lam": 0.01, "criterion": "absolute"}
    assert g.solve_spans["tol"].line == 5
    assert set(g.solve) <= set(SETTING_KEYS)  # the language's keys


def test_settings_keys_and_rules_match_the_runtime():
    from fpidsl.passes import settings as language
    from fpidsl.runtime import settings as runtime

    assert language.SETTING_KEYS == runtime.SETTING_KEYS
    assert (language.METHODS, language.CRITERIA, language.ON_FAIL) == \
        (runtime.METHODS, runtime.CRITERIA, runtime.ON_FAIL)
    assert language.DEFAULT_MAX_ITER == runtime.FORWARD_DEFAULTS.max_iter
    assert (language.METHOD_OPTIONS, language.MODE_OPTIONS) == (runtime.METHOD_OPTIONS, runtime.MODE_OPTIONS)
    takes = {"m": (runtime.FORWARD_DEFAULTS, {"method": "anderson"}),  # a method or mode that takes the option
             "lam": (runtime.FORWARD_DEFAULTS, {"method": "anderson"}),
             "k": (runtime.BACKWARD_DEFAULTS, {"mode": "phantom"}),
             "tau": (runtime.BACKWARD_DEFAULTS, {"mode": "phantom"})}
    for key, (rule, ok, integer) in language._NUMBERS.items():
        base, context = takes.get(key, (runtime.FORWARD_DEFAULTS, {}))
        for value in (-1, 0, 0.5, 1, 2, 1e-9):
            if integer and not isinstance(value, int):
                continue
            try:
                base.merged({**context, key: value, **({"min_iter": 0} if key == "max_iter" else {})})
                accepted = True
            except runtime.SettingsError:
                accepted = False
            assert accepted == ok(value), (key, value)


def test_several_layers_and_errors_in_each_are_all_reported():
    from .helpers import errors

    text = layer("update x = y") + layer("update x = z").replace("layer L", "layer M")
    found = errors(text)
    assert [e.message for e in found] == ["unknown name y", "unknown name z"]


def test_checking_does_not_import_torch(root):
    code = ("import sys; from fpidsl.compiler import check_file; "
            f"check_file({str(root / 'specs' / 'optical_flow.fpi')!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_checked_dict_preserves_layer_order():
    text = layer("update x = a") + layer("update x = a").replace("layer L", "layer A")
    assert list(check(text)) == ["L", "A"]
