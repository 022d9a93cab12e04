"""The ``fp8`` backend: the three GEMMs of a Linear layer as FP8 products (``torch._scaled_mm``).

Every operand is a float8 code matrix ``C`` (``float8_e4m3fn`` or ``float8_e5m2``) times a
power-of-two scale ``s`` that is constant along the axis its GEMM sums over (docs/method.md §12),
so the scales come out of the product:

    output      = (s_x s_w) · (C_x C_wᵀ)          s_x, s_w per tensor (inside ``_scaled_mm``)
    grad_input  = s_g ⊙ (s_w · C_g C_w)           s_g per tensor or per row of grad_output
    grad_weight = s_h ⊙ (s_x · C_hᵀ C_x)          s_h per tensor or per column of grad_output

Per-tensor scales go into ``_scaled_mm`` as its ``scale_a`` / ``scale_b``; a per-row or
per-column scale multiplies the float32 product outside it. Both are exact: the scales are
powers of two (barring float32 underflow), so the placement changes no bit. Per-row scales are
kept outside on purpose: CUDA's row-wise ``_scaled_mm`` needs a bf16 output and E4M3 on both
sides, and an outside float32 multiply on an (M, K) product costs next to nothing.

**Exactness against simulate.** A product of two FP8 values (at most 4 significant bits each)
is exact in float32, so the only difference from the simulate backend (float32 GEMMs on the same
dequantized values) is the order in which the float32 accumulator sums the ``K`` exact products.
Each order is within ``γ_K Σ_k |a_k b_k|`` of the exact sum (``γ_K = K u / (1 − K u)``,
``u = 2⁻²⁴``), so the two backends differ by at most ``2 γ_K (|A| |B|)[i, j]`` per entry (plus
one rounding of the bias add): :func:`accumulation_tolerance`, what the tests assert. On this CPU
build the two agree bit for bit; a GPU kernel's blocked order uses the bound.

**Autocast.** As on simulate, the forward output is rounded once to the autocast dtype and then
returned in the input's dtype; the backward GEMMs stay float32 (rounding ``Q(grad_output)`` to
bf16 would bias it).

**Where it runs.** CPU (this torch build runs ``_scaled_mm`` there, slowly: for testing) and
CUDA GPUs of compute capability ≥ 8.9 with every GEMM dimension (batch rows, in and out
features) a multiple of 16 and not both operands E5M2 (cuBLASLt's constraints). Anything else
(another device, float64 operands, a quantizer that is not a per-tensor / per-row FP8 format)
raises :class:`~.base.Unsupported` and the layer falls back to simulate with one warning. A
gradient quantizer set to ``identity`` (QAT) runs its GEMM in float32 on the dequantized operand.

The forward saves the FP8 codes, not the float operands, for the backward (4× less memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..quantizers.base import QuantizedTensor, Quantizer
from ..quantizers.formats import FormatQuantizer
from ..quantizers.uniform import Identity
from .base import FQTPlan, PlanSource, Unsupported, check_finite, refuse_second_derivative

__all__ = ["accumulation_tolerance", "conv", "linear", "plan_refusal", "scaled_mm"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_UNIT = 2.0**-24  # float32 unit roundoff


def accumulation_tolerance(a: Tensor, b: Tensor, extra: Tensor | None = None) -> Tensor:
    """Largest difference between two float32 evaluations of ``a @ b`` (exact products, any
    summation order): ``2 γ_K (|a| |b|)``, ``γ_K = K u / (1 − K u)``, computed in float64.
    ``extra`` (broadcasting) is a further float32 term each side adds (the bias), which adds one
    term to the sum and one rounding."""
    k = a.shape[-1] + (extra is not None)
    gamma = k * _UNIT / (1 - k * _UNIT)
    bound = a.double().abs() @ b.double().abs()
    if extra is not None:
        bound = bound + extra.double().abs()
    return 2 * gamma * bound


def _layout(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` row-major, ``b`` column-major (cuBLASLt's FP8 kernels need this "TN" layout; the CPU
    kernel takes any strides)."""
    if a.device.type != "cuda":
        return a, b
    if a.stride() != (a.shape[1], 1):
        a = a.contiguous()
    if b.stride() != (1, b.shape[0]):
        b = b.T.contiguous().T
    return a, b


def scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor) -> Tensor:
    """float8 ``a`` (m, k) × float8 ``b`` (k, n) times the float32 scalars ``scale_a · scale_b``,
    returned in float32 (accumulated in float32 on the CPU; CUDA's FP8 kernels accumulate in
    less: docs/method.md §12)."""
    a, b = _layout(a, b)
    return torch._scaled_mm(
        a,
        b,
        scale_a=scale_a.float().reshape(()),
        scale_b=scale_b.float().reshape(()),
        out_dtype=torch.float32,
    )


def _split(scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """A scale as (the scalar that goes into ``_scaled_mm``, the rest applied outside or None)."""
    if scale.numel() == 1:
        return scale, None
    return torch.ones((), dtype=torch.float32, device=scale.device), scale


def _forward(x: QuantizedTensor, w: QuantizedTensor) -> Tensor:
    return scaled_mm(x.codes, w.codes.T, x.scale, w.scale)  # (M, K) × (K, O)


def _grad_input(g: QuantizedTensor, w: QuantizedTensor) -> Tensor:
    inside, rows = _split(g.scale)  # rows: (M, 1) per-row scales
    out = scaled_mm(g.codes, w.codes, inside, w.scale)  # (M, O) × (O, K)
    return out if rows is None else out.mul_(rows)


def _grad_weight(h: QuantizedTensor, x: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """``grad_weight`` (O, K) and ``grad_bias`` (O,) (the values simulate sums: ``C_h s_h``)."""
    inside, cols = _split(h.scale)  # cols: (1, O) per-column scales
    out = scaled_mm(h.codes.T, x.codes, inside, x.scale)  # (O, M) × (M, K)
    if cols is not None:
        out.mul_(cols.reshape(-1, 1))
    grad_bias = (h.codes.float() * h.scale).sum(0)
    return out, grad_bias


def _fp8_quantizer(q: Quantizer, kinds: tuple[str, ...]) -> bool:
    return (
        isinstance(q, FormatQuantizer)
        and q.kind in kinds
        and q.element.dtype in FP8_DTYPES
        and type(q).encode is FormatQuantizer.encode  # no transform wrapped around it
    )


def plan_refusal(plan: FQTPlan) -> str | None:
    """Why this plan's quantizer objects cannot leave ``_scaled_mm`` (``None``: they can). The
    config refuses such names up front (``fqtorch.config.fp8_refusal``); this guards plans built
    by hand."""
    checks = (
        ("input", plan.input, ("tensor",)),
        ("weight", plan.weight, ("tensor",)),
        ("grad_output", plan.grad_output, ("tensor", "row")),
        ("grad_output_weight", plan.grad_output_weight, ("tensor", "row")),
    )
    for role, q, kinds in checks:
        if role.startswith("grad") and isinstance(q, Identity):
            continue
        if not _fp8_quantizer(q, kinds):
            return f"the {role} quantizer {q!r} is not a {' or '.join(kinds)}-scaled FP8 format"
        # per-row scales factor out of the GEMM only along its reduction: grad_output's rows
        # (blocks along dim 1), grad_output_weight's columns (along dim 0)
        reduction = 0 if role == "grad_output_weight" else 1
        if q.kind == "row" and q.block_dim != reduction:
            return (
                f"the {role} quantizer {q!r} scales along dim {q.block_dim}; its GEMM reduces "
                f"along dim {reduction} (block_dim={reduction})"
            )
    return None


def _device_refusal(plan: FQTPlan, m: int, k: int, n: int, device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"torch._scaled_mm does not run on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"FP8 GEMMs need CUDA compute capability >= 8.9, got {capability}"
    if m % 16 or k % 16 or n % 16:
        return f"cuBLASLt FP8 GEMMs need every dimension a multiple of 16, got M={m} K={k} N={n}"
    e5m2 = [
        getattr(getattr(q, "element", None), "dtype", None) == torch.float8_e5m2
        for q in (plan.input, plan.weight, plan.grad_output, plan.grad_output_weight)
    ]
    x, w, g, h = e5m2
    if (x and w) or (g and w) or (h and x):
        return "cuBLASLt has no E5M2 x E5M2 GEMM"
    return None


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, source: Any, name: str
    ) -> Tensor:
        plan = source.plan
        x = plan.input.encode(input)
        w = plan.weight.encode(weight)
        device_type = input.device.type
        autocast = torch.is_autocast_enabled(device_type)
        with torch.autocast(device_type, enabled=False):
            out = _forward(x, w)
            if autocast:
                # As simulate: the bias in the autocast dtype, the output rounded to it once.
                dtype = torch.get_autocast_dtype(device_type)
                if bias is not None:
                    out.add_(bias.to(dtype).float())
                out = out.to(dtype)
            elif bias is not None:
                out.add_(bias.float())
        ctx.save_for_backward(x.codes, x.scale, w.codes, w.scale)
        ctx.meta = (x.shape, w.shape, weight.dtype, input.dtype, bias is not None)
        ctx.source, ctx.name = source, name
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        xc, xs, wc, ws = ctx.saved_tensors
        x_shape, w_shape, w_dtype, in_dtype, has_bias = ctx.meta
        zero_x, zero_w = torch.zeros_like(xs), torch.zeros_like(ws)
        x = QuantizedTensor(xc, xs, zero_x, 8, x_shape, torch.float32)
        w = QuantizedTensor(wc, ws, zero_w, 8, w_shape, torch.float32)
        plan = ctx.source.plan  # read now: a measurement may have switched it
        refuse_second_derivative(False, ctx.name)  # codes saved
        generator = ctx.source.generator(grad_output.device)
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        grad = grad_output.float()
        ctx.source.on_grad_output(grad)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(grad.device.type, enabled=False):
            # Same order of generator draws as simulate: grad_input's quantizer first.
            if need_input:
                if isinstance(plan.grad_output, Identity):
                    grad_input = grad @ w.dequantize()
                else:
                    grad_input = _grad_input(plan.grad_output.encode(grad, generator), w)
                grad_input = grad_input.to(in_dtype)
            if need_weight or need_bias:
                if isinstance(plan.grad_output_weight, Identity):
                    grad_weight = grad.T @ x.dequantize() if need_weight else None
                    grad_bias = grad.sum(0)
                else:
                    h = plan.grad_output_weight.encode(grad, generator)
                    grad_weight, grad_bias = _grad_weight(h, x)
                grad_weight = None if grad_weight is None else grad_weight.to(w_dtype)
                grad_bias = grad_bias.to(w_dtype)
        if not need_weight:
            grad_weight = None
        if not (need_bias and has_bias):
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, source: PlanSource, name: str
) -> Tensor:
    """Run the Linear plan (``input`` (M, in)) on FP8 GEMMs; :class:`Unsupported` where the
    quantizers, dtype or device cannot."""
    plan = source.plan
    refusal = plan_refusal(plan)
    if refusal is None and torch.float64 in (input.dtype, weight.dtype):
        refusal = "FP8 GEMMs accumulate in float32, not float64"
    if refusal is None:
        (m, k), n = input.shape, weight.shape[0]
        refusal = _device_refusal(plan, m, k, n, input.device)
    if refusal is not None:
        raise Unsupported(refusal)
    return _FP8Linear.apply(input, weight, bias, source, name)


def conv(
    input: Tensor, weight: Tensor, bias: Tensor | None, ops: Any, source: PlanSource, name: str
) -> Tensor:
    """Not implemented: convolutions run on simulate (the caller warns once per call site)."""
    raise Unsupported("the fp8 backend runs Linear layers only")
