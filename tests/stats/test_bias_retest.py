"""A layer that fails the bias test is tested again on fresh draws and is reported biased only
when that fails too (``BiasReport``, docs/method.md §7): the plumbing, on scripted statistics, and
both sides on real quantizers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fqtorch import FQTConfig, quantize_model
from fqtorch.models import build_model
from fqtorch.stats import estimators, measure_quantization
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
        variance, z2, z_max, params, owner = real(model, loss_fn, batches, 4, z)
        calls.append(samples)
        value = script[len(calls) - 1]
        return variance, [torch.full_like(t, value) for t in z2], z_max, params, owner

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
    def test_deterministic_bias_is_not_retested(self):
        """Nearest rounding has no spread: ``+inf``, certain, and not worth a retest."""
        model = _model(grad_rounding="nearest")
        report = measure_quantization(model, F.cross_entropy, digits_batches(2), 8).bias
        assert not report.passed and math.isinf(report.z_rms)
        assert report.retested() == []

    def test_small_bias_is_still_caught_after_retest(self):
        """A shift of a tenth of a grid step (the power test's quantizer): the first test and the
        retest on four times the draws both fail it."""
        from tests.stats.test_bias_threshold import cli_defaults

        d = cli_defaults()
        model = _model("test_shift_tenth_step")
        batches = digits_batches(d["batches"], size=d["batch_size"])
        report = measure_quantization(model, F.cross_entropy, batches, d["samples"]).bias
        assert not report.passed
        assert report.retested() and all(
            not layer.retest.passed for layer in report.layers if layer.name in report.failing()
        )
