"""The fp8 backend: ``torch._scaled_mm`` on the FP8 codes gives simulate's values (the same codes
from the same generator state) to the float32 accumulation-order bound, refuses what it cannot run
naming the field, and falls back with one warning where it does not run (convolutions)."""

from __future__ import annotations

import copy
import itertools
import re
import warnings

import pytest
import torch
from torch import nn

import fqtorch
from fqtorch import FQTConfig, quantize_model
from fqtorch.backends.base import FQTPlan
from fqtorch.backends.fp8 import accumulation_tolerance
from fqtorch.nn.functional import fqt_linear
from fqtorch.quantizers import get_quantizer
from fqtorch.quantizers.base import has_random_transform

FIELDS = ("input_quantizer", "weight_quantizer", "grad_quantizer", "grad_weight_quantizer")
TENSOR = ("fp8_e4m3", "fp8_e5m2")
ROW = (*TENSOR, "fp8_e4m3_per_row", "fp8_e5m2_per_row")
# What each field takes under backend="fp8", written out here, not read from the config.
EXPECTED = {
    "input_quantizer": TENSOR,
    "weight_quantizer": TENSOR,
    "grad_quantizer": (None, "identity", *ROW),
    "grad_weight_quantizer": (None, "identity", *ROW),
}
BASE = {
    "input_quantizer": "fp8_e4m3",
    "weight_quantizer": "fp8_e4m3",
    "grad_quantizer": "fp8_e5m2",
    "grad_weight_quantizer": "fp8_e5m2",
}
# grad_quantizer="identity" with grad_weight_quantizer=None defaults the latter to "per_column"
# (the paper's default), which fp8 refuses: TestRefusals checks that case.
ACCEPTED = [
    dict(zip(FIELDS, combo, strict=True))
    for combo in itertools.product(*EXPECTED.values())
    if combo[2:] != ("identity", None)
]


def run(layer, x, g, autocast=False):
    """Output and the three gradients of ``layer`` on ``x`` with upstream gradient ``g``; a
    fallback to simulate (its warning) is an error."""
    xi = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*using the simulate backend")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(xi)
        out.backward(g)
    grads = [p.grad for p in layer.parameters()]
    return (out.detach(), xi.grad, *grads)


def both(base, x, g, autocast=False, **fields):
    """``run`` on simulate and on fp8 (same seed, hence the same codes), fused pinned off."""
    fields = {"fused": False, **fields}
    return [
        run(quantize_model(copy.deepcopy(base), FQTConfig(backend=b, **fields)), x, g, autocast)
        for b in ("simulate", "fp8")
    ]


def tolerances(base, x, g, cfg, per_abs_sum=0.0):
    """The accumulation-order bound of each result (``fp8.accumulation_tolerance``): exact
    forward operands, and for a gradient quantizer the entrywise envelope
    ``|Q(g)| ≤ (1 + 2⁻²)|g| + 2⁻¹⁶ max|g|``. Stochastic rounding lands on one of the two grid
    points around a value; among normal numbers they are at most 2⁻ᵐ of it apart (m = 2 for
    E5M2, 3 for E4M3), and below them the subnormal step is ``2^(emin − m)`` of the scale, which
    puts the group maximum in the format's top binade (one binade higher at most under the
    no-clip rule of stochastic rounding): under 2^-16.8 of it for E4M3, 2^-30.8 for E5M2. That
    holds while the scale's exponent is not clamped (group maxima above about 2⁻¹¹⁹; these
    tests' are far above). The envelope is per entry, so small rows keep bounds of their own
    size (a per-row scale's error there is seen). ``per_abs_sum`` adds that fraction of
    ``|a| |b|`` to each GEMM's bound (a GPU's FP8 units that accumulate in less than float32)."""
    q = cfg.build_quantizers()
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    xq, wq = q["input"](x2), q["weight"](base.weight.detach())
    ga = 1.25 * g2.abs() + 2**-16 * float(g2.abs().max())

    def bound(a, b, extra=None):
        return accumulation_tolerance(a, b, extra) + per_abs_sum * (
            a.double().abs() @ b.double().abs()
        )

    out = bound(xq, wq.T, base.bias.detach()).reshape(*x.shape[:-1], -1)
    grad_input = bound(ga, wq).reshape(x.shape)
    grad_weight = bound(ga.T, xq)
    grad_bias = accumulation_tolerance(ga.T, torch.ones(g2.shape[0], 1)).reshape(-1)
    return out, grad_input, grad_weight, grad_bias


def assert_within(got, expected, tolerance):
    diff = (got.double() - expected.double()).abs()
    assert bool((diff <= tolerance).all()), float((diff - tolerance).max())


class TestAgainstSimulate:
    """Every accepted combination (both FP8 element types per tensor, per-row / per-column
    gradient scales, exact backward branches), with a bias: fp8 == simulate within the bound.
    Catches e.g. a per-row scale not applied (planted: ``_grad_input`` without ``mul_(rows)``)
    or the wrong per-tensor scale (planted: ``scaled_mm(..., x.scale, x.scale)``)."""

    @pytest.mark.parametrize(
        "fields", ACCEPTED, ids=["-".join(map(str, f.values())) for f in ACCEPTED]
    )
    def test_accepted_matches_simulate(self, fields):
        gen = torch.Generator().manual_seed(3)
        base = nn.Linear(24, 10)
        x = torch.randn(12, 24, generator=gen) * 3
        g = torch.randn(12, 10, generator=gen) * torch.logspace(-3, 1, 12)[:, None]
        sim, fp8 = both(base, x, g, **fields)
        cfg = FQTConfig(backend="fp8", fused=False, **fields)
        for a, b, tol in zip(sim, fp8, tolerances(base, x, g, cfg), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_within(b, a, tol)

    @pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
    def test_nd_input_and_rounding(self, rounding):
        """A (3, 5, 24) input through the (15, 24) view, per-row gradients, either rounding."""
        gen = torch.Generator().manual_seed(4)
        base = nn.Linear(24, 7)
        x, g = torch.randn(3, 5, 24, generator=gen), torch.randn(3, 5, 7, generator=gen)
        fields = {**BASE, "grad_quantizer": "fp8_e5m2_per_row", "grad_rounding": rounding}
        sim, fp8 = both(base, x, g, **fields)
        cfg = FQTConfig(backend="fp8", fused=False, **fields)
        for a, b, tol in zip(sim, fp8, tolerances(base, x, g, cfg), strict=True):
            assert_within(b, a, tol)

    def test_no_bias(self):
        """Planted: ``grad_bias`` returned for a layer without bias -> autograd raises."""
        torch.manual_seed(0)
        base = nn.Linear(16, 8, bias=False)
        x, g = torch.randn(6, 16), torch.randn(6, 8)
        sim, fp8 = both(base, x, g, **BASE)
        assert len(fp8) == 3
        for a, b in zip(sim, fp8, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    def test_frozen_weight(self):
        """Only the bias and the input train: their gradients match, the weight gets none.
        Planted: the weight-gradient branch entered on ``need_weight`` only -> no bias grad."""
        torch.manual_seed(0)
        base = nn.Linear(16, 8)
        base.weight.requires_grad_(False)
        x, g = torch.randn(6, 16), torch.randn(6, 8)
        sim, fp8 = both(base, x, g, **BASE)
        assert fp8[2] is None and fp8[3] is not None  # (out, input, weight, bias) grads
        for a, b in zip(sim[:2] + sim[3:], fp8[:2] + fp8[3:], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    def test_bf16_autocast(self):
        """As simulate: the forward output rounded once to bf16 (returned float32), the backward
        in float32. Planted: no rounding to the autocast dtype -> the output is not bf16-valued."""
        torch.manual_seed(0)
        base = nn.Linear(32, 12)
        x, g = torch.randn(9, 32), torch.randn(9, 12)
        sim, fp8 = both(base, x, g, autocast=True, **BASE)
        out = fp8[0]
        assert out.dtype == torch.float32
        assert torch.equal(out.bfloat16().float(), out)
        torch.testing.assert_close(out, sim[0], rtol=2**-7, atol=0.0)
        for a, b in zip(sim[1:], fp8[1:], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    def test_saves_fp8_codes(self):
        """The forward keeps FP8 codes for the backward. Planted: saving ``input``/``weight``."""
        base = quantize_model(nn.Linear(16, 8), FQTConfig(backend="fp8", fused=False, **BASE))
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            base(torch.randn(4, 16, requires_grad=True))
        assert [t.dtype for t in saved].count(torch.float8_e4m3fn) == 2
        assert all(t.numel() == 1 for t in saved if t.dtype == torch.float32)  # scales only

    @pytest.mark.slow
    def test_fused_quantizers(self):
        """``fused=True`` (the fp8 config default: compiled quantizers) pinned on both backends:
        the same codes, the same values."""
        torch.manual_seed(0)
        base = nn.Linear(24, 16)
        x, g = torch.randn(20, 24), torch.randn(20, 16)
        fields = {**BASE, "grad_quantizer": "fp8_e5m2_per_row", "fused": True}
        assert FQTConfig(backend="fp8", **BASE).fused is True
        sim, fp8 = both(base, x, g, **fields)
        cfg = FQTConfig(backend="fp8", **fields)
        for a, b, tol in zip(sim, fp8, tolerances(base, x, g, cfg), strict=True):
            assert_within(b, a, tol)


def test_tolerance_bounds_float32_sums_in_any_order():
    """Float32 sums of exact FP8 products in three orders (BLAS, left to right, right to left)
    are within half the bound of the exact (float64) sum, so within it of each other. Positive
    operands, where rounding errors add up (about 11 u·Σ|ab| here, 2⁻²⁴ = u; the bound is
    2 K u Σ|ab|, K = 4096): planted ``gamma = _UNIT`` (the factor K forgotten) fails."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(16, 4096, generator=gen).to(torch.float8_e4m3fn).float()
    b = torch.rand(4096, 4, generator=gen).to(torch.float8_e4m3fn).float()
    exact = a.double() @ b.double()
    tol = accumulation_tolerance(a, b)
    left = torch.zeros(16, 4)
    right = torch.zeros(16, 4)
    for k in range(a.shape[1]):
        left += a[:, k : k + 1] * b[k : k + 1]
        right += a[:, -1 - k : a.shape[1] - k] * b[-1 - k : b.shape[0] - k]
    for total in (a @ b, left, right):
        assert bool(((total.double() - exact).abs() <= tol / 2).all())


class TestRefusals:
    def test_accepted_and_refused_per_field(self):
        """Each registered quantizer in each field (the others valid): accepted exactly when
        listed in EXPECTED; refused with a message naming that field, the name and an example.
        Planted: ``"fp8_e4m3_per_row"`` added to the config's input list -> fails."""
        for field in FIELDS:
            names = fqtorch.list_quantizers() + ([None] if field.startswith("grad") else [])
            for name in names:
                fields = {**BASE, field: name}
                if field == "grad_quantizer" and name is None:
                    fields["grad_weight_quantizer"] = None
                if field in FIELDS[:2] and name is not None and has_random_transform(name):
                    # refused whatever the backend (tests/test_config.py)
                    with pytest.raises(ValueError, match=f"{field}='{name}' draws random signs"):
                        FQTConfig(backend="fp8", **fields)
                elif name not in EXPECTED[field]:
                    with pytest.raises(ValueError) as error:
                        FQTConfig(backend="fp8", **fields)
                    message = str(error.value)
                    named = [f for f in FIELDS if re.search(rf"\b{f}\b", message)]
                    assert named == [field], message
                    assert f"got {name!r}" in message and "backend='fp8'" in message
                    assert "preset('fp8_e5m2', backend='fp8')" in message
                else:
                    FQTConfig(backend="fp8", **fields)

    def test_identity_grad_keeps_the_paper_default(self):
        with pytest.raises(ValueError, match=r"grad_weight_quantizer .*got 'per_column'"):
            fields = {**BASE, "grad_quantizer": "identity", "grad_weight_quantizer": None}
            FQTConfig(backend="fp8", **fields)

    def test_presets_fit(self):
        for preset in ("fp8_e4m3", "fp8_e5m2"):
            assert FQTConfig.preset(preset, backend="fp8").backend == "fp8"
        with pytest.raises(ValueError, match="grad_transform"):
            FQTConfig.preset("fp8_e5m2", backend="fp8", grad_transform="rht16")

    def test_auto_does_not_pick_fp8(self):
        from fqtorch.backends.auto import decide

        for device in ("cpu", "cuda"):
            backend, _ = decide(device, cpu_flags=[], cuda_capability=(9, 0))
            assert backend != "fp8"


class TestFallback:
    def test_conv_warns_once_and_matches_simulate(self):
        """Planted: a conv entry that runs simulate silently (no warning) -> fails."""
        torch.manual_seed(0)
        base = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 6, 6)
        g = torch.randn(2, 4, 6, 6)
        results = []
        for backend in ("simulate", "fp8"):
            layer = quantize_model(
                copy.deepcopy(base), FQTConfig(backend=backend, fused=False, **BASE)
            )
            xi = x.clone().requires_grad_(True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                for _ in range(2):
                    out = layer(xi)
            out.backward(g)
            fallbacks = [w for w in caught if "simulate backend" in str(w.message)]
            assert len(fallbacks) == (backend == "fp8"), [str(w.message) for w in caught]
            if fallbacks:
                assert "Linear layers only" in str(fallbacks[0].message)
            results.append((out.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)

    def test_hand_built_plan_and_float64_fall_back(self):
        """A plan whose quantizers are not FP8 formats, or float64 operands: simulate, warned."""
        q = FQTConfig(grad_quantizer="psq").build_quantizers()
        plan = FQTPlan(**q, backend="fp8")
        x, w = torch.randn(4, 8), torch.randn(3, 8)
        with pytest.warns(RuntimeWarning, match="not a tensor-scaled FP8 format"):
            fqt_linear(x, w, None, plan)
        fp8_plan = FQTPlan.from_config(FQTConfig(backend="fp8", fused=False, **BASE))
        with pytest.warns(RuntimeWarning, match="float64"):
            fqt_linear(x.double(), w.double(), None, fp8_plan)

    def test_per_row_scales_across_the_reduction_fall_back(self):
        """A hand-built plan whose per-row FP8 gradient scales run across its GEMM's reduction
        (block_dim swapped): the scales cannot factor out of _scaled_mm, so the layer runs on
        simulate, warned (square operands got a silently wrong gradient, 1.9x its size)."""
        forward = get_quantizer("fp8_e4m3", rounding="nearest")
        across = (
            get_quantizer("fp8_e4m3_per_row", rounding="nearest", block_dim=0),
            get_quantizer("fp8_e4m3_per_row", rounding="nearest", block_dim=1),
        )
        grads = []
        for backend in ("simulate", "fp8"):
            plan = FQTPlan(forward, forward, *across, backend=backend)
            x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
            w = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fqt_linear(x, w, None, plan).backward(torch.logspace(-3, 3, 8)[:, None] * x)
            said = [str(c.message) for c in caught]
            assert any("scales along dim 0; its GEMM reduces along dim 1" in m for m in said) == (
                backend == "fp8"
            ), said
            grads.append((x.grad, w.grad))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)


def test_non_finite_gradient_matches_simulate():
    """A NaN in ``grad_output`` turns its row (per-row scale) NaN on both backends, and nothing
    else. Planted: per-row scale applied inside as ``scale.max()`` -> NaN everywhere."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x, g = torch.randn(6, 16), torch.randn(6, 8)
    g[2, 3] = float("nan")
    fields = {**BASE, "grad_quantizer": "fp8_e5m2_per_row", "grad_weight_quantizer": "identity"}
    sim, fp8 = both(base, x, g, **fields)
    assert torch.equal(sim[1].isnan(), fp8[1].isnan())
    assert bool(fp8[1][2].isnan().all()) and not bool(fp8[1][[0, 1, 3, 4, 5]].isnan().any())


def test_the_three_gemms_run_in_scaled_mm(monkeypatch):
    """Forward, ``grad_input`` and ``grad_weight`` are each one ``torch._scaled_mm`` on float8
    codes (a dequantize-and-matmul path would match simulate too)."""
    real, seen = torch._scaled_mm, []

    def spy(a, b, *args, **kwargs):
        seen.append((a.dtype, b.dtype))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    gen = torch.Generator().manual_seed(5)
    x, g = torch.randn(12, 24, generator=gen), torch.randn(12, 10, generator=gen)
    fields = {**BASE, "grad_quantizer": "fp8_e5m2", "grad_weight_quantizer": "fp8_e5m2"}
    run(quantize_model(nn.Linear(24, 10), FQTConfig(backend="fp8", **fields)), x, g)
    assert len(seen) == 3
    assert all(dt in (torch.float8_e4m3fn, torch.float8_e5m2) for pair in seen for dt in pair)


def test_a_fallback_is_warned_once_per_layer_and_reason():
    """Python's once-per-location memo is reset by torch.compile (a fused run warned the same
    layer's fallback on a later pass again): the warning is memoised by its text."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    quantize_model(model, FQTConfig.preset("fp8_e4m3", backend="fp8"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as after a reset of the registry
        for _ in range(3):
            model(torch.randn(2, 2, 4, 4)).sum().backward()
    said = [str(w.message) for w in caught if "using the simulate backend" in str(w.message)]
    assert said == [
        "FQT layer '0': the fp8 backend runs Linear layers only; using the simulate backend"
    ]


CUDA_FIELDS = {
    "e4m3-e5m2": BASE,
    "per-row": {
        **BASE,
        "grad_quantizer": "fp8_e5m2_per_row",
        "grad_weight_quantizer": "fp8_e4m3_per_row",
    },
    # Not both operands E5M2 in any product (cuBLASLt refuses that pair).
    "e5m2-forward": {
        **BASE,
        "input_quantizer": "fp8_e5m2",
        "grad_quantizer": "fp8_e4m3",
        "grad_weight_quantizer": "fp8_e4m3",
    },
}


@pytest.mark.cuda
@pytest.mark.parametrize("features", [(64, 32), (4096, 64)], ids=["k64", "k4096"])
@pytest.mark.parametrize("name", CUDA_FIELDS)
def test_cuda_fp8_matches_simulate(name, features):
    """On a GPU (capability ≥ 8.9): the three GEMMs run in cuBLASLt's ``_scaled_mm`` (a fallback
    warning is an error) and equal simulate on the same GPU within the float32 accumulation-order
    bound plus 2⁻¹¹ of ``|a| |b|``, at a short and a long reduction. The FP8 kernels do not
    accumulate in float32: on an NVIDIA H200 (torch 2.11.0+cu130) the first run failed the
    float32 bound alone, and ``benchmarks/gpu_probe.py`` measured max |C − exact| / (|a| |b|) of
    1.6–1.75e-4 for K ≤ 256 (1.3e-5 at K = 4096), under 2⁻¹¹ = 4.9e-4. A wrong scale or layout
    is off by order 1 of the entries it touches, and the bounds are per entry (``tolerances``),
    so rows four decades below the largest are checked at their own size."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs compute capability 8.9 or more")
    fields = CUDA_FIELDS[name]
    gen = torch.Generator().manual_seed(5)
    base = nn.Linear(*features)
    x = torch.randn(48, features[0], generator=gen) * 3
    g = torch.randn(48, features[1], generator=gen) * torch.logspace(-3, 1, 48)[:, None]
    cfg = FQTConfig(backend="fp8", fused=False, **fields)
    tol = tolerances(base, x, g, cfg, per_abs_sum=2**-11)
    sim, fp8 = both(base.cuda(), x.cuda(), g.cuda(), **fields)
    for a, b, t in zip(sim, fp8, tol, strict=True):
        assert b.is_cuda and a.dtype == b.dtype and a.shape == b.shape
        assert_within(b.cpu(), a.cpu(), t)
