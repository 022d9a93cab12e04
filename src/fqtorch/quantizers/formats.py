"""Float and block-scaled formats: FP8 (E4M3, E5M2), MXFP8, MXFP4, NVFP4 (docs/method.md §12).

Every value a format quantizer returns is exactly a value of its *element* format times the scale
of its group: ``x ≈ e · S`` with ``e`` an E4M3, E5M2 or E2M1 number and ``S`` the group's scale.

==================  =========  ============================  ================  ==============
name                element    group (one scale each)        scale             bits/element
==================  =========  ============================  ================  ==============
fp8_e4m3, fp8_e5m2  E4M3/E5M2  the tensor                    2^k (float32)     8
fp8_*_per_row       E4M3/E5M2  a row of the reduction        2^k (float32)     8 (+32/row)
mxfp8               E4M3       32 elements along it          2^k (E8M0)        8.25
mxfp4               E2M1       32 elements along it          2^k (E8M0)        4.25
nvfp4               E2M1       16 elements along it          E4M3 × 2^t        4.5 (+32/tensor)
==================  =========  ============================  ================  ==============

``bits`` is fixed by the format: the constructor accepts any valid bit width (so
``FQTConfig(grad_quantizer="mxfp4")`` works with the default ``grad_bits``) and ignores it;
``q.bits`` is the element width and :attr:`FormatQuantizer.bits_per_element` adds the block scale's
share, for cost models.

**Blocks run along the GEMM's reduction dimension** (``block_dim``), the only direction along
which a scale factors out of the GEMM: ``block_dim=1`` (blocks within a row, along the columns:
``grad_output`` in ``grad_input = G @ W``, and the forward operands) or ``block_dim=0`` (blocks
within a column, along the rows: ``grad_output`` in ``grad_weight = Gᵀ @ X``). :class:`FQTConfig`
sets it from the tensor's role. A "per row" FP8 scale is one scale per line of the reduction
(per row for ``block_dim=1``, per column for ``block_dim=0``). A 4-D or 5-D convolution tensor
``(N, C, *S)`` with ``block_dim=1`` (its ``grad_output`` for ``grad_input``, whose reduction runs
over output channels and taps; its input and weight, reduced over input channels and taps) is
blocked along ``C`` at each ``(n, s)``: the view ``(N·S, C)``, not the row view ``(N, C·S)``, whose
blocks would cover positions of one channel (:func:`.transforms.is_channel_tensor`; 3-D tensors
keep the row view, as a batched-matmul operand ``(B, M, K)`` must).

**Scale rules.** With round-to-nearest the standard rule: for power-of-two scales the OCP MX rule
``k = floor(log2 amax) − emax`` (the block maximum lands in the element format's top binade and
may exceed its largest value: it saturates there, as hardware does); for NVFP4 the block scale
``amax / 6`` rounded to nearest E4M3. With stochastic rounding the *no-clip* rule: the smallest
scale at which the block maximum is representable (``k = ceil(log2(amax / max))``, the E4M3 block
scale rounded up), so no value is clipped and ``E[Q(x)] = x``. Its cost: a block whose maximum
would clip (MXFP4: maximum's mantissa above 1.5, E4M3 elements: above 1.75) gets twice the OCP
scale. The element grid's spacing is relative, so an entry that stays a normal element keeps
its absolute spacing ``S·h``; only entries the doubled scale leaves subnormal get twice the
spacing, at most 4× their rounding variance (the worst case). Measured MSE ratio no-clip /
standard under stochastic rounding on Gaussian data: mxfp4 1.08, nvfp4 1.18, mxfp8 0.90,
fp8_e4m3 1.00 (docs/method.md §12).

Power-of-two scales make scaling exact, so the decoded values are exactly ``e · S`` in float32.
The FP8 per-tensor and per-row scales are powers of two as well (a float grid is invariant under
them, so nothing is lost but the top binade of range). NVFP4's tensor scale is the power of two
that puts the largest block scale at most at E4M3's maximum 448; its division ``x / S`` is the one
inexact step (relative error ≤ 2⁻²⁴, far below any rounding noise).

**Storage.** FP8 codes are ``torch.float8_e4m3fn`` / ``float8_e5m2`` tensors in the 2-D view with
a float32 scale that broadcasts (a plain :class:`~.base.QuantizedTensor`). Block formats return a
:class:`BlockScaledTensor` whose codes are stored with the blocks along their last dim ("K-major":
``(rows, cols)`` for ``block_dim=1``, the transpose ``(cols, rows)`` for ``block_dim=0``), padded
with zeros to whole blocks; MX scales are ``torch.float8_e8m0fnu``, NVFP4 block scales
``torch.float8_e4m3fn`` and its tensor scale float32. E2M1 codes are packed two per byte (element
``2j`` in the low nibble, ``2j + 1`` in the high one; bit 3 of a nibble is the sign) and stored as
``torch.float4_e2m1fn_x2``: this torch build has the dtype but cannot convert to or from it, so
the packing and decoding are done here.

**Non-finite input**: a group (tensor, row, block) holding a NaN or ±Inf gets a NaN scale, so it
decodes to NaN, never to finite garbage (NVFP4's tensor scale is taken over the finite values, so
only the block turns NaN). Near the float32 maximum the element grid runs past it: a value above
the largest grid value below ``2^128`` (``1.5·2^127`` for E2M1, ``1.75·2^127`` for E5M2,
``1.875·2^127`` for E4M3) may round up to ``2^128`` and decode to ``inf``. **float16 input**
decodes to float16, where the same happens above 65504: the no-clip grid can round 60000 up to
65536 (MXFP4), which is ``inf`` (quantize in float32 or bfloat16 to avoid it). **float64 input**
whose group maximum lies outside ``[2^-149, max·2^127]`` (×448 for NVFP4) raises ``ValueError``:
no scale reaches it, so it would clip or vanish while ``unbiased`` claims otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import (
    _REGISTRY,
    QuantizedTensor,
    Quantizer,
    as_rows,
    check_bits,
    check_float,
    compute_dtype,
    register_quantizer,
)
from .fused import LazyCompiled
from .rounding import Noise, round_to_grid
from .transforms import ChannelLayout, channels_view, is_channel_tensor

__all__ = [
    "E2M1",
    "E4M3",
    "E5M2",
    "BlockScaledTensor",
    "ElementFormat",
    "FormatQuantizer",
    "is_format",
    "pack_fp4",
    "unpack_fp4",
]

SCALE_RULES = ("no_clip", "standard")


@dataclass(frozen=True)
class ElementFormat:
    """A small float format: ``mantissa`` bits, smallest normal ``2^emin``, top binade ``2^emax``,
    largest finite value ``max`` (E4M3 "fn" gives its top mantissa code to NaN: 448, not 480)."""

    name: str
    bits: int
    mantissa: int
    emin: int
    emax: int
    max: float
    dtype: torch.dtype | None  # torch storage dtype; None: packed nibbles (E2M1)


E4M3 = ElementFormat("e4m3", 8, 3, -6, 8, 448.0, torch.float8_e4m3fn)
E5M2 = ElementFormat("e5m2", 8, 2, -14, 15, 57344.0, torch.float8_e5m2)
E2M1 = ElementFormat("e2m1", 4, 1, 0, 2, 6.0, None)
_ELEMENTS = {f.name: f for f in (E4M3, E5M2, E2M1)}

# E2M1 values by nibble (bit 3: sign); the inverse map takes 2·|value| (an integer 0..12).
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_INDEX = {int(2 * v): i for i, v in enumerate(_FP4_VALUES)}
_E8M0_MIN, _E8M0_MAX = -127, 127  # the power-of-two scale's exponent range (E8M0, all formats)
_NV_TENSOR_MIN = -126  # NVFP4 tensor-scale exponent: a normal float32
_NV_BLOCK_MIN = 2.0**-9  # E4M3's smallest subnormal: a block scale is never 0


def spacing(v: Tensor, fmt: ElementFormat) -> Tensor:
    """The element grid's spacing at ``v`` (element units), ``2^(max(floor(log2|v|), emin) − m)``:
    the gap between the two grid values around ``v`` (exact: a power of two)."""
    exponent = torch.frexp(v).exponent - 1  # |v| = mant·2^(exp), mant in [1, 2); v = 0 gives -1
    return torch.exp2((exponent.clamp(min=fmt.emin) - fmt.mantissa).to(v.dtype))


def round_element(v: Tensor, fmt: ElementFormat, rounding: str, noise: Noise) -> Tensor:
    """``v`` rounded onto the element grid: to nearest (ties to even mantissa) or stochastically
    between its two neighbours, then saturated at ``±max``. Within a binade the grid is uniform
    with step :func:`spacing`, so rounding ``v / step`` to an integer is exact rounding onto the
    format, and the binade's top (the next power of two) is itself a grid value."""
    step = spacing(v, fmt)
    return (
        round_to_grid(v / step, rounding, -math.inf, math.inf, noise)
        .mul_(step)
        .clamp_(-fmt.max, fmt.max)
    )


def _e4m3_scale(r: Tensor, ceil: bool) -> Tensor:
    """A non-negative ``r`` as an E4M3 value: rounded up (no-clip rule) or to nearest, kept within
    ``[2^-9, 448]`` (a block scale must be a positive finite E4M3 number)."""
    step = spacing(r, E4M3)
    units = r / step
    units = units.ceil() if ceil else units.round()
    return (units * step).clamp(_NV_BLOCK_MIN, E4M3.max)


def _pow2_exponent(amax: Tensor, fmt: ElementFormat, no_clip: bool) -> Tensor:
    """The scale exponent ``k`` of groups with largest magnitude ``amax``: the OCP rule
    ``floor(log2 amax) − emax``, plus one where ``amax / 2^k`` would exceed ``max`` under the
    no-clip rule; ``-127`` for an all-zero group, within E8M0's ``[-127, 127]``."""
    mant, exp = torch.frexp(amax)  # amax = mant·2^exp, mant in [1/2, 1)
    k = exp - 1 - fmt.emax
    if no_clip:
        k = k + (mant * 2.0 ** (fmt.emax + 1) > fmt.max).to(k.dtype)
    k = torch.where(amax > 0, k, torch.full_like(k, _E8M0_MIN))
    return k.clamp(_E8M0_MIN, _E8M0_MAX).to(amax.dtype)


def _canonical(x2d: Tensor, kind: str, block: int, block_dim: int) -> tuple[Tensor, int]:
    """``x2d`` as ``(groups, blocks, block)`` with the blocks along the last dim, zero-padded to
    whole blocks, and the unpadded width of that last dim."""
    if kind == "tensor":
        return x2d.reshape(1, 1, -1), x2d.numel()
    y = x2d.T if block_dim == 0 else x2d
    width = y.shape[1]
    if kind == "row":
        return y.reshape(y.shape[0], 1, width), width
    pad = -width % block
    if pad:
        y = torch.cat([y, y.new_zeros(y.shape[0], pad)], dim=1)
    return y.reshape(y.shape[0], -1, block), width


def _scales(
    blocks: Tensor, element: str, scale: str, no_clip: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(effective scale per block ``S``, stored block scale with NaN for a non-finite group, tensor
    scale) of ``blocks`` ``(groups, blocks, block)``. They depend on the data only, never on the
    noise, so the variance bound recomputes them exactly."""
    fmt = _ELEMENTS[element]
    amax = blocks.abs().amax(-1)
    finite = torch.isfinite(amax)
    amax = torch.where(finite, amax, torch.zeros_like(amax))
    nan = torch.full_like(amax, math.nan)
    if scale == "pow2":
        effective = torch.exp2(_pow2_exponent(amax, fmt, no_clip))
        return effective, torch.where(finite, effective, nan), torch.ones((), dtype=amax.dtype)
    # NVFP4: tensor scale 2^t with the largest block scale amax_t / (6·2^t) at most 448.
    amax_t = amax.amax()
    # amax_t / 2688 underflows to 0 for amax_t below about 2^-139 (frexp(0) would give t = 0,
    # a tensor scale of 1): such a tensor is lifted by 2^64 first, exactly, and t lowered back.
    tiny = amax_t < 2.0**-100
    lifted = torch.where(tiny, amax_t * 2.0**64, amax_t)
    mant, exp = torch.frexp(lifted / (fmt.max * E4M3.max))
    t = torch.where(mant == 0.5, exp - 1, exp) - torch.where(tiny, 64, 0).to(exp.dtype)
    t = torch.where(amax_t > 0, t, torch.zeros_like(t)).clamp(_NV_TENSOR_MIN, _E8M0_MAX)
    tensor = torch.exp2(t.to(amax.dtype))
    # Divided by the power-of-two tensor scale first (exact): for a tensor of subnormals, whose
    # tensor scale is clamped at 2^-126, amax / 6 would round in the subnormal range, possibly
    # down onto an E4M3 multiple, and the ceiling would then give a scale that clips.
    block = _e4m3_scale(amax / tensor / fmt.max, ceil=no_clip)
    return block * tensor, torch.where(finite, block, nan), tensor


def _format_kernel(
    x2d: Tensor,
    noise: Noise,
    element: str,
    kind: str,
    block: int,
    block_dim: int,
    scale: str,
    rounding: str,
    no_clip: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(element values ``(groups, blocks, block)``, stored block scales, tensor scale)."""
    fmt = _ELEMENTS[element]
    blocks, _ = _canonical(x2d.to(compute_dtype(x2d)), kind, block, block_dim)
    effective, stored, tensor = _scales(blocks, element, scale, no_clip)
    finite = torch.isfinite(stored)[..., None]
    v = torch.where(finite, blocks / effective[..., None], torch.zeros_like(blocks))
    return round_element(v, fmt, rounding, noise), stored, tensor


fused_format = LazyCompiled(_format_kernel)


def pack_fp4(values: Tensor) -> Tensor:
    """E2M1 values (an even number along the last dim) as ``float4_e2m1fn_x2``, two per byte."""
    magnitude = (values.abs() * 2).to(torch.int64)
    lookup = torch.zeros(13, dtype=torch.uint8, device=values.device)
    for twice, index in _FP4_INDEX.items():
        lookup[twice] = index
    nibbles = lookup[magnitude] | (torch.signbit(values).to(torch.uint8) << 3)
    pairs = nibbles.reshape(*values.shape[:-1], -1, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return packed.view(torch.float4_e2m1fn_x2)


def unpack_fp4(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The E2M1 values of packed codes (inverse of :func:`pack_fp4`)."""
    packed = codes.view(torch.uint8)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    table = torch.tensor(_FP4_VALUES, dtype=dtype, device=codes.device)
    values = table[(nibbles & 0x7).long()]
    return torch.where((nibbles & 0x8).bool(), -values, values)


@dataclass(frozen=True)
class BlockScaledTensor(QuantizedTensor):
    """Block-scaled codes: value = ``element(codes) · scale · tensor_scale``, one ``scale`` per
    ``block`` consecutive codes along the codes' last dim (see the module docstring for layout).

    ``codes`` are ``(lines, padded)`` (packed: ``padded / 2`` bytes) with the blocks along the last
    dim; ``scale`` is ``(lines, padded / block)``; ``bias`` is an unused zero (the base fields);
    ``size2d`` is the unpadded 2-D view ``(rows, cols)`` that was encoded.
    """

    element: ElementFormat = E2M1
    block: int = 32
    block_dim: int = 1
    tensor_scale: Tensor | None = None
    size2d: tuple[int, int] = (0, 0)

    def element_values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The element values ``(lines, padded)``, exactly (no scale applied)."""
        if self.element.dtype is None:
            return unpack_fp4(self.codes, dtype)
        return self.codes.to(dtype)

    def scales_2d(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The effective scale of every element of the encoded 2-D view, ``(rows, cols)``."""
        scale = self.scale.to(dtype).repeat_interleave(self.block, dim=1)
        if self.tensor_scale is not None:
            scale = scale * self.tensor_scale.to(dtype)
        return self._crop(scale)

    def _crop(self, lines: Tensor) -> Tensor:
        rows, cols = self.size2d
        if self.block_dim == 0:
            return lines[:, :rows].T
        return lines[:, :cols]

    def dequantize(self, fused: bool = False) -> Tensor:
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        scale = self.scale.to(dtype).repeat_interleave(self.block, dim=1)
        values = self.element_values(dtype) * scale  # exact: few mantissa bits times 2^k or E4M3
        if self.tensor_scale is not None:
            values = values * self.tensor_scale.to(dtype)  # exact: a power of two
        values = self._crop(values)
        if self.transform is not None:
            values = self.transform.inverse(values)
        return values.reshape(self.shape).to(self.dtype)


class FormatQuantizer(Quantizer):
    """Rounding onto a float element format with one scale per group (module docstring).

    Args:
        bits: accepted for a uniform signature and ignored: the format fixes the width.
        rounding: ``"stochastic"`` (unbiased, no-clip scale rule) or ``"nearest"`` (RNE,
            standard scale rule, saturating).
        block_dim: the axis of the 2-D view the blocks (or per-row scales) run along: the GEMM's
            reduction dimension. Set by :class:`~fqtorch.config.FQTConfig` from the role.
        scale_rule: ``"no_clip"`` or ``"standard"``; default no-clip for stochastic rounding and
            standard for nearest (the other pairings exist for ablations: stochastic rounding with
            the standard rule is biased wherever it clips).
    """

    element: ElementFormat = E4M3
    kind = "tensor"  # "tensor", "row" or "block"
    block_size = 0  # elements per block for kind "block"
    scale = "pow2"  # "pow2" (E8M0 / float32 power of two) or "nv" (E4M3 × float32 2^t)
    scale_bits = 0  # bits of one block scale (for bits_per_element)

    def __init__(
        self,
        bits: int = 8,
        *,
        rounding: str = "stochastic",
        fused: bool = False,
        block_dim: int = 1,
        scale_rule: str | None = None,
    ) -> None:
        check_bits(bits)
        super().__init__(self.element.bits, rounding=rounding, fused=fused)
        if block_dim not in (0, 1):
            raise ValueError(
                f"block_dim must be 0 or 1 (an axis of the 2-D view), got {block_dim!r}"
            )
        self.block_dim = block_dim
        if scale_rule is None:
            scale_rule = "no_clip" if self.rounding == "stochastic" else "standard"
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
        self.scale_rule = scale_rule

    @property
    def unbiased(self) -> bool:
        return self.rounding == "stochastic" and self.scale_rule == "no_clip"

    @property
    def column_equivariant(self) -> bool:  # type: ignore[override]
        """Per-tensor and per-line scales follow a permutation; blocks of 16 or 32 consecutive
        elements do not."""
        return self.kind != "block"

    @property
    def bits_per_element(self) -> float:
        """Element bits plus the block scale's share (per-tensor and per-row scales amortize to 0
        over a tensor or a long row and are not counted)."""
        share = self.scale_bits / self.block_size if self.kind == "block" else 0.0
        return self.element.bits + share

    def _view(self, x: Tensor) -> Tensor:
        """The 2-D view whose lines the groups run along: for block formats, a convolution tensor
        ``(N, C, *S)`` with its reduction along the channels is viewed as ``(N·S, C)`` (blocks of
        channels at one sample and position); otherwise the row view ``(N, −1)``. Per-tensor and
        per-row scales keep the row view: a scale per sample already factors out."""
        if self.kind == "block" and is_channel_tensor(x, self.block_dim):
            return channels_view(x)
        return as_rows(x)

    def _check_range(self, x2d: Tensor) -> None:
        """float64 input can hold group maxima no scale reaches: above ``max·2^127`` they would
        clip, below float32's smallest subnormal ``2^-149`` they would round to zero with a
        probability float32 noise cannot resolve. Refuse them rather than lose unbiasedness."""
        blocks, _ = _canonical(x2d, self.kind, self.block_size, self.block_dim)
        amax = blocks.abs().amax(-1)
        amax = amax[torch.isfinite(amax) & (amax > 0)]
        high = self.element.max * 2.0**_E8M0_MAX * (E4M3.max if self.scale == "nv" else 1.0)
        low = 2.0**-149
        if amax.numel() and bool(((amax > high) | (amax < low)).any()):
            raise ValueError(
                f"{self.name}: a group's largest magnitude lies outside [2^-149, {high:.4g}], the "
                "range its scales represent (float64 input: rescale it first)"
            )

    def _kernel_args(self, block_dim: int | None = None) -> tuple[object, ...]:
        """The kernel's arguments after the input and the noise (``block_dim``: another
        orientation than the quantizer's)."""
        return (
            self.element.name,
            self.kind,
            self.block_size,
            self.block_dim if block_dim is None else block_dim,
            self.scale,
            self.rounding,
            self.scale_rule == "no_clip",
        )

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d = self._view(x)
        if x.dtype == torch.float64:
            self._check_range(x2d)
        noise = self.noise(generator, x2d.device)
        lines, args = x2d, self._kernel_args()
        if self.block_dim == 0 and self.kind != "tensor":
            # The groups run down the columns: hand the kernel their lines row-major (one
            # transposing copy), the canonical layout it would build, so the same values. On a
            # strided view the compiled kernel read across rows for every group, 4× slower.
            # (Per-line FP8 codes then come back as a transposed view, column-major: the same
            # values; the fp8 backend takes either layout.)
            lines, args = x2d.T.contiguous(), self._kernel_args(block_dim=1)
        values, stored, tensor = self.kernel(fused_format)(lines, noise, *args)
        rows, cols = x2d.shape
        if self.kind != "block":
            transposed = self.kind == "row" and self.block_dim == 0
            codes = values.reshape(cols, rows).T if transposed else values.reshape(rows, cols)
            codes = codes.to(self.element.dtype)
            if self.kind == "tensor":
                scale = stored.reshape(1, 1)
            else:
                scale = stored.reshape(1, cols) if self.block_dim == 0 else stored.reshape(rows, 1)
            # float64 input keeps a float64 scale: float32 would decode codes·scale past
            # 3.4e38 (float64 maxima up to max·2^127 are accepted) to inf
            scale = scale.double() if x.dtype == torch.float64 else scale.float()
            return QuantizedTensor(
                codes, scale, torch.zeros_like(scale), self.bits, x.shape, x.dtype
            )
        lines = values.reshape(values.shape[0], -1)
        codes = pack_fp4(lines) if self.element.dtype is None else lines.to(self.element.dtype)
        if self.scale == "pow2":
            stored, tensor_scale = stored.to(torch.float8_e8m0fnu), None
        else:
            stored, tensor_scale = stored.to(torch.float8_e4m3fn), tensor.float()
        zero = torch.zeros((1, 1), device=x.device)
        return BlockScaledTensor(
            codes,
            stored,
            zero,
            self.bits,
            x.shape,
            x.dtype,
            element=self.element,
            block=self.block_size,
            block_dim=self.block_dim,
            tensor_scale=tensor_scale,
            size2d=(rows, cols),
            transform=ChannelLayout(x.shape) if is_channel_tensor(x, self.block_dim) else None,
        )

    def _scaled(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(``v = x / S`` and ``S`` per element, canonical layout) of ``x``'s 2-D view, float64."""
        x2d = self._view(x).to(torch.float64)
        blocks, _ = _canonical(x2d, self.kind, self.block_size, self.block_dim)
        effective = _scales(blocks, self.element.name, self.scale, self.scale_rule == "no_clip")[0]
        effective = effective[..., None].expand_as(blocks)
        return blocks / effective, effective

    def variance_bound(self, x: Tensor) -> Tensor:
        """``Σ_i (S_i·h(v_i))²/4`` for stochastic rounding, ``v_i = x_i / S_i``, ``h`` the element
        grid's spacing at ``v_i`` (stochastic rounding between neighbours ``h`` apart has variance
        ``f(1 − f)h² ≤ h²/4``; the no-clip rule keeps every ``|v_i| ≤ max``). Round-to-nearest errs
        by at most ``S·h/2`` in range. Under the standard scale rule an entry with ``|v| > max``
        saturates with either rounding: a fixed error ``S·(|v| − max)``. ``inf`` for non-finite
        input."""
        check_float(x, self.name)
        if not torch.isfinite(x).all():
            return torch.tensor(math.inf, dtype=torch.float64, device=x.device)
        v, effective = self._scaled(x)
        gap = effective * spacing(v, self.element)
        per = gap.square() / 4
        if self.scale_rule == "standard":
            # The standard rule lets a block's maximum land above ``max``: there both roundings
            # saturate (every grid neighbour above ``max`` clamps to it), a fixed error.
            clipped = (v.abs() - self.element.max).clamp(min=0) * effective
            per = torch.where(clipped > 0, clipped.square(), per)
        return per.sum()

    def mixed_bound(self, magnitudes: Tensor) -> Tensor:
        """A bound on ``E‖Q(y) − y‖²`` for every ``y`` with ``|y| ≤ magnitudes`` elementwise (what
        a random Hadamard transform guarantees, :mod:`.transforms`): the scales are nondecreasing
        in the group maxima, and the grid spacing at ``|y|`` is at most
        ``max(2^-m|y|, S·2^(emin−m))``, nondecreasing in both, so
        ``Σ c·max(4^-m y², S²4^(emin−m))`` bounds it, ``c = 1/4`` for stochastic rounding,
        ``c = 4`` for nearest (an error of at most half a spacing in range, at most two spacings
        of the top binade where it saturates)."""
        m, fmt = magnitudes.abs(), self.element
        _, effective = self._scaled(m)
        view = self._view(m).to(torch.float64)
        y, _ = _canonical(view, self.kind, self.block_size, self.block_dim)
        floor = (effective * 2.0 ** (fmt.emin - fmt.mantissa)).square()
        c = 0.25 if self.rounding == "stochastic" else 4.0
        return (c * torch.maximum(y.square() * 4.0**-fmt.mantissa, floor)).sum()

    def __repr__(self) -> str:
        fused = ", fused" if self.fused else ""
        rule = "" if self.unbiased or self.rounding == "nearest" else f", {self.scale_rule}"
        return f"{self.name}({self.rounding}, block_dim={self.block_dim}{rule}{fused})"


def is_format(name: str) -> bool:
    """Whether the quantizer registered as ``name`` is a float format (takes ``block_dim``)."""
    cls = _REGISTRY.get(name)
    return cls is not None and issubclass(cls, FormatQuantizer)


@register_quantizer("fp8_e4m3")
class FP8E4M3(FormatQuantizer):
    """FP8 E4M3 with one power-of-two scale per tensor."""

    element = E4M3


@register_quantizer("fp8_e5m2")
class FP8E5M2(FormatQuantizer):
    """FP8 E5M2 (more range, one mantissa bit less) with one power-of-two scale per tensor."""

    element = E5M2


@register_quantizer("fp8_e4m3_per_row")
class FP8E4M3PerRow(FormatQuantizer):
    """FP8 E4M3 with one power-of-two scale per line of the reduction dimension."""

    element = E4M3
    kind = "row"


@register_quantizer("fp8_e5m2_per_row")
class FP8E5M2PerRow(FormatQuantizer):
    """FP8 E5M2 with one power-of-two scale per line of the reduction dimension."""

    element = E5M2
    kind = "row"


@register_quantizer("mxfp8")
class MXFP8(FormatQuantizer):
    """OCP MXFP8: E4M3 elements, blocks of 32, E8M0 (power-of-two) scales."""

    element = E4M3
    kind = "block"
    block_size = 32
    scale_bits = 8


@register_quantizer("mxfp4")
class MXFP4(FormatQuantizer):
    """OCP MXFP4: E2M1 elements, blocks of 32, E8M0 (power-of-two) scales."""

    element = E2M1
    kind = "block"
    block_size = 32
    scale_bits = 8


@register_quantizer("nvfp4")
class NVFP4(FormatQuantizer):
    """NVFP4: E2M1 elements, blocks of 16, E4M3 block scales and a float32 tensor scale."""

    element = E2M1
    kind = "block"
    block_size = 16
    scale = "nv"
    scale_bits = 8
