"""The sampling variance's own standard error: the jackknife it reports, and its calibration
(the ±2 standard error interval covers the true variance about as often as it should, and would
not if the error were half as large)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.stats import sampling_variance
from fqtorch.stats.estimators import FEW_BATCHES, _relative_standard_error, few_batches_caveat
from tests.helpers import exact_gradients


def _trace_of_sample_covariance(x: torch.Tensor) -> float:
    return float((x - x.mean(0)).square().sum() / (len(x) - 1))


@pytest.mark.parametrize("batches", [3, 4, 7])
def test_the_centred_formula_is_the_delete_one_jackknife(batches):
    """Around the batches' own mean the reported error is the jackknife's, computed here the long
    way: the variance recomputed with each batch left out."""
    g = torch.Generator().manual_seed(batches)
    x = torch.randn(batches, 50, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 50)
    whole = _trace_of_sample_covariance(x)
    left_out = torch.tensor(
        [_trace_of_sample_covariance(torch.cat([x[:i], x[i + 1 :]])) for i in range(batches)],
        dtype=torch.float64,
    )
    jackknife = math.sqrt((batches - 1) / batches * (left_out - left_out.mean()).square().sum())
    spread = (x - x.mean(0)).square().sum(1).tolist()
    assert _relative_standard_error(spread, centred=True) == pytest.approx(
        jackknife / whole, rel=1e-9
    )


def test_around_full_data_the_formula_is_the_mean_s_standard_error():
    """Around a known centre the d_b are independent: the standard error of their mean, with no
    jackknife factor (which would overstate it by (B−1)/(B−2), 1.33× at 5)."""
    spread = [1.0, 2.0, 4.0, 3.0, 5.0]
    mean, sd = 3.0, math.sqrt(2.5)
    assert _relative_standard_error(spread, centred=False) == pytest.approx(
        sd / (mean * math.sqrt(5)), rel=1e-12
    )


def test_too_few_batches_say_nothing():
    assert _relative_standard_error([1.0, 1.0], centred=True) is None
    assert _relative_standard_error([1.0], centred=False) is None
    assert _relative_standard_error([0.0, 0.0, 0.0], centred=True) is None
    assert _relative_standard_error([1.0, 3.0], centred=False) == pytest.approx(
        math.sqrt(2) / (2 * math.sqrt(2))
    )


# Gaussian gradient noise whose variance sits in a few directions (as a trained model's does:
# the per-batch spread is then wide), and with a spectrum decaying as a power.
_SPECTRA = {
    "few directions": torch.cat([torch.tensor([10.0, 5.0, 2.0]), torch.full((997,), 1e-3)]),
    "power law": 1 / torch.arange(1, 1001, dtype=torch.float64) ** 1.5,
}


def _coverage(spectrum, batches, centred, shrink=1.0, repeats=400):
    """How often S ± 2·SE (SE as reported, times ``shrink``) holds the true variance."""
    g = torch.Generator().manual_seed(batches * 2 + centred)
    true, hits = float(spectrum.sum()), 0
    for _ in range(repeats):
        x = torch.randn(batches, len(spectrum), generator=g, dtype=torch.float64)
        x = x * spectrum.double().sqrt()
        centre = x.mean(0) if centred else torch.zeros(len(spectrum), dtype=torch.float64)
        spread = (x - centre).square().sum(1)
        s = float(spread.sum() / (batches - 1 if centred else batches))
        rse = _relative_standard_error(spread.tolist(), centred) * shrink
        hits += abs(s - true) <= 2 * rse * s
    return hits / repeats


@pytest.mark.parametrize(
    ("spectrum", "batches", "centred"),
    list(itertools.product(_SPECTRA, (8, 16), (True, False))),
)
def test_two_standard_errors_cover_the_true_variance(spectrum, batches, centred):
    """Under Gaussian noise the interval covers the truth in about 90% of 400 draws (measured
    0.85–0.93 on these cases); the bar, 0.80, is 5 binomial standard errors under 0.88 (0.016 at
    400 draws). An error reported half as large covers 0.45–0.65 here: the check fails on it."""
    assert _coverage(_SPECTRA[spectrum], batches, centred) >= 0.80
    assert _coverage(_SPECTRA[spectrum], batches, centred, shrink=0.5) < 0.80


@pytest.mark.parametrize("spectrum", _SPECTRA)
def test_few_batches_read_low_as_the_caveat_says(spectrum):
    """Below FEW_BATCHES the ±2 SE interval covers less than it should (measured 0.66–0.80 on
    these cases at 2–4 batches, 0.84–0.86 at 6): what few_batches_caveat prints. The draws are
    seeded, so these are fixed; the bars are the caveat's range, 66–80%, to rounding."""
    for batches, centred in ((2, False), (3, True), (3, False), (4, True), (4, False)):
        assert 0.655 <= _coverage(_SPECTRA[spectrum], batches, centred) <= 0.805
    assert "reads low" in few_batches_caveat(FEW_BATCHES - 1)
    assert few_batches_caveat(FEW_BATCHES) == few_batches_caveat(None) == ""


def test_sampling_variance_reports_its_error():
    """The model's own batches: the reported error is the formula on their squared deviations,
    around their mean (3 or more batches) or around full_data's gradient (2 suffice)."""
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(6, 3)), FQTConfig.preset("qat"))
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(5)
    ]
    stacked = exact_gradients(model, F.cross_entropy, batches)
    spread = (stacked - stacked.mean(0)).square().sum(1).tolist()
    result = sampling_variance(model, F.cross_entropy, batches)
    assert result.relative_standard_error == pytest.approx(
        _relative_standard_error(spread, centred=True), rel=1e-4
    )
    assert 0 < result.relative_standard_error < 1
    assert sampling_variance(model, F.cross_entropy, batches[:2]).relative_standard_error is None
    around = sampling_variance(model, F.cross_entropy, batches[:2], full_data=batches)
    assert around.relative_standard_error is not None
