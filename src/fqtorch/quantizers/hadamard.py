"""RHT: randomized Hadamard transform quantization (beyond the paper).

Rows are mixed in blocks of ``block`` rows by ``T = H·diag(σ)/√block`` (``H`` the Walsh–Hadamard
matrix, ``σ`` random signs drawn from the generator), then quantized per row with stochastic
rounding, and ``T⁻¹ = Tᵀ`` is applied to the result. ``T`` is orthogonal, so it spreads a dominant
row's magnitude evenly over its block (as BHQ does for its groups) and, like BHQ, factors out of the
activation-gradient GEMM. Given the signs the quantizer is unbiased, hence unbiased overall.

The fast transform costs ``O(N·D·log block)``; rows are zero-padded to a multiple of ``block``.
Each block of rows is first scaled by an exact power of two ``2^-e`` that brings its largest
magnitude into ``[1/2, 1)`` (and back after the inverse), so the butterfly's sums cannot overflow
for values near the float maximum, subnormal values are mixed at full precision, and a block far
below the tensor's largest value keeps its values (scaled by the tensor's maximum, a block 2^126
or more below it underflowed to 0 on every draw). Values 2^126 below their own block's maximum
still underflow. (The ``rht16``/``rht32`` transforms before another quantizer scale the whole
tensor by one power: :mod:`.transforms`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    QuantizedTensor,
    Quantizer,
    as_rows,
    check_float,
    compute_dtype,
    register_quantizer,
)
from .uniform import fused_affine

__all__ = ["RandomizedHadamard", "RandomizedHadamardTransform"]


def _walsh_hadamard(x: Tensor, block: int, factor: Tensor) -> Tensor:
    """``blockdiag(H_block) x · factor`` for ``x`` (rows, D) with rows a multiple of ``block``."""
    rows, cols = x.shape
    y = x.reshape(rows // block, block, cols)
    h = 1
    while h < block:
        y = y.reshape(rows // block, block // (2 * h), 2, h, cols)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(rows, cols) * factor


def block_exponents(lines: Tensor, block: int) -> Tensor:
    """``e`` per row of ``lines`` (rows mixed in blocks of ``block``, zero-padded to a multiple of
    it), the same on every row of a block: its largest magnitude is ``m·2^e``, ``m`` in
    ``[1/2, 1)``; 0 for a block of zeros or one holding a NaN or an infinity."""
    rows = lines.shape[0]
    padded = -(-rows // block) * block
    low, high = torch.aminmax(lines, dim=1) if lines.shape[1] else (lines.new_zeros(rows),) * 2
    absmax = torch.maximum(-low, high)  # NaN where a row holds one
    absmax = torch.cat([absmax, absmax.new_zeros(padded - rows)]).reshape(-1, block)
    finite = torch.isfinite(absmax).all(1)
    exponent = torch.frexp(absmax.nan_to_num(0.0).amax(1)).exponent
    exponent = torch.where(finite, exponent, torch.zeros_like(exponent))
    return exponent.repeat_interleave(block)


@dataclass(frozen=True)
class RandomizedHadamardTransform:
    """``x ↦ 2^-E · blockdiag(H)·diag(σ)·x/√block`` on zero-padded rows: the orthogonal mix after
    an exact scaling by ``2^-E`` (``E`` diagonal, one ``e`` per block of rows from its largest
    magnitude: the mix stays within a block), so its inverse is its transpose times ``2^E``."""

    signs: Tensor  # (padded rows,) ±1
    block: int
    rows: int
    exponent: Tensor  # (padded rows,) int: e of each row's block, the block's scale is 2^e

    def _factors(self, exponent: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``2^exponent`` as exact factors within ``dtype``'s range (``|e|`` reaches 148 in
        float32), per row: ``σ·2^h`` and ``2^(exponent − h)/√block``, ``h = exponent // 2`` (the
        second applied after the butterfly: it is the same on every row of a block)."""
        half = torch.div(exponent, 2, rounding_mode="floor")
        rows = self.signs.to(dtype) * torch.exp2(half.to(dtype))
        rest = torch.exp2((exponent - half).to(torch.float64)) / self.block**0.5
        return rows, rest.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        pad = self.signs.shape[0] - self.rows
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        rows, rest = self._factors(-self.exponent, x.dtype)
        return _walsh_hadamard(x * rows[:, None], self.block, rest[:, None])

    def inverse(self, y: Tensor) -> Tensor:
        # H is symmetric and H·H = block·I, so T⁻¹ = 2^e·diag(σ)·H/√block.
        rows, rest = self._factors(self.exponent, y.dtype)
        return (_walsh_hadamard(y, self.block, rest[:, None]) * rows[:, None])[: self.rows]

    def inverse_column_norms_sq(self) -> Tensor:
        """``4^e·(real rows of its block)/block`` for every padded row, ``e`` its block's (float64:
        it passes the float32 range): column ``i`` of ``T⁻¹`` has ``block`` entries
        ``±2^e/√block``, of which the inverse keeps those on real rows (the last block may be
        part padding)."""
        padded = self.signs.shape[0]
        starts = torch.arange(0, padded, self.block, device=self.signs.device)
        real = (self.rows - starts).clamp(0, self.block).double() / self.block
        return torch.exp2(2 * self.exponent.double()) * real.repeat_interleave(self.block)


@register_quantizer("rht")
class RandomizedHadamard(Quantizer):
    """Per-row stochastic rounding after a random-sign Hadamard mix of ``block`` rows."""

    random_transform = True

    column_equivariant = True  # mixes rows, column by column; per-row grids

    def __init__(
        self, bits: int = 8, *, rounding: str = "stochastic", fused: bool = False, block: int = 16
    ) -> None:
        super().__init__(bits, rounding=rounding, fused=fused)
        if block < 1 or block & (block - 1):
            raise ValueError(f"rht block must be a power of two, got {block}")
        self.block = block

    def _block_for(self, rows: int) -> int:
        block = 1
        while block < min(self.block, rows):
            block *= 2
        return block

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x))
        rows = x2d.shape[0]
        block = self._block_for(rows)
        padded = -(-rows // block) * block
        bits = torch.randint(0, 2, (padded,), generator=generator, device=x.device)
        signs = (2 * bits - 1).to(x2d.dtype)
        transform = RandomizedHadamardTransform(signs, block, rows, block_exponents(x2d, block))
        y = transform.forward(x2d)
        # Fused, only the rounding is compiled: the butterfly compiles poorly with dynamic shapes.
        noise = self.noise(generator, x2d.device)
        kernel = self.kernel(fused_affine)
        codes, scale, bias = kernel(y, noise, self.bits, "row", self.rounding)
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype, transform)

    def variance_bound(self, x: Tensor) -> Tensor:
        """A bound for every sign draw: row ``i`` of ``Tx`` has entries at most
        ``Σ_{j∈block} |x_j| / √block``, so ``R_i(Tx) ≤ 2·max_d Σ_j |x_jd| / √block`` and
        ``E‖Q(x) − x‖² ≤ (D/B²)·Σ_blocks (max_d Σ_{j∈block} |x_jd|)²``."""
        check_float(x, self.name)
        if not torch.isfinite(x).all():  # no bound (NaN would pass every comparison)
            return torch.tensor(math.inf, dtype=torch.float64, device=x.device)
        x2d = as_rows(x).to(torch.float64)  # sums of values near the float32 maximum
        rows, cols = x2d.shape
        block = self._block_for(rows)
        padded = -(-rows // block) * block
        if padded != rows:
            x2d = torch.cat([x2d, x2d.new_zeros(padded - rows, cols)])
        col_sums = x2d.abs().reshape(padded // block, block, cols).sum(1)  # (blocks, D)
        bins = 2**self.bits - 1
        return cols * col_sums.amax(1).square().sum() / bins**2

    def __repr__(self) -> str:
        fused = ", fused" if self.fused else ""
        return f"{self.name}({self.bits}, {self.rounding}, block={self.block}{fused})"
