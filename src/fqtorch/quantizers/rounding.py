"""Rounding onto an integer grid: round-to-nearest and stochastic rounding.

Stochastic rounding ``SR(v) = floor(v + u)``, ``u ~ U[0, 1)``, rounds up with probability
``frac(v)``, so ``E[SR(v)] = v`` and ``Var[SR(v)] = frac(v)(1 − frac(v)) ≤ 1/4`` (PAPER.md §4).
The uniforms come from an explicit ``torch.Generator``, so a seed fixes every draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_to_grid"]


def round_to_grid(
    v: Tensor,
    rounding: str,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Round ``v`` (in grid units) to an integer in ``[low, high]``, as a float tensor.

    ``v`` must be a temporary: it is overwritten.
    """
    if rounding == "nearest":
        rounded = v.round_()
    else:
        noise = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device)
        rounded = v.add_(noise).floor_()
    return rounded.clamp_(low, high)


def to_codes(rounded: Tensor, offset: int) -> Tensor:
    """Shift grid indices ``0..2**bits - 1`` by ``-offset`` into an ``int8`` container."""
    if offset:
        rounded = rounded.sub_(offset)
    return rounded.to(torch.int8)
