"""Float and block-scaled formats (docs/method.md §12): exact grids and storage, block direction,
unbiased stochastic rounding without clipping, variance bounds, transforms, presets, end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig
from fqtorch.convert import quantize_model
from fqtorch.quantizers import get_quantizer
from fqtorch.quantizers.base import QuantizedTensor
from fqtorch.quantizers.formats import (
    E2M1,
    E4M3,
    E5M2,
    BlockScaledTensor,
    fused_format,
    pack_fp4,
    spacing,
    unpack_fp4,
)
from fqtorch.quantizers.transforms import HadamardThen
from fqtorch.train.config import TrainConfig
from tests.helpers import heavy_rows, projection_z, t_limit, z_limit

FORMATS = [
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_e4m3_per_row",
    "fp8_e5m2_per_row",
    "mxfp8",
    "mxfp4",
    "nvfp4",
]
ELEMENT = {
    "fp8_e4m3": E4M3,
    "fp8_e5m2": E5M2,
    "fp8_e4m3_per_row": E4M3,
    "fp8_e5m2_per_row": E5M2,
    "mxfp8": E4M3,
    "mxfp4": E2M1,
    "nvfp4": E2M1,
}
BLOCK = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
ROUNDINGS = ["stochastic", "nearest"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draws(q, x: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([q(x, g) for _ in range(count)])


def element_grid(fmt) -> torch.Tensor:
    """Every finite value of the element format, from its bit patterns (float64)."""
    if fmt.dtype is None:
        values = unpack_fp4(torch.arange(256, dtype=torch.uint8)[:, None], torch.float64)
    else:
        values = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).double()
    return torch.unique(values[torch.isfinite(values)])  # sorted


def sample_data(rows: int = 24, cols: int = 70, seed: int = 0) -> torch.Tensor:
    """Heavy rows with exact zeros, small values (the elements' subnormal range) and a column
    count that is not a multiple of any block (padding). Nothing is so small next to its group's
    maximum that it rounds the same way in every draw: the bias test could not see it."""
    x = heavy_rows(rows, cols, seed=seed)
    x[3, 5:9] = 0
    x[4, :] *= 1e-2
    x[5, 7] = 1e-3 * x[5].abs().max()
    return x


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to nearest E4M3 by torch's own cast."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def decoded_parts(encoded: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(element value, scale) of every entry of the encoded 2-D view, float64."""
    if isinstance(encoded, BlockScaledTensor):
        elements = encoded.element_values(torch.float64)
        rows, cols = encoded.size2d
        elements = elements[:, :rows].T if encoded.block_dim == 0 else elements[:, :cols]
        return elements, encoded.scales_2d(torch.float64)
    return encoded.codes.double(), encoded.scale.double().expand_as(encoded.codes)


class TestExactValues:
    """After encode every entry is an element-format value times its group's scale, stored in
    torch's own dtypes, and the decoded tensor is exactly that product."""

    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize("rounding", ROUNDINGS)
    @pytest.mark.parametrize("block_dim", [0, 1])
    def test_grid_membership_and_decode(self, name, rounding, block_dim):
        q = get_quantizer(name, rounding=rounding, block_dim=block_dim)
        x = sample_data()
        encoded = q.encode(x, gen(1))
        fmt = ELEMENT[name]
        expected_dtype = fmt.dtype if fmt.dtype is not None else torch.float4_e2m1fn_x2
        assert encoded.codes.dtype == expected_dtype
        elements, scales = decoded_parts(encoded)
        assert torch.isin(elements, element_grid(fmt)).all()
        # the rounded values before storage (same draws) are on the grid: storage loses nothing
        raw = fused_format.fn(x, gen(1), *q._kernel_args())[0].double()
        assert torch.isin(raw, element_grid(fmt)).all()
        raw, kept = raw[raw != 0], elements[elements != 0]  # (padding adds zeros)
        assert torch.equal(raw.sort().values, kept.sort().values)
        out = encoded.dequantize()
        assert torch.equal(out.double(), (elements * scales).reshape(x.shape))
        assert torch.equal(out, q(x, gen(1)))
        # the scales are of their kind: a power of two, or an E4M3 value times one (NVFP4)
        if name == "nvfp4":
            assert encoded.scale.dtype == torch.float8_e4m3fn
            t = encoded.tensor_scale.double()
            assert torch.frexp(t).mantissa == 0.5  # a power of two
            assert torch.isin(encoded.scale.double(), element_grid(E4M3)).all()
        else:
            if name in BLOCK:
                assert encoded.scale.dtype == torch.float8_e8m0fnu
            assert (torch.frexp(scales).mantissa == 0.5).all()

    @pytest.mark.parametrize("name", FORMATS)
    def test_values_on_the_grid_are_kept(self, name):
        """Values already on the format's grid (the group maximum at the format's maximum)
        come back exactly under both roundings."""
        fmt = ELEMENT[name]
        grid = element_grid(fmt).float()
        x = grid[torch.randint(0, grid.numel(), (8, 64), generator=gen(2))]
        x[:, 0] = fmt.max  # every block's maximum: the scale is 1 under either rule
        if name in BLOCK:
            x[:, BLOCK[name] :: BLOCK[name]] = fmt.max
        for rounding in ROUNDINGS:
            q = get_quantizer(name, rounding=rounding)
            assert torch.equal(q(x, gen()), x)

    def test_fp4_packing_round_trip(self):
        values = unpack_fp4(torch.arange(256, dtype=torch.uint8)[:, None]).reshape(-1, 2)
        assert torch.equal(values[1], torch.tensor([0.5, 0.0]))  # element 2j: the low nibble
        packed = pack_fp4(values.reshape(16, 32))
        assert packed.dtype == torch.float4_e2m1fn_x2
        assert torch.equal(packed.view(torch.uint8).flatten(), torch.arange(256, dtype=torch.uint8))
        # the sign bit survives on zero: -0.0 is its own code
        assert torch.signbit(unpack_fp4(pack_fp4(torch.tensor([-0.0, 0.0])))).tolist() == [
            True,
            False,
        ]

    @pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
    def test_fp8_storage_round_trip(self, dtype):
        """Every finite FP8 value, encoded by fqtorch at scale 1 (the tensor maximum is the
        format's largest value), is stored as its own bit pattern and decodes to itself."""
        name = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}[dtype]
        codes = torch.arange(256, dtype=torch.uint8).view(dtype)
        finite = torch.isfinite(codes.float())
        x = codes.float()[finite].reshape(1, -1)
        encoded = get_quantizer(name).encode(x, gen())
        assert encoded.codes.dtype == dtype and float(encoded.scale) == 1.0
        stored = encoded.codes.view(torch.uint8).flatten()
        nonzero = x.flatten() != 0  # -0.0 is stored as +0.0
        assert torch.equal(stored[nonzero], codes.view(torch.uint8)[finite][nonzero])
        assert torch.equal(encoded.dequantize(), x)

    def test_e8m0_round_trip(self):
        """MXFP8 blocks with maxima ``448·2^k`` get the E8M0 scale code ``k + 127`` and decode
        exactly."""
        k = torch.arange(-120, 120)
        x = torch.rand(len(k), 32, generator=gen(2)) * 448
        x[:, 0] = 448
        x = e4m3_round(x) * torch.exp2(k.float())[:, None]
        encoded = get_quantizer("mxfp8", rounding="nearest").encode(x)
        assert encoded.scale.dtype == torch.float8_e8m0fnu
        assert torch.equal(encoded.scale.view(torch.uint8).flatten(), (k + 127).to(torch.uint8))
        assert torch.equal(encoded.dequantize(), x)


class TestBlockDirection:
    """Blocks (and per-row scales) run along the reduction dimension chosen by ``block_dim``:
    the scale is constant within a block of one line and changes across lines."""

    @pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "nvfp4", "fp8_e4m3_per_row"])
    @pytest.mark.parametrize("block_dim", [0, 1])
    def test_scales_constant_along_blocks(self, name, block_dim):
        q = get_quantizer(name, block_dim=block_dim)
        x = heavy_rows(40, 64, seed=3)
        x = x if block_dim == 1 else x.T.contiguous()  # heavy lines along the blocks' line axis
        scales = decoded_parts(q.encode(x, gen()))[1]
        lines = scales if block_dim == 1 else scales.T  # (lines, along the reduction)
        block = BLOCK.get(name, lines.shape[1])
        blocks = lines.reshape(lines.shape[0], -1, block)
        assert (blocks == blocks[..., :1]).all()  # one scale per block of one line
        if name != "nvfp4":  # the no-clip power of two of each block's own maximum
            data = (x if block_dim == 1 else x.T).double().abs()
            amax = data.reshape(data.shape[0], -1, block).amax(-1)
            expected = torch.exp2(torch.ceil(torch.log2(amax / ELEMENT[name].max)))
            assert torch.equal(blocks[..., 0], expected)

    def test_block_layout(self):
        x = heavy_rows(5, 40)
        by_row = get_quantizer("mxfp4", block_dim=1).encode(x, gen())
        by_col = get_quantizer("mxfp4", block_dim=0).encode(x, gen())
        assert by_row.scale.shape == (5, 2) and by_row.codes.shape == (5, 32)  # 64 nibbles
        assert by_col.scale.shape == (40, 1) and by_col.codes.shape == (40, 16)
        per_row = get_quantizer("fp8_e5m2_per_row", block_dim=0).encode(x, gen())
        assert per_row.scale.shape == (1, 40)

    def test_config_picks_direction_from_role(self):
        plan = FQTConfig(grad_quantizer="nvfp4").build_quantizers()
        assert plan["grad_output"].block_dim == 1  # grad_input = G @ W sums over G's columns
        assert plan["grad_output_weight"].block_dim == 0  # grad_weight = Gᵀ X over G's rows
        assert plan["grad_output_weight"].name == "nvfp4"  # the format on both GEMMs
        fwd = FQTConfig(input_quantizer="mxfp8", weight_quantizer="mxfp8").build_quantizers()
        assert fwd["input"].block_dim == fwd["weight"].block_dim == 1


class TestRangesAndRepr:
    """Subnormal and near-maximum float32 inputs stay finite and unbiased; a format quantizer
    prints its format, rounding and block direction."""

    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize("magnitude", [1e-40, 2.5e38])
    def test_extreme_ranges(self, name, magnitude):
        """Up to 2.5e38: above 1.5·2^127 (2.55e38) E2M1's next grid value is 2^128, which float32
        cannot hold (docs/method.md §12)."""
        x = (torch.rand(12, 40, generator=gen(7)) * 2 - 1) * magnitude
        q = get_quantizer(name, block_dim=1)
        samples = draws(q, x, 300)
        assert torch.isfinite(samples).all()
        assert math.isfinite(float(q.variance_bound(x)))
        z = projection_z(samples, x)
        assert z.abs().max() < z_limit(2 * len(FORMATS) * z.numel()), z
        assert torch.isfinite(get_quantizer(name, rounding="nearest")(x)).all()

    def test_repr(self):
        assert repr(get_quantizer("mxfp4", block_dim=0)) == "mxfp4(stochastic, block_dim=0)"
        q = get_quantizer("nvfp4", rounding="nearest", fused=True)
        assert repr(q) == "nvfp4(nearest, block_dim=1, fused)"
        clipping = get_quantizer("mxfp8", scale_rule="standard")
        assert repr(clipping) == "mxfp8(stochastic, block_dim=1, standard)"


class TestBits:
    """The format fixes its width: any ``bits`` is accepted and ignored, and
    ``bits_per_element`` counts the block scales."""

    @pytest.mark.parametrize("bits", [2, 4, 8])
    def test_bits_ignored(self, bits):
        assert get_quantizer("mxfp4", bits).bits == 4
        assert get_quantizer("fp8_e5m2", bits).bits == 8
        x = heavy_rows(4, 32)
        assert torch.equal(get_quantizer("nvfp4", bits)(x, gen()), get_quantizer("nvfp4")(x, gen()))

    def test_bits_per_element(self):
        expected = {"fp8_e4m3": 8.0, "fp8_e5m2_per_row": 8.0, "mxfp8": 8.25}
        expected |= {"mxfp4": 4.25, "nvfp4": 4.5}
        for name, bpe in expected.items():
            assert get_quantizer(name).bits_per_element == bpe

    def test_config_default_bits_work(self):
        cfg = FQTConfig(grad_quantizer="mxfp4")  # grad_bits=8 by default
        assert cfg.build_quantizers()["grad_output"].bits == 4

    def test_bad_options(self):
        with pytest.raises(ValueError, match="2..8"):
            get_quantizer("mxfp4", 9)
        with pytest.raises(ValueError, match="block_dim must be 0 or 1"):
            get_quantizer("mxfp4", block_dim=2)
        with pytest.raises(ValueError, match="scale_rule must be one of"):
            get_quantizer("mxfp4", scale_rule="ocp")


def clipping_case() -> torch.Tensor:
    """Blocks whose maxima have mantissa 1.9 (above E2M1's 1.5 and E4M3's 1.75): the OCP scale
    rule puts them above the element format's largest value."""
    x = torch.rand(16, 64, generator=gen(4)) * 1.9
    x[:, ::16] = 1.9  # every block's (and row's, and tensor's) maximum
    return x * torch.exp2(torch.randint(-3, 4, (16, 1), generator=gen(5)).float())


class TestUnbiasedness:
    """Stochastic rounding with the no-clip scale is unbiased; nearest rounding, and stochastic
    rounding under the clipping (standard) scale rule, are caught as biased."""

    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize("block_dim", [0, 1])
    def test_stochastic_is_unbiased(self, name, block_dim):
        q = get_quantizer(name, block_dim=block_dim)
        assert q.unbiased
        for x in (sample_data(16, 40), clipping_case()):
            z = projection_z(draws(q, x, 600), x)
            assert z.abs().max() < z_limit(2 * z.numel()), z

    @pytest.mark.parametrize("name", FORMATS)
    def test_nearest_is_caught(self, name):
        q = get_quantizer(name, rounding="nearest")
        assert not q.unbiased
        x = clipping_case()
        z = projection_z(draws(q, x, 20), x)
        assert z.abs().max() > z_limit(z.numel())

    @pytest.mark.parametrize("name", ["fp8_e4m3", "mxfp8", "mxfp4"])
    def test_clipping_scale_rule_is_biased(self, name):
        """The reason for the no-clip rule: stochastic rounding under the OCP scale clips the
        block maxima, and the bias test sees it."""
        q = get_quantizer(name, scale_rule="standard")
        assert not q.unbiased
        x = clipping_case()
        z = projection_z(draws(q, x, 600), x)
        assert z.abs().max() > z_limit(z.numel())


def expected_error(q, x: torch.Tensor) -> float:
    """``E‖Q(x) − x‖²`` of stochastic rounding, exactly: ``Σ (S·h)²·f(1 − f)`` with ``h`` the
    element grid's spacing at ``v = x/S`` and ``f`` the fraction of a spacing ``v`` sits above
    the grid value below it (float64, from the grid values, not from ``variance_bound``)."""
    grid = element_grid(q.element)
    v, scale = q._scaled(x)
    below = grid[(torch.searchsorted(grid, v.contiguous(), right=True) - 1).clamp(min=0)]
    above = grid[torch.searchsorted(grid, v.contiguous(), right=False).clamp(max=grid.numel() - 1)]
    gap = above - below
    f = torch.where(gap > 0, (v - below) / torch.where(gap > 0, gap, 1), 0)
    return float(((scale * gap).square() * f * (1 - f)).sum())


class TestVarianceBound:
    """Measured ``E‖Q(x) − x‖²`` is below ``variance_bound(x)``, and for stochastic rounding it
    is what the grid gives exactly."""

    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize(
        "rounding,rule", [("stochastic", None), ("nearest", None), ("stochastic", "standard")]
    )
    def test_error_below_bound(self, name, rounding, rule):
        """Stochastic rounding under the standard rule saturates like nearest rounding does."""
        q = get_quantizer(name, rounding=rounding, block_dim=0, scale_rule=rule)
        for x in (sample_data(32, 48), clipping_case()):
            errors = (draws(q, x, 300) - x).square().sum((1, 2)).double()
            se = errors.std() / math.sqrt(errors.numel())
            assert errors.mean() <= q.variance_bound(x) + 4 * se

    @pytest.mark.parametrize("name", FORMATS)
    def test_error_is_the_grids(self, name):
        q = get_quantizer(name)
        x = sample_data(32, 48)
        errors = (draws(q, x, 400) - x).square().sum((1, 2)).double()
        expected = expected_error(q, x)
        se = float(errors.std()) / math.sqrt(errors.numel())
        assert abs(float(errors.mean()) - expected) < t_limit(len(FORMATS), errors.numel()) * se
        assert expected <= float(q.variance_bound(x))
        # the bound is the grid's worst case, h²/4 per entry: within a small factor of it
        assert expected > 0.2 * float(q.variance_bound(x))

    @pytest.mark.parametrize("name", FORMATS)
    def test_nearest_saturation_within_bound(self, name):
        """Every entry at its block's maximum, mantissa 1.99: the standard rule saturates them
        all (nearest rounding is deterministic: one draw is its error)."""
        x = torch.full((8, 64), 1.99) * torch.exp2(torch.arange(8.0))[:, None]
        q = get_quantizer(name, rounding="nearest")
        assert (q(x) - x).double().square().sum() <= q.variance_bound(x)

    def test_no_clip_costs_at_most_four_times(self):
        """The no-clip rule doubles a clipping block's scale: its variance bound is at most 4×
        the rounding part of the OCP rule's (the standard rule adds the saturation error on top,
        which makes its bound, and its error, larger here)."""
        x = clipping_case()
        standard = get_quantizer("mxfp4", scale_rule="standard")
        v, scale = standard._scaled(x)
        rounding_part = (scale * spacing(v, E2M1)).square().sum() / 4
        fit = get_quantizer("mxfp4").variance_bound(x)
        assert rounding_part < fit <= 4 * rounding_part
        assert fit < standard.variance_bound(x)


class TestNonFinite:
    """A NaN or Inf makes its group (tensor, line, block) NaN and leaves the others finite."""

    @pytest.mark.parametrize("name", FORMATS)
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    @pytest.mark.parametrize("block_dim", [0, 1])
    def test_group_turns_nan(self, name, bad, block_dim):
        x = heavy_rows(40, 48, spread=0.5)
        x[33, 20] = bad
        out = get_quantizer(name, block_dim=block_dim)(x, gen())
        group = torch.zeros(x.shape, dtype=torch.bool)
        if name.startswith("fp8") and not name.endswith("per_row"):
            group[:] = True
        elif block_dim == 1:
            block = BLOCK.get(name, 48)
            group[33, 20 // block * block : (20 // block + 1) * block] = True
        else:
            block = BLOCK.get(name, 40)
            group[33 // block * block : (33 // block + 1) * block, 20] = True
        assert torch.isnan(out[group]).all()
        assert torch.isfinite(out[~group]).all()
        assert get_quantizer(name).variance_bound(x) == math.inf


class TestTransforms:
    """A random Hadamard transform composes with any quantizer without a transform of its own:
    unbiased, inverted exactly, bounded, reproducible from the generator."""

    @pytest.mark.parametrize("inner", ["mxfp4", "nvfp4", "fp8_e5m2", "psq", "per_column"])
    @pytest.mark.parametrize("block,dim", [(16, 1), (32, 0)])
    def test_unbiased_and_bounded(self, inner, block, dim):
        options = {"block_dim": dim} if inner not in ("psq", "per_column") else {}
        q = HadamardThen(get_quantizer(inner, 4, **options), block, dim)
        assert q.unbiased
        x = sample_data(24, 40)
        samples = draws(q, x, 500)
        z = projection_z(samples, x)
        assert z.abs().max() < z_limit(20 * z.numel()), z
        errors = (samples - x).square().sum((1, 2)).double()
        se = errors.std() / math.sqrt(errors.numel())
        assert errors.mean() <= q.variance_bound(x) + 4 * se

    def test_nearest_bound(self):
        q = HadamardThen(get_quantizer("mxfp4", rounding="nearest"), 32, 1)
        x = clipping_case()
        assert (q(x, gen()) - x).square().sum() <= q.variance_bound(x)

    def test_inverse_is_exact_and_signs_come_from_generator(self):
        q = HadamardThen(get_quantizer("fp8_e4m3"), 16, 1)
        x = heavy_rows(6, 20, seed=8)
        encoded = q.encode(x, gen(3))
        torch.testing.assert_close(encoded.transform.inverse(encoded.transform.forward(x)), x)
        assert torch.equal(q(x, gen(3)), encoded.dequantize())
        assert not torch.equal(q(x, gen(3)), q(x, gen(4)))
        assert encoded.dequantize().shape == x.shape

    def test_spreads_an_outlier(self):
        """One outlier per block: the transform shrinks the other entries' error (what the
        MXFP4/NVFP4 recipes use it for)."""
        x = torch.randn(64, 64, generator=gen(6))
        x[:, ::32] *= 100
        plain, mixed = get_quantizer("mxfp4"), HadamardThen(get_quantizer("mxfp4"), 32, 1)
        err = {q: (draws(q, x, 20) - x).square().sum((1, 2)).mean() for q in (plain, mixed)}
        assert err[mixed] < 0.75 * err[plain]  # measured: 0.53

    def test_refuses_own_transforms(self):
        for name in ("bhq", "rht"):
            with pytest.raises(ValueError, match="cannot precede"):
                HadamardThen(get_quantizer(name, 4), 16, 1)

    def test_config(self):
        plan = FQTConfig(grad_quantizer="mxfp4", grad_transform="rht32").build_quantizers()
        assert isinstance(plan["grad_output"], HadamardThen) and plan["grad_output"].dim == 1
        assert plan["grad_output_weight"].dim == 0
        with pytest.raises(ValueError, match="grad_transform must be one of"):
            FQTConfig(grad_quantizer="mxfp4", grad_transform="rht8")
        with pytest.raises(ValueError, match="grad_transform needs a grad_quantizer"):
            FQTConfig(grad_transform="rht16")
        with pytest.raises(ValueError, match="backend='int8' needs grad_transform=None"):
            FQTConfig(grad_quantizer="psq", grad_transform="rht16", backend="int8")
        with pytest.raises(ValueError, match="backend='int8' needs a grad_quantizer"):
            FQTConfig(grad_quantizer="mxfp4", backend="int8")
        for field, name in (("grad_quantizer", "bhq"), ("grad_quantizer", "rht")):
            with pytest.raises(ValueError, match=f"grad_transform='rht16' cannot precede {field}"):
                FQTConfig(**{field: name}, grad_bits=4, grad_transform="rht16")


class TestPresets:
    FORMAT_PRESETS = ("fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4_sr", "mxfp4_rht_sr")
    FORMAT_PRESETS += ("nvfp4_sr", "nvfp4_rht_sr")

    @pytest.mark.parametrize("name", FORMAT_PRESETS)
    def test_listed_and_usable_from_train(self, name):
        assert name in FQTConfig.presets()
        cfg = TrainConfig(preset=name).fqt_config()
        assert cfg == FQTConfig.preset(name)
        plan = cfg.build_quantizers()
        assert plan["grad_output"].unbiased and plan["grad_output_weight"].unbiased
        assert (cfg.grad_transform is not None) == ("rht" in name)

    def test_recipe_contents(self):
        cfg = FQTConfig.preset("nvfp4_rht_sr")
        assert (cfg.input_quantizer, cfg.grad_quantizer) == ("nvfp4", "nvfp4")
        assert cfg.grad_weight_quantizer == "nvfp4" and cfg.grad_transform == "rht16"
        assert FQTConfig.preset("fp8_e5m2").grad_quantizer == "fp8_e5m2"


# Compiled == eager for every format, in the orientation encode hands the kernel (blocks along
# the rows): tests/quantizers/test_fused.py::TestFusedKernels::test_compiled_equals_eager. The
# kernel's own blocks-down-the-columns branch is no longer compiled by encode; the test below runs
# it eagerly against the transpose.


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8", "fp8_e4m3_per_row"])
def test_blocks_down_the_columns_are_the_transposes_blocks_along_the_rows(name, fused):
    """Blocks (or per-line scales) down the columns of ``x`` are those along the rows of ``xᵀ``:
    the same codes, scales and values from the same generator (the encoder hands the kernel the
    lines row-major, whichever way they run), with a padded last block (37 rows)."""
    x = sample_data(37, 24)
    down = get_quantizer(name, rounding="stochastic", block_dim=0, fused=fused)
    along = get_quantizer(name, rounding="stochastic", block_dim=1, fused=fused)
    a = down.encode(x, torch.Generator().manual_seed(4))
    b = along.encode(x.T.contiguous(), torch.Generator().manual_seed(4))
    # block formats store the lines (blocks along the last dim); per-line scales keep x's layout
    flip = (lambda t: t.T) if a.codes.shape == x.shape else (lambda t: t)
    assert torch.equal(a.codes.view(torch.uint8), flip(b.codes.view(torch.uint8)))
    assert torch.equal(a.scale.float(), flip(b.scale.float()))
    assert torch.equal(a.dequantize(), b.dequantize().T)
    # and the kernel's own handling of blocks down the columns (which encode no longer uses)
    # gives the same values, scales and tensor scale
    noise = (q.noise(torch.Generator().manual_seed(4), x.device) for q in (down, along))
    direct = fused_format.fn(x, next(noise), *down._kernel_args())
    via = fused_format.fn(x.T.contiguous(), next(noise), *along._kernel_args())
    for u, v in zip(direct, via, strict=True):
        assert torch.equal(u, v)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 40)
        self.fc2 = nn.Linear(40, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def net_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("preset", TestPresets.FORMAT_PRESETS)
def test_network_gradient_unbiased(preset):
    """docs/method.md §3 with a format: on a fixed batch the mean FQT gradient is the QAT
    gradient of the same (format-quantized) forward pass, on both backward GEMMs."""
    torch.manual_seed(0)
    net = SmallNet()
    x, y = torch.randn(12, 2, 6, 6), torch.randint(0, 5, (12,))
    cfg = FQTConfig.preset(preset, seed=1)
    qat_cfg = cfg.replace(grad_quantizer=None, grad_weight_quantizer=None, grad_transform=None)
    qat = net_gradient(quantize_model(copy.deepcopy(net), qat_cfg), x, y)
    model = quantize_model(copy.deepcopy(net), cfg)
    samples = torch.stack([net_gradient(model, x, y) for _ in range(200)])
    assert (samples.std(0) > 0).any()
    z = projection_z(samples, qat)
    assert z.abs().max() < z_limit(len(TestPresets.FORMAT_PRESETS) * z.numel()), z


@pytest.mark.slow
def test_variance_cli_measures_formats_once(tmp_path):
    """``fqtorch variance`` takes format names and ``NAME+rht*``; a format fixes its width, so
    it is measured once whatever ``--bits`` lists, an integer quantizer once per width."""
    import json

    from fqtorch.cli import main

    args = ["variance", "--quantizers", "mxfp4,nvfp4+rht16,psq", "--bits", "4,8"]
    args += ["--batch-size", "16", "--batches", "2", "--samples", "4", "--profile", "none"]
    args += ["--full-batches", "1", "--out", str(tmp_path / "v")]
    assert main(args) == 0
    results = json.loads((tmp_path / "v" / "variance.json").read_text())["results"]
    got = [(r["quantizer"], r["bits"], r["bits_per_element"]) for r in results]
    assert got == [("mxfp4", 4, 4.25), ("nvfp4+rht16", 4, 4.5), ("psq", 4, 4.0), ("psq", 8, 8.0)]


class TestConvolutionLayout:
    """A convolution tensor ``(N, C, H, W)`` blocked along its reduction (``block_dim=1``) gets
    blocks and transforms over channels at one ``(n, h, w)``, never over positions."""

    def case(self) -> torch.Tensor:
        """Magnitude ``2^(−(n, h, w) index)`` shared by all channels, random signs: blocks of
        channels are exact on an MX grid; a block over positions loses its small entries."""
        n, c, h, w = 2, 64, 3, 5
        index = torch.arange(n * h * w).reshape(n, 1, h, w).float()
        signs = torch.randint(0, 2, (n, c, h, w), generator=gen(9)) * 2 - 1
        return signs * torch.exp2(-index)

    @pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "nvfp4"])
    def test_blocks_share_position(self, name):
        x = self.case()
        q = get_quantizer(name, block_dim=1)
        if name != "nvfp4":  # (NVFP4's E4M3 block scales are not powers of two)
            assert torch.equal(q(x, gen()), x)
        encoded = q.encode(x, gen())
        assert encoded.size2d == (2 * 3 * 5, 64)  # one line per (n, h, w), channels along it
        scales = encoded.transform.inverse(encoded.scales_2d(torch.float64))  # (N, C, H, W)
        blocks = scales.unflatten(1, (-1, BLOCK[name]))
        assert (blocks == blocks[:, :, :1]).all()  # constant over a block's channels
        assert len(torch.unique(scales)) >= 10  # and set per position

    @pytest.mark.parametrize("inner", ["mxfp4", "nvfp4", "fp8_e4m3_per_row"])
    def test_transform_mixes_channels_only(self, inner):
        """Zero is on every grid here: any nonzero output off the one position came from a
        transform that mixed positions."""
        x = torch.zeros(2, 64, 3, 5)
        x[1, :, 2, 4] = torch.randn(64, generator=gen(3))  # one position
        q = HadamardThen(get_quantizer(inner, block_dim=1), 32, 1)
        out = q(x, gen())
        assert out.shape == x.shape
        assert (out[1, :, 2, 4] != 0).any()
        out[1, :, 2, 4] = 0
        assert (out == 0).all()  # nothing leaked to other positions

    @pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp4+rht32"])
    def test_unbiased_and_bounded(self, name):
        inner = get_quantizer(name.split("+")[0], block_dim=1)
        q = HadamardThen(inner, 32, 1) if "+" in name else inner
        x = heavy_rows(4, 20 * 6, seed=5).reshape(4, 20, 2, 3)  # channels: not whole blocks
        samples = draws(q, x, 400)
        z = projection_z(samples.flatten(2), x.flatten(1))
        assert z.abs().max() < z_limit(3 * z.numel()), z
        errors = (samples - x).square().flatten(1).sum(1).double()
        se = errors.std() / math.sqrt(errors.numel())
        assert errors.mean() <= q.variance_bound(x) + 4 * se


class TestNearestScales:
    """Round-to-nearest uses the standard scale rule, on blocks whose maxima have mantissa 1.9,
    where it differs from the no-clip rule (and from rounding the NVFP4 block scale up); the
    no-clip rule holds down to tensors of subnormals."""

    @pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2_per_row", "mxfp8", "mxfp4"])
    def test_power_of_two_scale(self, name):
        x = clipping_case()
        q = get_quantizer(name, rounding="nearest", block_dim=1)
        _, scales = decoded_parts(q.encode(x))
        group = {"fp8_e4m3": 64 * 16, "fp8_e5m2_per_row": 64}.get(name, BLOCK.get(name))
        amax = x.reshape(-1, group).abs().amax(1, keepdim=True).expand(-1, group).reshape(x.shape)
        expected = torch.exp2(torch.floor(torch.log2(amax.double())) - ELEMENT[name].emax)
        assert torch.equal(scales, expected)

    def test_nvfp4_block_scale(self):
        x = torch.rand(16, 64, generator=gen(4)) + 0.5
        x *= torch.exp2(torch.randint(-3, 4, (16, 1), generator=gen(5)).float())
        encoded = get_quantizer("nvfp4", rounding="nearest").encode(x)
        tensor_scale = encoded.tensor_scale
        amax = x.reshape(16, 4, 16).abs().amax(-1)
        expected = e4m3_round(amax / 6 / tensor_scale)
        assert torch.equal(encoded.scale.float(), expected)

    @pytest.mark.parametrize("k", [1, 3, 7, 21])
    def test_nvfp4_never_clips_a_tensor_of_subnormals(self, k):
        """A tensor whose largest value is a float32 subnormal gets the smallest tensor scale
        (2^-126). A block maximum just above 6x an E4M3 multiple, ``(6k·2^14 + 1)·2^-149``,
        then still gets a block scale S with 6·S ≥ its maximum (``amax / 6`` computed among
        subnormals rounded down onto the multiple, and every draw clipped the maximum to 6·S);
        the variance bound (float64) uses the same S."""
        top = (6 * k * 2**14 + 1) * 2.0**-149
        x = torch.full((1, 16), top / 3)
        x[0, 0] = top
        assert float(x[0, 0]) == top and top < 2.0**-126  # subnormal, held exactly
        q = get_quantizer("nvfp4")
        encoded = q.encode(x, gen())
        effective = encoded.scale.double() * encoded.tensor_scale.double()
        assert float(6 * effective.max()) >= top
        assert float(q._scaled(x)[1].max()) == float(effective.max())

    @pytest.mark.parametrize("fused", [False, True])
    @pytest.mark.parametrize("largest", [2.0**-149, 1e-42, 2.0**-140])
    def test_nvfp4_tensor_scale_of_the_smallest_tensors(self, largest, fused):
        """A tensor whose largest magnitude is below about 2^-139 has amax / (6·448) underflow
        to 0 in float32; it gets the smallest tensor scale 2^-126 (it got 1: every entry then
        sat next to 0 on a grid of step 2^-10, rounding up to it about once in 2^24 draws, a
        mean 10^30 times the value), so its grid step is the smallest, 2^-136."""
        x = torch.full((64, 16), largest)
        q = get_quantizer("nvfp4", fused=fused)
        encoded = q.encode(x, gen())
        assert float(encoded.tensor_scale) == 2.0**-126
        step = 2.0**-136  # E2M1's 0.5 x the smallest E4M3 block scale 2^-9 x 2^-126
        draws = torch.stack([q(x, gen(i)) for i in range(8)]).double()
        assert float(draws.min()) >= 0 and float(draws.max()) <= max(step, largest)
        assert float(q.variance_bound(x)) <= 64 * 16 * step**2 / 4


class TestInputDtypes:
    """float64 beyond what a scale represents is refused; float16 output can overflow."""

    @pytest.mark.parametrize("name", ["mxfp4", "fp8_e4m3", "fp8_e5m2_per_row", "nvfp4"])
    @pytest.mark.parametrize("magnitude", [1e300, 1e-300])
    def test_float64_out_of_range(self, name, magnitude):
        x = torch.rand(4, 32, generator=gen(), dtype=torch.float64) * magnitude
        q = get_quantizer(name)
        with pytest.raises(ValueError, match="outside \\[2\\^-149"):
            q.encode(x, gen())
        x[0] = 1.0  # only that group is out of range: still refused
        if magnitude > 1:
            with pytest.raises(ValueError, match="outside"):
                q.encode(x, gen())
        ok = torch.rand(4, 32, generator=gen(), dtype=torch.float64) * 1e30
        ok[1] = 0.0
        assert torch.equal(q(ok, gen()), q(ok, gen()))  # in range (and zero): accepted

    @pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3_per_row", "nvfp4"])
    def test_float64_beyond_float32_decodes_finite(self, name):
        """float64 maxima between float32's largest (3.4e38) and ``max·2^127`` are accepted:
        they decode finite and near the input (the tensor- and row-scaled FP8 codes decoded
        through a float32 scale, to inf)."""
        x = torch.tensor([[1e39, 2.0, -3e39, 1.0]], dtype=torch.float64)
        q = get_quantizer(name, rounding="nearest")
        y = q(x, gen())
        assert y.dtype == torch.float64 and torch.isfinite(y).all()
        assert float((y - x).abs().max()) <= 0.2 * 3e39

    def test_float16_overflows_to_inf(self):
        """Documented (docs/method.md §12): the no-clip grid can round 60000 up to 65536, which
        float16 cannot hold; the float32 decode of the same input is finite."""
        x = torch.full((4, 32), 60000.0, dtype=torch.float16)
        q = get_quantizer("mxfp4")
        samples = draws(q, x, 50)
        assert samples.dtype == torch.float16 and torch.isinf(samples).any()
        wide = draws(q, x.float(), 50)
        assert torch.isfinite(wide).all()
        assert torch.equal(torch.isinf(samples), wide > 65504)
