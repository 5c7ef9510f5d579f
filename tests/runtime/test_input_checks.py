"""Dtype and device mismatches of a compiled layer's inputs raise LayerInputError naming the input."""
import pytest
import torch

import fpidsl
from fpidsl import LayerInputError

TWO_INPUTS = """
layer Two {
  input a : [B, 4]
  input b : [B, 4]
  state x : [B, 4] = zeros
  update x = tanh(0.5 * x + a * b)
  output x
}
"""


@pytest.fixture(scope="module")
def box():
    return fpidsl.load("specs/box_projection.fpi", name="BoxProjectionNN")


def test_float64_layer_given_float32_input(box):
    layer = box().double()
    with pytest.raises(LayerInputError, match=r"input 'a' is float32 but the layer's parameters are float64: "
                                              r"convert the input \(a.to\(torch.float64\)\) or the layer"):
        layer(torch.randn(2, 10))


def test_integer_input(box):
    with pytest.raises(LayerInputError, match=r"input 'a' has dtype int64; .* pass a.to\(torch.float32\)"):
        box()(torch.ones(2, 10, dtype=torch.int64))


def test_meta_input_and_meta_parameters(box):
    with pytest.raises(LayerInputError, match="input 'a' is on the meta device"):
        box()(torch.randn(2, 10, device="meta"))
    with pytest.raises(LayerInputError, match="the layer's parameters are on the meta device"):
        box().to("meta")(torch.randn(2, 10))


def test_inputs_of_a_parameterless_layer_must_agree(tmp_path):
    path = tmp_path / "two.fpi"
    path.write_text(TWO_INPUTS)
    layer = fpidsl.load(str(path))()
    with pytest.raises(LayerInputError, match=r"Two \(two.fpi\): input 'b' is float64 but input 'a' is float32"):
        layer(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))
    assert layer(torch.randn(2, 4), torch.randn(2, 4)).shape == (2, 4)
