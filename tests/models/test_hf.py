"""Hugging Face transformers models (built from configs with random weights, nothing downloaded):
every projection becomes an FQT layer, the FQT gradient is unbiased, and training reduces the
loss. transformers' Conv1D (GPT-2) converts through the layer registry."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqtorch
from fqtorch import FQTConfig, fqt_modules, quantize_model, stats
from fqtorch.nn import FQTLinear, FQTTransposedLinear

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, TOKENS = 64, 64, 2, 4, 8


class Logits(nn.Module):
    """A causal LM as ``ids -> logits`` (the stats' ``loss_fn(model(inputs), targets)`` API)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        max_position_embeddings=4 * TOKENS,
    )
    torch.manual_seed(0)
    return Logits(transformers.LlamaForCausalLM(config))


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=4 * TOKENS,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return Logits(transformers.GPT2LMHeadModel(config))


# Per decoder layer: Llama's q/k/v/o and gate/up/down projections; GPT-2's c_attn, c_proj and the
# MLP's c_fc, c_proj (all Conv1D); plus the head.
FAMILIES = {
    "llama": (llama, {FQTLinear: 7 * LAYERS + 1}),
    "gpt2": (gpt2, {FQTTransposedLinear: 4 * LAYERS, FQTLinear: 1}),
}


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, TOKENS), generator=torch.Generator().manual_seed(seed))
    return ids, ids


@pytest.mark.parametrize("family", FAMILIES)
class TestFamilies:
    def test_every_projection_is_fqt(self, family):
        build, expected = FAMILIES[family]
        model = quantize_model(build(), FQTConfig.preset("bhq5"))
        layers = fqt_modules(model).values()
        counts = {cls: sum(type(m) is cls for m in layers) for cls in expected}
        assert counts == expected
        assert not any(type(m) in (nn.Linear, Conv1D) for m in model.modules())
        summary = fqtorch.conversion_summary(model)
        assert all("nn.Embedding" in why for why in summary.left_float.values()), summary

    def test_functional_attention_products_are_noted(self, family, caplog):
        """These models compute attention in their forward (no nn.MultiheadAttention), which
        module swapping does not see: attention_products=True says so instead of doing nothing
        silently."""
        with caplog.at_level(logging.INFO, logger="fqtorch.convert"):
            quantize_model(FAMILIES[family][0](), FQTConfig.preset("bhq5", attention_products=True))
        logged = caplog.records[-1].getMessage()
        assert "attention_products=True, but no nn.MultiheadAttention was converted" in logged

    def test_fqt_gradient_is_unbiased(self, family):
        model = quantize_model(FAMILIES[family][0](), FQTConfig.preset("psq4"))
        report = stats.check_unbiased(model, next_token_loss, batch(0), samples=16)
        assert report.passed, report.summary()

    def test_training_reduces_the_loss(self, family):
        model = quantize_model(FAMILIES[family][0](), FQTConfig.preset("psq5"))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        ids, _ = batch(0)
        losses = []
        for _ in range(6):
            loss = next_token_loss(model(ids), ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], losses


class TestConv1D:
    def test_exact_with_quantization_off(self):
        torch.manual_seed(0)
        ref = Conv1D(5, 3)
        with torch.no_grad():
            ref.bias.normal_()
        fqt = quantize_model(copy.deepcopy(ref), FQTConfig.preset("exact"))
        assert isinstance(fqt, FQTTransposedLinear)
        x = torch.randn(2, 4, 3)
        results = []
        for layer in (ref, fqt):
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.backward(torch.ones_like(out))
            results.append([out, xi.grad, layer.weight.grad, layer.bias.grad])
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)

    def test_parameters_and_round_trip(self):
        ref = Conv1D(5, 3)
        params = dict(ref.named_parameters())
        model = nn.Sequential(ref)
        quantize_model(model, FQTConfig.preset("psq4"))
        assert all(p is params[n] for n, p in model[0].named_parameters())
        assert list(model.state_dict()) == ["0.weight", "0.bias"]
        assert "nx=3, nf=5" in repr(model)
        fqtorch.dequantize_model(model)
        assert type(model[0]) is Conv1D and model[0].weight is params["weight"]

    def test_quantized_weight_rows_are_output_features(self):
        """Per-row weight quantization of a Conv1D scales each output feature, as for Linear."""
        torch.manual_seed(0)
        ref = Conv1D(4, 6)
        linear = nn.Linear(6, 4)
        with torch.no_grad():
            linear.weight.copy_(ref.weight.T)
            linear.bias.copy_(ref.bias)
        cfg = FQTConfig(weight_bits=3, weight_quantizer="symmetric_per_row")
        x = torch.randn(5, 6)
        expected = quantize_model(linear, cfg)(x)
        torch.testing.assert_close(quantize_model(ref, cfg)(x), expected)
