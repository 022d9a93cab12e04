"""Properties of fqtorch.stats that mutation testing (scripts/mutation.sh, docs/testing.md) found
unchecked: the one-batch null threshold, the profile's mean over batches, the bias report's
bookkeeping, and ``fqtorch variance`` run in-process (the subprocess tests cannot see a change
made to the code under test by a mutation tool)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sps
from torch import nn

import fqtorch
from fqtorch import FQTConfig, quantize_model
from fqtorch.cli import main
from fqtorch.models import build_model
from fqtorch.stats import bias_test, variance_profile
from fqtorch.stats.null import z2_threshold

FQT_LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]


def digits_batches(count: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from fqtorch.data import build_datasets

    spec = build_datasets("digits")
    xs, ys = zip(*(spec.train[i] for i in range(count * size)), strict=True)
    x, y = torch.stack(xs), torch.stack(ys)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, count * size, size)]


def small_cnn(preset: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(build_model("digits_cnn"), FQTConfig.preset(preset, **overrides)).train()


class TestNullThreshold:
    @pytest.mark.parametrize("samples,alpha", [(8, 0.01), (16, 0.05)])
    def test_one_batch_threshold_is_the_tail_mean_of_t_squared(self, samples, alpha):
        """With one batch the threshold is ``E[t² | t² ≥ q]``, t Student-t(S − 1) and q its upper
        ``alpha`` quantile of t²: a Monte Carlo mean of that tail (fixed seed) agrees within
        4.5 of its standard errors (two-sided p ≈ 7e-6)."""
        nu = samples - 1
        q = sps.t.ppf(1 - alpha / 2, nu) ** 2
        t2 = np.square(np.random.default_rng(0).standard_t(nu, size=2_000_000))
        tail = t2[t2 >= q]
        se = tail.std(ddof=1) / math.sqrt(tail.size)
        assert abs(z2_threshold(samples, 1, alpha) - tail.mean()) < 4.5 * se

    def test_more_batches_never_raise_the_threshold(self):
        one = z2_threshold(8, 1, 0.01)
        assert 1 < z2_threshold(8, 4, 0.01) <= one


class TestProfile:
    def test_profile_over_batches_is_the_mean_of_the_per_batch_profiles(self):
        """Measured on [b1, b2] the profile is the mean of the profiles of b1 and of b2 measured
        one after the other (the same noise draws: nothing but the quantizers draws)."""
        batches = digits_batches(2, size=8)
        model = small_cnn("psq4")
        fqtorch.reseed(model, 0)
        first = variance_profile(model, F.cross_entropy, batches[:1], samples=2)
        second = variance_profile(model, F.cross_entropy, batches[1:], samples=2)
        fqtorch.reseed(model, 0)
        both = variance_profile(model, F.cross_entropy, batches, samples=2)
        assert both.rows == FQT_LAYERS
        mean = (torch.tensor(first.matrix) + torch.tensor(second.matrix)) / 2
        assert mean.sum() > 0
        torch.testing.assert_close(torch.tensor(both.matrix), mean, rtol=1e-5, atol=0)


class TestBiasReport:
    def test_layer_entries_count_its_parameters(self):
        model = small_cnn("psq4")
        report = bias_test(model, F.cross_entropy, digits_batches(1), samples=4)
        modules = dict(model.named_modules())
        for layer in report.layers:
            params = modules[layer.name].parameters(recurse=False)
            assert layer.entries == sum(p.numel() for p in params)

    def test_failure_names_the_topmost_failing_layer(self):
        """Nearest rounding biases the gradient: the report names as suspect the failing layer
        closest to the loss (last in forward order)."""
        model = small_cnn("psq2", grad_rounding="nearest")
        report = bias_test(model, F.cross_entropy, digits_batches(2), samples=8)
        failing = report.failing()
        assert failing and not report.passed
        in_order = [name for name, _ in model.named_modules() if name in failing]
        assert report.suspect == in_order[-1]
        assert repr(report.suspect) in report.summary()


def run_cli(tmp_path, caplog, name: str, *flags: str) -> tuple[dict, dict, list[str]]:
    out = tmp_path / name
    common = ["--batch-size", "16", "--batches", "2", "--samples", "4", "--out", str(out)]
    with caplog.at_level(logging.INFO):
        caplog.clear()
        assert main(["variance", *common, *flags]) == 0
    payload = json.loads((out / "variance.json").read_text())
    details = json.loads((out / "variance_details.json").read_text())
    return payload, details, [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_variance_cli_in_process(tmp_path, caplog):
    """``fqtorch variance`` with its defaults for data and model: configurations in the order
    asked, the profile of the first quantizer at its fewest bits (its last row the sampling
    variance per layer), progress and the files written in the log; ``--profile none`` writes
    no profile; ``--full-batches`` sets the reference gradient of the sampling variance."""
    payload, details, log = run_cli(
        tmp_path,
        caplog,
        "a",
        *("--quantizers", "psq", "--bits", "4,3", "--profile-samples", "2"),
        *("--full-batches", "1"),
    )
    assert (payload["model"], payload["dataset"], payload["seed"]) == ("digits_cnn", "digits", 0)
    assert [(r["quantizer"], r["bits"]) for r in payload["results"]] == [("psq", 4), ("psq", 3)]
    for r in payload["results"]:
        assert [layer["name"] for layer in r["layers"]] == FQT_LAYERS
        assert r["quantization_variance"] > 0 and r["bias_z_rms"] <= r["bias_z_limit"]
    # fewer bits, more variance
    assert (
        payload["results"][1]["quantization_variance"]
        > payload["results"][0]["quantization_variance"]
    )
    sampling = details["sampling_per_layer"]
    assert math.isclose(payload["sampling_variance"], sum(sampling.values()), rel_tol=1e-6)
    assert 0 < payload["sampling_variance_rse"] < 1  # 2 batches around the full-data gradient
    profile = details["profile"]
    assert (profile["quantizer"], profile["bits"]) == ("psq", 3)
    assert profile["rows"] == [*FQT_LAYERS, "sampling"]
    assert profile["matrix"][-1] == [sampling[c] for c in profile["columns"]]
    assert (details["batches"], details["samples"], details["bias_passed"]) == (2, 4, [True] * 2)
    files = ["variance.json", "variance_details.json", "variance_vs_bits.png"]
    files.append("variance_profile.png")
    for name in files[2:]:
        assert (tmp_path / "a" / name).stat().st_size > 1000
    assert any(line.startswith("psq") and " 2/2, " in line for line in log)
    assert log[-1].startswith(f"wrote {tmp_path / 'a'}/" + ", ".join(files))

    other, details, log = run_cli(
        tmp_path,
        caplog,
        "b",
        *("--quantizers", "psq", "--bits", "4", "--profile", "none", "--full-batches", "2"),
    )
    assert details["profile"] is None and not (tmp_path / "b" / "variance_profile.png").exists()
    assert "variance_profile.png" not in log[-1] and "variance_vs_bits.png" in log[-1]
    # the same minibatches (same seed), measured around another full-data gradient
    assert (
        other["results"][0]["quantization_variance"]
        == payload["results"][0]["quantization_variance"]
    )
    assert other["sampling_variance"] != payload["sampling_variance"]


class TestFigures:
    """What the figures of ``fqtorch variance`` show, read from the matplotlib figure as it is
    saved (the PNG's pixels would be a brittle thing to compare)."""

    @staticmethod
    def _saved_figures(monkeypatch, tmp_path, payload, profile):
        import matplotlib.figure

        from fqtorch.stats.cli import _plots

        saved = {}

        def capture(fig, path, *args, **kwargs):
            saved[Path(path).name] = fig

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
        written = _plots(tmp_path, payload, profile, "psq4")
        assert written == list(saved)
        return saved

    def test_every_quantizer_line_has_its_own_style(self, monkeypatch, tmp_path):
        quantizers = ["ptq", "psq", "bhq", "rht"]
        results = [
            {"quantizer": q, "bits": b, "quantization_variance": 1.0 / b}  # identical lines
            for q in quantizers
            for b in (4, 8)
        ]
        payload = {
            "results": results,
            "sampling_variance": 0.1,
            "model": "m",
            "dataset": "d",
            "batch_size": 8,
        }
        figure = self._saved_figures(monkeypatch, tmp_path, payload, None)["variance_vs_bits.png"]
        lines = [
            line for line in figure.axes[0].get_lines() if line.get_label() != "sampling (QAT)"
        ]
        assert [line.get_label() for line in lines[: len(quantizers)]] == [
            q.upper() for q in quantizers
        ]
        looks = {(line.get_marker(), line.get_linestyle()) for line in lines[: len(quantizers)]}
        assert len(looks) == len(quantizers), "two quantizers drawn alike hide each other"

    def test_profile_shows_log_variance_and_zeros_apart(self, monkeypatch, tmp_path):
        from fqtorch.stats.estimators import VarianceProfile

        matrix = [[4e-3, 0.0, 0.0], [1e-5, 2e-2, 5.0], [1e-4, 1e-4, 1e-4]]
        profile = VarianceProfile(
            rows=["a", "b", "sampling"], columns=["a", "bn", "b"], matrix=matrix
        )
        payload = {
            "results": [],
            "sampling_variance": 1.0,
            "model": "m",
            "dataset": "d",
            "batch_size": 8,
        }
        figure = self._saved_figures(monkeypatch, tmp_path, payload, profile)[
            "variance_profile.png"
        ]
        shown = figure.axes[0].get_images()[0].get_array()
        kept = np.array(matrix)[:, [0, 2]]  # the column of "bn", a layer with no row, is left out
        assert shown.shape == kept.shape
        np.testing.assert_array_equal(np.ma.getmaskarray(shown), kept == 0)
        np.testing.assert_allclose(shown.compressed(), np.log10(kept[kept > 0]))
