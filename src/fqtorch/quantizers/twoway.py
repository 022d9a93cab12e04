"""Both quantizations of a ``grad_output`` in one compiled graph.

An FQT backward quantizes ``grad_output`` twice (docs/method.md §2): per row (or tensor) for the
``grad_input`` GEMM, and per column (or tensor) for the ``grad_weight`` GEMM. Done one after the
other that is two compiled calls, each reading the tensor for its statistics and again for its
rounding. Here one ``torch.compile``'d graph computes both sets of statistics and both sets of
codes, both row-major ``(rows, cols)``: the layout the integer GEMMs take them in on the CPU
(``fqtorch.backends.int8``; the weight-gradient product reads them as its right operand).

The codes are those of the two quantizers' own :meth:`~.base.Quantizer.encode`, bit for bit: the
same functions (:func:`~.uniform.group_minmax`, :func:`~.uniform.affine_encode`,
:func:`~.uniform.symmetric_encode`) on the same hash keys, drawn from the generator in the same
order (the row quantizer's first). It applies to uniform quantizers with hash noise
(``fused=True``); :func:`encode_two_way` quantizes the others one after the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import QuantizedTensor, Quantizer, as_rows, check_float, compute_dtype
from .fused import LazyCompiled
from .rounding import Noise
from .uniform import (
    affine_encode,
    affine_params,
    affine_round,
    group_minmax,
    symmetric_encode,
    uniform_spec,
)

__all__ = ["encode_two_way", "fused_two_way", "fused_two_way_round", "fused_two_way_stats"]


def _encode(
    x2d: Tensor, noise: Noise, bits: int, granularity: str, symmetric: bool, rounding: str
) -> tuple[Tensor, Tensor, Tensor]:
    low, high = group_minmax(x2d, granularity)
    if symmetric:
        return symmetric_encode(x2d, torch.maximum(-low, high), bits, rounding, noise)
    return affine_encode(x2d, low, high, bits, rounding, noise)


def _two_way_kernel(
    x2d: Tensor, noise_g: Noise, noise_h: Noise, spec_g: tuple, spec_h: tuple
) -> tuple[Tensor, ...]:
    """``(codes_g, scale_g, bias_g, codes_h, scale_h, bias_h)``."""
    x2d = x2d.to(compute_dtype(x2d))
    return (*_encode(x2d, noise_g, *spec_g), *_encode(x2d, noise_h, *spec_h))


# Two asymmetric grids (PTQ, PSQ, per column: the paper's pair) run as two graphs: the statistics
# and each group's grid parameters first, materialized (one per row, one per column), then the
# rounding (:func:`~.uniform.affine_params`, :func:`~.uniform.affine_round`). In one graph
# Inductor recomputes a column's grid parameters (range fold, step rounded up, divisor) for every
# element of the column, which cost more than the rounding itself. Same operations as
# affine_encode, split in two, so the same codes.
def _two_way_stats(x2d: Tensor, spec_g: tuple, spec_h: tuple) -> tuple[tuple, tuple]:
    x2d = x2d.to(compute_dtype(x2d))
    return (
        affine_params(*group_minmax(x2d, spec_g[1]), spec_g[0]),
        affine_params(*group_minmax(x2d, spec_h[1]), spec_h[0]),
    )


def _two_way_round(
    x2d: Tensor, noise_g: Noise, noise_h: Noise, params: tuple, spec_g: tuple, spec_h: tuple
) -> tuple[Tensor, Tensor]:
    x2d = x2d.to(compute_dtype(x2d))
    return (
        affine_round(x2d, params[0], spec_g[0], spec_g[3], noise_g),
        affine_round(x2d, params[1], spec_h[0], spec_h[3], noise_h),
    )


fused_two_way = LazyCompiled(_two_way_kernel)
fused_two_way_stats = LazyCompiled(_two_way_stats)
fused_two_way_round = LazyCompiled(_two_way_round)


def encode_two_way(
    x: Tensor,
    row_quantizer: Quantizer,
    column_quantizer: Quantizer,
    generator: torch.Generator | None = None,
    compiled: bool = True,
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """``(row_quantizer.encode(x), column_quantizer.encode(x))``, the same codes, in one compiled
    graph when both are fused uniform quantizers (else one after the other). ``compiled=False``
    runs the same graph eagerly (for debugging; same codes)."""
    check_float(x, column_quantizer.name)
    # A row quantizer with its own two-way encode (BHQ: a row transform before the rounding).
    two_way = getattr(row_quantizer, "encode_two_way", None)
    if two_way is not None:
        pair = two_way(x, column_quantizer, generator, compiled)
        if pair is not None:
            return pair
    x2d = as_rows(x)
    spec_g, spec_h = uniform_spec(row_quantizer), uniform_spec(column_quantizer)
    if spec_g is None or spec_h is None:
        return row_quantizer.encode(x, generator), column_quantizer.encode(x, generator)
    noise_g = row_quantizer.noise(generator, x2d.device)
    noise_h = column_quantizer.noise(generator, x2d.device)
    if not (spec_g[2] or spec_h[2]):  # two asymmetric grids
        stats = fused_two_way_stats if compiled else fused_two_way_stats.fn
        rounding = fused_two_way_round if compiled else fused_two_way_round.fn
        params = stats(x2d, spec_g, spec_h)
        cg, ch = rounding(x2d, noise_g, noise_h, params, spec_g, spec_h)
        (sg, bg), (sh, bh) = params[0][3:], params[1][3:]
    else:
        kernel = fused_two_way if compiled else fused_two_way.fn
        cg, sg, bg, ch, sh, bh = kernel(x2d, noise_g, noise_h, spec_g, spec_h)
    return (
        QuantizedTensor(cg, sg, bg, row_quantizer.bits, x.shape, x.dtype),
        QuantizedTensor(ch, sh, bh, column_quantizer.bits, x.shape, x.dtype),
    )
