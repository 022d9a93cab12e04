"""The bias test's projection statistic on synthetic draws with known answers (method §7)."""

from __future__ import annotations

import math

import torch

from fqtorch.stats.estimators import (
    _bias_report,
    _Directions,
    _Draws,
    _Moments,
    _Params,
    _z_scores,
)

SAMPLES = 16


def _draws(params: _Params, qat: Tensor, draw) -> tuple[_Draws, _Directions]:
    """``SAMPLES`` draws ``draw(i)`` (flat float64) summarized as the estimators do."""
    directions = _Directions(params)
    signs = [t.sign() for t in qat.split(params.sizes)]
    moments, projections = _Moments(), []
    for i in range(SAMPLES):
        g = draw(i)
        moments.add(g)
        projections.append(directions.project(g, signs))
    d = _Draws(qat, moments.mean, moments.variance(), SAMPLES, torch.stack(projections), signs)
    return d, directions


def _report(params, d, directions):
    _, projected = _z_scores(d, params, directions)
    return _bias_report(
        params,
        directions.owner,
        [projected.square()],
        torch.zeros(sum(params.sizes)),
        SAMPLES,
        1e-3,
    )


Tensor = torch.Tensor


def test_large_tensor_with_fine_noise_is_judged():
    """2^21 entries, noise 1e-4 of the largest gradient, every entry shifted by one noise sd: a
    gross bias. The projections' float-rounding floor must not swallow their spread (it grows
    like √n, not n)."""
    n = 2**21
    gen = torch.Generator().manual_seed(0)
    qat = torch.randn(n, generator=gen, dtype=torch.float64)
    sd = 1e-4 * float(qat.abs().max())
    params = _Params(["w"], ["layer"], [torch.zeros(n)])

    def draw(i):
        return qat + sd + sd * torch.randn(n, generator=gen, dtype=torch.float64)

    report = _report(params, *_draws(params, qat, draw))
    assert not report.passed and math.isfinite(report.z_rms), report.summary()

    def unbiased(i):
        return qat + sd * torch.randn(n, generator=gen, dtype=torch.float64)

    assert _report(params, *_draws(params, qat, unbiased)).passed


def test_deterministic_biased_tensor_fails_beside_a_stochastic_one():
    """A layer whose weight gradient is stochastic and unbiased and whose bias gradient is
    deterministic and off by 1% of its scale (nearest rounding on one branch) is biased."""
    gen = torch.Generator().manual_seed(1)
    qat = torch.randn(64 + 8, generator=gen, dtype=torch.float64)
    params = _Params(["w", "b"], ["layer", "layer"], [torch.zeros(64), torch.zeros(8)])
    off = torch.cat([torch.zeros(64), torch.full((8,), 0.01 * float(qat[64:].abs().max()))])

    def draw(i):
        noise = torch.cat([torch.randn(64, generator=gen, dtype=torch.float64), torch.zeros(8)])
        return qat + off.double() + noise

    report = _report(params, *_draws(params, qat, draw))
    assert not report.passed and math.isinf(report.layers[0].z_rms), report.summary()


def test_entries_that_rarely_round_up_raise_no_false_alarms():
    """2000 unbiased entries that each jump from 0 to 1 with probability 0.02 (QAT value 0.02:
    a gradient fed by a few rare roundings) beside 50 Gaussian ones. In most sets of 16 draws
    such an entry never jumps and has no spread; leaving those out of the projections' mean
    difference, as the statistic once did, kept only the entries that jumped, a selection on
    the draws that moved the all-ones projection by z ≈ 19 and failed every set. Over 40 sets
    the level-1e-3 test may fail at most ``binomial_upper(40, 1e-3)`` of them."""
    from tests.helpers import binomial_upper

    rare, gaussian, p, sets = 2000, 50, 0.02, 40
    gen = torch.Generator().manual_seed(5)
    qat = torch.cat([torch.full((rare,), p), torch.zeros(gaussian)]).double()
    qat[-1] = 5.0  # the tensor's scale
    params = _Params(["w"], ["layer"], [torch.zeros(rare + gaussian)])

    def draw(i):
        g = qat.clone()
        g[:rare] = (torch.rand(rare, generator=gen) < p).double()
        g[rare:] += 0.1 * torch.randn(gaussian, generator=gen, dtype=torch.float64)
        return g

    alarms = sum(not _report(params, *_draws(params, qat, draw)).passed for _ in range(sets))
    assert alarms <= binomial_upper(sets, 1e-3), alarms
