"""The inputs BHQ is measured on, apart from the tests (no pytest here): the BHQ tests use them,
and ``experiments/method_checks.py bhq`` prints the error ratios docs/method.md §5 quotes."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fqtorch.data import build_datasets
from fqtorch.models import build_model
from tests.helpers import heavy_rows

DRAWS = 100


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def leader_over_rows(small_rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """One row of ±5000 over ``small_rows`` rows of range exactly 1: BHQ puts most of them in
    the leader's group (float32 group sums over it erred by hundreds of ulp)."""
    x = torch.rand(small_rows + 1, cols, generator=gen(seed))
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    x = (x - low) / (high - low) - 0.5
    x[0] *= 1e4
    return x


def similar_rows() -> torch.Tensor:
    """128 rows whose ranges differ by at most 20%: mostly groups of two rows."""
    g = gen(1)
    return torch.randn(128, 256, generator=g) * (1 + 0.2 * torch.rand(128, 1, generator=g))


@functools.cache
def digits_grad_outputs() -> dict[str, torch.Tensor]:
    """Each Conv2d/Linear layer's grad_output in a float backward pass of the untrained digits
    model on a batch of 64 training images (fixed seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("digits_cnn")
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # a module backward hook cannot follow an in-place op
    train = build_datasets("digits").train
    images = torch.stack([train[i][0] for i in range(64)]).requires_grad_()
    labels = torch.stack([train[i][1] for i in range(64)])
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name: grads.__setitem__(name, grad_out[0])
            )
    F.cross_entropy(model(images), labels).backward()
    return grads


DIGITS_LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]
CASES = ["similar_rows", "heavy_rows"] + [f"digits_{layer}" for layer in DIGITS_LAYERS]


def case_input(case: str) -> torch.Tensor:
    if case == "similar_rows":
        return similar_rows()
    if case == "heavy_rows":
        return heavy_rows(128, 256, seed=11)
    return digits_grad_outputs()[case.removeprefix("digits_")]
