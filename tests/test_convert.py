"""quantize_model / dequantize_model: in-place swaps that keep Parameters and state_dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fqtorch
from fqtorch import FQTConfig, dequantize_model, quantize_model
from fqtorch.nn import FQTConv1d, FQTConv2d, FQTLinear


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 5 * 5, 8), nn.ReLU(), nn.Linear(8, 3)),
    )


class TestQuantizeModel:
    """Every Linear/Conv is swapped for its FQT layer on the very same Parameter objects, so
    optimisers and state_dicts are unaffected; dequantize_model swaps back."""

    def test_swaps_and_keeps_parameters(self):
        model = make_model()
        params = {n: p for n, p in model.named_parameters()}
        state = copy.deepcopy(model.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
        assert quantize_model(model, FQTConfig.preset("bhq5")) is model
        assert isinstance(model[0], FQTConv2d) and isinstance(model[4][0], FQTLinear)
        assert isinstance(model[1], nn.BatchNorm2d)
        for name, p in model.named_parameters():
            assert p is params[name]
        assert list(model.state_dict()) == list(state)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key])
        model(torch.randn(4, 1, 5, 5)).sum().backward()
        optimizer.step()
        assert not torch.equal(model[4][2].weight, state["4.2.weight"])

    def test_print_shows_plan(self):
        text = str(quantize_model(make_model(), FQTConfig.preset("bhq5")))
        assert "grad_output=bhq(5, stochastic)" in text
        assert "grad_output_weight=per_column(8, stochastic)" in text

    def test_dequantize_roundtrip(self):
        model = make_model().eval()
        x = torch.randn(2, 1, 5, 5)
        before = model(x)
        dequantize_model(quantize_model(model, FQTConfig.preset("exact")))
        assert type(model[0]) is nn.Conv2d and type(model[4][2]) is nn.Linear
        torch.testing.assert_close(model(x), before)
        assert not model[0].weight.is_meta

    def test_root_layer_is_returned(self):
        layer = nn.Linear(3, 2)
        fqt = quantize_model(layer, FQTConfig())
        assert isinstance(fqt, FQTLinear) and fqt.weight is layer.weight
        assert type(dequantize_model(fqt)) is nn.Linear

    def test_conv1d(self):
        model = nn.Sequential(nn.Conv1d(2, 3, 3))
        quantize_model(model, FQTConfig())
        assert isinstance(model[0], FQTConv1d)

    def test_filter_and_per_layer_config(self):
        model = quantize_model(make_model(), FQTConfig(), module_filter_fn=lambda m, n: n != "0")
        assert type(model[0]) is nn.Conv2d and isinstance(model[4][0], FQTLinear)

        def per_layer(module, name):
            if name == "4.2":
                return None  # keep the head in float
            return FQTConfig.preset("psq6" if isinstance(module, nn.Conv2d) else "bhq4")

        model = quantize_model(make_model(), per_layer)
        assert type(model[4][2]) is nn.Linear
        assert model[0].config.grad_quantizer == "psq" and model[4][0].config.grad_bits == 4
        assert model[0].name == "0" and model[4][0].name == "4.0"

    def test_training_mode_is_kept(self):
        model = make_model().eval()
        quantize_model(model, FQTConfig())
        assert not model[0].training

    def test_nothing_matched_raises(self):
        with pytest.raises(ValueError, match="accepted none"):
            quantize_model(make_model(), FQTConfig(), module_filter_fn=lambda m, n: False)
        with pytest.raises(ValueError, match="there are none"):
            quantize_model(nn.Sequential(nn.ReLU()), FQTConfig())

    def test_bad_arguments(self):
        with pytest.raises(TypeError, match="FQTConfig or a callable"):
            quantize_model(make_model(), "bhq5")
        with pytest.raises(TypeError, match="must return an FQTConfig"):
            quantize_model(make_model(), lambda m, n: "bhq5")

    def test_attention_out_proj_left_alone(self):
        mha = nn.MultiheadAttention(8, 2)
        model = nn.Sequential()
        model.add_module("attn", mha)
        model.add_module("head", nn.Linear(8, 2))
        quantize_model(model, FQTConfig())
        assert type(mha.out_proj) is not FQTLinear


def test_public_api_names():
    for name in (
        "FQTConfig",
        "quantize_model",
        "dequantize_model",
        "register_quantizer",
        "get_quantizer",
        "list_quantizers",
    ):
        assert hasattr(fqtorch, name)


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, torch; import fqtorch; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'matplotlib' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
