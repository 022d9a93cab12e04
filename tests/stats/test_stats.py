"""fqtorch.stats: closed forms, the decomposition, 4× per bit, the bias test, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import t as student_t
from torch import nn

import fqtorch
from fqtorch import FQTConfig, quantize_model
from fqtorch.models import build_model
from fqtorch.quantizers import register_quantizer
from fqtorch.quantizers.uniform import PerRow
from fqtorch.stats import (
    BiasError,
    VarianceMonitor,
    check_unbiased,
    exact_backward,
    grad_output_errors,
    measure_quantization,
    qat_gradient,
    quantization_variance,
    sampling_variance,
    variance_profile,
)
from tests.helpers import exact_gradients


def digits_batches(count: int, size: int = 32, seed: int = 0):
    from fqtorch.data import build_datasets

    spec = build_datasets("digits")
    order = torch.randperm(len(spec.train), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(count):
        idx = order[i * size : (i + 1) * size]
        batches.append(
            (
                torch.stack([spec.train[j][0] for j in idx]),
                torch.stack([spec.train[j][1] for j in idx]),
            )
        )
    return batches


def small_cnn(preset: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return quantize_model(build_model("digits_cnn"), FQTConfig.preset(preset, **overrides)).train()


def linear_loss(output, target):
    return (output * target).sum()  # grad_output = target exactly


class TestClosedForms:
    """A single Linear layer with a known grad_output: the quantization variance of its weight
    and bias gradients is computable exactly, ``Σ_r x_ri² Δ_o² f(1 − f)``."""

    def test_single_linear_weight_branch(self):
        gen = torch.Generator().manual_seed(0)
        rows, fan_in, fan_out = 24, 5, 3
        x = torch.randn(rows, fan_in, generator=gen)
        g = torch.randn(rows, fan_out, generator=gen)
        layer = nn.Sequential(nn.Linear(fan_in, fan_out))
        cfg = FQTConfig(
            input_quantizer="identity",
            weight_quantizer="identity",
            grad_quantizer="identity",
            grad_weight_quantizer="per_column",
            grad_weight_bits=3,
        )
        quantize_model(layer, cfg)
        low, high = g.amin(0), g.amax(0)
        step = (high - low) / 7
        frac = torch.frac((g - low) / step)
        per_elem = (step**2 * frac * (1 - frac)).double()  # (rows, out) SR variance
        expected_w = (x.double().square().T @ per_elem).sum()  # Σ_o Σ_i Σ_r x² var
        expected_b = per_elem.sum()
        var = quantization_variance(layer, linear_loss, [(x, g)], samples=4000)
        se_rel = math.sqrt(2 / 4000)
        assert var.per_parameter["0.weight"] == pytest.approx(float(expected_w), rel=5 * se_rel)
        assert var.per_parameter["0.bias"] == pytest.approx(float(expected_b), rel=5 * se_rel)

    def test_stochastic_rounding_of_uniform_values(self):
        # Values uniform within their bins: E[(Q(x) − x)²] = Δ²·E[f(1 − f)] = Δ²/6.
        q = fqtorch.get_quantizer("psq", 4)
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(200, 64, generator=gen)
        x[:, 0], x[:, 1] = 0.0, 1.0  # every row has range exactly 1
        step = 1 / 15
        err = torch.stack([(q(x, gen) - x)[:, 2:].square().mean() for _ in range(50)]).double()
        assert float(err.mean()) == pytest.approx(step**2 / 6, rel=0.03)


@pytest.mark.slow
class TestDecomposition:
    """docs/method.md §3: Var[FQT] = sampling variance + quantization variance, within sampling
    error (the cross term has zero mean because the FQT gradient is unbiased)."""

    def test_total_is_sampling_plus_quantization(self):
        """Per batch, ``E‖g − g_full‖² = ‖g_QAT − g_full‖² + quantization variance``: the mean
        over the batches of ``total − sampling − quantization`` is 0 within a t-test on the
        batches (independent draws). ``quantization_variance``, replaying the same draws (same
        seed), is the batches' mean unbiased sample variance of those very draws, and
        ``sampling_variance`` the mean of ``‖g_QAT − g_full‖²``."""
        model = small_cnn("psq3")
        batches = digits_batches(12)
        full = digits_batches(40, size=32, seed=1)
        sampling = sampling_variance(model, F.cross_entropy, batches, full_data=full)
        params = list(model.parameters())

        def flat(loss):
            return torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]
            ).double()

        with exact_backward(model):
            g_full = sum(flat(F.cross_entropy(model(x), y)) for x, y in full) / len(full)
        draws = 6
        fqtorch.reseed(model, 5)
        totals, samps, variances = [], [], []
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            with exact_backward(model):
                g_qat = flat(loss)
            g = torch.stack([flat(loss) for _ in range(draws)])
            totals.append((g - g_full).square().sum(1).mean())
            samps.append((g_qat - g_full).square().sum())
            variances.append(g.var(0).sum())  # unbiased per entry, summed
        totals, samps, variances = (torch.stack(v) for v in (totals, samps, variances))
        fqtorch.reseed(model, 5)
        quant = quantization_variance(model, F.cross_entropy, batches, samples=draws)
        assert quant.total == pytest.approx(float(variances.mean()), rel=1e-6)
        assert sampling.total == pytest.approx(float(samps.mean()), rel=1e-6)
        gap = totals - samps - variances  # mean 0 per batch when the decomposition holds
        limit = float(student_t.ppf(1 - 1e-3 / 2, len(batches) - 1))
        assert abs(float(gap.mean())) < limit * float(gap.std()) / math.sqrt(len(batches))
        assert float(variances.mean()) > 0.05 * float(totals.mean())  # the term is not negligible

    def test_quantization_variance_falls_four_times_per_bit(self):
        batches = digits_batches(2)
        var = {}
        for bits in (4, 5, 6):
            model = small_cnn(f"psq{bits}", grad_weight_bits=bits)
            var[bits] = quantization_variance(model, F.cross_entropy, batches, samples=24).total
        for b in (4, 5):
            assert 2.8 < var[b] / var[b + 1] < 6.0, var  # ((2^(b+1) − 1)/(2^b − 1))² ≈ 4.1–4.5


class ShiftedRounding(PerRow):
    """A deliberately biased quantizer: stochastic rounding that rounds up too rarely."""

    def encode(self, x, generator=None):
        return super().encode(x - 0.05 * x.abs().amax(), generator)


if "test_biased_sr" not in fqtorch.list_quantizers():
    register_quantizer("test_biased_sr")(ShiftedRounding)


@pytest.mark.slow
class TestBiasCheck:
    """check_unbiased passes every unbiased quantizer and catches biased ones, naming the layer."""

    @pytest.mark.parametrize("preset", ["ptq4", "psq4", "bhq4", "bhq3"])
    def test_unbiased_pass(self, preset):
        report = check_unbiased(small_cnn(preset), F.cross_entropy, digits_batches(3), samples=24)
        assert report.passed, report.summary()
        assert 0.7 < report.z_rms < 1.3

    def test_rht_passes(self):
        model = small_cnn("qat", grad_quantizer="rht", grad_bits=4)
        assert check_unbiased(model, F.cross_entropy, digits_batches(3), samples=24).passed

    def test_nearest_rounding_fails(self):
        model = small_cnn("psq2", grad_rounding="nearest")
        report = check_unbiased(model, F.cross_entropy, digits_batches(2), samples=8)
        assert not report.passed

    def test_biased_stochastic_quantizer_is_named(self):
        model = small_cnn("qat")
        layer = "classifier.1"

        def config(module, name):
            if name == layer:
                return FQTConfig(
                    grad_quantizer="test_biased_sr", grad_bits=4, grad_weight_quantizer="identity"
                )
            return FQTConfig(grad_quantizer="psq", grad_bits=4)

        fqtorch.dequantize_model(model)
        quantize_model(model, config)
        with pytest.raises(BiasError, match=layer):
            check_unbiased(
                model, F.cross_entropy, digits_batches(3), samples=24, raise_on_failure=True
            )

    def test_needs_fqt_layers(self):
        with pytest.raises(ValueError, match="no FQT layers"):
            check_unbiased(build_model("digits_cnn"), F.cross_entropy, digits_batches(1))


class TestEstimatorsLeaveModelAlone:
    """Estimators restore BatchNorm buffers and never touch .grad."""

    def test_no_side_effects(self):
        model = small_cnn("bhq4")
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        measure_quantization(model, F.cross_entropy, digits_batches(1), samples=4)
        sampling_variance(model, F.cross_entropy, digits_batches(2))
        qat_gradient(model, F.cross_entropy, digits_batches(1)[0])
        for k, v in model.named_buffers():
            assert torch.equal(v, buffers[k])
        assert all(p.grad is None for p in model.parameters())


class TestGradOutputAndProfile:
    def test_grad_output_error_below_bound(self):
        errors = grad_output_errors(small_cnn("ptq4"), F.cross_entropy, digits_batches(1)[0], 16)
        assert {e.name for e in errors} == {
            "features.0",
            "features.3",
            "classifier.1",
            "classifier.3",
        }
        for e in errors:
            assert 0 < e.error <= e.bound * 1.1

    def test_a_layer_called_twice_counts_both_calls(self):
        """A shared layer quantizes two grad_outputs per backward; only the last recorded one
        (the first call's) was measured, so its error and bound covered half the noise its
        variance row counts. Both calls now: the bound is the sum of the two calls' bounds."""

        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.shared, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

            def forward(self, x):
                return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

        torch.manual_seed(0)
        model = quantize_model(Twice(), FQTConfig.preset("psq4", seed=1))
        g = torch.Generator().manual_seed(2)
        batch = (torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
        seen = []
        fqtorch.reseed(model, 5)  # the same noise in both backward passes: the same grad_outputs
        with model.shared.observe_grad_output(lambda grad: seen.append(grad.detach().float())):
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        model.zero_grad(set_to_none=True)
        fqtorch.reseed(model, 5)
        assert len(seen) == 2
        quantizer = model.shared.plan.grad_output
        expected = sum(float(quantizer.variance_bound(grad)) for grad in seen)
        shared = {e.name: e for e in grad_output_errors(model, F.cross_entropy, batch, 8)}["shared"]
        assert shared.bound == pytest.approx(expected, rel=1e-5)
        assert 0 < shared.error <= shared.bound

    def test_profile_is_lower_triangular(self):
        """A layer's quantizers reach exactly its own gradient and those of every layer below it
        (BatchNorms included): zero above the diagonal, positive on and below it; sampling
        reaches every layer."""
        model = small_cnn("psq4")
        batches = digits_batches(1)
        sampling = sampling_variance(model, F.cross_entropy, digits_batches(3))
        profile = variance_profile(model, F.cross_entropy, batches, samples=4, sampling=sampling)
        fqt_layers = ["features.0", "features.3", "classifier.1", "classifier.3"]
        assert profile.rows == [*fqt_layers, "sampling"]
        assert profile.columns == [
            "features.0",
            "features.1",
            "features.3",
            "features.4",
            "classifier.1",
            "classifier.3",
        ]
        for row, values in zip(fqt_layers, profile.matrix, strict=False):
            cut = profile.columns.index(row) + 1  # the columns in forward order up to the row
            assert all(v > 0 for v in values[:cut]), (row, values)
            assert all(v == 0 for v in values[cut:]), (row, values)
        assert all(v > 0 for v in profile.matrix[-1])


def test_variance_monitor():
    model = small_cnn("psq4")
    ratio = VarianceMonitor(model, F.cross_entropy).measure(digits_batches(1, size=64)[0])
    assert 0 < ratio.total_ratio < 1
    assert set(ratio.ratio) >= {"features.0", "classifier.3"}
    assert json.dumps(ratio.to_dict())


def test_measuring_leaves_training_as_it_was():
    """A run that measures after every step (the monitor, the adaptive-precision probe) trains
    bit for bit as one that does not: the measurements draw dropout masks and rounding noise,
    and put both streams back. The layers' generators are created inside the first
    measurements (no draw has made them yet) and must be gone again after them."""
    from fqtorch.convert import fqt_modules
    from fqtorch.stats import PrecisionController

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g))]
    batches *= 4

    def run(measure: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = quantize_model(
            nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3)),
            FQTConfig.preset("bhq4", seed=1),
        )
        monitor = VarianceMonitor(model, F.cross_entropy, samples=2, micro_batches=2)
        ctl = PrecisionController(fqt_modules(model), budget=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i, (x, y) in enumerate(batches):
            if measure and i == 0:  # before any draw: generators not yet created
                monitor.measure((x, y))
                ctl.probe(model, F.cross_entropy, (x, y))
                assert all(layer._generator is None for layer in fqt_modules(model).values())
            F.cross_entropy(model(x), y).backward()
            if measure:
                monitor.measure((x, y))
                ctl.probe(model, F.cross_entropy, (x, y))
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for quiet, measured in zip(run(False), run(True), strict=True):
        assert torch.equal(quiet, measured)


@pytest.mark.parametrize("batch", [8, 13])
def test_variance_monitor_sampling_is_unbiased_for_uneven_micro_batches(batch):
    """The monitor's sampling variance of a size-N batch gradient, over many batches, averages
    the true value, also where the micro-batches are uneven (13 in 4: 4, 4, 4, 1). A
    zero-weight ``Linear(8, 1)`` under MSE on x ~ N(0, I), y ~ N(0, 1) has per-sample gradients
    ``−2·y·x``: variance 4 per entry, so ``Var[ḡ] = 8·4/N`` in all. The unweighted
    ``var(micro-batch means) / m`` reads 3.47 for 2.46 at N = 13 (z ≈ 8 with 800 batches)."""
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(8, 1, bias=False)), FQTConfig.preset("psq8"))
    with torch.no_grad():
        model[0].weight.zero_()

    def loss_fn(out, y):
        return F.mse_loss(out.squeeze(-1), y)

    monitor = VarianceMonitor(model, loss_fn, samples=2, micro_batches=4)
    g = torch.Generator().manual_seed(batch)
    estimates = torch.tensor(
        [
            sum(
                monitor._sampling(
                    (torch.randn(batch, 8, generator=g), torch.randn(batch, generator=g))
                ).values()
            )
            for _ in range(800)
        ],
        dtype=torch.float64,
    )
    truth = 8 * 4 / batch
    # the mean of 800 independent estimates against its standard error: |z| < 4.5 is a false
    # alarm once in ~1e5 per case
    z = (estimates.mean() - truth) / (estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(z)) < 4.5, (float(estimates.mean()), truth)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_variance_cli_schema(tmp_path, fused):
    out = tmp_path / "v"
    cmd = [
        sys.executable,
        "-m",
        "fqtorch",
        "variance",
        "--quantizers",
        "psq,bhq",
        "--bits",
        "4,6",
        "--batches",
        "2",
        "--samples",
        "4",
        "--profile-samples",
        "2",
        "--full-batches",
        "2",
        "--out",
        str(out),
    ] + (["--fused", "--profile", "none"] if fused else [])
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = result.stdout + result.stderr
    assert "max |z| (info)" in log and "max |z| of single entries is informational" in log
    assert "4/4," in log  # progress per configuration
    # the README's install gives the figures, and the last line names what was written
    figures = ["variance_vs_bits.png"] + ([] if fused else ["variance_profile.png"])
    for name in figures:
        assert (out / name).stat().st_size > 10_000, name
        assert name in log.strip().splitlines()[-1]
    assert json.loads((out / "variance_details.json").read_text())["fused"] is fused
    data = json.loads((out / "variance.json").read_text())
    assert set(data) == {
        "model",
        "dataset",
        "batch_size",
        "seed",
        "sampling_variance",
        "sampling_variance_rse",
        "results",
    }
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert set(r) == {
            "quantizer",
            "bits",
            "bits_per_element",
            "rounding",
            "bias_passed",
            "quantization_variance",
            "bias_z_rms",
            "bias_z_limit",
            "bias_z_max",
            "bias_retested",
            "bias_retest",
            "bias_failing",
            "layers",
        }
        for layer in r["layers"]:
            assert set(layer) == {
                "name",
                "quantization_variance",
                "grad_output_error",
                "grad_output_error_bound",
            }
    assert (out / "variance_vs_bits.png").stat().st_size > 1000
    if not fused:  # the fused run skips the profile (--profile none)
        assert (out / "variance_profile.png").stat().st_size > 1000
    bad = subprocess.run(
        [sys.executable, "-m", "fqtorch", "variance", "--quantizers", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--quantizers: 'nope' is not a registered" in bad.stderr


@pytest.mark.slow
def test_train_logs_variance(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fqtorch",
        "train",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "4",
        "--variance-every",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "variance.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    steps = {m["epoch"]: m["steps"] for m in map(json.loads, (out / "metrics.jsonl").open())}
    for x in lines:  # the epoch it was measured in, counted as metrics.jsonl counts them
        assert steps.get(x["epoch"] - 1, 0) < x["step"] <= steps[x["epoch"]], (x, steps)
    assert lines[0]["total_ratio"] > 0 and "classifier.3" in lines[0]["ratio"]


@pytest.mark.slow
def test_variance_cli_bad_input_leaves_nothing_behind(tmp_path):
    """Too many batches, --out naming a file, too few samples: one line naming the problem, exit
    code 2, no folder left behind."""
    out = tmp_path / "never"
    cmd = [sys.executable, "-m", "fqtorch", "variance", "--batches", "1000", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "exceeds the" in result.stderr, result.stderr[-500:]
    assert "Traceback" not in result.stderr and not out.exists()
    file = tmp_path / "a_file"
    file.write_text("keep me")
    cmd = [sys.executable, "-m", "fqtorch", "variance", "--out", str(file)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "is a file" in result.stderr, result.stderr[-500:]
    assert file.read_text() == "keep me"
    cmd = [sys.executable, "-m", "fqtorch", "variance", "--samples", "3", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--samples: samples must be >= 4" in result.stderr
    assert not out.exists()


class _Tied(nn.Module):
    """An embedding and an output head sharing one weight (tied, as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(x))))


def test_a_tied_parameter_counts_once():
    """The sampling variance of a model with tied weights is that of ``model.parameters()``'s
    gradient (each tensor once), computed by hand from the same batches' gradients; the tied
    weight belongs to the FQT layer that holds it (the head), where its weight-gradient
    quantization noise lands."""
    from fqtorch.stats import sampling_variance

    torch.manual_seed(0)
    model = quantize_model(_Tied(), FQTConfig(seed=1))
    assert model.head.weight is model.embed.weight
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 11, (8,), generator=g), torch.randint(0, 11, (8,), generator=g))
        for _ in range(4)
    ]
    result = sampling_variance(model, F.cross_entropy, batches)
    assert sorted(result.per_parameter) == ["head.weight", "mix.bias", "mix.weight"]
    assert sorted(result.per_layer) == ["head", "mix"]
    stacked = exact_gradients(model, F.cross_entropy, batches)
    expect = float(stacked.var(0).sum())
    assert result.total == pytest.approx(expect, rel=1e-9)


def test_variance_profile_bits_default_to_the_fewest_of_bits_and_help_says_so(capsys):
    """``--profile bhq`` (no ``:BITS``) is bhq at the fewest of ``--bits``, as ``--help`` says;
    ``bhq:`` (an empty BITS) is refused."""
    from fqtorch.cli import main
    from fqtorch.stats.cli import _profile_choice

    assert _profile_choice("bhq", ["ptq"], [6, 5, 8]) == ("bhq", 5)
    assert _profile_choice("bhq:7", ["ptq"], [6, 5, 8]) == ("bhq", 7)
    assert _profile_choice(None, ["ptq", "bhq"], [6, 5]) == ("ptq", 5)
    assert _profile_choice("none", ["ptq"], [6]) is None
    with pytest.raises(SystemExit):
        main(["variance", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--profile QUANTIZER[:BITS]" in text and "BITS left out: the fewest of --bits" in text


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--profile", "xyz"], "--profile: 'xyz' is not a registered quantizer; give NAME or"),
        (["--profile", "bhq+rht16:4"], "--profile: 'bhq+rht16': bhq takes no transform before"),
        # --quantizers' errors name the flag typed (not FQTConfig's grad_quantizer), and the
        # forms it takes
        (
            ["--quantizers", "foo"],
            "--quantizers: 'foo' is not a registered quantizer; give NAME "
            "or NAME+rht16 or NAME+rht32 with NAME one of: bhq, ",
        ),
        (
            ["--quantizers", "psq,bhq+rht8"],
            "--quantizers: 'bhq+rht8' names no known transform; "
            "give NAME or NAME+rht16 or NAME+rht32",
        ),
        (["--quantizers", "psq+"], "--quantizers: 'psq+' names no known transform"),
        (["--quantizers", "rht+rht32"], "--quantizers: 'rht+rht32': rht takes no transform"),
        (
            ["--quantizers", "identity+rht16"],
            "--quantizers: 'identity+rht16': identity quantizes nothing, so +rht16 would",
        ),
        (["--profile", "bhq:x"], "--profile: expected QUANTIZER[:BITS] (e.g. bhq:4, or bhq"),
        (["--profile", "bhq:"], "--profile: expected QUANTIZER[:BITS] (e.g. bhq:4, or bhq"),
        (["--profile", "bhq:9"], "--profile: bits must be in 2..8, got 9"),
        (["--profile-samples", "1"], "--profile-samples must be >= 2, got 1"),
        (["--batches", "0"], "--batches must be >= 1, got 0"),
        (["--bits", "4,9"], "--bits: each must be in 2..8, got 9"),
    ],
)
def test_variance_cli_checks_every_flag_before_measuring(tmp_path, capsys, flags, message):
    """Flags the run only needs at its end (the profile's) are checked before the grid is
    measured, so a typo costs nothing: one line naming the flag, nothing written."""
    from fqtorch.cli import main

    out = tmp_path / "never"
    assert main(["variance", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_layer_without_gradient_has_ratio_0_and_one_batch_has_no_spread():
    """A layer with neither quantization nor sampling variance (no gradient: 0/0) has ratio 0,
    not inf (which read as a layer drowned in noise); a layer with quantization variance over
    a zero sampling variance keeps inf. One batch gives no spread around its own mean: refused
    (it returned 0)."""
    from fqtorch.stats.monitor import VarianceRatio

    ratio = VarianceRatio({"dead": 0.0, "a": 2.0, "b": 1.0}, {"dead": 0.0, "a": 4.0, "b": 0.0})
    assert ratio.ratio == {"dead": 0.0, "a": 0.5, "b": math.inf}
    model = quantize_model(nn.Sequential(nn.Linear(4, 2)), FQTConfig.preset("psq4"))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="needs 2 or more batches"):
        fqtorch.stats.sampling_variance(model, F.cross_entropy, [batch])
    assert fqtorch.stats.sampling_variance(model, F.cross_entropy, [batch], [batch]).total == 0


def test_no_batches_is_one_line():
    from fqtorch.stats import check_unbiased

    model = quantize_model(nn.Linear(3, 2), FQTConfig.preset("bhq5"))
    with pytest.raises(ValueError, match="no batches given"):
        check_unbiased(model, F.mse_loss, [], samples=8)


def test_a_text_checkpoint_gives_its_data_set_and_context(tmp_path):
    """fqtorch variance / plan --checkpoint of a text run: the data set, its file and the context
    length default to the run's (digits and 64 did, and the weights then did not fit)."""
    import argparse

    from fqtorch.cli import main
    from fqtorch.stats.cli import _model_and_data
    from tests.data.test_datasets import write_text

    corpus = write_text(tmp_path / "c.txt")
    flags = ("--dataset", "text", "--data-dir", corpus, "--block-size", "16", "--batch-size", "8")
    out = tmp_path / "run"
    limit = ("--epochs", "1", "--max-steps-per-epoch", "1", "--quiet")
    assert main(["train", *map(str, flags), *limit, "--out", str(out)]) == 0
    args = argparse.Namespace(
        checkpoint=str(out / "checkpoint.pt"),
        model=None,
        dataset=None,
        data_dir=None,
        block_size=None,
        seed=0,
        device="cpu",
    )
    _, spec, name = _model_and_data(args)
    assert (args.dataset, args.block_size, name) == ("text", 16, "char_gpt")
    assert spec.block_size == 16 and args.data_dir == str(corpus)
