"""Properties of the int8 backend that mutation testing (scripts/mutation.sh, docs/testing.md)
found unchecked: the bias gradient of a layer whose weight is frozen (the integer path then sums
the gradient's codes itself instead of taking the sums its weight-gradient product yields)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: nn.Linear(9, 5), (12, 9)), (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 6))],
    ids=["linear", "conv"],
)
@pytest.mark.parametrize("preset", ["psq4", "ptq8"])
def test_frozen_weight_bias_gradient_matches_simulate(make, shape, preset):
    """Only the bias trains: int8 and simulate draw the same codes, so the bias and input
    gradients agree to float rounding, and the weight gets none."""
    torch.manual_seed(0)
    base = make()
    base.weight.requires_grad_(False)
    x = torch.randn(*shape)
    grads = []
    for backend in ("simulate", "int8"):
        cfg = FQTConfig.preset(preset, backend=backend, fused=False)
        layer = quantize_model(copy.deepcopy(base), cfg)
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        assert layer.weight.grad is None
        grads.append((layer.bias.grad, inp.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
