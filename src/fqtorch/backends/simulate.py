"""The ``simulate`` backend: the three GEMMs in float on the dequantized operands, one autograd
Function for every layer type (:class:`~fqtorch.backends.base.GemmOps` says how a type lays them
out). ``grad_output`` is quantized twice, independently: per row (sample) for ``grad_input``,
where row scales and row transforms factor out of the product; per column (output feature or
channel) for ``grad_weight``, which sums over rows. It runs every quantizer, on every device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..quantizers.base import Quantizer
from ..quantizers.uniform import Identity
from .base import (
    ConvOps,
    FQTPlan,
    GemmOps,
    LinearOps,
    PlanSource,
    channels_last,
    check_finite,
    hwc_rows,
    refuse_second_derivative,
)

__all__ = ["conv", "fqt_gemm", "linear"]

_LINEAR = LinearOps()


def _quantize_grad(
    quantizer: Quantizer, grad: Tensor, generator: torch.Generator | None, ops: GemmOps
) -> Tensor:
    """``grad_output`` quantized per sample; a 2-d convolution's read as (H, W, C) per sample
    (:func:`~.base.hwc_rows`), as the int8 backend reads it."""
    if isinstance(quantizer, Identity):
        return grad
    nhwc = hwc_rows(quantizer, grad) if isinstance(ops, ConvOps) else None
    if nhwc is None:
        return quantizer(grad, generator)
    return quantizer(nhwc, generator).permute(0, 3, 1, 2)


def _saturated(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` cast to the autocast ``dtype``, finite values saturating at its largest: a forward
    quantizer rounding to nearest can land above the input's largest value (a block format's
    top code by up to 1.2×), past float16's 65504 from an input float16 holds, where the cast
    would make it infinite. Infinities and NaN stay what they are (a run's non-finite checks
    must see them). A float16 model without autocast quantizes in float16 and overflows inside
    the quantizer: not covered here."""
    if dtype == torch.float16 and t.dtype != dtype:
        top = torch.finfo(dtype).max
        t = torch.where(t.abs() == math.inf, t, t.clamp(-top, top))
    return t.to(dtype)


class _FQTFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ops: GemmOps,
        source: PlanSource,
        name: str,
    ) -> Tensor:
        plan = source.plan
        input_q = ops.prepare(plan.input(input))
        if (channels_last(input) or channels_last(weight)) and not channels_last(input_q):
            # the quantizer's rows come back NCHW: laid out channels-last where the input or
            # the weight is (ATen's rule for the float convolution), the layer hands
            # channels-last tensors on as the float layer and the int8 backend do
            # (a copy with channels-last strides: .contiguous() keeps a 1-channel tensor's)
            input_q = torch.empty_like(input_q, memory_format=torch.channels_last).copy_(input_q)
        weight_q = plan.weight(weight)
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type) and torch.float64 not in (
            input.dtype,
            weight.dtype,
        ):  # autocast leaves float64 alone (not an eligible dtype): so does the layer
            # The forward GEMM runs in the autocast dtype, as autocast would; the output keeps the
            # input's dtype (float32 for float32 activations, as the int8 backend does), so the
            # gradient that comes back is not rounded to bf16/fp16 between layers, which would
            # bias it (round-to-nearest of a random value: E[round(g)] ≠ E[g]).
            dtype = torch.get_autocast_dtype(device_type)
            input_q, weight_q = _saturated(input_q, dtype), _saturated(weight_q, dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            output = ops.output(input_q, weight_q, bias).to(input.dtype)
        ctx.save_for_backward(input_q, weight_q)
        ctx.ops, ctx.source, ctx.name = ops, source, name
        # The backward is the float layer's, differentiable, only where the saved operands are
        # the ones that came in: exact quantizers, no autocast cast, no padding done here.
        ctx.differentiable = plan.exact and input_q is input and weight_q is weight
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input_q, weight_q = ctx.saved_tensors
        ops: GemmOps = ctx.ops
        plan: FQTPlan = ctx.source.plan  # read now: a measurement may have switched it
        refuse_second_derivative(ctx.differentiable and plan.exact, ctx.name)
        generator = ctx.source.generator(grad_output.device)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        # The backward GEMMs run in float32 (float64 stays float64) on exact operands: under
        # autocast, rounding Q(grad_output) back to bf16/fp16 would bias it (E[round(Q(G))] ≠ G).
        # The saved forward operands upcast exactly, so QAT (identity quantizers) runs the same
        # GEMMs and stays the reference of E[FQT gradient].
        dtype = torch.promote_types(weight_q.dtype, torch.float32)
        if ctx.differentiable and plan.exact:  # the float operands, no quantizer: their dtype
            dtype = weight_q.dtype
        grad_output = grad_output.to(dtype)
        input_q, weight_q = input_q.to(dtype), weight_q.to(dtype)
        ctx.source.on_grad_output(grad_output)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(grad_output.device.type, enabled=False):
            if need_input:
                grad = _quantize_grad(plan.grad_output, grad_output, generator, ops)
                grad_input = ops.grad_input(grad, input_q, weight_q)
            if need_weight or need_bias:
                grad = grad_output
                if not isinstance(plan.grad_output_weight, Identity):
                    columns = plan.grad_output_weight(ops.columns(grad_output), generator)
                    grad = ops.uncolumns(columns, grad_output)
                if need_weight and need_bias and grad is grad_output:
                    # not quantized (exact, QAT): the float layer's call, bit for bit
                    grad_weight, grad_bias = ops.grad_weight_and_bias(grad, input_q, weight_q)
                else:  # the bias as a plain sum: ATen's CPU convolution sums it in float32
                    # in order (1.3e-4 of its size off at 2^18 positions: tests/nn/test_layers.py,
                    # test_conv_bias_gradient_is_accurate_at_a_long_reduction)
                    if need_weight:
                        grad_weight = ops.grad_weight(grad, input_q, weight_q)
                    if need_bias:
                        grad_bias = ops.grad_bias(grad, input_q, weight_q)
        return grad_input, grad_weight, grad_bias, None, None, None


def fqt_gemm(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ops: GemmOps,
    source: PlanSource,
    name: str = "",
) -> Tensor:
    """Run one layer's three GEMMs under ``source.plan`` (the shared core of every FQT layer)."""
    return _FQTFunction.apply(input, weight, bias, ops, source, name)


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, source: PlanSource, name: str
) -> Tensor:
    """``input`` (M, in) @ ``weight`` (out, in)ᵀ under ``source.plan``."""
    return fqt_gemm(input, weight, bias, _LINEAR, source, name)


def conv(
    input: Tensor, weight: Tensor, bias: Tensor | None, ops: ConvOps, source: PlanSource, name: str
) -> Tensor:
    """A convolution (``ops``) under ``source.plan``."""
    return fqt_gemm(input, weight, bias, ops, source, name)
