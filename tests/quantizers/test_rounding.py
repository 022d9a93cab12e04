"""Stochastic rounding's probability of rounding up, exactly: over every uniform the generators
can draw (the 2**24 multiples of 2**-24 in [0, 1)), not by sampling."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from fqtorch.quantizers.rounding import round_to_grid, stochastic_round_

EVERY_UNIFORM = torch.arange(2**24, dtype=torch.float32) * 2.0**-24  # torch.rand's whole range

# Grid positions (float32) across the ranges the quantizers produce: 8-bit affine grids reach
# 255, symmetric ones ±127, format elements (E4M3) ±448; fractions with bits below 2**-24 near 0.
POSITIONS = [0.3, 1.3, 12.3, 100.3, 200.3, 254.9, 447.7, -0.3, -1e-10, -0.7, -100.3, -126.9]
POSITIONS += [2.0**-30, 3.0 * 2.0**-26, 0.5 + 2.0**-24, 255.0, -127.0, 0.0]


def _mean_rounded(v: float) -> Fraction:
    """``E[SR(v)]`` over every uniform, as an exact fraction."""
    rounded = stochastic_round_(torch.full((2**24,), v), EVERY_UNIFORM.clone())
    whole = math.floor(v)
    ups = int((rounded - whole).sum(dtype=torch.float64))  # each entry is whole or whole + 1
    assert rounded.min() >= whole and rounded.max() <= whole + 1
    return whole + Fraction(ups, 2**24)


@pytest.mark.parametrize("v", POSITIONS)
def test_stochastic_rounding_rounds_up_with_probability_frac(v):
    """``E[SR(v)] = v`` exactly for a float32 ``|v| ≥ 1/2``, and within ``2**-24`` grid steps
    below (the uniforms' resolution). ``floor(v + u)`` fails this: the sum rounds to nearest
    first, rounding up with probability ``frac(v) + ulp(v)/2`` (``+3.8e-6`` at ``v = 100.3``)."""
    v = float(torch.tensor(v, dtype=torch.float32))  # the float32 position, exactly
    error = _mean_rounded(v) - Fraction(v)
    if abs(v) >= 0.5:
        assert error == 0, float(error)
    else:
        assert abs(error) < Fraction(1, 2**24), float(error)


def test_round_to_grid_draws_from_the_generator_and_clamps():
    """Seeded draws repeat; the result is clamped to the grid's ends and integral."""
    v = torch.linspace(-3.7, 19.2, 1000)
    a = round_to_grid(v.clone(), "stochastic", 0, 15, torch.Generator().manual_seed(3))
    b = round_to_grid(v.clone(), "stochastic", 0, 15, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, a.round())
    assert a.min() == 0 and a.max() == 15
    inside = (v > 0) & (v < 15)
    assert ((a - v).abs()[inside] < 1).all()
