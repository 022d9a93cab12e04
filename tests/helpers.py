"""Statistical helpers shared by the tests: z-scores from measured standard errors."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def z_limit(count: int, alpha: float = 1e-3) -> float:
    """Two-sided Bonferroni threshold: P(any of ``count`` N(0,1) scores exceeds it) ≤ ``alpha``."""
    return float(torch.special.ndtri(torch.tensor(1 - alpha / (2 * count), dtype=torch.float64)))


def projection_z(samples: Tensor, target: Tensor, directions: int = 64, seed: int = 0) -> Tensor:
    """z-scores of the sample mean against ``target`` along random Gaussian directions.

    ``samples`` is (M, ...). Projections are sums over many entries, so their standard error is
    never 0 for a stochastic quantizer and their mean is close to normal; a bias of any shape
    shows on random directions. A projection with zero spread counts as exact only if it hits.
    """
    m = samples.shape[0]
    flat = samples.reshape(m, -1).double()
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(flat.shape[1], directions, generator=gen, dtype=torch.float64)
    proj = flat @ basis  # (M, K)
    diff = proj.mean(0) - target.reshape(-1).double() @ basis
    se = proj.std(0) / math.sqrt(m)
    scale = proj.abs().mean(0) + 1e-30
    exact = diff.abs() <= 1e-9 * scale
    z = torch.where(se > 0, diff / se.clamp(min=1e-300), torch.full_like(diff, math.inf))
    return torch.where(exact & (se == 0), torch.zeros_like(z), z)


def heavy_rows(n: int, d: int, seed: int = 0, spread: float = 2.0) -> Tensor:
    """Gradient-like rows: N(0, 1) entries scaled per row by exp(N(0, spread²))
    (docs/method.md §4)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.exp(spread * torch.randn(n, 1, generator=gen))
