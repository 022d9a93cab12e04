"""Every registered model trains under FQT: forward, backward, finite gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fqtorch
from fqtorch.models import build_model, list_models
from fqtorch.nn import FQTModule


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_under_fqt(name):
    if name == "char_gpt":
        model = build_model(name, num_classes=11, block_size=8, dim=32, layers=2, heads=2)
        x, y = torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    else:
        classes = 7
        model = build_model(name, num_classes=classes, in_channels=3 if name != "digits_cnn" else 1)
        size = 8 if name == "digits_cnn" else 32
        x = torch.randn(2, 1 if name == "digits_cnn" else 3, size, size)
        y = torch.randint(0, classes, (2,))
    fqtorch.quantize_model(model, fqtorch.FQTConfig.preset("bhq5"))
    assert any(isinstance(m, FQTModule) for m in model.modules())
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_preact_resnet56_depth():
    model = build_model("preact_resnet56")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 27 + 2  # stem, 27 blocks of 2 convs, 2 shortcut 1×1 convs


def test_unknown_model():
    with pytest.raises(ValueError, match="known models: .*digits_cnn"):
        build_model("vgg")


def test_an_unknown_option_is_refused():
    """A misspelt option is an error, not the default model built silently."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):
        build_model("char_gpt", layer=12)
