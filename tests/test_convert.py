"""quantize_model / dequantize_model: in-place swaps that keep Parameters and state_dict."""

from __future__ import annotations

import copy
import functools
import logging
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fqtorch
from fqtorch import FQTConfig, dequantize_model, quantize_model
from fqtorch.nn import FQTConv1d, FQTConv2d, FQTLinear
from fqtorch.quantizers.callers import FQTWarning


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
        with pytest.raises(ValueError, match=r"no layer of a registered type \(nn.Conv1d"):
            quantize_model(nn.Sequential(nn.ReLU()), FQTConfig())
        with pytest.raises(ValueError, match=r"stay float: 0 \(nn.LSTM\)"):
            quantize_model(nn.Sequential(nn.LSTM(3, 4)), FQTConfig())

    def test_second_call_says_already_quantized(self):
        model = quantize_model(make_model(), FQTConfig())
        with pytest.raises(ValueError, match=r"already quantized \(3 FQT layers: '0', '4.0'"):
            quantize_model(model, FQTConfig.preset("bhq5"))
        quantize_model(dequantize_model(model), FQTConfig.preset("bhq5"))  # after a swap back
        assert model[0].config.grad_quantizer == "bhq"

    def test_bad_arguments(self):
        with pytest.raises(TypeError, match="FQTConfig or a callable"):
            quantize_model(make_model(), "bhq5")
        with pytest.raises(TypeError, match="must return an FQTConfig"):
            quantize_model(make_model(), lambda m, n: "bhq5")
        with pytest.raises(TypeError, match="module_filter_fn must be callable"):
            quantize_model(make_model(), FQTConfig(), module_filter_fn="0")
        with pytest.raises(TypeError, match="layers must be a mapping"):
            quantize_model(make_model(), FQTConfig(), layers=[nn.Linear])
        with pytest.raises(TypeError, match="must be callable or None"):
            quantize_model(make_model(), FQTConfig(), layers={nn.Linear: "FQTLinear"})

    def test_shared_layer_stays_shared(self):
        shared = nn.Linear(4, 4)
        model = nn.Sequential(shared, nn.ReLU(), shared)
        quantize_model(model, FQTConfig())
        assert isinstance(model[0], FQTLinear) and model[2] is model[0]
        dequantize_model(model)
        assert type(model[0]) is nn.Linear and model[2] is model[0]


class TestFloatLayerChecks:
    """FQT layers are also the float layer type, so isinstance checks in user code still hold;
    their Parameters, attributes and state_dict are the source's, and to_float() gives the
    source's own class back."""

    @pytest.mark.parametrize(
        ("make", "float_type"),
        [
            (lambda: nn.Linear(4, 3, bias=False), nn.Linear),
            (lambda: nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d),
            (lambda: nn.Conv2d(2, 3, 3, stride=2, padding_mode="reflect", padding=1), nn.Conv2d),
        ],
    )
    def test_isinstance_and_round_trip(self, make, float_type):
        layer = make()
        state = layer.state_dict()
        attrs = {k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training"}
        fqt = quantize_model(layer, FQTConfig.preset("psq4"))
        assert isinstance(fqt, float_type) and type(fqt) is not float_type
        assert list(fqt.state_dict()) == list(state)
        assert {k: getattr(fqt, k) for k in attrs} == attrs
        assert fqt.weight is layer.weight
        back = dequantize_model(fqt)
        assert type(back) is float_type and back.weight is layer.weight
        assert {k: getattr(back, k) for k in attrs} == attrs
        assert back.state_dict().keys() == state.keys()

    def test_fqt_layer_is_never_converted_again(self):
        model = nn.Sequential(FQTLinear(nn.Linear(3, 3), FQTConfig()), nn.Linear(3, 2))
        quantize_model(model, FQTConfig.preset("bhq5"))
        assert model[0].config == FQTConfig() and model[1].config.grad_quantizer == "bhq"
        summary = fqtorch.conversion_summary(model)
        assert set(summary.quantized) == {"0", "1"} and not summary.left_float


class PlainSubclass(nn.Linear):
    """A subclass that keeps nn.Linear's forward: converted."""

    tag = "plain"


class OwnForward(nn.Linear):
    """A subclass with its own forward: left in float (fqtorch cannot know what it computes)."""

    def forward(self, x):
        return super().forward(x).relu()


class Raw(nn.Module):
    """A module that multiplies a raw parameter: fqtorch cannot see the product."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return x @ self.w


class TestSubclasses:
    def test_subclass_with_parent_forward_is_converted(self):
        model = nn.Sequential(PlainSubclass(3, 2))
        quantize_model(model, FQTConfig())
        assert isinstance(model[0], FQTLinear) and model[0].float_type is PlainSubclass
        dequantize_model(model)
        assert type(model[0]) is PlainSubclass

    def test_subclass_with_own_forward_is_left_in_float(self):
        model = nn.Sequential(OwnForward(3, 3), nn.Linear(3, 2))
        quantize_model(model, FQTConfig())
        assert type(model[0]) is OwnForward
        why = fqtorch.conversion_summary(model).left_float["0"]
        assert "OwnForward: subclass of nn.Linear with its own forward" in why

    def test_attention_out_proj_is_part_of_the_attention(self, caplog):
        """nn.MultiheadAttention's out_proj (a Linear subclass) converts with its attention; an
        attention left in float keeps it float too (its forward reads out_proj's weight)."""
        model = nn.Sequential()
        model.add_module("attn", nn.MultiheadAttention(8, 2))
        model.add_module("head", nn.Linear(8, 2))
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(model, FQTConfig(), module_filter_fn=lambda m, n: n != "attn")
        assert type(model.attn.out_proj) is not FQTLinear
        assert "attn -- nn.MultiheadAttention: excluded by module_filter_fn" in caplog.text
        quantize_model(model, FQTConfig())
        assert isinstance(model.attn.out_proj, FQTLinear)

    @pytest.mark.parametrize(
        "how",
        [
            {"module_filter_fn": lambda m, n: not n.endswith("out_proj")},
            {"layers": {nn.Linear: None}},
            {"config": lambda m, n: None if n.endswith("out_proj") else FQTConfig.preset("exact")},
        ],
        ids=["filter", "layers", "config"],
    )
    def test_attention_out_proj_excluded_on_its_own_stays_float(self, how):
        """The filter, ``layers=`` and the config callable are asked about out_proj under its
        own name, as about any layer: excluded, it stays float (it was quantized regardless)."""
        model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        params = dict(model.named_parameters())
        x = torch.randn(3, 2, 8)
        expected = model(x)
        how = dict(how)
        quantize_model(model, how.pop("config", FQTConfig.preset("exact")), **how)
        assert type(model.self_attn).__name__ == "FQTMultiheadAttention"
        assert type(model.self_attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
        assert dict(model.named_parameters()) == params
        assert "self_attn.out_proj" in fqtorch.conversion_summary(model).left_float
        torch.testing.assert_close(model(x), expected)  # the float out_proj runs

    def test_layers_inside_a_layer_left_float_are_listed_with_it(self):
        """A LoRA-style subclass with its own forward stays float, taken whole, and the layers
        inside it are listed as float with it (they stayed float, unsaid): only its forward
        knows whether it calls them, so converting them could count a product never run."""

        class LoRALinear(nn.Linear):
            def __init__(self) -> None:
                super().__init__(6, 6)
                self.lora_a, self.lora_b = nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False)

            def forward(self, x):
                return super().forward(x) + self.lora_b(self.lora_a(x))

        model = nn.Sequential(LoRALinear(), nn.Linear(6, 2))
        quantize_model(model, FQTConfig())
        assert type(model[0].lora_a) is nn.Linear and isinstance(model[1], FQTLinear)
        summary = fqtorch.conversion_summary(model)
        assert list(summary.left_float) == ["0", "0.lora_a", "0.lora_b"]
        assert "inside '0', which stays float" in summary.left_float["0.lora_a"]
        assert list(summary.quantized) == ["1"]
        # an adapter converted on its own before is quantized, not listed as float
        model = nn.Sequential(LoRALinear(), nn.Linear(6, 2))
        model[0].lora_a = quantize_model(model[0].lora_a, FQTConfig())
        quantize_model(model, FQTConfig())
        summary = fqtorch.conversion_summary(model)
        assert list(summary.left_float) == ["0", "0.lora_b"]
        assert set(summary.quantized) == {"0.lora_a", "1"}

    def test_lazy_layer_waits_for_initialisation(self):
        model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
        quantize_model(model, FQTConfig())
        assert "run one forward pass" in fqtorch.conversion_summary(model).left_float["0"]
        model = nn.Sequential(nn.LazyLinear(3))
        model(torch.randn(2, 5))
        quantize_model(model, FQTConfig())
        assert isinstance(model[0], FQTLinear) and model[0].in_features == 5

    def test_subclass_overriding_a_method_forward_calls_is_left_in_float(self):
        """nn.Conv2d.forward calls _conv_forward: a subclass that overrides it (weight
        standardisation) keeps the parent's forward but computes something else."""

        class StandardizedConv(nn.Conv2d):
            def _conv_forward(self, x, weight, bias):
                weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std()
                return super()._conv_forward(x, weight, bias)

            def reset_parameters(self) -> None:  # harmless: builds the layer
                super().reset_parameters()

        model = nn.Sequential(StandardizedConv(2, 2, 3), nn.Linear(2, 2))
        quantize_model(model, FQTConfig())
        assert type(model[0]) is StandardizedConv
        why = fqtorch.conversion_summary(model).left_float["0"]
        assert "subclass of nn.Conv2d with its own _conv_forward" in why
        assert "reset_parameters" not in why


def _weight_norm(layer: nn.Linear) -> nn.Linear:
    with warnings.catch_warnings():  # deprecated, and still in use
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.weight_norm(layer)
    with torch.no_grad():
        layer.weight_g.mul_(2.0)  # the forward's weight now differs from the stale attribute
    return layer


def _prune(layer: nn.Linear) -> nn.Linear:
    return prune.l1_unstructured(layer, "weight", amount=0.5)


def _forward_hook(layer: nn.Module) -> nn.Module:
    layer.register_forward_hook(lambda module, args, output: output * 2)
    return layer


def _patched_forward(layer: nn.Module) -> nn.Module:
    """The forward replaced on the instance, as accelerate's ``add_hook_to_module`` does."""
    original = layer.forward
    layer.forward = functools.wraps(original)(lambda *args, **kwargs: original(*args, **kwargs))
    return layer


def _hooked_out_proj(layer: nn.Module) -> nn.Module:
    attention = nn.MultiheadAttention(3, 1)
    _forward_hook(attention.out_proj)
    return attention


class TestHooksAndParametrizations:
    """A layer whose hooks or parametrization change what it computes stays float, saying so:
    the FQT layer would silently skip them (stale weight, lost user hook, or AttributeError)."""

    @pytest.mark.parametrize(
        ("wrap", "where"),
        [
            (_forward_hook, "hooks on itself"),
            (_weight_norm, "hooks on itself"),
            (torch.nn.utils.spectral_norm, "hooks on itself"),
            (_prune, "hooks on itself"),
            (torch.nn.utils.parametrizations.weight_norm, "parametrized"),
            (_hooked_out_proj, "hooks on 'out_proj'"),
            (_patched_forward, "its forward replaced on the instance"),
        ],
    )
    def test_left_in_float(self, wrap, where):
        torch.manual_seed(0)
        model = nn.Sequential(wrap(nn.Linear(3, 3)), nn.Linear(3, 3))
        layer = model[0]
        quantize_model(model, FQTConfig())
        assert model[0] is layer and isinstance(model[1], FQTLinear)
        assert where in fqtorch.conversion_summary(model).left_float["0"]

    def test_an_out_proj_converted_before_is_no_hook(self):
        """An attention layer whose out_proj was converted on its own first: the FQT layer's
        own pre-hook is not taken for a user's hook (the attention stayed float, "hooks on
        'out_proj'"), and the converted out_proj is kept."""
        model = nn.Sequential(nn.MultiheadAttention(8, 2))
        model[0].out_proj = quantize_model(model[0].out_proj, FQTConfig())
        out_proj = model[0].out_proj
        quantize_model(model, FQTConfig.preset("psq4"))
        assert type(model[0]).__name__ == "FQTMultiheadAttention"
        assert model[0].out_proj is out_proj and out_proj.config == FQTConfig()  # its own kept

    def test_hooks_on_an_fqt_layer_are_not_carried_back_silently(self):
        model = quantize_model(nn.Sequential(nn.Linear(3, 3)), FQTConfig())
        with pytest.warns(RuntimeWarning, match="forward pre hooks are not carried over") as said:
            model[0].register_forward_pre_hook(lambda module, args: None)
            dequantize_model(model)
        assert said[0].filename == __file__  # this line's call, not fqtorch's convert.py
        assert type(model[0]) is nn.Linear and not model[0]._forward_pre_hooks


class TestCompiledLayer:
    def test_layer_compiled_on_its_own_runs_its_fqt_forward(self, caplog):
        """layer.compile() stores the compiled *float* forward on the layer; the FQT layer must
        not adopt it (it would run the float forward in place of the FQT one)."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        x = torch.randn(8, 16)
        float_output = model(x)
        model[0].compile(backend="eager")
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(model, FQTConfig(input_bits=2, weight_bits=2))
        assert "_compiled_call_impl" not in vars(model[0])
        assert not torch.equal(model(x), float_output)  # 2-bit GEMMs ran
        assert "0: compiled on its own (layer.compile())" in caplog.records[-1].getMessage()


class TestSummary:
    def test_lists_what_holds_matrix_products_in_float(self, caplog):
        model = nn.ModuleDict(
            {
                "emb": nn.Embedding(10, 3),
                "lstm": nn.LSTM(3, 3),
                "up": nn.ConvTranspose2d(3, 3, 2),
                "conv3d": nn.Conv3d(3, 3, 1),
                "bilinear": nn.Bilinear(3, 3, 3),
                "own": OwnForward(3, 3),
                "raw": Raw(),
                "norm": nn.LayerNorm(3),
                "fc": nn.Linear(3, 3),
            }
        )
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(model, FQTConfig())
        summary = fqtorch.conversion_summary(model)
        assert summary.quantized == {"fc": "FQTLinear (nn.Linear)"}
        why = summary.left_float
        assert list(why) == ["emb", "lstm", "up", "conv3d", "bilinear", "own", "raw"]
        assert why["emb"].startswith("nn.Embedding: a table lookup")
        assert why["lstm"].startswith("nn.LSTM: recurrent layer")
        assert why["up"].startswith("nn.ConvTranspose2d: transposed convolution")
        assert why["conv3d"].startswith("nn.Conv3d: 3-d convolution")
        assert why["bilinear"].startswith("nn.Bilinear: bilinear product")
        assert "owns w (>= 2-d)" in why["raw"] and "stay float" in why["raw"]
        assert caplog.records[-1].levelno == logging.INFO
        logged = caplog.records[-1].getMessage()
        assert logged.startswith("FQT conversion: 1 FQT layers (1 FQTLinear); left in float (7)")
        assert "  lstm -- nn.LSTM: recurrent layer" in logged
        assert str(summary) in logged

    def test_nothing_left(self, caplog):
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(make_model(), FQTConfig())
        assert caplog.records[-1].getMessage() == (
            "FQT conversion: 3 FQT layers (1 FQTConv2d, 2 FQTLinear); "
            "no other module owns a matrix-shaped parameter"
        )

    def test_filter_and_config_reasons(self, caplog):
        def per_layer(module, name):
            return None if name == "4.2" else FQTConfig()

        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            model = quantize_model(make_model(), per_layer, module_filter_fn=lambda m, n: n != "0")
        assert "  0 -- nn.Conv2d: excluded by module_filter_fn" in caplog.text
        assert "  4.2 -- nn.Linear: the config callable returned None for it" in caplog.text
        left = fqtorch.conversion_summary(model).left_float  # later: the reason is not known
        assert set(left) == {"0", "4.2"} and "registered for FQT but float" in left["0"]

    def test_before_conversion(self):
        summary = fqtorch.conversion_summary(make_model())
        assert summary.quantized == {} and len(summary.left_float) == 3
        assert str(summary).startswith("FQT conversion: 0 FQT layers; left in float (3)")

    def test_transformer_encoder_note(self, caplog):
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        model = nn.TransformerEncoder(layer, 1)
        assert model.use_nested_tensor
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(model, FQTConfig())
        assert not model.use_nested_tensor
        assert "nested-tensor inference path turned off" in caplog.records[-1].getMessage()

    @pytest.mark.parametrize("products", [False, True])
    def test_attention_products_in_float_are_listed(self, products):
        model = nn.Sequential(nn.MultiheadAttention(4, 2))
        quantize_model(model, FQTConfig(attention_products=products))
        summary = fqtorch.conversion_summary(model)
        assert set(summary.quantized) == {"0", "0.out_proj"}
        if products:
            assert not summary.left_float
        else:
            assert "score and value products (Q·Kᵀ, A·V) run in float" in summary.left_float["0"]

    def test_attention_products_without_an_attention_layer_is_noted(self, caplog):
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(nn.Sequential(nn.Linear(3, 3)), FQTConfig(attention_products=True))
        assert "attention_products=True, but no nn.MultiheadAttention was converted" in (
            caplog.records[-1].getMessage()
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(nn.Sequential(nn.Linear(3, 3)), FQTConfig())
        assert "attention_products" not in caplog.records[-1].getMessage()

    def test_dequantize_restores_the_nested_tensor_path(self):
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
        quantize_model(model, FQTConfig())
        assert not model.use_nested_tensor
        dequantize_model(model)
        assert model.use_nested_tensor
        off = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(8, 2, 16), 1, enable_nested_tensor=False
        )
        dequantize_model(quantize_model(off, FQTConfig()))
        assert not off.use_nested_tensor


class TestRegistry:
    def test_builtins_are_registered(self):
        layers = fqtorch.registered_layers()
        for key in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention):
            assert key in layers
        assert "transformers.pytorch_utils.Conv1D" in layers

    def test_register_convert_summarize_and_unregister(self):
        class FQTRaw(fqtorch.nn.FQTModule):
            def __init__(self, source, config, name=""):
                super().__init__(config, name)
                self.adopt(source)

            def forward(self, x):
                return fqtorch.nn.fqt_linear(x, self.w.T, None, self, name=self.name)

        model = nn.Sequential(Raw())
        ref = Raw()
        ref.load_state_dict(model[0].state_dict())
        assert "owns w" in fqtorch.conversion_summary(model).left_float["0"]
        fqtorch.register_layer(Raw, FQTRaw)
        try:
            with pytest.raises(ValueError, match="already registered"):
                fqtorch.register_layer(Raw, FQTRaw)
            quantize_model(model, FQTConfig.preset("exact"))
            assert isinstance(model[0], FQTRaw)
            x = torch.randn(2, 3)
            assert torch.equal(model(x), ref(x))
            assert fqtorch.conversion_summary(model).quantized == {"0": f"FQTRaw ({_name(Raw)})"}
            dequantize_model(model)
            assert type(model[0]) is Raw
        finally:
            fqtorch.unregister_layer(Raw)
        assert Raw not in fqtorch.registered_layers()
        with pytest.raises(KeyError, match="is not registered"):
            fqtorch.unregister_layer(Raw)

    def test_from_fqt_and_replace(self):
        calls = []

        def from_fqt(layer):
            calls.append(layer.name)
            return layer.to_float()

        fqtorch.register_layer(PlainSubclass, FQTLinear, from_fqt)
        try:
            fqtorch.register_layer(PlainSubclass, FQTLinear, from_fqt, replace=True)
            model = quantize_model(nn.Sequential(PlainSubclass(2, 2)), FQTConfig())
            dequantize_model(model)
            assert calls == ["0"] and type(model[0]) is PlainSubclass
        finally:
            fqtorch.unregister_layer(PlainSubclass)

    def test_layers_override_for_one_call(self):
        model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))
        quantize_model(model, FQTConfig(), layers={nn.Linear: None})
        assert type(model[0]) is nn.Linear and isinstance(model[1], FQTConv1d)
        model = quantize_model(nn.Sequential(Raw()), FQTConfig(), layers={Raw: _FQTRawMatmul})
        assert isinstance(model[0], _FQTRawMatmul)
        assert Raw not in fqtorch.registered_layers()

    def test_override_wins_over_a_registered_subclass(self):
        fqtorch.register_layer(PlainSubclass, FQTLinear)
        try:
            model = nn.Sequential(PlainSubclass(2, 2), nn.Conv1d(2, 2, 1))
            quantize_model(model, FQTConfig(), layers={nn.Linear: None})
            assert type(model[0]) is PlainSubclass and isinstance(model[1], FQTConv1d)
            assert (
                "layers= maps nn.Linear to None"
                in fqtorch.conversion_summary(model, layers={nn.Linear: None}).left_float["0"]
            )
        finally:
            fqtorch.unregister_layer(PlainSubclass)

    def test_name_of_an_imported_class_is_resolved(self):
        """torch.nn.Bilinear is defined as torch.nn.modules.linear.Bilinear: the re-exported
        name resolves to the class, and a name its imported module lacks is refused."""
        fqtorch.register_layer("torch.nn.Bilinear", _FQTRawMatmul)
        try:
            assert nn.Bilinear in fqtorch.registered_layers()
            summary = fqtorch.conversion_summary(nn.Sequential(nn.Bilinear(2, 2, 2)))
            assert "registered for FQT but float" in summary.left_float["0"]
        finally:
            fqtorch.unregister_layer("torch.nn.Bilinear")
        assert nn.Bilinear not in fqtorch.registered_layers()
        with pytest.raises(ValueError, match="holds no class 'NoSuchLayer'"):
            fqtorch.register_layer("torch.nn.NoSuchLayer", FQTLinear)
        with pytest.raises(ValueError, match="'package.module.Class'"):
            fqtorch.register_layer("torch.nn.Bi linear", FQTLinear)

    def test_name_registered_before_its_module_is_imported(self, monkeypatch):
        """A name kept as given (its module not imported) is found again by that name, or by
        its class, once the module is imported."""
        name = "fqtorch_test_late.Layer"
        fqtorch.register_layer(name, _FQTRawMatmul)
        try:
            late = types.ModuleType("fqtorch_test_late")
            late.Layer = type("Layer", (Raw,), {"__module__": "fqtorch_test_late"})
            monkeypatch.setitem(sys.modules, "fqtorch_test_late", late)
            model = quantize_model(nn.Sequential(late.Layer()), FQTConfig())
            assert isinstance(model[0], _FQTRawMatmul)
            with pytest.raises(ValueError, match="already registered"):
                fqtorch.register_layer(late.Layer, FQTLinear)
        finally:
            fqtorch.unregister_layer(name)
        assert name not in fqtorch.registered_layers()

    def test_match_by_qualified_name(self):
        model = quantize_model(
            nn.Sequential(Raw()), FQTConfig(), layers={_name(Raw): _FQTRawMatmul}
        )
        assert isinstance(model[0], _FQTRawMatmul)

    def test_bad_registrations(self):
        with pytest.raises(TypeError, match="nn.Module subclass or its qualified name"):
            fqtorch.register_layer(int, FQTLinear)
        with pytest.raises(ValueError, match="'package.module.Class'"):
            fqtorch.register_layer("Conv1D", FQTLinear)
        with pytest.raises(TypeError, match="is an FQT layer"):
            fqtorch.register_layer(FQTLinear, FQTLinear)
        with pytest.raises(TypeError, match="to_fqt must be callable"):
            fqtorch.register_layer(Raw, "FQTRaw")
        with pytest.raises(TypeError, match="must return an FQTModule"):
            quantize_model(nn.Sequential(Raw()), FQTConfig(), layers={Raw: lambda m, c, n: m})

    def test_attribute_clash_is_refused(self):
        class Named(nn.Linear):
            def __init__(self) -> None:
                super().__init__(2, 2)
                self.name = "mine"

        model = nn.Sequential(nn.Linear(2, 2), Named())
        message = r"quantize_model: 1 \(.*Named\): .*attributes \['name'\] clash.*nothing was"
        with pytest.raises(TypeError, match=message):
            quantize_model(model, FQTConfig())
        assert type(model[0]) is nn.Linear  # not half converted: every layer is built first


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _FQTRawMatmul(fqtorch.nn.FQTModule):
    def __init__(self, source, config, name=""):
        super().__init__(config, name)
        self.adopt(source)

    def forward(self, x):
        return fqtorch.nn.fqt_linear(x, self.w.T, None, self, name=self.name)


def test_readme_your_own_model_runs(capsys):
    """The README's "Your own model" example runs as written and prints what it says."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Your own model") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme"}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        fqtorch.unregister_layer(namespace["ScaledLinear"])
    printed = capsys.readouterr().out
    expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    assert printed.splitlines()[0] == expected[0]
    assert printed.splitlines()[1].startswith(expected[1].removesuffix("..."))


def test_public_api_names():
    for name in (
        "FQTConfig",
        "quantize_model",
        "dequantize_model",
        "register_quantizer",
        "get_quantizer",
        "list_quantizers",
        "register_layer",
        "unregister_layer",
        "registered_layers",
        "conversion_summary",
    ):
        assert hasattr(fqtorch, name)


def test_import_is_cheap():
    import subprocess
    import sys

    code = (
        "import sys, torch; import fqtorch; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'matplotlib' not in sys.modules; "
        "assert 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bare_layer_is_returned_converted_and_the_summary_says_so(caplog):
    """quantize_model cannot swap the object it was given: a bare layer comes back as its FQT
    layer, and the logged summary says the object passed in stays float (it said nothing)."""
    layer = nn.Linear(4, 3)
    with caplog.at_level(logging.INFO, logger="fqtorch"):
        fqt = quantize_model(layer, FQTConfig.preset("bhq5"))
    assert "use the returned FQTLinear (the object passed in stays float)" in caplog.text
    assert type(layer) is nn.Linear and type(fqt).__name__ == "FQTLinear"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fqtorch"):
        quantize_model(nn.Sequential(nn.Linear(4, 3)), FQTConfig.preset("bhq5"))
    assert "passed in stays float" not in caplog.text


def test_data_parallel_replicas_are_refused():
    """nn.DataParallel rebuilds its replicas from the module every step (a shallow copy): each
    would start the layer's noise stream again from its seed, so every step would draw the
    same rounding noise. A replica's forward is refused, naming what to use instead."""
    model = quantize_model(nn.Sequential(nn.Linear(4, 3)), FQTConfig.preset("psq2"))
    model(torch.randn(2, 4))  # the module itself runs
    replica = model[0]._replicate_for_data_parallel()  # what DataParallel.replicate() does
    with pytest.raises(RuntimeError, match=r"nn.DataParallel replica.*DistributedDataParallel"):
        replica(torch.randn(2, 4))


def test_check_finite_must_be_a_bool():
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        FQTConfig(check_finite="no")


def test_a_config_callable_chooses_for_layers_built_inside_a_converted_layer():
    """``out_proj``, built by the attention layer's conversion, gets the callable's config for
    its own name (it silently took the parent's, so a plan's entry for it was ignored); where
    the callable returns None it stays float, as any layer does (it took the parent's)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

    own = {"attn": FQTConfig.preset("bhq4"), "attn.out_proj": FQTConfig.preset("psq8")}
    seen = []

    def choose(module, name):
        seen.append((type(module).__name__, name))
        return own.get(name)

    model = quantize_model(Net(), choose)
    assert ("NonDynamicallyQuantizableLinear", "attn.out_proj") in seen
    assert len(seen) == len(set(seen)) == 2  # each layer asked once
    assert model.attn.config == own["attn"] and model.attn.out_proj.config == own["attn.out_proj"]
    model = quantize_model(Net(), lambda module, name: own["attn"] if name == "attn" else None)
    assert type(model.attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    summary = fqtorch.conversion_summary(model)
    assert list(summary.quantized) == ["attn"] and "attn.out_proj" in summary.left_float


def test_dequantize_refuses_layers_parametrized_after_conversion():
    """The float layer lost the parametrization and its weight with it (AttributeError at the
    next forward); now one line says what to do, and nothing is swapped."""
    model = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), FQTConfig())
    torch.nn.utils.parametrizations.weight_norm(model[1])
    with pytest.raises(ValueError, match=r"FQT layers \['1'\] were parametrized after .* remove"):
        dequantize_model(model)
    assert isinstance(model[0], FQTLinear)  # untouched
    torch.nn.utils.parametrize.remove_parametrizations(model[1], "weight")
    assert type(dequantize_model(model)[1]) is nn.Linear


class TestSeparateConversions:
    """Layers converted in separate calls under one seed, each named alike within its call, start
    from the same noise seed: the same draws on both, so the upper layer's noise is correlated
    with the gradient reaching the lower one, whose gradient is then biased. Said when a later
    call sees them together; fqtorch.reseed(model, seed) on the whole model separates them."""

    @staticmethod
    def model(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        cfg = FQTConfig.preset("psq2", seed=1)
        layers = [quantize_model(nn.Linear(8, 8), cfg) for _ in range(2)]  # both named ''
        return nn.Sequential(layers[0], nn.Tanh(), layers[1])

    @staticmethod
    def draws(model: nn.Module, x: torch.Tensor, count: int) -> torch.Tensor:
        """The input's gradient: the lower layer's 2-bit grad_input branch (its weight gradient
        goes through the presets' 8-bit branch)."""
        out = []
        for _ in range(count):
            x = x.detach().requires_grad_(True)
            model(x).square().sum().backward()
            out.append(x.grad.flatten())
        return torch.stack(out)

    def test_found_said_and_separated(self):
        model = self.model()
        assert fqtorch.same_streams(model) == [("0", "2")]
        with pytest.warns(FQTWarning, match=r"draw the same rounding noise \('0.0', '0.2'\)"):
            quantize_model(nn.Sequential(model, nn.Linear(8, 2)), FQTConfig.preset("psq2"))
        fqtorch.reseed(model, 5)
        assert fqtorch.same_streams(model) == []
        # a new seed set through the config keeps the names the reseed gave (it went back to the
        # conversion's, and the streams met again)
        for layer in fqtorch.fqt_modules(model).values():
            layer.config = layer.config.replace(seed=7)
        assert fqtorch.same_streams(model) == []
        # layers that draw no noise (QAT: an exact backward) share nothing, and are not said
        qat = nn.Sequential(
            *(quantize_model(nn.Linear(4, 4), FQTConfig.preset("qat")) for _ in "ab")
        )
        assert fqtorch.same_streams(qat) == []
        with warnings.catch_warnings():
            warnings.simplefilter("error", FQTWarning)
            quantize_model(nn.Sequential(qat, nn.Linear(4, 2)), FQTConfig.preset("qat"))

    @pytest.mark.parametrize("separated", [False, True])
    def test_the_same_streams_bias_the_lower_layer(self, separated):
        """400 draws of the input's gradient against QAT's: biased on one stream (the test has the
        power to see it), unbiased once reseeded (no false alarm)."""
        from tests.helpers import projection_z, z_limit

        model = self.model()
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
        exact = copy.deepcopy(model)
        for layer in fqtorch.fqt_modules(exact).values():
            layer.config = layer.config.replace(grad_quantizer=None, grad_weight_quantizer=None)
        qat = self.draws(exact, x, 1)[0]
        if separated:
            fqtorch.reseed(model, 1)
        z = projection_z(self.draws(model, x, 400), qat)
        if separated:
            assert z.abs().max() < z_limit(z.numel()), z
        else:
            assert z.abs().max() > z_limit(z.numel()), z


def test_attention_computed_in_a_forward_is_noted_once_per_module(caplog):
    """Attention modules of other libraries own no weight of their own (their projections are
    Linear children, converted), so the ≥ 2-d parameter rule does not list them: a note says
    their two products stay float, counting the innermost (an HF Attention wraps its
    SelfAttention), not a mask helper, nor an nn.MultiheadAttention left float by a filter
    (listed as left in float already)."""

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4, 4)

        def forward(self, x):
            q = self.q(x)
            return torch.nn.functional.scaled_dot_product_attention(q, x, x)

    class Attention(nn.Module):  # the wrapper, as Hugging Face writes it
        def __init__(self):
            super().__init__()
            self.self = SelfAttention()

        def forward(self, x):
            return self.self(x)

    class AttentionMask(nn.Module):  # no products
        def forward(self, x):
            return x

    model = nn.Sequential(Attention(), Attention(), AttentionMask(), nn.MultiheadAttention(4, 1))
    with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
        quantize_model(
            model,
            FQTConfig.preset("psq4"),
            module_filter_fn=lambda m, name: not isinstance(m, nn.MultiheadAttention),
        )
    text = caplog.text
    assert "note: 2 attention module(s) (0.self, 1.self) compute their score and value" in text
    assert "3 --" in text  # the filtered MultiheadAttention: listed as left in float
    assert text.count("attention module(s)") == 1
