"""Both sides of the tests' projection z-test (``tests/helpers.py``): on unbiased stochastic
rounding it false-alarms at most at its level (Bonferroni over every direction), and its
structured directions catch a systematic shift of a hundredth of a step, which random Gaussian
directions see only at the scale of one entry's noise."""

from __future__ import annotations

import pytest
import torch

from fqtorch.quantizers import get_quantizer
from tests.helpers import (
    binomial_upper,
    heavy_rows,
    projection_directions,
    projection_z,
    z_limit,
)

BITS = 4


def psq_draws(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` independent PSQ quantizations of ``x`` (N, D), as (count, N, D), from one call:
    PSQ's grids are per row, so quantizing ``x`` stacked ``count`` times gives independent
    draws."""
    q = get_quantizer("psq", BITS)
    stacked = x.repeat(count, 1)
    return q(stacked, torch.Generator().manual_seed(seed)).reshape(count, *x.shape)


def row_steps(x: torch.Tensor) -> torch.Tensor:
    """PSQ's step of each row, broadcast over its entries."""
    return ((x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (2**BITS - 1)).expand_as(x)


def test_directions():
    """64 Gaussian directions, all ones, ``sign(x)``, and an indicator per row and column."""
    x = heavy_rows(3, 4)
    basis = projection_directions(x)
    assert basis.shape == (12, 64 + 2 + 3 + 4)
    assert torch.equal(basis[:, 64], torch.ones(12, dtype=torch.float64))
    assert torch.equal(basis[:, 65], x.reshape(-1).sign().double())
    rows, cols = basis[:, 66:69], basis[:, 69:]
    assert torch.equal(rows.sum(0), torch.full((3,), 4.0, dtype=torch.float64))
    assert torch.equal(cols.sum(0), torch.full((4,), 3.0, dtype=torch.float64))
    assert torch.equal(rows.reshape(3, 4, 3)[1, :, 1], torch.ones(4, dtype=torch.float64))
    assert torch.equal(cols.reshape(3, 4, 4)[:, 2, 2], torch.ones(3, dtype=torch.float64))
    assert projection_directions(x.reshape(-1)).shape == (12, 66)  # no rows in a vector
    assert projection_directions(x, structured=False).shape == (12, 64)


def test_false_alarm_rate_at_most_alpha():
    """Unbiased PSQ draws: over many independent trials, the largest |z| over all directions
    passes ``z_limit(directions, alpha)`` at rate ≤ alpha (binomial upper tail at 1e-3)."""
    x = heavy_rows(8, 12, seed=1)
    trials, count, alpha = 300, 300, 0.1
    samples = psq_draws(x, trials * count, seed=2).reshape(trials, count, *x.shape)
    alarms = 0
    for trial in samples:
        z = projection_z(trial, x)
        alarms += int(z.abs().max() > z_limit(z.numel(), alpha))
    assert alarms <= binomial_upper(trials, alpha), alarms


def planted(shift: str, x: torch.Tensor) -> torch.Tensor:
    """A systematic shift, in units of each row's PSQ step."""
    step = row_steps(x)
    if shift == "every entry":
        return 0.01 * step
    if shift == "towards zero":
        return -0.01 * step * x.sign()
    mask = torch.zeros_like(x)
    if shift == "one row":
        mask[5] = 1
    else:  # one column
        mask[:, 7] = 1
    return 0.05 * step * mask


@pytest.mark.parametrize("shift", ["every entry", "towards zero", "one row", "one column"])
def test_catches_planted_shifts(shift):
    """1500 draws (as the quantizer tests take) of 4-bit PSQ on heavy rows: the same draws pass
    unshifted and fail with a hundredth of a step added to every entry (or a twentieth to one
    row or column)."""
    x = heavy_rows(16, 24, seed=4)
    samples = psq_draws(x, 1500, seed=5)
    z = projection_z(samples, x)
    assert z.abs().max() < z_limit(z.numel())
    z = projection_z(samples + planted(shift, x), x)
    assert z.abs().max() > z_limit(z.numel())


def test_float_rounding_is_not_a_bias():
    """Values decoded off a grid end point by a float32 ulp, with no other spread, count as
    exact; a miss of a thousandth of their size does not."""
    x = heavy_rows(4, 6)
    ulp = torch.nextafter(x, torch.full_like(x, torch.inf)) - x
    samples = torch.stack([x + ulp * (i % 2) for i in range(10)])
    assert projection_z(samples, x).abs().max() == 0
    assert torch.isinf(projection_z(x[None].expand(10, -1, -1) * 1.001, x)).any()
