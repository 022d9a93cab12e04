"""Shared properties of every registered quantizer, and the claims of docs/method.md §4."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fqtorch
from fqtorch.quantizers import Quantizer, get_quantizer, list_quantizers, register_quantizer
from fqtorch.quantizers import base as base_module
from fqtorch.quantizers.base import QuantizedTensor, as_rows
from fqtorch.quantizers.formats import is_format
from fqtorch.quantizers.householder import build_block_householder
from tests.helpers import (
    heavy_rows,
    library_quantizers,
    projection_z,
    t_as_z,
    t_limit,
    z_limit,
)

ALL = library_quantizers()
# Integer grids (int8 codes, bits-dependent); float formats: tests/quantizers/test_formats.py.
CODED = [name for name in ALL if name != "identity" and not is_format(name)]
GRIDS = [name for name in ALL if not is_format(name)]
GRADIENT = ["ptq", "psq", "per_column", "bhq"]
ROUNDINGS = ["stochastic", "nearest"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(q: Quantizer, x: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([q(x, g) for _ in range(count)])


def expected_error(encoded: QuantizedTensor, x: torch.Tensor) -> float:
    """``E‖Q(x) − x‖²`` on the grid (and row transform ``T``) that ``encoded`` was drawn on:
    ``Σ_i ‖T⁻¹e_i‖²·Σ_d Δ_i²·f(1 − f)``, ``f`` the fraction of a step at which entry ``(i, d)``
    of ``T x`` sits (stochastic rounding's variance, docs/method.md §4), in float64. Computed
    from the grid alone, never from ``variance_bound``."""
    x2d = as_rows(x).float()
    transform = encoded.transform
    y = (x2d if transform is None else transform.forward(x2d)).double()
    step, bias = encoded.scale.double(), encoded.bias.double()
    position = (y - bias) / torch.where(step > 0, step, torch.ones_like(step))
    frac = position - position.floor()
    # A value on a grid point (a range's end) is exact: its position, recomputed here from the
    # float32 scale and bias, is off by float rounding (≲ 1e-5 of a step), not a fraction.
    on_grid = torch.minimum(frac, 1 - frac) < 1e-4
    frac = torch.where(on_grid, torch.zeros_like(frac), frac)
    per_entry = (step.square() * frac * (1 - frac)).expand_as(y)
    if transform is not None:
        # Column i of T⁻¹ applied to the identity is T⁻¹e_i (cropped to the real rows for rht).
        inverse = transform.inverse(torch.eye(y.shape[0])).double()
        per_entry = per_entry * inverse.square().sum(0)[:, None]
    return float(per_entry.sum())


def errors_and_expectations(
    q: Quantizer, x: torch.Tensor, count: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per draw, the squared error ``‖Q(x) − x‖²`` and its expectation on that draw's grid
    (:func:`expected_error`; rht draws new signs each time), both float64."""
    g = gen(seed)
    errors, expected = [], []
    for _ in range(count):
        encoded = q.encode(x, g)
        errors.append(float((encoded.dequantize().double() - x.double()).square().sum()))
        expected.append(expected_error(encoded, x))
    return torch.tensor(errors, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)


def error_z(errors: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> float:
    """z-score of the mean of ``errors − expected`` (0 in expectation under stochastic rounding),
    with the standard error measured from the draws. Without spread beyond float32 decoding's own
    squared error (every value on a grid point), 0 if it also misses by no more, else ``inf``."""
    diff = errors - expected
    decoding = (8 * torch.finfo(torch.float32).eps) ** 2 * float(x.double().square().sum())
    se = float(diff.std()) / math.sqrt(diff.numel())
    if se <= decoding:
        return 0.0 if abs(float(diff.mean())) <= decoding else math.inf
    return float(t_as_z(torch.tensor(float(diff.mean()) / se), diff.numel()))


def _bhq_bound(x2d: torch.Tensor, bits: int) -> torch.Tensor:
    """``(D/4)·Σ_i Δ_i(Tx)²·‖T⁻¹e_i‖²``, with ``T⁻¹e_i`` from the transform's inverse of the
    identity (not from its ``inverse_column_norms_sq``); PSQ's bound when N ≤ 2."""
    transform = build_block_householder(x2d.float())
    if transform is None:
        return documented_bound("psq", x2d, bits)
    y = transform.forward(x2d.float()).double()
    norms = transform.inverse(torch.eye(y.shape[0])).double().square().sum(0)
    steps = (y.amax(1) - y.amin(1)) / (2**bits - 1)
    return y.shape[1] / 4 * (steps.square() * norms).sum()


def _rht_bound(x2d: torch.Tensor, bits: int) -> torch.Tensor:
    """``(D/B²)·Σ_blocks (max_d Σ_{j∈block} |x_jd|)²``, blocks of ``min(16, 2^⌈log2 N⌉)`` rows
    (the last one zero-padded)."""
    rows, cols = x2d.shape
    block = min(16, 1 << (rows - 1).bit_length())
    padded = torch.cat([x2d, x2d.new_zeros(-rows % block, cols)])
    sums = padded.abs().reshape(-1, block, cols).sum(1)
    return cols * sums.amax(1).square().sum() / (2**bits - 1) ** 2


def documented_bound(name: str, x: torch.Tensor, bits: int) -> float:
    """The bound on ``E‖Q(x) − x‖²`` of a built-in quantizer as docs/method.md §4 states it,
    computed here in float64 from ``x`` (``B = 2^bits − 1`` bins; a symmetric grid has
    ``L = 2^(bits−1) − 1`` steps each side of zero)."""
    x2d = as_rows(x).double()
    rows, cols = x2d.shape
    bins, side = 2**bits - 1, 2 ** (bits - 1) - 1
    if name == "ptq":
        bound = rows * cols / 4 * ((x2d.max() - x2d.min()) / bins) ** 2
    elif name == "psq":
        bound = cols / 4 * ((x2d.amax(1) - x2d.amin(1)) / bins).square().sum()
    elif name == "per_column":
        bound = rows / 4 * ((x2d.amax(0) - x2d.amin(0)) / bins).square().sum()
    elif name == "symmetric":
        bound = rows * cols / 4 * (x2d.abs().max() / side) ** 2
    elif name == "symmetric_per_row":
        bound = cols / 4 * (x2d.abs().amax(1) / side).square().sum()
    elif name == "bhq":
        bound = _bhq_bound(x2d, bits)
    elif name == "rht":
        bound = _rht_bound(x2d, bits)
    else:
        raise KeyError(f"no documented bound for {name!r}")
    return float(bound)


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

    @pytest.mark.parametrize("name", GRIDS)
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
    @pytest.mark.parametrize("bits", [2, 8])
    def test_bits_at_both_ends(self, name, bits):
        """At 2 and 8 bits the codes use the whole grid (a range's ends on its end codes) and
        the error is what stochastic rounding on that grid gives (an off-by-one in the bins or
        the int8 offset shows here)."""
        q = get_quantizer(name, bits)
        x = heavy_rows(16, 24, seed=3)
        codes = q.encode(x, gen()).codes.int()
        half = 2 ** (bits - 1)
        if name.startswith("symmetric"):  # only max|x| must reach an end: ±(half − 1)
            assert codes.abs().max() == half - 1 and codes.min() >= -(half - 1)
        else:  # every group's min and max sit on the grid's end points
            assert codes.min() == -half and codes.max() == half - 1
        errors, expected = errors_and_expectations(q, x, 100, seed=bits)
        assert abs(error_z(errors, expected, x)) < z_limit(2 * len(CODED))

    @pytest.mark.parametrize("name", GRIDS)
    @pytest.mark.parametrize("n", [1, 2])
    def test_single_sample_and_two_samples(self, name, n):
        """One or two rows: unbiased (the mean of many draws on every projection) with the
        error stochastic rounding on the grid gives; the identity returns its input."""
        x = heavy_rows(n, 7)
        q = get_quantizer(name, 4)
        if name == "identity":
            assert torch.equal(q(x, gen()), x)
            return
        cases = 2 * len(ALL)  # Bonferroni over every case of this test
        z = projection_z(draws(q, x, 400, seed=n), x)
        assert z.abs().max() < z_limit(cases * z.numel()), z
        errors, expected = errors_and_expectations(q, x, 400, seed=n)
        assert abs(error_z(errors, expected, x)) < z_limit(cases)

    @pytest.mark.parametrize("name", CODED)
    def test_huge_range_stays_finite(self, name):
        """Ranges near 1e36 (squares past the float32 maximum): finite output whose error is
        stochastic rounding's on the grid, not finite garbage."""
        x = heavy_rows(12, 8) * 1e30
        x[0, 0] = 3e36
        q = get_quantizer(name, 8)
        assert torch.isfinite(draws(q, x, 20)).all()
        assert math.isfinite(float(q.variance_bound(x)))
        errors, expected = errors_and_expectations(q, x, 100)
        assert abs(error_z(errors, expected, x)) < z_limit(len(CODED))

    @pytest.mark.parametrize("name", ALL)
    def test_bfloat16_and_noncontiguous(self, name):
        """A non-contiguous view quantizes to what its contiguous copy does; bf16 input is
        quantized in float32 (the same codes as its float32 copy) and returned in bf16, rounded
        to nearest (documented: biased by up to half a bf16 ulp; ``q(x.float())`` is not)."""
        q = get_quantizer(name, 6)
        x = heavy_rows(10, 12).T  # non-contiguous
        assert not x.is_contiguous()
        out = q(x, gen())
        assert out.shape == x.shape
        assert torch.equal(out, q(x.contiguous(), gen()))
        xb = x.to(torch.bfloat16)
        out_b = q(xb, gen())
        assert out_b.dtype == torch.bfloat16
        assert torch.equal(out_b, q(xb.float(), gen()).to(torch.bfloat16))


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
    """Measured ``E‖q(x) − x‖²`` stays below ``variance_bound(x)`` (docs/method.md §4), the bound
    is the documented formula, and it is as tight as the grid allows: the measured error over it
    is the exact expected ratio (about 2/3 for values spread within their bins)."""

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

    @pytest.mark.parametrize("name", CODED)
    @pytest.mark.parametrize("rows", ["similar", "heavy"])
    def test_bound_is_tight(self, name, rows):
        """measured / ``variance_bound`` equals the expected ratio ``E‖Q(x) − x‖² / bound``
        within its null spread over the draws: the expectation exact from each draw's grid
        (:func:`expected_error`), the bound as documented (:func:`documented_bound`). Values
        spread within their bins give about E[f(1 − f)] / (1/4) = 2/3 on a uniform grid (rows of
        similar ranges); heavy rows put many values near a grid point (zero on a symmetric grid)
        and make BHQ reflect groups; rht's bound holds for every sign draw, so its ratio is
        lower by design. Whatever the ratio, it is known: a bound 2× too loose halves the
        measured one, far outside a window of a few standard errors."""
        q = get_quantizer(name, 3)
        if rows == "similar":
            x = torch.rand(32, 40, generator=gen(9)) * torch.linspace(1, 4, 32)[:, None]
        else:
            x = heavy_rows(32, 40, seed=9)
        errors, expected = errors_and_expectations(q, x, 200, seed=10)
        documented = documented_bound(name, x, 3)
        expected_ratio = float(expected.mean()) / documented
        assert expected_ratio <= 1  # a bound bounds: the documented form is not too tight
        ratio = float(errors.mean()) / float(q.variance_bound(x))
        se = float((errors - expected).std()) / math.sqrt(errors.numel()) / documented
        window = t_limit(2 * len(CODED), errors.numel()) * se
        assert abs(ratio - expected_ratio) <= window, (ratio, expected_ratio, window)

    def test_identity_bound_is_zero(self):
        assert get_quantizer("identity").variance_bound(torch.randn(3, 4)) == 0

    @pytest.mark.parametrize("name", CODED)
    @pytest.mark.parametrize("shape", [(8, 12), (21, 5)])
    def test_bound_closed_forms(self, name, shape):
        # The bound is float64; a float32 step is rounded up by at most one float (1.2e-7).
        x = heavy_rows(*shape)
        bound = float(get_quantizer(name, 5).variance_bound(x))
        assert bound == pytest.approx(documented_bound(name, x, 5), rel=1e-6)

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


def group_of(name: str, x: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Mask of the entries that share a quantization group with ``x[row, col]``: the tensor,
    its row, its column, its BHQ group of rows, or its block of 16 rows mixed by rht."""
    mask = torch.zeros(x.shape, dtype=torch.bool)
    if name in ("ptq", "symmetric"):
        mask[:] = True
    elif name in ("psq", "symmetric_per_row"):
        mask[row] = True
    elif name == "per_column":
        mask[:, col] = True
    elif name == "bhq":
        group = build_block_householder(x).group
        mask[group == group[row]] = True
    elif name == "rht":
        start = row // 16 * 16
        mask[start : start + 16] = True
    else:
        raise KeyError(name)
    return mask


class TestNonFinite:
    """Documented policy: a NaN or Inf makes its quantization group NaN, never finite garbage,
    and leaves every other group finite."""

    @pytest.mark.parametrize("name", CODED)
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_group_turns_nan(self, name, bad):
        x = heavy_rows(64, 5, spread=0.5)
        x[2, 3] = bad
        out = get_quantizer(name, 4)(x, gen())
        group = group_of(name, x, 2, 3)
        assert torch.isnan(out[group]).all()
        assert torch.isfinite(out[~group]).all()

    @pytest.mark.parametrize("name", [n for n in ALL if n != "identity"])
    @pytest.mark.parametrize("bad", [math.nan, math.inf])
    def test_no_bound(self, name, bad):
        """No bound holds for a tensor with a NaN or Inf: ``inf``, never NaN (which passes
        every ``measured <= bound`` and ``bound > budget`` comparison as false)."""
        x = heavy_rows(64, 5, spread=0.5)
        x[2, 3] = bad
        assert get_quantizer(name, 4).variance_bound(x) == math.inf


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

    @pytest.mark.parametrize("name", ALL)
    @pytest.mark.parametrize("shape", [(0, 32), (4, 0), (0,)])
    def test_empty_tensor_is_one_clear_line(self, name, shape):
        """Every quantizer's call, encode and bound refuse an empty tensor saying so (they
        crashed in reshape or amax, naming neither the quantizer nor the shape); the identity
        passes it through."""
        q = get_quantizer(name) if is_format(name) else get_quantizer(name, 4)
        empty = torch.zeros(shape)
        if name == "identity":
            assert q(empty, gen()) is empty and float(q.variance_bound(empty)) == 0
            return
        for run in (lambda: q(empty, gen()), lambda: q.encode(empty, gen())):
            with pytest.raises(ValueError, match=rf"{name} expects a tensor with elements"):
                run()
        with pytest.raises(ValueError, match="nothing to quantize"):
            q.variance_bound(empty)

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


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_dequantize_is_codes_times_scale_plus_bias_and_leaves_the_codes(fused, dtype):
    """The decode runs in place on a copy: the codes (int8, or a float container a user's
    quantizer might keep) come back unchanged, the values are ``codes * scale + bias``."""
    g = gen(21)
    codes = torch.randint(-16, 16, (40, 24), generator=g).to(dtype)
    kept = codes.clone()
    for scale, bias in [
        (torch.rand(40, 1, generator=g), torch.randn(40, 1, generator=g)),
        (torch.rand(1, 24, generator=g), torch.randn(1, 24, generator=g)),
        (torch.rand(1, 1, generator=g), torch.zeros(1, 1)),
    ]:
        q = QuantizedTensor(codes, scale, bias, 5, codes.shape, torch.float32)
        assert torch.equal(q.dequantize(fused=fused), codes.float() * scale + bias)
        assert torch.equal(codes, kept)
    # scale or bias that widen the result (a larger shape, a wider dtype): as out of place
    row = codes[:1]
    scale, bias = torch.rand(40, 1, generator=g), torch.randn(1, 24, generator=g).double()
    for s, b, wide_shape, wide_dtype in [
        (scale, bias.float(), (40, 24), torch.float32),
        (1 + 0 * scale[:1], bias, (1, 24), torch.float64),
    ]:
        got = base_module._decode(row, s, b) if not fused else base_module._decode_fused(row, s, b)
        want = row.to(s.dtype) * s + b
        assert got.shape == wide_shape and got.dtype == wide_dtype and torch.equal(got, want)


@pytest.mark.parametrize("name", library_quantizers())
def test_column_equivariance_is_claimed_truthfully(name):
    """A quantizer that says it is ``column_equivariant`` (backends then read a channels-last
    gradient in memory order) gives, with nearest rounding, the values of the permuted input as
    the permuted values, exactly; one that does not say so (block formats, row transforms along
    the row) is checked to differ, so the check can fail."""
    q = get_quantizer(name, 4, rounding="nearest")
    x = heavy_rows(12, 96, seed=4)
    x[:, 5] *= 1e3  # an outlier column: a block or a row transform spreads it differently
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    permuted_first = q(x[:, perm], torch.Generator().manual_seed(2))  # rht's signs
    permuted_after = q(x, torch.Generator().manual_seed(2))[:, perm]
    assert torch.equal(permuted_first, permuted_after) == q.column_equivariant, name


@pytest.mark.cuda
@pytest.mark.parametrize("inner,transform", [("psq", "rht16"), ("mxfp4", "rht32")])
def test_transformed_bound_on_cuda_equals_cpu(inner, transform):
    """A transform's variance bound builds its checkerboard on the input's device (it was built on
    the CPU: a device error for CUDA input)."""
    from fqtorch.quantizers.transforms import with_transform

    q = with_transform(get_quantizer(inner, 4), transform, dim=1)
    x = heavy_rows(64, 96, seed=2)
    cpu, cuda = q.variance_bound(x), q.variance_bound(x.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-9, atol=0)


def test_decode_dtype_rule_is_result_type():
    """``_decode`` decides in place or not from ``_result_dtype``, a traceable copy of
    ``torch.result_type`` for floating tensors: the same dtype for every pair of float dtypes
    and of 0-, 1- and 2-dim operands (a 0-dim float64 bias keeps float32 values float32).
    Planted: ``promote_types`` alone fails."""
    from fqtorch.quantizers.base import _result_dtype

    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for a_dtype, b_dtype, a_dim, b_dim in itertools.product(dtypes, dtypes, range(3), range(3)):
        a = torch.zeros([2] * a_dim, dtype=a_dtype)
        b = torch.zeros([2] * b_dim, dtype=b_dtype)
        assert _result_dtype(a, b) == torch.result_type(a, b), (a_dtype, b_dtype, a_dim, b_dim)
