"""Shared properties of every registered quantizer, and the claims of docs/method.md §4."""

from __future__ import annotations

import math

import pytest
import torch

import fqtorch
from fqtorch.quantizers import Quantizer, get_quantizer, list_quantizers, register_quantizer
from fqtorch.quantizers.base import QuantizedTensor
from tests.helpers import heavy_rows, projection_z, z_limit

ALL = list_quantizers()
CODED = [name for name in ALL if name != "identity"]
GRADIENT = ["ptq", "psq", "per_column", "bhq"]
ROUNDINGS = ["stochastic", "nearest"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(q: Quantizer, x: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([q(x, g) for _ in range(count)])


class TestRegistryProperties:
    """Every registered quantizer: same shape and dtype, codes on its grid, exact zeros, no NaN on
    constant input, reproducible from its generator."""

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("bits", [2, 5, 8])
    def test_shape_dtype_and_reproducible(self, name, rounding, bits):
        q = get_quantizer(name, bits, rounding=rounding)
        x = heavy_rows(7, 13).reshape(7, 13, 1)
        a, b = q(x, gen(3)), q(x, gen(3))
        assert a.shape == x.shape and a.dtype == x.dtype
        assert torch.equal(a, b)

    @pytest.mark.parametrize("name", CODED)
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("bits", [2, 3, 8])
    def test_codes_on_grid_and_decode(self, name, rounding, bits):
        q = get_quantizer(name, bits, rounding=rounding)
        x = heavy_rows(9, 16, seed=1)
        encoded = q.encode(x, gen(5))
        assert isinstance(encoded, QuantizedTensor)
        assert encoded.codes.dtype == torch.int8 and encoded.codes.shape[1] == 16
        # A row transform may pad rows (rht works on whole blocks); otherwise one code per entry.
        assert encoded.codes.shape[0] == 9 or encoded.transform is not None
        codes = encoded.codes.int()
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        assert torch.equal(encoded.dequantize(), q(x, gen(5)))

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_all_zero_stays_exactly_zero(self, name, rounding):
        q = get_quantizer(name, 4, rounding=rounding)
        out = q(torch.zeros(6, 5), gen())
        assert torch.equal(out, torch.zeros(6, 5))

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_constant_input_is_finite_and_kept(self, name, rounding):
        q = get_quantizer(name, 4, rounding=rounding)
        x = torch.full((6, 5), 2.5)
        out = q(x, gen())
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, x)

    @pytest.mark.parametrize("name", [n for n in CODED if n not in ("bhq", "rht")])
    def test_nearest_is_idempotent(self, name):
        q = get_quantizer(name, 4, rounding="nearest")
        once = q(heavy_rows(8, 10, seed=2))
        torch.testing.assert_close(q(once), once, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("name", CODED)
    def test_bits_at_both_ends(self, name):
        x = heavy_rows(16, 24, seed=3)
        err = {b: (get_quantizer(name, b)(x, gen()) - x).square().sum() for b in (2, 8)}
        assert err[8] < err[2]

    @pytest.mark.parametrize("name", ALL)
    def test_single_sample_and_two_samples(self, name):
        for n in (1, 2):
            x = heavy_rows(n, 7)
            out = get_quantizer(name, 4)(x, gen())
            assert out.shape == x.shape and torch.isfinite(out).all()

    @pytest.mark.parametrize("name", CODED)
    def test_huge_range_stays_finite(self, name):
        x = heavy_rows(12, 8) * 1e30
        x[0, 0] = 3e36
        out = get_quantizer(name, 8)(x, gen())
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("name", ALL)
    def test_bfloat16_and_noncontiguous(self, name):
        q = get_quantizer(name, 6)
        x = heavy_rows(10, 12).T  # non-contiguous
        assert q(x, gen()).shape == x.shape
        xb = x.to(torch.bfloat16)
        assert q(xb, gen()).dtype == torch.bfloat16


class TestUnbiasedness:
    """Stochastic rounding makes every quantizer unbiased: the mean of many draws matches x
    within the standard error measured from the draws; nearest rounding is caught as biased."""

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("bits", [2, 4, 8])
    def test_mean_matches_input(self, name, bits):
        q = get_quantizer(name, bits)
        assert q.unbiased
        x = heavy_rows(16, 24, seed=bits)
        z = projection_z(draws(q, x, 1500), x)
        assert z.abs().max() < z_limit(z.numel()), z

    @pytest.mark.parametrize("name", CODED)
    def test_nearest_rounding_is_detected_as_biased(self, name):
        q = get_quantizer(name, 2, rounding="nearest")
        assert not q.unbiased
        x = heavy_rows(16, 24, seed=7)
        z = projection_z(draws(q, x, 50), x)
        assert z.abs().max() > z_limit(z.numel())


class TestVarianceBounds:
    """Measured ``E‖q(x) − x‖²`` stays below ``variance_bound(x)`` (docs/method.md §4), and the
    bound is not vacuous (stochastic rounding of spread-out values reaches about 2/3 of it)."""

    @pytest.mark.parametrize("name", CODED)
    @pytest.mark.parametrize("bits", [2, 4, 8])
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    def test_error_below_bound(self, name, bits, rounding):
        q = get_quantizer(name, bits, rounding=rounding)
        x = heavy_rows(32, 40, seed=bits)
        errors = (draws(q, x, 300) - x).square().sum((1, 2)).double()
        mean, se = errors.mean(), errors.std() / math.sqrt(errors.numel())
        bound = q.variance_bound(x).double()
        assert mean <= bound + 4 * se

    @pytest.mark.parametrize("name", [n for n in CODED if n != "rht"])
    def test_bound_is_tight_for_spread_values(self, name):
        # Values uniform within their bins: E[f(1 − f)] = 1/6 against the bound's 1/4.
        # (rht's bound holds for every sign draw, so it is looser by design.)
        q = get_quantizer(name, 3)
        x = torch.rand(32, 40, generator=gen(9)) * torch.linspace(1, 4, 32)[:, None]
        errors = (draws(q, x, 300) - x).square().sum((1, 2)).double()
        ratio = errors.mean() / q.variance_bound(x).double()
        assert 0.3 < ratio < 1.0

    def test_identity_bound_is_zero(self):
        assert get_quantizer("identity").variance_bound(torch.randn(3, 4)) == 0

    @pytest.mark.parametrize(
        "name,closed_form",
        [
            ("ptq", lambda x, b: x.numel() * ((x.max() - x.min()) / (2**b - 1)) ** 2 / 4),
            (
                "psq",
                lambda x, b: x.shape[1] * (((x.amax(1) - x.amin(1)) / (2**b - 1)) ** 2).sum() / 4,
            ),
        ],
    )
    def test_bound_closed_forms(self, name, closed_form):
        # The bound is float64; a float32 step is rounded up by at most one float (1.2e-7).
        x = heavy_rows(8, 12)
        bound = get_quantizer(name, 5).variance_bound(x)
        torch.testing.assert_close(bound, closed_form(x.double(), 5), rtol=1e-6, atol=0)

    @pytest.mark.parametrize("bits", [4, 8])
    def test_ordering_ptq_psq_bhq_when_few_rows_dominate(self, bits):
        x = heavy_rows(128, 256, seed=11)
        err = {}
        for name in ("ptq", "psq", "bhq"):
            q = get_quantizer(name, bits)
            err[name] = (draws(q, x, 20) - x).square().sum((1, 2)).mean()
            assert err[name] <= q.variance_bound(x) * 1.05
        assert err["ptq"] > 3 * err["psq"] > 3 * err["bhq"] * 0.5
        assert err["psq"] > err["bhq"]

    def test_error_falls_about_four_times_per_bit(self):
        x = heavy_rows(64, 64, seed=4)
        q = {b: get_quantizer("psq", b) for b in (5, 6)}
        err = {b: (draws(q[b], x, 100) - x).square().sum((1, 2)).mean() for b in q}
        ratio = err[5] / err[6]
        assert 3.0 < ratio < 5.5  # (2^6 - 1)² / (2^5 - 1)² = 4.13


class TestBlockHouseholder:
    """BHQ's structured transform is orthogonal within groups, inverts exactly and never forms
    a dense N×N matrix."""

    def test_transform_inverts_and_groups_have_two_rows(self):
        from fqtorch.quantizers.householder import build_block_householder

        x = heavy_rows(50, 17, seed=5).double()
        t = build_block_householder(x)
        torch.testing.assert_close(t.inverse(t.forward(x)), x)
        sizes = torch.bincount(t.group)
        assert sizes[sizes > 0].min() >= 2
        leaders = torch.unique(t.group)
        assert len(leaders) < 50

    def test_matches_dense_reference(self):
        from fqtorch.quantizers.householder import build_block_householder

        x = heavy_rows(20, 9, seed=8).double()
        t = build_block_householder(x)
        dense = t.forward(torch.eye(20, dtype=torch.float64))  # T as a matrix, for this test only
        torch.testing.assert_close(dense @ x, t.forward(x))
        inverse_cols = torch.linalg.inv(dense)
        torch.testing.assert_close(inverse_cols.square().sum(0), t.inverse_column_norms_sq())

    def test_at_most_two_rows_is_psq(self):
        x = heavy_rows(2, 30)
        torch.testing.assert_close(
            get_quantizer("bhq", 4)(x, gen()), get_quantizer("psq", 4)(x, gen())
        )


class TestNonFinite:
    """Documented policy: a NaN or Inf makes its quantization group NaN, never finite garbage."""

    @pytest.mark.parametrize("name", ["ptq", "psq", "bhq", "symmetric"])
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_group_turns_nan(self, name, bad):
        x = heavy_rows(64, 5, spread=0.5)
        x[2, 3] = bad
        out = get_quantizer(name, 4)(x, gen())
        assert torch.isnan(out[2]).all()
        finite_rows = torch.isfinite(out).all(1)
        if name in ("psq", "bhq"):
            assert finite_rows.any()  # other rows (groups) are unaffected


class TestErrors:
    """Bad input fails with a message that says what was expected."""

    @pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True])
    def test_bits_out_of_range(self, bits):
        with pytest.raises((ValueError, TypeError), match="2..8"):
            get_quantizer("psq", bits)

    def test_unknown_name_lists_known(self):
        with pytest.raises(ValueError, match="known quantizers: .*bhq"):
            get_quantizer("nope")

    def test_unknown_rounding(self):
        with pytest.raises(ValueError, match="stochastic"):
            get_quantizer("psq", 4, rounding="up")

    def test_integer_tensor(self):
        with pytest.raises(TypeError, match="floating-point"):
            get_quantizer("psq", 4)(torch.ones(3, 3, dtype=torch.int32))

    def test_duplicate_registration(self):
        with pytest.raises(ValueError, match="already registered"):

            @register_quantizer("psq")
            class Again(Quantizer):
                pass

    def test_custom_quantizer_reaches_config(self):
        name = "test_halfstep"
        if name not in list_quantizers():

            @register_quantizer(name)
            class HalfStep(fqtorch.quantizers.uniform.PerRow):
                pass

        cfg = fqtorch.FQTConfig(grad_quantizer=name, grad_bits=4)
        assert cfg.build_quantizers()["grad_output"].name == name
