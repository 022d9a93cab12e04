"""The ``int8`` backend: the three GEMMs of a Linear layer as integer products (``torch._int_mm``).

Every operand is an int8 code matrix ``C`` with a scale ``s`` and bias ``b`` (value ``C·s + b``)
along an axis that the GEMM does not sum over (PAPER.md §2), so they come out of the product:

    output      = X_q W_qᵀ,   X_q = s_x C_x + b_x (per tensor),  W_q = s_w C_w (per tensor)
                = s_x s_w (C_x C_wᵀ) + b_x s_w · 1 rowsum(C_w)ᵀ
    grad_input  = T⁻¹[(C_g s_g + b_g) W_q]      per-row s_g, b_g; T the BHQ/RHT row transform
                = T⁻¹[s_g s_w (C_g C_w) + b_g s_w · colsum(C_w)]
    grad_weight = (C_h s_h + b_h)ᵀ X_q          per-column s_h, b_h (one per output feature o)
        [o, k]  = s_o s_x (C_hᵀ C_x)[o, k] + s_o b_x colsum(C_h)[o]
                  + b_o s_x colsum(C_x)[k] + M b_o b_x

The integer products accumulate in int32 (exact: |C| ≤ 128, so no overflow below 2^17 terms).
The forward saves the int8 codes, not the float operands, for the backward (4× less memory).
A gradient quantizer set to ``identity`` runs its GEMM in float on the dequantized operand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..nn.functional import check_finite
from ..quantizers.base import QuantizedTensor
from ..quantizers.uniform import Identity

__all__ = ["int8_linear", "int_mm", "int_mm_supported"]


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs an (m, k) × (k, n) product on ``device``."""
    if device.type == "cpu":
        return True
    # CUDA kernels need m > 16 and k, n multiples of 8.
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 (m, k) × int8 (k, n) → int32 (m, n), exact, in the layout integer GEMM kernels
    prefer: ``a`` row-major and ``b`` column-major ("TN"), copying an operand that is not.

    The copies are of int8 codes, cheap next to the product: on this project's AVX2 CPU the
    int8 Linear step ran 2.5× faster with them than with the backward GEMMs' transposed views
    (``benchmarks/linear_step.py``, before/after in docs/performance.md); TN is also the
    layout cuBLASLt's int8 kernels use.
    """
    if not a.is_contiguous():
        a = a.contiguous()
    if not b.T.is_contiguous():
        b = b.T.contiguous().T
    return torch._int_mm(a, b)


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """:func:`int_mm` as float32 (exact below 2^24 in magnitude)."""
    return int_mm(a, b).to(torch.float32)


def _per_tensor(q: QuantizedTensor, role: str) -> None:
    if q.scale.numel() != 1 or q.transform is not None:
        raise ValueError(
            f"the int8 backend needs a per-tensor {role} quantizer (a scale per tensor factors "
            f"out of every GEMM), got scale shape {tuple(q.scale.shape)}"
        )


def _forward(x: QuantizedTensor, w: QuantizedTensor, bias: Tensor | None) -> Tensor:
    acc = _int_mm(x.codes, w.codes.T)  # (M, O)
    out = acc.mul_(x.scale * w.scale)
    w_rows = w.codes.sum(1, dtype=torch.int32).to(torch.float32)  # (O,)
    out.add_(x.bias * w.scale * w_rows[None, :])
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def _grad_input(g: QuantizedTensor, w: QuantizedTensor) -> Tensor:
    acc = _int_mm(g.codes, w.codes)  # (M', O) × (O, K) → (M', K)
    out = acc.mul_(g.scale * w.scale)  # per-row scale of grad_output
    w_cols = w.codes.sum(0, dtype=torch.int32).to(torch.float32)  # (K,)
    out.add_(g.bias * w.scale * w_cols[None, :])
    return out if g.transform is None else g.transform.inverse(out)


def _grad_weight(h: QuantizedTensor, x: QuantizedTensor) -> Tensor:
    # Σ_r (C_ro s_o + b_o)(s_x C_rk + b_x)
    #   = s_o s_x (CᵀC_x)_ok + s_o b_x colsum(C)_o + b_o s_x colsum(C_x)_k + M b_o b_x
    rows = h.codes.shape[0]
    acc = _int_mm(h.codes.T, x.codes)  # (O, M) × (M, K) → (O, K)
    s_o, b_o = h.scale.reshape(-1, 1), h.bias.reshape(-1, 1)  # (O, 1) or (1, 1)
    h_cols = h.codes.sum(0, dtype=torch.int32).to(torch.float32)[:, None]  # (O, 1)
    x_cols = x.codes.sum(0, dtype=torch.int32).to(torch.float32)[None, :]  # (1, K)
    out = acc.mul_(s_o * x.scale)
    out.add_(s_o * x.bias * h_cols)
    out.add_(b_o * x.scale * x_cols)
    out.add_(rows * b_o * x.bias)
    return out


def _grad_bias(h: QuantizedTensor) -> Tensor:
    rows = h.codes.shape[0]
    h_cols = h.codes.sum(0, dtype=torch.int32).to(torch.float32)  # (O,)
    return h_cols * h.scale.reshape(-1) + rows * h.bias.reshape(-1)


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, source: Any, name: str
    ) -> Tensor:
        plan = source.plan
        x = plan.input.encode(input)
        w = plan.weight.encode(weight)
        _per_tensor(x, "input")
        _per_tensor(w, "weight")
        ctx.save_for_backward(x.codes, x.scale, x.bias, w.codes, w.scale, w.bias)
        ctx.meta = (x.shape, x.dtype, w.shape, w.dtype, input.dtype, bias is not None)
        ctx.source, ctx.name = source, name
        return _forward(x, w, bias).to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        xc, xs, xb, wc, ws, wb = ctx.saved_tensors
        x_shape, x_dtype, w_shape, w_dtype, in_dtype, has_bias = ctx.meta
        x = QuantizedTensor(xc, xs, xb, 8, x_shape, x_dtype)
        w = QuantizedTensor(wc, ws, wb, 8, w_shape, w_dtype)
        plan = ctx.source.plan
        generator = ctx.source.generator(grad_output.device)
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        ctx.source.on_grad_output(grad_output)
        grad = grad_output.float()
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
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
                if h.transform is not None:
                    raise ValueError(
                        "the weight-gradient quantizer cannot mix rows: its GEMM sums them"
                    )
                grad_weight = _grad_weight(h, x) if need_weight else None
                grad_bias = _grad_bias(h) if need_bias else None
        if not (need_bias and has_bias):
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None


def int8_linear(
    input2d: Tensor, weight: Tensor, bias: Tensor | None, source: Any, name: str
) -> Tensor | None:
    """Run the Linear plan on integer GEMMs; ``None`` when a shape cannot run (the caller falls
    back to the simulate path)."""
    m, k = input2d.shape
    n = weight.shape[0]
    if not (
        int_mm_supported(m, k, n, input2d.device)
        and int_mm_supported(n, m, k, input2d.device)
        and int_mm_supported(m, n, k, input2d.device)
    ):
        return None
    return _Int8Linear.apply(input2d, weight, bias, source, name)
