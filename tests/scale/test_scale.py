"""The guarantee at the sizes and in the settings users run: reduction lengths of 2^18, bf16 and
fp16 autocast, extreme dynamic ranges; every layer type and backend.

Unbiasedness is tested as elsewhere: the mean of many FQT draws against the QAT value, as
z-scores of projections (random Gaussian, all-ones and sign directions) with a Bonferroni
threshold from the number of projections; int8 against simulate with the same codes. Layers are
narrow (a few features or channels) so that 2^18-long reductions stay cheap.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.models import build_model
from fqtorch.stats import check_unbiased
from tests.helpers import t_as_z, z_limit

# Real scale (2^18 reductions, statistics under autocast): `pytest -m "not slow"` leaves it out.
pytestmark = pytest.mark.slow

M = 2**18  # the reduction length: tokens of a GPT batch, N·H·W of an ImageNet ResNet stage
GRAD_QUANTIZERS = ["ptq", "psq", "bhq", "rht"]


def _projector(target: torch.Tensor, directions: int = 8, seed: int = 0) -> torch.Tensor:
    """(entries, directions + 2) float64: Gaussian directions, all ones and ``sign(target)``,
    which see a systematic shift of every entry with full power."""
    flat = target.reshape(-1).double()
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(flat.numel(), directions, generator=gen, dtype=torch.float64)
    return torch.cat([gauss, torch.ones_like(flat)[:, None], flat.sign()[:, None]], dim=1)


def projected_z(draw, targets: tuple[torch.Tensor, ...], draws: int) -> torch.Tensor:
    """z-scores of the mean of ``draws`` calls of ``draw()`` (a tuple of tensors, like
    ``targets``) against ``targets``, projected; one row of scores per tensor."""
    bases = [_projector(t) for t in targets]
    proj = torch.stack(
        [
            torch.stack([d.reshape(-1).double() @ b for d, b in zip(draw(), bases, strict=True)])
            for _ in range(draws)
        ]
    )  # (draws, tensors, directions)
    centre = torch.stack([t.reshape(-1).double() @ b for t, b in zip(targets, bases, strict=True)])
    diff, se = proj.mean(0) - centre, proj.std(0) / math.sqrt(draws)
    # a projection without spread (only grid end points feed it) must hit to float rounding
    exact = diff.abs() <= 1e-6 * proj.abs().mean(0) + 1e-30
    z = t_as_z(diff / se.clamp(min=1e-300), draws)
    return torch.where(se == 0, torch.where(exact, 0.0, math.inf), z)


def _layer_draws(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One forward; each call of the returned function is one stochastic backward pass, giving
    ``(grad_input, grad_weight)``."""
    x = x.detach().requires_grad_(True)
    out = layer(x)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.autograd.grad(out, [x, layer.weight], g, retain_graph=True)

    return draw


def _reference(layer: nn.Module, cfg: FQTConfig, x: torch.Tensor, g: torch.Tensor):
    """The QAT gradients (same forward quantization, exact backward) of a copy of ``layer``."""
    qat = quantize_model(copy.deepcopy(layer), FQTConfig(input_bits=cfg.input_bits))
    x = x.detach().requires_grad_(True)
    grads = torch.autograd.grad(qat(x), [x, qat.weight], g)
    return grads


def relu_input_and_lopsided_grad(m: int, k: int, o: int, seed: int = 0):
    """Post-ReLU activations (codes at one end of the grid) and a gradient whose columns have a
    few far outliers (codes at the other end): the sums that overflow int32 at M = 2^18."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).relu()
    g = 0.01 * torch.randn(m, o, generator=gen)
    g[torch.randperm(m, generator=gen)[:20]] -= 5
    return x, g


class TestLongReductions:
    """Linear over 2^18 tokens and Conv2d over N·H·W = 2^18 positions."""

    @pytest.mark.parametrize("quantizer", GRAD_QUANTIZERS)
    def test_int8_equals_simulate_linear(self, quantizer):
        x, g = relu_input_and_lopsided_grad(M, 8, 4)
        torch.manual_seed(0)
        base = nn.Linear(8, 4)
        grads = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig(grad_quantizer=quantizer, grad_bits=5, backend=backend, fused=False)
            layer = quantize_model(copy.deepcopy(base), cfg)
            grads.append(_layer_draws(layer, x, g)())
        (sim_input, sim_weight), (int8_input, int8_weight) = grads
        scale = float(sim_input.abs().max())
        torch.testing.assert_close(int8_input, sim_input, rtol=1e-4, atol=1e-4 * scale)
        # simulate sums 2^18 float32 products (int8 sums the codes exactly): its rounding error is
        # a few √M·ε of the sum of the products' magnitudes
        magnitude = (g.abs().double().T @ x.abs().double()) * 1.1  # |Q(G)|ᵀ|Q(x)|, within 10%
        tolerance = 4 * math.sqrt(M) * 2**-24 * magnitude
        assert ((int8_weight.double() - sim_weight.double()).abs() <= tolerance).all()

    def test_int8_equals_simulate_conv2d(self):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(16, 2, 128, 128, generator=gen).relu()  # N·H·W = 2^18
        torch.manual_seed(0)
        base = nn.Conv2d(2, 3, 3, padding=1)
        g = 0.01 * torch.randn(16, 3, 128, 128, generator=gen)
        g[:, :, :2, :2] -= 5
        grads = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig.preset("psq5", backend=backend, fused=False)  # same noise on both
            layer = quantize_model(copy.deepcopy(base), cfg)
            grads.append(_layer_draws(layer, x, g)())
        for sim, int8 in zip(*grads, strict=True):
            scale = float(sim.abs().max())
            torch.testing.assert_close(int8, sim, rtol=1e-4, atol=1e-4 * scale)

    @pytest.mark.parametrize("backend", ["simulate", "int8"])
    @pytest.mark.parametrize("quantizer", ["psq", "bhq"])
    def test_unbiased_linear(self, backend, quantizer):
        x, g = relu_input_and_lopsided_grad(M, 4, 8, seed=2)
        torch.manual_seed(0)
        base = nn.Linear(4, 8)
        cfg = FQTConfig(grad_quantizer=quantizer, grad_bits=4, backend=backend)
        layer = quantize_model(copy.deepcopy(base), cfg)
        z = projected_z(_layer_draws(layer, x, g), _reference(base, cfg, x, g), draws=24)
        assert z.abs().max() < z_limit(z.numel()), z


class AutocastModel(nn.Module):
    """Runs ``inner`` under CPU autocast and returns float32 logits."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.inner(x).float()


def digits_batches(count: int, size: int = 32):
    from fqtorch.data import build_datasets

    spec = build_datasets("digits")
    items = [spec.train[i] for i in range(count * size)]
    xs = torch.stack([x for x, _ in items]).split(size)
    ys = torch.stack([y for _, y in items]).split(size)
    return list(zip(xs, ys, strict=True))


class TestAutocast:
    """bf16 and fp16 autocast: the FQT gradient stays unbiased (the library's own bias test, with
    the same threshold as float32). The quantized operands enter the backward GEMMs exactly, and
    FQT layers return float32 for float32 inputs, so gradients are not rounded between layers."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize(
        "grad_quantizer,weight_quantizer",
        [("psq", "per_column"), ("bhq", "per_column"), ("rht", "ptq"), ("ptq", "ptq")],
    )
    def test_check_unbiased(self, dtype, grad_quantizer, weight_quantizer):
        torch.manual_seed(0)
        cfg = FQTConfig(
            grad_quantizer=grad_quantizer,
            grad_bits=8,
            grad_weight_quantizer=weight_quantizer,
        )
        model = AutocastModel(quantize_model(build_model("digits_cnn"), cfg), dtype).train()
        # 256 passes: enough to catch bf16 rounding of Q(grad_output) (RMS z 4.8–5.3 against a
        # limit of 4.1 before the fix; fp16's 8× smaller rounding error stays below it)
        report = check_unbiased(model, F.cross_entropy, digits_batches(1), samples=256)
        assert report.passed, report.summary()

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_int8_backend(self, dtype):
        torch.manual_seed(0)
        cfg = FQTConfig.preset("psq8", backend="int8")
        model = AutocastModel(quantize_model(build_model("digits_cnn"), cfg), dtype).train()
        report = check_unbiased(model, F.cross_entropy, digits_batches(2), samples=16)
        assert report.passed, report.summary()


class TestExtremeRanges:
    """Gradients spanning 60 decades, and whole tensors near the float32 limits."""

    @pytest.mark.parametrize("backend", ["simulate", "int8"])
    @pytest.mark.parametrize("quantizer", GRAD_QUANTIZERS)
    def test_wide_row_ranges_unbiased(self, backend, quantizer):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(256, 6, generator=gen)
        g = torch.randn(256, 5, generator=gen) * 10.0 ** (
            60 * torch.rand(256, 1, generator=gen) - 30
        )
        torch.manual_seed(0)
        base = nn.Linear(6, 5)
        cfg = FQTConfig(grad_quantizer=quantizer, grad_bits=4, backend=backend)
        layer = quantize_model(copy.deepcopy(base), cfg)
        # Unbiased at the scale of the whole gradient: a row 60 decades below another keeps only
        # float32's resolution of the values it is mixed or gridded with.
        z = projected_z(_layer_draws(layer, x, g), _reference(base, cfg, x, g), draws=200)
        assert torch.isfinite(z).all() and z.abs().max() < z_limit(z.numel()), z

    @pytest.mark.parametrize("scale", [1e-35, 1e35])
    @pytest.mark.parametrize("quantizer", GRAD_QUANTIZERS)
    def test_tiny_and_huge_gradients(self, scale, quantizer):
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(64, 6, generator=gen)
        g = torch.randn(64, 5, generator=gen) * scale
        torch.manual_seed(0)
        base = nn.Linear(6, 5, bias=False)
        cfg = FQTConfig(grad_quantizer=quantizer, grad_bits=4)
        layer = quantize_model(copy.deepcopy(base), cfg)
        refs = _reference(base, cfg, x, g)
        draw = _layer_draws(layer, x, g)
        assert all(torch.isfinite(d).all() for d in draw())
        units = [float(r.abs().max()) for r in refs]

        def scaled_draw():
            return tuple(d / u for d, u in zip(draw(), units, strict=True))

        targets = tuple(r / u for r, u in zip(refs, units, strict=True))
        z = projected_z(scaled_draw, targets, draws=200)
        assert z.abs().max() < z_limit(z.numel()), z
