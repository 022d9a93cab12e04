"""Uniform quantizers: one grid per tensor, per row or per column (docs/method.md §4, ``T = I``).

Asymmetric quantizers map each group's range ``[min, max]`` onto the ``B = 2**bits - 1`` bins of
``[0, B]`` (``ptq``: one group, ``psq``: one per row (sample), ``per_column``: one per column).
Symmetric quantizers map ``[-max|x|, max|x|]`` onto ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` so
that real zero is exactly a code (the forward weight quantizers).

Every finite range has a grid that covers it: the step is rounded up where rounding to nearest would
leave the grid short of the range's top, so a subnormal range gets a step of at least the smallest
subnormal (every grid point is then exact), and a range past the float maximum (``±3e38``) is
measured at half scale (:func:`affine_steps`). Such a range decodes while ``codes · scale`` stays
finite: up to ``2·B/2**bits`` times the float maximum (from 1.5× at 2 bits to 1.99× at 8).

Non-finite input: a group (tensor, row or column) that holds a NaN or ±Inf gets a NaN scale, so its
output is NaN: never finite garbage. Training loops and ``GradScaler`` see it and skip the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import (
    QuantizedTensor,
    Quantizer,
    as_rows,
    check_float,
    compute_dtype,
    register_quantizer,
    uniform_bound,
)
from .fused import LazyCompiled
from .rounding import Noise, round_to_grid, to_codes

__all__ = [
    "Identity",
    "PerColumn",
    "PerRow",
    "PerTensor",
    "SymmetricPerRow",
    "SymmetricPerTensor",
    "affine_encode",
    "affine_params",
    "affine_round",
    "affine_steps",
    "uniform_spec",
]

_REDUCE_DIM = {"tensor": None, "row": 1, "column": 0}


# Rows per block of the column reduction (see _column_minmax).
_COLUMN_BLOCK = 64


def group_minmax(x2d: Tensor, granularity: str) -> tuple[Tensor, Tensor]:
    """Min and max of each group, shaped to broadcast over ``x2d``."""
    dim = _REDUCE_DIM[granularity]
    if dim is None:
        low, high = torch.aminmax(x2d)
        return low.reshape(1, 1), high.reshape(1, 1)
    if x2d.device.type == "cpu" and not torch.compiler.is_compiling():
        # Eagerly on the CPU, ATen's aminmax over a dimension runs 2-6x slower than amin and amax
        # apiece (benchmarks/column_ranges.py; docs/performance.md, "Eager ranges"). Same values;
        # where a group holds both +0 and -0, the zero's sign may differ, which changes no code.
        return x2d.amin(dim, keepdim=True), x2d.amax(dim, keepdim=True)
    if dim == 0 and x2d.device.type == "cpu":  # on CUDA a column reduction reads coalesced
        return _column_minmax(x2d)
    return torch.aminmax(x2d, dim=dim, keepdim=True)


def _column_minmax(x2d: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.aminmax(x2d, dim=0, keepdim=True)``, the same values, in two stages.

    A row-major tensor reduced down its columns in one stage is read a strip of columns at a time,
    every row a new page: in compiled kernels on the CPU that ran slower than a pass over the rows
    (so it is used there; eagerly, ``amin`` and ``amax`` apiece are faster still). Reduced over
    blocks of :data:`_COLUMN_BLOCK` rows first, then over the blocks' results, each stage touches
    few pages at a time. Min and max do not depend on the order of the reduction (NaN included), so
    the result is the same.
    """
    rows, cols = x2d.shape
    whole = rows - rows % _COLUMN_BLOCK
    if whole == 0:
        return torch.aminmax(x2d, dim=0, keepdim=True)
    blocks = x2d[:whole].reshape(whole // _COLUMN_BLOCK, _COLUMN_BLOCK, cols)
    low, high = torch.aminmax(blocks, dim=1)
    low, high = low.amin(0, keepdim=True), high.amax(0, keepdim=True)
    if whole < rows:
        tail_low, tail_high = torch.aminmax(x2d[whole:], dim=0, keepdim=True)
        low, high = torch.minimum(low, tail_low), torch.maximum(high, tail_high)
    return low, high


def _live_steps(span: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """(step used for dequantization, step safe to divide by) for groups of range ``span``.

    The step is ``span / bins``, moved up one float (``nextafter``) where rounding made it too small
    for the grid to reach the top of the range (``span / step > bins``): a clamp there would bias
    stochastic rounding. So a live group's step is never 0 (at least the smallest subnormal), and
    no grid position ``(x − low) / step`` of the group exceeds ``bins``.
    """
    finite = torch.isfinite(span)
    step = span / bins
    short = span / step > bins  # also where span / bins underflowed to 0
    step = torch.where(short, torch.nextafter(step, torch.full_like(step, math.inf)), step)
    live = finite & (span > 0)
    divisor = torch.where(live, step, torch.ones_like(step))
    # A constant group keeps step 0, so it decodes exactly to its value; a non-finite one is NaN.
    step = torch.where(live, step, torch.zeros_like(step))
    step = torch.where(finite, step, torch.full_like(step, float("nan")))
    return step, divisor


def _fold(low: Tensor, high: Tensor) -> Tensor:
    """1, or 1/2 for a group whose span ``high − low`` overflows although both ends are finite:
    its span and grid positions are computed at half scale, which is exact (a power of two)."""
    overflow = torch.isinf(high - low) & torch.isfinite(low) & torch.isfinite(high)
    return 1 - overflow.to(low.dtype) / 2


def affine_steps(low: Tensor, high: Tensor, bins: int) -> Tensor:
    """The step :func:`affine_encode` uses for groups of range ``[low, high]`` on ``bins`` bins."""
    fold = _fold(low, high)
    return _live_steps(high * fold - low * fold, bins)[0] / fold


def affine_encode(
    x2d: Tensor,
    low: Tensor,
    high: Tensor,
    bits: int,
    rounding: str,
    noise: Noise,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scale and bias of the asymmetric grid ``[low, high] -> [0, B]`` (shifted to int8).

    Computed at ``fold`` scale (:func:`_fold`): grid position ``(x·f − low·f) / (step·f)``, bias
    ``(low·f + half·step·f) / f``; with ``f = 1`` these are the plain formulas. The grid positions
    are computed in ``out`` when given (``x2d`` itself, if the caller no longer needs it).
    """
    bins = 2**bits - 1
    half = 2 ** (bits - 1)
    fold = _fold(low, high)
    step, divisor = _live_steps(high * fold - low * fold, bins)  # at fold scale
    grid = round_to_grid(
        torch.addcmul(-low * fold, x2d, fold, out=out).div_(divisor), rounding, 0, bins, noise
    )
    # value = (grid) * step + low = (grid - half) * step + (low + half * step)
    return to_codes(grid, half), step / fold, (low * fold + half * step) / fold


def symmetric_encode(
    x2d: Tensor, absmax: Tensor, bits: int, rounding: str, noise: Noise
) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scale and (zero) bias of the grid ``[-absmax, absmax] -> [-L, L]``."""
    params = symmetric_params(-absmax, absmax, bits)
    return symmetric_round(x2d, params, bits, rounding, noise), params[1], params[2]


# affine_encode split in two (the same operations, so the same codes): each group's grid
# parameters first, materialized, then the rounding. Kernels that round several grids in one loop
# (:mod:`.twoway`, :mod:`.householder`) use them: in one graph Inductor would recompute a column's
# parameters for every element of the column.
def affine_params(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, ...]:
    """:func:`affine_encode`'s per-group values: (−low·f, f, divisor, scale, bias)."""
    half = 2 ** (bits - 1)
    fold = _fold(low, high)
    step, divisor = _live_steps(high * fold - low * fold, 2**bits - 1)
    return -low * fold, fold, divisor, step / fold, (low * fold + half * step) / fold


def affine_round(
    x2d: Tensor, params: tuple[Tensor, ...], bits: int, rounding: str, noise: Noise
) -> Tensor:
    """:func:`affine_encode`'s codes from :func:`affine_params`' first three values."""
    offset, fold, divisor = params[:3]
    grid = torch.addcmul(offset, x2d, fold).div_(divisor)
    return to_codes(round_to_grid(grid, rounding, 0, 2**bits - 1, noise), 2 ** (bits - 1))


def symmetric_params(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, ...]:
    """:func:`symmetric_encode`'s per-group values for ranges ``[low, high]``: (divisor, scale,
    bias)."""
    step, divisor = _live_steps(torch.maximum(-low, high), 2 ** (bits - 1) - 1)
    return divisor, step, torch.zeros_like(step)


def symmetric_round(
    x2d: Tensor, params: tuple[Tensor, ...], bits: int, rounding: str, noise: Noise
) -> Tensor:
    """:func:`symmetric_encode`'s codes from :func:`symmetric_params`' first value."""
    limit = 2 ** (bits - 1) - 1
    return to_codes(round_to_grid(x2d / params[0], rounding, -limit, limit, noise), 0)


# The whole uniform encode (cast, ranges, grid, rounding, codes). Eagerly one function; compiled,
# two graphs (_TwoGraphs): in one graph Inductor recomputes a group's grid parameters for every
# element, which made a compiled per-column encode 2-2.5x and a per-row one 1.1-1.5x slower.
# Two functions per grid, not one with a flag, so that each keeps its own small set of graphs.
def _affine_kernel(
    x2d: Tensor, noise: Noise, bits: int, granularity: str, rounding: str
) -> tuple[Tensor, Tensor, Tensor]:
    x2d = x2d.to(compute_dtype(x2d))
    low, high = group_minmax(x2d, granularity)
    return affine_encode(x2d, low, high, bits, rounding, noise)


def _symmetric_kernel(
    x2d: Tensor, noise: Noise, bits: int, granularity: str, rounding: str
) -> tuple[Tensor, Tensor, Tensor]:
    x2d = x2d.to(compute_dtype(x2d))
    low, high = group_minmax(x2d, granularity)
    return symmetric_encode(x2d, torch.maximum(-low, high), bits, rounding, noise)


def _affine_stats(x2d: Tensor, bits: int, granularity: str) -> tuple[Tensor, ...]:
    x2d = x2d.to(compute_dtype(x2d))
    return affine_params(*group_minmax(x2d, granularity), bits)


def _affine_rounding(
    x2d: Tensor, params: tuple[Tensor, ...], bits: int, rounding: str, noise: Noise
) -> Tensor:
    return affine_round(x2d.to(compute_dtype(x2d)), params, bits, rounding, noise)


def _symmetric_stats(x2d: Tensor, bits: int, granularity: str) -> tuple[Tensor, ...]:
    x2d = x2d.to(compute_dtype(x2d))
    return symmetric_params(*group_minmax(x2d, granularity), bits)


def _symmetric_rounding(
    x2d: Tensor, params: tuple[Tensor, ...], bits: int, rounding: str, noise: Noise
) -> Tensor:
    return symmetric_round(x2d.to(compute_dtype(x2d)), params, bits, rounding, noise)


class _TwoGraphs:
    """A uniform encode ``(x2d, noise, bits, granularity, rounding) -> (codes, scale, bias)``:
    ``fn`` eagerly; called, compiled: on a large tensor as two graphs (the groups' grid
    parameters, materialized, then the rounding), on a small one as one graph (a second compiled
    call costs about 0.1 ms, more than it saves there). All run the same operations, so they give
    the same codes."""

    def __init__(
        self, fn: Callable[..., Any], stats: Callable[..., Any], rounding: Callable[..., Any]
    ) -> None:
        self.fn = fn
        # Elements from which the two graphs are faster, by granularity (one thread, Intel Xeon:
        # benchmarks/uniform_encode.py, docs/performance.md): a column's parameters recomputed per
        # element cost most.
        self.split_from = {"column": 2**16, "row": 2**18, "tensor": 2**18}
        self.whole = LazyCompiled(fn)
        self.stats, self.rounding = LazyCompiled(stats), LazyCompiled(rounding)

    def __call__(
        self, x2d: Tensor, noise: Noise, bits: int, granularity: str, rounding: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not self.splits(x2d.numel(), granularity):
            return self.whole(x2d, noise, bits, granularity, rounding)
        params = self.stats(x2d, bits, granularity)
        return self.rounding(x2d, params, bits, rounding, noise), params[-2], params[-1]

    def splits(self, numel: int, granularity: str) -> bool:
        """Whether a tensor of ``numel`` elements is encoded by the two graphs."""
        return numel >= self.split_from[granularity]

    def __repr__(self) -> str:
        return f"_TwoGraphs({self.fn.__qualname__})"


fused_affine = _TwoGraphs(_affine_kernel, _affine_stats, _affine_rounding)
fused_symmetric = _TwoGraphs(_symmetric_kernel, _symmetric_stats, _symmetric_rounding)


class _Uniform(Quantizer):
    """A uniform grid per group; subclasses choose the group and the grid's symmetry."""

    granularity = "tensor"
    symmetric = False
    column_equivariant = True  # per tensor, row or column: groups follow a permutation

    def _steps(self, x2d: Tensor) -> Tensor:
        """The steps :meth:`encode` uses, one per group."""
        low, high = group_minmax(x2d, self.granularity)
        if self.symmetric:
            return _live_steps(torch.maximum(-low, high), 2 ** (self.bits - 1) - 1)[0]
        return affine_steps(low, high, 2**self.bits - 1)

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = as_rows(x)  # the kernel casts to the compute dtype (inside the fused loop)
        kernel = self.kernel(fused_symmetric if self.symmetric else fused_affine)
        noise = self.noise(generator, x2d.device)
        codes, scale, bias = kernel(x2d, noise, self.bits, self.granularity, self.rounding)
        return QuantizedTensor(codes, scale, bias, self.bits, x.shape, x.dtype)

    def variance_bound(self, x: Tensor) -> Tensor:
        check_float(x, self.name)
        x2d = as_rows(x).to(compute_dtype(x))
        steps = self._steps(x2d).to(torch.float64)  # a step past 1e19 squares past float32
        return uniform_bound(x2d.numel() // steps.numel(), steps)


def uniform_spec(q: Quantizer) -> tuple | None:
    """``(bits, granularity, symmetric, rounding)`` of a fused uniform quantizer, else ``None``:
    what the kernels that quantize a tensor two ways take (:mod:`.twoway`)."""
    if isinstance(q, _Uniform) and q.fused:
        return (q.bits, q.granularity, q.symmetric, q.rounding)
    return None


@register_quantizer("ptq")
class PerTensor(_Uniform):
    """PTQ: one scale and zero point for the whole tensor; bound ``N·D·R(x)²/(4B²)``."""

    granularity = "tensor"


@register_quantizer("psq")
class PerRow(_Uniform):
    """PSQ: one scale and zero point per row (sample); bound ``D/(4B²)·Σ_i R_i²``."""

    granularity = "row"


@register_quantizer("per_column")
class PerColumn(_Uniform):
    """One scale and zero point per column: the weight-gradient branch's ``grad_output``."""

    granularity = "column"


@register_quantizer("symmetric")
class SymmetricPerTensor(_Uniform):
    """Per-tensor symmetric grid with real zero exactly on a code: the forward weight default."""

    granularity = "tensor"
    symmetric = True


@register_quantizer("symmetric_per_row")
class SymmetricPerRow(_Uniform):
    """Per-row symmetric grid: per output channel for a ``(out, in, ...)`` weight."""

    granularity = "row"
    symmetric = True


@register_quantizer("identity")
class Identity(Quantizer):
    """The null quantizer: returns its input unchanged (exact, unbiased, zero variance)."""

    column_equivariant = True

    @property
    def unbiased(self) -> bool:
        return True

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_float(x, self.name, empty=True)
        return x

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        raise NotImplementedError("the identity quantizer has no integer codes")

    def variance_bound(self, x: Tensor) -> Tensor:
        check_float(x, self.name, empty=True)
        return torch.zeros((), dtype=torch.float64, device=x.device)

    def __repr__(self) -> str:
        return "identity"
