"""Functional forms of the FQT layers: ``F.linear`` and ``F.conv1d``/``F.conv2d`` under an FQT
plan. The GEMMs run on the plan's backend (:mod:`fqtorch.backends`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..backends.base import ConvOps, FixedPlan, FQTPlan, GemmOps, LinearOps, PlanSource
from ..backends.simulate import fqt_gemm

__all__ = [
    "ConvOps",
    "FQTPlan",
    "FixedPlan",
    "GemmOps",
    "LinearOps",
    "PlanSource",
    "fqt_conv",
    "fqt_gemm",
    "fqt_linear",
]


def _source(plan: FQTPlan | PlanSource, generator: torch.Generator | None) -> PlanSource:
    return FixedPlan(plan, generator) if isinstance(plan, FQTPlan) else plan


def fqt_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: FQTPlan | PlanSource,
    generator: torch.Generator | None = None,
    name: str = "",
) -> Tensor:
    """``F.linear`` under an FQT plan; ``input`` is ``(*, in_features)``. An empty batch has
    nothing to quantize: it runs as ``F.linear`` (an empty output, zero weight gradients); so
    does a tensor on the ``meta`` device (shape inference: no values)."""
    if input.numel() == 0 or input.is_meta:  # in the input's dtype, as the FQT path returns
        return F.linear(input, weight, bias).to(input.dtype)
    flat = input.reshape(-1, input.shape[-1]) if input.dim() != 2 else input  # (M, in)
    output = backends.linear(flat, weight, bias, _source(plan, generator), name)  # (M, out)
    if input.dim() == 2:
        # Not a reshape to the same shape: that returns a view, and FSDP2 warns that an in-place
        # op on a module's view output (ReLU(inplace=True)) drops its pre-backward hook.
        return output
    return output.reshape(*input.shape[:-1], weight.shape[0])


def fqt_conv(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    ops: ConvOps,
    plan: FQTPlan | PlanSource,
    generator: torch.Generator | None = None,
    name: str = "",
) -> Tensor:
    """``F.conv1d`` / ``F.conv2d`` under an FQT plan; ``input`` is ``(N, C, *spatial)``. An
    empty batch, or one on the ``meta`` device, runs as the float convolution (nothing to
    quantize)."""
    if input.numel() == 0 or input.is_meta:
        return ops.output(ops.prepare(input), weight, bias).to(input.dtype)
    return backends.conv(input, weight, bias, ops, _source(plan, generator), name)
