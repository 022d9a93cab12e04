"""The ``int8`` backend for ``Conv2d`` (groups = 1): the three GEMMs as ``torch._int_mm`` on im2col
views of the int8 codes. :func:`conv` first offers the layer to :mod:`fqtorch.backends.int8_qconv`
(integer convolution kernels, 7–9× faster here); this path runs where those kernels are not exact on
the machine (it warns), and for the weight gradient of layers whose taps do not pay
(``int8_qconv.weight_by_taps``: strided kernels larger than 1 × 1 or on more than 64 channels,
stride-1 ones with large kernels on few channels).

    output      : cols(C_x) (N·L, C·k·k) × C_wᵀ (C·k·k, O)         L output positions
    grad_input  : rows(C_g) (N·L, O) × C_w (O, C·k·k), then col2im (``F.fold``)
    grad_weight : C_hᵀ (O, N·L) × cols(C_x) (N·L, C·k·k)

The scale algebra is the Linear one (:mod:`fqtorch.backends.int8`, chunked reductions and float64
epilogues included), per row of ``cols``, with one change for zero padding: a padded tap holds real
zero, which need not be a point of the input's affine grid ``s_x·C + b_x``. Padded taps hold code 0
and a tap mask ``M`` (L, C·k·k) — 1 on real taps, the same for every sample — carries the zero point
exactly. ``M`` is also the same in every channel: it is built from one channel, ``m`` (L, k·k), and
every term below that holds it is a sum over taps of ``m`` spread over the channels. The weight's
zero point ``b_w`` multiplies the sum of the real input values of each receptive field, ``s_x
rowsum(cols(C_x)) + b_x rowsum(M)``:

    output[n·L + l, o] = s_x s_w (cols(C_x) C_wᵀ)[n·L + l, o] + b_x s_w (M C_wᵀ)[l, o]
                         + b_w (s_x rowsum(cols(C_x))[n·L + l] + b_x rowsum(M)[l])

In ``grad_input`` it adds ``b_w Σ_o g_q[n·L + l, o] = b_w (s_g rowsum(C_g) + O b_g)`` to every tap
of position ``l`` before col2im (the transposed convolution of ``grad_output`` with the constant
kernel ``b_w``); what col2im puts on padding is cropped. In ``grad_weight`` the two terms with
``b_x`` (Linear: ``s_o b_x colsum(C_h)[o]`` and ``M b_o b_x``) become ``s_o b_x (S_hᵀ M)[o, t]`` and
``N b_o b_x colsum(M)[t]``, with ``S_h`` (L, O) the per-position sums of the codes of
``grad_output`` over the batch. The mask corrections are GEMMs 1/(N·C) the size of the main ones
(``M C_wᵀ = m (Σ_c C_w)ᵀ``, ``S_hᵀ M`` is ``S_hᵀ m`` on every channel). On CUDA this is the layer's
path (no integer convolution kernels are used there yet), for shapes its ``torch._int_mm`` runs.
Grouped and 1-d convolutions run the simulate path (:func:`conv` raises
:class:`~fqtorch.backends.base.Unsupported`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quantizers.base import QuantizedTensor, Quantizer
from ..quantizers.uniform import Identity
from .base import (
    ConvOps,
    PlanSource,
    Unsupported,
    channels_last,
    check_finite,
    hwc_rows,
    refuse_second_derivative,
)
from .int8 import (
    _affine,
    _code_sum,
    _epilogue_dtype,
    _grad_bias,
    _grad_weight,
    _int_mm,
    _per_column,
    _per_row,
    _per_tensor,
    int_mm_verdict,
    refuse_float64,
    say_speed,
)
from .notes import say_once

__all__ = ["conv"]


def _pads(ops: ConvOps) -> list[int]:
    """F.pad amounts (left, right, top, bottom) for the integer padding plus ``ops.pad``."""
    (ph, pw) = ops.padding
    extra = list(ops.pad) if ops.pad is not None else [0, 0, 0, 0]
    return [pw + extra[0], pw + extra[1], ph + extra[2], ph + extra[3]]


def _out_length(padded: int, k: int, s: int, d: int) -> int:
    """Outputs along one axis of ``padded`` positions (padding included), kernel ``k``, stride
    ``s``, dilation ``d``."""
    return (padded - d * (k - 1) - 1) // s + 1


def _out_size(shape: tuple, pads: list[int], kernel: tuple, ops: ConvOps) -> tuple[int, int]:
    """(Ho, Wo) of a convolution over an (H, W) plane ``shape`` with the F.pad amounts ``pads``
    (:func:`_pads`), ``kernel`` (kh, kw), stride and dilation."""
    (h, w), (kh, kw), (sh, sw), (dh, dw) = shape, kernel, ops.stride, ops.dilation
    hp, wp = h + pads[2] + pads[3], w + pads[0] + pads[1]
    return _out_length(hp, kh, sh, dh), _out_length(wp, kw, sw, dw)


def _unfold(x: Tensor, pads: list[int], kernel: tuple, ops: ConvOps) -> Tensor:
    """im2col (N, C, H, W) -> (N, L, C·kh·kw), zero-padded."""
    padded = F.pad(x, pads) if any(pads) else x
    return F.unfold(padded, kernel, dilation=ops.dilation, stride=ops.stride).transpose(1, 2)


def _cols(codes: Tensor, pads: list[int], kernel: tuple, ops: ConvOps) -> Tensor:
    """im2col of int8 codes -> (N·L, C·kh·kw) int8; padded taps hold code 0. Read only: where
    the windows are the codes themselves (a 1×1 kernel at stride 1 without padding) it is a
    view of ``codes``, not always row-major (``_int_mm`` copies what it needs); else a fresh
    row-major copy.

    The windows are a strided view of the (padded) codes, ``(N, Ho, Wo, C, kh, kw)``, copied
    once into the GEMM's layout: one byte per element read and written, where ``F.unfold``
    (floating point only) took a float32 copy, the unfold, its transpose and a cast back."""
    padded = F.pad(codes, pads) if any(pads) else codes
    n, c = padded.shape[:2]
    (kh, kw), (dh, dw), (sh, sw) = kernel, ops.dilation, ops.stride
    ho, wo = _out_size(codes.shape[2:], pads, kernel, ops)
    s_n, s_c, s_h, s_w = padded.stride()
    windows = padded.as_strided(
        (n, ho, wo, c, kh, kw), (s_n, sh * s_h, sw * s_w, s_c, dh * s_h, dw * s_w)
    )
    return windows.reshape(n * ho * wo, c * kh * kw)


def _cols_taps_first(codes: Tensor, pads: list[int], kernel: tuple, ops: ConvOps) -> Tensor:
    """:func:`_cols` with the columns in (kh, kw, C) order, taps outermost: the windows are read
    from a channels-last copy of the padded codes, a window row's kw·C bytes at a time, where
    the (C, kh, kw) order reads kw bytes at a time across C planes (``benchmarks/im2col.py``:
    1.8–8× faster for ResNet-18's and PreAct ResNet-20's strided 3×3 and 7×7 kernels)."""
    padded = F.pad(codes.contiguous(memory_format=torch.channels_last), pads)
    n, c = padded.shape[:2]
    (kh, kw), (dh, dw), (sh, sw) = kernel, ops.dilation, ops.stride
    ho, wo = _out_size(codes.shape[2:], pads, kernel, ops)
    s_n, s_c, s_h, s_w = padded.stride()
    windows = padded.as_strided(
        (n, ho, wo, kh, kw, c), (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, s_c)
    )
    return windows.reshape(n * ho * wo, kh * kw * c)


def taps_first_pays(kernel: tuple) -> bool:
    """Whether :func:`_cols_taps_first` beats :func:`_cols`: for every kernel larger than 1×1
    (``benchmarks/im2col.py``, from ResNet-18's 3-channel stem up); a 1×1 window is a single
    byte either way, and there the channels-last copy is pure cost."""
    return kernel[0] * kernel[1] > 1


def _axis_mask(size: int, before: int, k: int, s: int, d: int, out: int, device: torch.device
               ) -> Tensor:  # fmt: skip
    """(out, k) float32 along one axis of ``size`` input positions with ``before`` padded ahead:
    1 where tap ``i`` of output position ``y`` reads the input, 0 where it reads padding."""
    taps = torch.arange(out, device=device)[:, None] * s + torch.arange(k, device=device) * d
    taps -= before
    return ((taps >= 0) & (taps < size)).to(torch.float32)


def _axis_masks(
    size: tuple, pads: list[int], kernel: tuple, ops: ConvOps, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The tap mask of an (H, W) plane ``size`` as its two factors, (Ho, kh) along the height and
    (Wo, kw) along the width: a tap reads the input where it does along both axes."""
    (ho, wo), (kh, kw) = _out_size(size, pads, kernel, ops), kernel
    (sh, sw), (dh, dw) = ops.stride, ops.dilation
    return (
        _axis_mask(size[0], pads[2], kh, sh, dh, ho, device),
        _axis_mask(size[1], pads[0], kw, sw, dw, wo, device),
    )


def _tap_mask(
    size: tuple, pads: list[int], kernel: tuple, ops: ConvOps, device: torch.device
) -> Tensor | None:
    """(L, kh·kw) float32 for an (H, W) plane ``size``: 1 where a tap reads the input, 0 where it
    reads padding; ``None`` without padding (all ones). One channel's: the mask is the same in
    every channel and sample, and the terms it enters are sums over taps, which
    :func:`_add_per_tap` spreads over the channels (1/C of the work and memory of the full
    (L, C·kh·kw) mask)."""
    if not any(pads):
        return None
    rows, cols = _axis_masks(size, pads, kernel, ops, device)
    return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(
        rows.shape[0] * cols.shape[0], -1
    )


def _add_per_tap(out: Tensor, per_tap: Tensor, taps_first: bool = False) -> Tensor:
    """``out`` (..., C·kh·kw) += ``per_tap`` (..., kh·kw) on every channel, in place, the columns
    in (C, kh, kw) order or, with ``taps_first``, (kh, kw, C) (:func:`_cols_taps_first`);
    ``per_tap``'s leading axes broadcast against ``out``'s."""
    taps = per_tap.shape[-1]
    if taps_first:
        out.view(*out.shape[:-1], taps, -1).add_(per_tap.unsqueeze(-1))
    else:
        out.view(*out.shape[:-1], -1, taps).add_(per_tap.unsqueeze(-2))
    return out


def _border_rows(size: int, before: int, k: int, s: int, d: int, out: int) -> tuple[int, int]:
    """The output positions along one axis (``size`` inputs, ``before`` padded ahead, ``out``
    outputs) with a tap in the padding, as two runs ``[0, top)`` and ``[start, out)``: from the
    geometry alone, so nothing waits on the device. A position's first tap reads the padding
    ahead of the input where ``y·s < before``, its last the padding after it where
    ``y·s + (k − 1)·d ≥ size + before``."""
    top = min(out, max(0, -(-before // s)))
    start = min(out, max(top, -(-(size + before - (k - 1) * d) // s)))
    return top, start


def _sums_on_real_taps(
    codes: Tensor, bits: int, size: tuple, pads: list[int], kernel: tuple, ops: ConvOps
) -> tuple[Tensor, Tensor, Tensor]:
    """``S_hᵀ M`` (O, kh·kw) and ``colsum(M)`` (kh·kw) in float64, exact, and the codes' column
    sums (O,) in int64, for the gradient codes ``codes`` (N·Ho·Wo, O) of a layer over (H, W)
    planes ``size``. For
    each tap, the sum of the codes over the positions (all samples) where that tap reads the input,
    and the number of those positions in one sample. The mask ``M`` is the product of its two
    factors (:func:`_axis_masks`): a tap reads the input on a rectangle of positions, every row's
    columns where its width factor is 1, less the rows where its height factor is 0, which are only
    the rows near the padding, ``B`` (:func:`_border_rows`):

        S_hᵀ M [o, (i, j)] = Σ_x c[x, j] Σ_(n,y) C_h[n, y, x, o]
                             − Σ_(y∈B) (1 − r[y, i]) Σ_x c[x, j] Σ_n C_h[n, y, x, o]

    with ``r`` (Ho, kh) and ``c`` (Wo, kw) the factors. One pass over the codes (their sums
    down the columns, as the GEMMs' code sums) and the codes of the border rows: no
    (L, C·kh·kw) mask, no product over every position."""
    f64 = torch.float64
    height, width = (m.to(f64) for m in _axis_masks(size, pads, kernel, ops, codes.device))
    ho, wo, kh = height.shape[0], width.shape[0], kernel[0]
    planes = codes.reshape(-1, ho, wo, codes.shape[1])  # (N, Ho, Wo, O): a view
    columns = _code_sum(planes.reshape(-1, wo, codes.shape[1]), 0, bits)  # (Wo, O)
    sums = (width.T @ columns.to(f64)).T[:, None, :].repeat(1, kh, 1)  # (O, kh, kw)
    top, start = _border_rows(size[0], pads[2], kh, ops.stride[0], ops.dilation[0], ho)
    if top or start < ho:
        border = torch.cat([planes[:, :top], planes[:, start:]], 1)  # (N, |B|, Wo, O)
        rows = border.sum(0, dtype=torch.int64).to(f64)  # (|B|, Wo, O)
        along_width = torch.tensordot(rows, width, dims=([1], [0]))  # (|B|, O, kw)
        lost = 1 - torch.cat([height[:top], height[start:]])  # (|B|, kh): taps on padding
        sums -= torch.tensordot(lost, along_width, dims=([0], [0])).transpose(0, 1)
    real_taps = height.sum(0)[:, None] * width.sum(0)  # colsum(M): (kh, kw)
    return sums.reshape(sums.shape[0], -1), real_taps.reshape(-1), columns.sum(0, dtype=torch.int64)


def _conv_grad_weight(
    h: QuantizedTensor, x: QuantizedTensor, size: tuple, pads: list[int], kernel: tuple,
    ops: ConvOps, taps_first: bool = False,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``grad_weight`` (O, C·kh·kw) of a layer over (H, W) planes ``size``, with the padding
    correction (module docstring, :func:`_sums_on_real_taps`), and the column sums of ``h``'s
    codes (as :func:`~fqtorch.backends.int8._grad_weight`). The columns of ``x`` are in
    (C, kh, kw) order, or (kh, kw, C) with ``taps_first``."""
    if not any(pads):
        return _grad_weight(h, x)
    f64, rows = torch.float64, h.codes.shape[0]
    prod, h_cols, x_cols = _int_mm(h.codes.T, h.bits, x.codes, x.bits)  # (O, N·L) × (N·L, Ck²)
    (s_h, b_h), (s_x, b_x) = _affine(h, f64), _affine(x, f64)
    s_o, b_o = s_h.reshape(-1, 1), b_h.reshape(-1, 1)  # (O, 1) or (1, 1)
    sums, real_taps, _ = _sums_on_real_taps(h.codes, h.bits, size, pads, kernel, ops)
    batch = rows // math.prod(_out_size(size, pads, kernel, ops))
    out = prod.to(f64).mul_(s_o * s_x)
    # s_o b_x (S_hᵀ M) + N b_o b_x colsum(M), per tap: the same for every channel
    _add_per_tap(out, s_o * b_x * sums + batch * b_o * b_x * real_taps, taps_first)
    out.addcmul_(b_o * s_x, x_cols.to(f64)[None, :])
    return out, h_cols


class _Int8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: Tensor, x: QuantizedTensor, w: QuantizedTensor,
                bias: Tensor | None, ops: ConvOps, weight: Tensor, source: Any,
                name: str) -> Tensor:  # fmt: skip
        n, c, h, wd = input.shape
        o, _, kh, kw = weight.shape
        pads = _pads(ops)
        codes = x.codes.reshape(n, c, h, wd)
        cols = _cols(codes, pads, (kh, kw), ops)  # (N·L, C·kh·kw)
        w2d = w.codes.reshape(o, -1)  # (O, C·kh·kw)
        prod, x_rows, w_rows = _int_mm(cols, x.bits, w2d.T, w.bits)  # (N·L, Ck²) × (Ck², O)
        dtype = _epilogue_dtype(prod, cols.shape[1])
        (s_x, b_x), (s_w, b_w) = _affine(x, dtype), _affine(w, dtype)
        acc = prod.to(dtype).mul_(s_x * s_w)
        # b_w times each receptive field's real input values: s_x Σ codes (here) + b_x Σ real taps
        acc.add_(s_x * b_w * x_rows.to(dtype)[:, None])
        mask = _tap_mask((h, wd), pads, (kh, kw), ops, input.device)
        if mask is None:
            taps = w_rows.to(dtype)[None, :]  # (1, O)
            count = cols.shape[1]
        else:
            mask = mask.to(dtype)  # (L, kh·kw)
            tap_sums = w2d.to(dtype).reshape(o, c, -1).sum(1)  # (O, kh·kw): over channels
            # (L, O): the weight codes on real taps, sums of integers exact in the epilogue's
            # dtype; autocast would run this GEMM in bf16/fp16 and round them.
            with torch.autocast(input.device.type, enabled=False):
                taps = mask @ tap_sums.T
            count = c * mask.sum(1, keepdim=True)  # (L, 1): the number of real taps
        acc.view(n, -1, o).add_(b_x * s_w * taps + b_x * b_w * count)
        ho, wo = _out_size((h, wd), pads, (kh, kw), ops)
        out = acc.reshape(n, ho, wo, o).permute(0, 3, 1, 2)
        if bias is not None:
            out = out + bias.to(out.dtype)[None, :, None, None]
        ctx.save_for_backward(codes, x.scale, x.bias, w2d, w.scale, w.bias)
        ctx.meta = (input.shape, input.dtype, weight.shape, pads, (ho, wo), bias is not None)
        ctx.bits = (x.bits, w.bits)
        ctx.ops, ctx.source, ctx.name = ops, source, name
        # Channels-last, as computed (and as the integer convolutions return it): the
        # gradient that comes back is then read as (H, W, C) without a copy (hwc_rows).
        return out.contiguous(memory_format=torch.channels_last).to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        codes, xs, xb, w2d, ws, wb = ctx.saved_tensors
        in_shape, in_dtype, w_shape, pads, (ho, wo), has_bias = ctx.meta
        x_bits, w_bits = ctx.bits
        ops: ConvOps = ctx.ops
        plan = ctx.source.plan
        refuse_second_derivative(False, ctx.name)  # codes saved
        generator = ctx.source.generator(grad_output.device)
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        grad = grad_output.float()
        ctx.source.on_grad_output(grad)
        _, _, h, wd = in_shape
        o, _, kh, kw = w_shape
        need_input, need_weight, need_bias = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[5],
            (ctx.needs_input_grad[3]),
        )
        grad_input = grad_weight = grad_bias = None
        if need_input:
            if isinstance(plan.grad_output, Identity):
                x_like = torch.empty(in_shape, dtype=torch.float32, device=grad.device)
                w_values = (w2d.to(torch.float32) * ws + wb).reshape(w_shape)
                grad_input = ops.grad_input(grad, ops.prepare(x_like), w_values)
            else:
                g, nhwc = encode_samples(plan.grad_output, grad, generator)
                _per_row(g)  # rows = samples (N', O·ho·wo)
                rows = g.codes.shape[0]
                if nhwc:  # (N', ho·wo·O): the rows of the GEMM as they are
                    g_cols = g.codes.reshape(-1, o)
                else:
                    g_cols = g.codes.reshape(rows, o, ho * wo).transpose(1, 2).reshape(-1, o)
                prod, g_rows, w_cols = _int_mm(g_cols, g.bits, w2d, w_bits)  # (N'·L, O) × (O, Ck²)
                dtype = _epilogue_dtype(prod, o)
                s_g, b_g = (
                    t.to(dtype).expand(rows, 1).reshape(rows, 1, 1) for t in (g.scale, g.bias)
                )
                s_w, b_w = ws.to(dtype), wb.to(dtype)
                acc = prod.to(dtype).reshape(rows, ho * wo, -1).mul_(s_g * s_w)  # (N', L, Ck²)
                # b_w Σ_o g_q on every tap of each position: Σ_o g_q = s_g Σ_o C_g + O b_g
                acc.add_(b_w * (s_g * g_rows.to(dtype).reshape(rows, -1, 1) + o * b_g))
                acc.addcmul_(b_g * s_w, w_cols.to(dtype))
                hp, wp = h + pads[2] + pads[3], wd + pads[0] + pads[1]
                folded = F.fold(acc.to(g.scale.dtype).transpose(1, 2), (hp, wp), (kh, kw),
                                dilation=ops.dilation, stride=ops.stride)  # fmt: skip
                folded = folded[:, :, pads[2] : pads[2] + h, pads[0] : pads[0] + wd]
                flat = folded.reshape(rows, -1)
                grad_input = flat if g.transform is None else g.transform.inverse(flat)
                grad_input = grad_input.reshape(in_shape)
            grad_input = grad_input.to(in_dtype)
        if need_weight or need_bias:
            x_cols = _cols(codes, pads, (kh, kw), ops)
            x_q = QuantizedTensor(x_cols, xs, xb, x_bits, x_cols.shape, torch.float32)
            columns = ops.columns(grad)  # (N·L, O)
            batch = in_shape[0]
            if isinstance(plan.grad_output_weight, Identity):
                x_vals = x_cols.to(torch.float32) * xs
                x_vals = x_vals.view(batch, -1, x_vals.shape[1])
                mask = _tap_mask((h, wd), pads, (kh, kw), ops, grad.device)
                if mask is None:
                    x_vals.add_(xb)
                else:
                    _add_per_tap(x_vals, xb * mask)
                x_vals = x_vals.reshape(-1, x_vals.shape[2])
                grad_weight = (columns.T @ x_vals).reshape(w_shape) if need_weight else None
                grad_bias = columns.sum(0)
            else:
                hq = plan.grad_output_weight.encode(columns, generator)
                _per_column(hq)
                h_cols = None
                w_dtype = torch.promote_types(ws.dtype, wb.dtype)  # the weight values' dtype
                if need_weight:
                    grad_weight, h_cols = _conv_grad_weight(hq, x_q, (h, wd), pads, (kh, kw), ops)
                    grad_weight = grad_weight.to(w_dtype).reshape(w_shape)
                grad_bias = _grad_bias(hq, h_cols).to(w_dtype) if need_bias else None
        if not (need_bias and has_bias):
            grad_bias = None
        return grad_input, None, None, grad_bias, None, grad_weight, None, None


def encode_samples(
    quantizer: Quantizer, grad: Tensor, generator: torch.Generator | None
) -> tuple[QuantizedTensor, bool]:
    """``grad_output``'s per-sample codes, and whether their rows hold each sample in (H, W, C)
    order (:func:`~.base.hwc_rows`, as the simulate backend reads it) rather than (C, H, W)."""
    nhwc = hwc_rows(quantizer, grad)
    if nhwc is None:
        return quantizer.encode(grad, generator), False
    return quantizer.encode(nhwc, generator), True


def _encode_input(quantizer: Quantizer, input: Tensor) -> QuantizedTensor:
    """The input's codes. A channels-last input under a round-to-nearest quantizer is encoded in
    its own memory order, ``(N, H·W·C)`` rows (a view, where ``as_rows`` would copy it to NCHW
    order), and its codes come back as the channels-last ``(N, C, H, W)`` tensor that the
    integer convolution takes without another copy. The codes are the same element for
    element: rounding to nearest depends on the element and the tensor's statistics alone (the
    int8 backend's input quantizer is per tensor; :func:`_per_tensor` checks it). The conv
    backend reads these codes as ``codes.reshape(input.shape)`` only."""
    if not channels_last(input) or getattr(quantizer, "rounding", None) != "nearest":
        return quantizer.encode(input)
    nhwc = input.permute(0, 2, 3, 1)  # contiguous
    x = quantizer.encode(nhwc)
    if x.scale.numel() != 1:  # not per tensor: the caller refuses it with its own message
        return x
    codes = x.codes.reshape(nhwc.shape).permute(0, 3, 1, 2)
    return dataclasses.replace(x, codes=codes, shape=input.shape)


def _cuda_shapes(input: Tensor, weight: Tensor, ops: ConvOps) -> str | None:
    """``None`` where CUDA's ``torch._int_mm`` runs all three of the layer's GEMMs, else why not.
    Its kernels need m > 16 and k, n multiples of 8; :func:`~fqtorch.backends.int8._int_mm` pads
    the reduction, so the output channels O and the unfolded width C·kh·kw (the GEMMs' n, which
    are bordered by 8 or 16 columns of ones to a multiple of 16) must be multiples of 8, N·L
    (the forward's and ``grad_input``'s m) above 16, and O at least 16 (``grad_weight``'s m is
    O plus a bordering row of ones)."""
    n, c = input.shape[:2]
    o, _, kh, kw = weight.shape
    ho, wo = _out_size(input.shape[2:], _pads(ops), (kh, kw), ops)
    positions = ho * wo
    width = c * kh * kw
    if n * positions > 16 and o >= 16 and o % 8 == 0 and width % 8 == 0:
        return None
    return (
        f"torch._int_mm on CUDA needs O and C·kh·kw multiples of 8, O ≥ 16 and N·L > 16; this "
        f"convolution has O = {o}, C·kh·kw = {width}, N·L = {n * positions}"
    )


def conv(input: Tensor, weight: Tensor, bias: Tensor | None, ops: ConvOps, source: PlanSource,
         name: str) -> Tensor:  # fmt: skip
    """Run the Conv2d plan on integer GEMMs; :class:`Unsupported` for grouped or 1-d
    convolutions, devices other than the CPU and CUDA, shapes CUDA's ``torch._int_mm`` cannot
    run, and where ``torch._int_mm`` is not exact here. On the CPU the layer first goes to
    oneDNN's integer convolutions (:mod:`fqtorch.backends.int8_qconv`); on CUDA it runs im2col
    + ``torch._int_mm``."""
    device = input.device.type
    if ops.groups != 1 or input.dim() != 4 or device not in ("cpu", "cuda"):
        raise Unsupported(
            "this convolution cannot run on integer GEMMs (grouped, 1-d, or on neither the CPU "
            "nor CUDA)"
        )
    refuse_float64(input, weight)
    verdict = int_mm_verdict(device)  # the weight gradient needs it on either path
    if verdict is None and device == "cuda":
        verdict = _cuda_shapes(input, weight, ops)
    if verdict is not None:
        raise Unsupported(verdict)
    plan = source.plan
    with torch.no_grad():
        x = _encode_input(plan.input, input)
        w = plan.weight.encode(weight)
    _per_tensor(x, "input")
    _per_tensor(w, "weight")
    say_speed(input.device)
    if device == "cpu":
        # Integer convolution kernels where they are exact here; int8_qconv builds on this
        # module.
        from . import int8_qconv

        out = int8_qconv.conv(input, x, w, bias, ops, weight, source, name)
        if out is not None:
            return out
    else:
        say_once(f"FQT layer {name!r}: Conv2d on im2col + torch._int_mm ({device})")
    return _Int8Conv2d.apply(input, x, w, bias, ops, weight, source, name)
