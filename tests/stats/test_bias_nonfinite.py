"""A NaN or an infinity in the FQT gradient fails the bias test (never "no spread, matches"), and
a non-finite QAT gradient stops it with one line (docs/method.md §7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, list_quantizers, quantize_model
from fqtorch.quantizers.base import register_quantizer
from fqtorch.quantizers.formats import NVFP4
from fqtorch.stats import check_unbiased, estimators
from fqtorch.stats.estimators import BiasReport, LayerBias

S = 16


class _NaNNVFP4(NVFP4):
    """A broken format: NVFP4 with 1% of its outputs NaN."""

    def __call__(self, x, generator=None):
        out = super().__call__(x, generator)
        broken = torch.rand(out.shape, generator=generator, device=out.device) < 0.01
        return torch.where(broken, math.nan, out)


if "test_nan_nvfp4" not in list_quantizers():
    register_quantizer("test_nan_nvfp4")(_NaNNVFP4)


def _scripted(draws: torch.Tensor, qat: torch.Tensor) -> BiasReport:
    """The bias report of scripted draws ``(S, P)`` of ``nn.Linear(8, 4)``'s gradient."""
    params = estimators._Params.of(nn.Linear(8, 4))
    directions = estimators._Directions(params)
    signs = [t.sign() for t in qat.split(params.sizes)]
    projections = torch.stack([directions.project(g, signs) for g in draws])
    d = estimators._Draws(qat, draws.mean(0), draws.var(0), S, projections, signs)
    entries, projected = estimators._z_scores(d, params, directions)
    return estimators._bias_report(
        params, directions.owner, [projected.square()], entries.abs(), S, 1e-3
    )


@pytest.fixture
def unbiased_draws():
    gen = torch.Generator().manual_seed(0)
    qat = torch.randn(36, generator=gen, dtype=torch.float64)
    return qat, qat + 0.1 * torch.randn(S, 36, generator=gen, dtype=torch.float64)


def test_unbiased_scripted_draws_pass(unbiased_draws):
    qat, draws = unbiased_draws
    assert _scripted(draws, qat).passed  # the cases below fail for their non-finite entry alone


@pytest.mark.parametrize(
    "where", ["one NaN entry", "one +inf entry", "one -inf entry", "every entry NaN"]
)
def test_non_finite_draws_fail(unbiased_draws, where):
    qat, draws = unbiased_draws
    draws = draws.clone()
    if where == "every entry NaN":
        draws[:] = math.nan
    else:
        draws[3, 33] = {"one NaN entry": math.nan, "one +inf entry": math.inf}.get(where, -math.inf)
    report = _scripted(draws, qat)
    assert not report.passed and math.isinf(report.z_rms) and math.isinf(report.z_max)


def test_broken_format_fails_check_unbiased():
    """End to end: a quantizer writing NaN into 1% of its outputs is reported, with culprits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    batches = [(torch.randn(64, 20), torch.randint(0, 5, (64,))) for _ in range(2)]
    fqt = quantize_model(model, FQTConfig(grad_quantizer="test_nan_nvfp4", seed=0)).train()
    report = check_unbiased(fqt, F.cross_entropy, batches, samples=8)
    assert not report.passed and math.isinf(report.z_rms)
    assert report.failing() == ["0", "2"] and report.retested() == []  # non-finite: no retest
    assert report.culprits == ["0", "2"] and "['0', '2'] are biased" in report.summary()
    assert "NaN or infinite FQT gradients in layers ['0', '2']" in report.summary()


def test_non_finite_qat_gradient_is_one_clear_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    fqt = quantize_model(model, FQTConfig(grad_quantizer="psq", grad_bits=4, seed=0)).train()
    batch = (torch.randn(64, 20), torch.randint(0, 5, (64,)))

    def nan_loss(output, target):
        return F.cross_entropy(output, target) * math.nan

    with pytest.raises(ValueError, match=r"QAT \(exact-backward\) gradient is not finite in 0\."):
        check_unbiased(fqt, nan_loss, batch, samples=4)


def test_no_single_culprit_is_said_plainly():
    layer = LayerBias("fc", math.inf, math.inf, 3.0, 10)
    report = BiasReport([layer], 8, 1, math.inf, math.inf, 1e-3, suspect="fc", culprits=[])
    assert "no layer's quantizers are biased alone" in report.summary()
    assert "[]" not in report.summary()


def _mlp_fqt(quantizer: str = "psq"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    fqt = quantize_model(model, FQTConfig(grad_quantizer=quantizer, grad_bits=4, seed=0))
    batches = [(torch.randn(64, 20), torch.randint(0, 5, (64,))) for _ in range(2)]
    return fqt.train(), batches


def test_a_non_finite_first_test_is_not_cleared_by_a_clean_retest(monkeypatch):
    """A rare overflow (NaN in the first draws, none in the retest's) still fails: a non-finite
    layer is not retested at all."""
    real, calls = estimators._measure, []

    def fake(model, loss_fn, batches, samples, z=True):
        out = real(model, loss_fn, batches, samples, z)
        calls.append(samples)
        if len(calls) == 1:  # the first test saw a NaN in every layer; a retest would be clean
            z2 = [torch.full_like(t, math.inf) for t in out[1]]
            return out[0], z2, out[2], out[3], out[4], torch.ones_like(out[5])
        return out

    monkeypatch.setattr(estimators, "_measure", fake)
    model, batches = _mlp_fqt()
    report = estimators.measure_quantization(model, F.cross_entropy, batches, 4).bias
    assert calls == [4] and report.retested() == []  # no retest
    assert not report.passed and report.failing() == ["0", "2"]
    assert "NaN or infinite FQT gradients in layers ['0', '2']" in report.summary()


def test_variance_of_a_non_finite_qat_gradient_is_nan_not_an_error():
    """Training's --variance-every measures after a skipped non-finite step: the measurement
    reports NaN (which the adaptive planner ignores) instead of stopping the run."""
    model, batches = _mlp_fqt()

    def nan_loss(output, target):
        return F.cross_entropy(output, target) * math.nan

    assert math.isnan(estimators.quantization_variance(model, nan_loss, batches, 4).total)


def test_culprits_are_tested_at_alpha_over_the_layers(monkeypatch):
    real, alphas = estimators._bias_report, []

    def spy(*args, **kwargs):
        alphas.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(estimators, "_bias_report", spy)
    model, batches = _mlp_fqt("test_nan_nvfp4")
    check_unbiased(model, F.cross_entropy, batches, samples=4, alpha=1e-3)
    assert alphas == [1e-3, 5e-4, 5e-4]  # the whole model, then each of the 2 layers alone
