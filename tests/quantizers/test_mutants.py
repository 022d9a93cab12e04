"""Properties of the quantizers that mutation testing (scripts/mutation.sh, docs/testing.md) found
unchecked: what row transforms report about their inverse, BHQ on too few rows, reprs, errors."""

from __future__ import annotations

import re

import pytest
import torch

from fqtorch.quantizers import get_quantizer, list_quantizers
from fqtorch.quantizers.base import as_rows
from fqtorch.quantizers.formats import is_format
from tests.helpers import heavy_rows


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TestRowTransforms:
    @pytest.mark.parametrize("name", ["bhq", "rht"])
    @pytest.mark.parametrize("scale", [1.0, 2.0**-30, 2.0**40])
    @pytest.mark.parametrize("rows", [32, 28])
    def test_inverse_column_norms_are_those_of_the_inverse(self, name, scale, rows):
        """``inverse_column_norms_sq()[i]`` is ``‖T⁻¹e_i‖²``, as measured by applying the inverse
        to the identity, at any magnitude of the input (RHT scales by a power of two), also when
        RHT's last block is part zero padding (28 rows: the cropping inverse keeps 12 of 16)."""
        x = heavy_rows(rows, 7, seed=3) * scale
        transform = get_quantizer(name, 4).encode(x, gen()).transform
        assert transform is not None
        norms = transform.inverse_column_norms_sq().double()
        inverse = transform.inverse(torch.eye(norms.shape[0], dtype=torch.float32)).double()
        assert inverse.shape[0] == rows
        torch.testing.assert_close(
            norms,
            inverse.square().sum(0),
            rtol=1e-5,
            atol=0,
        )


class TestBhqWithFewRows:
    @pytest.mark.parametrize("rows", [1, 2])
    @pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
    def test_is_psq_below_three_rows(self, rows, rounding):
        """No group fits in fewer than three rows: BHQ is PSQ, codes and bound alike."""
        x = heavy_rows(rows, 9, seed=1)
        bhq = get_quantizer("bhq", 3, rounding=rounding)
        psq = get_quantizer("psq", 3, rounding=rounding)
        torch.testing.assert_close(bhq(x, gen()), psq(x, gen()), rtol=0, atol=0)
        torch.testing.assert_close(bhq.variance_bound(x), psq.variance_bound(x))


class TestReprs:
    @pytest.mark.parametrize("fused", [False, True])
    @pytest.mark.parametrize(
        "name", [n for n in list_quantizers() if n != "identity" and not is_format(n)]
    )
    def test_repr_names_quantizer_bits_rounding_and_fused(self, name, fused):
        """Printed models show each quantizer as ``name(bits, rounding[, options][, fused])``."""
        q = get_quantizer(name, 5, rounding="nearest", fused=fused)
        fused_part = ", fused" if fused else ""
        assert re.fullmatch(rf"{name}\(5, nearest(, [a-z_]+=[0-9]+)*{fused_part}\)", repr(q))


def test_identity_has_no_codes_and_says_so():
    with pytest.raises(NotImplementedError, match="identity quantizer has no integer codes"):
        get_quantizer("identity").encode(torch.ones(2, 2))


def test_as_rows_views():
    """Rows are dim 0; a 1-D tensor is a column and a scalar one entry."""
    assert as_rows(torch.ones(())).shape == (1, 1)
    assert as_rows(torch.ones(5)).shape == (5, 1)
    assert as_rows(torch.ones(2, 3, 4)).shape == (2, 12)


def test_draw_keys_cover_the_32_bit_range():
    """The keys are uniform over all 2^32 int32 values: over 2000 draws (4000 keys) both halves
    of the range and keys above 2^30 appear (each absent with probability below 2^-1000)."""
    from fqtorch.quantizers.rounding import draw_keys

    g = gen(5)
    keys = torch.cat([draw_keys(g, torch.device("cpu")) for _ in range(2000)]).long()
    assert keys.dtype == torch.int64 and keys.min() < -(2**30) and keys.max() > 2**30
    assert len(torch.unique(keys)) > 3990  # distinct: collisions are rare among 2^32 values


def test_check_float_names_what_it_got():
    from fqtorch.quantizers.base import check_float

    with pytest.raises(TypeError, match="ptq expects a torch.Tensor, got list"):
        check_float([1.0], "ptq")
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        check_float(torch.arange(3), "ptq")
