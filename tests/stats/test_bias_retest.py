"""A layer that fails the bias test is tested again on fresh draws and is reported biased only
when that fails too (``BiasReport``, docs/method.md §7): the plumbing, on scripted statistics, and
both sides on real quantizers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fqtorch import FQTConfig, quantize_model
from fqtorch.convert import fqt_modules
from fqtorch.models import build_model
from fqtorch.stats import check_unbiased, estimators, measure_quantization
from fqtorch.stats.estimators import RETEST_FACTOR
from tests.stats.test_stats import digits_batches


def _model(quantizer: str = "psq", **kwargs):
    torch.manual_seed(0)
    cfg = FQTConfig(grad_quantizer=quantizer, grad_bits=4, seed=0, **kwargs)
    return quantize_model(build_model("digits_cnn"), cfg).train()


@pytest.fixture
def scripted(monkeypatch):
    """Replace each measurement's projection z² by a scripted value per call (first test, then
    the retest), recording the sample counts the measurements were asked for."""
    real, calls, script = estimators._measure, [], []

    def fake(model, loss_fn, batches, samples, z=True):
        variance, z2, z_max, params, owner, nonfinite = real(model, loss_fn, batches, 4, z)
        calls.append(samples)
        value = script[len(calls) - 1]
        return variance, [torch.full_like(t, value) for t in z2], z_max, params, owner, nonfinite

    monkeypatch.setattr(estimators, "_measure", fake)
    return calls, script


class TestRetestPlumbing:
    def test_first_failure_that_retest_clears_passes(self, scripted):
        calls, script = scripted
        script += [100.0, 1.0]  # every layer far above its limit, then at the null mean
        report = measure_quantization(_model(), F.cross_entropy, digits_batches(1), 8).bias
        assert calls == [8, RETEST_FACTOR * 8]
        assert report.passed and report.suspect is None
        assert report.retested() == [layer.name for layer in report.layers]
        for layer in report.layers:
            assert layer.z_rms == pytest.approx(10.0) and layer.retest.z_rms == pytest.approx(1.0)
            assert layer.retest.limit < layer.limit  # more draws: a tighter limit
        assert f"retested on {RETEST_FACTOR * 8} fresh backward passes" in report.summary()
        assert "passed" in report.summary().split(":")[0]

    def test_failure_confirmed_by_retest_fails(self, scripted):
        _, script = scripted
        script += [100.0, 100.0]
        model = _model()
        report = measure_quantization(model, F.cross_entropy, digits_batches(1), 8).bias
        assert not report.passed
        assert report.failing() == report.retested() == [layer.name for layer in report.layers]
        last = [name for name, _ in model.named_modules() if name in report.failing()][-1]
        assert report.suspect == last  # the topmost failing layer, as without a retest

    def test_retest_draws_are_fresh(self, monkeypatch):
        """The retest's backward passes continue each layer's generator from where the first
        stage left it (a retest replaying the first stage's stream would partly repeat it)."""
        model = _model()
        batches = digits_batches(1)
        measure_quantization(model, F.cross_entropy, batches, 4)  # every generator exists now
        real, starts = estimators._measure, []

        def spy(model, loss_fn, batches, samples, z=True):
            starts.append([m._generator.get_state() for m in fqt_modules(model).values()])
            return real(model, loss_fn, batches, samples, z)

        monkeypatch.setattr(estimators, "_measure", spy)
        first = estimators._bias_report

        def failing(*args):  # every layer fails the first stage: the retest runs
            report = first(*args)
            return dataclasses.replace(
                report, layers=[dataclasses.replace(r, z_rms=1e9) for r in report.layers]
            )

        monkeypatch.setattr(estimators, "_bias_report", failing)
        measure_quantization(model, F.cross_entropy, batches, 8)
        assert len(starts) == 2
        ends = [m._generator.get_state() for m in fqt_modules(model).values()]
        for start_1, start_2, end in zip(*starts, ends, strict=True):
            assert not torch.equal(start_1, start_2) and not torch.equal(start_2, end)

    def test_passing_layers_are_not_retested(self, scripted):
        calls, script = scripted
        script += [1.0]
        report = measure_quantization(_model(), F.cross_entropy, digits_batches(1), 8).bias
        assert calls == [8] and report.passed and report.retested() == []
        assert "retested" not in report.summary()


def test_cli_line_names_the_retested_layers_and_the_outcome():
    from fqtorch.stats.cli import _retest_note

    passed = {"bias_retested": ["fc2"], "bias_failing": []}
    draws = RETEST_FACTOR * 16
    assert _retest_note(passed, 16) == f"  (retested fc2 on {draws} fresh draws: passed)"
    confirmed = {"bias_retested": ["fc1", "fc2"], "bias_failing": ["fc2", "conv1"]}
    assert _retest_note(confirmed, 16).endswith("draws: biased: fc2)")
    assert _retest_note({"bias_retested": [], "bias_failing": ["conv1"]}, 16) == ""


@pytest.mark.slow
class TestRetestOnRealQuantizers:
    def test_deterministic_bias_stays_biased_on_retest(self):
        """Nearest rounding has no spread: ``+inf`` in the first test and in the retest."""
        model = _model(grad_rounding="nearest")
        report = measure_quantization(model, F.cross_entropy, digits_batches(2), 8).bias
        assert not report.passed and math.isinf(report.z_rms)
        assert report.retested() == report.failing()
        assert all(math.isinf(layer.retest.z_rms) for layer in report.layers if layer.retest)

    def test_culprits_are_retested_before_they_are_named(self, monkeypatch):
        """check_unbiased switches each layer on alone; a layer is named only when its retest on
        four times the draws fails too."""
        real, calls = estimators._retested, []

        def spy(first, measure_again):
            report = real(first, measure_again)
            calls.append((first.samples, report.retested()))
            return report

        monkeypatch.setattr(estimators, "_retested", spy)
        model = _model(grad_rounding="nearest")
        report = check_unbiased(model, F.cross_entropy, digits_batches(1), samples=8)
        layers = list(fqt_modules(model))
        assert len(calls) == 1 + len(layers)  # the whole model, then each layer alone
        assert all(samples == 8 for samples, _ in calls)
        assert report.culprits and all(c in layers for c in report.culprits)
        retested_alone = {name for _, names in calls[1:] for name in names}
        assert set(report.culprits) <= retested_alone

    def test_small_bias_is_still_caught_after_retest(self):
        """A shift of a tenth of a grid step (the power test's quantizer): the first test and the
        retest on four times the draws both fail it."""
        from tests.stats.test_bias_threshold import cli_defaults

        d = cli_defaults()
        model = _model("test_shift_tenth_step")
        batches = digits_batches(d["batches"], size=d["batch_size"])
        report = measure_quantization(model, F.cross_entropy, batches, d["samples"]).bias
        assert not report.passed and report.retested()


def test_variance_json_records_the_retest():
    """``fqtorch variance``'s per-configuration record: nearest rounding fails both tests, so
    every failing layer was retested, at a tighter limit, with ``+inf`` again."""
    from fqtorch.stats.cli import _measure_config

    torch.manual_seed(0)
    model = build_model("digits_cnn").train()
    cfg = FQTConfig(grad_quantizer="psq", grad_bits=4, grad_rounding="nearest", seed=0)
    r = _measure_config(model, cfg, digits_batches(1), 4, 1e-3)
    assert not r["bias_passed"] and r["bias_failing"]
    assert r["bias_retested"] == r["bias_failing"] == list(r["bias_retest"])
    for layer in r["bias_failing"]:
        assert math.isinf(r["bias_retest"][layer]["z_rms"])
        assert r["bias_retest"][layer]["limit"] < r["bias_z_limit"]
