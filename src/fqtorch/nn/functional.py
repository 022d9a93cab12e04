"""The FQT autograd plan: one Function for the three GEMMs of every layer (docs/method.md §2).

    output      = Q_input(input) @ Q_weight(weight).T        (+ bias)
    grad_input  = Q_grad(grad_output) @ Q_weight(weight)
    grad_weight = Q_grad_weight(grad_output).T @ Q_input(input)   (bias grad: same branch)

``grad_output`` is quantized twice, independently: per row (sample) for ``grad_input``, where row
scales and row transforms factor out of the product; per column (output feature or channel) for
``grad_weight``, which sums over rows. Linear and convolution differ only in the GEMM ops.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import FQTConfig
from ..quantizers.base import Quantizer
from ..quantizers.uniform import Identity

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


@dataclass(frozen=True)
class FQTPlan:
    """The quantizer objects of one layer, by the tensor role they act on."""

    input: Quantizer
    weight: Quantizer
    grad_output: Quantizer
    grad_output_weight: Quantizer
    check_finite: bool = False
    backend: str = "simulate"

    @classmethod
    def from_config(cls, config: FQTConfig) -> FQTPlan:
        return cls(
            **config.build_quantizers(), check_finite=config.check_finite, backend=config.backend
        )

    def exact_backward(self) -> FQTPlan:
        """The same forward with an exact backward (QAT)."""
        identity = Identity()
        return dataclasses.replace(self, grad_output=identity, grad_output_weight=identity)


class GemmOps(Protocol):
    """How one layer type runs the three GEMMs on (already quantized) operands."""

    def prepare(self, input: Tensor) -> Tensor: ...
    def output(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...
    def grad_input(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor: ...
    def grad_weight(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor: ...
    def grad_bias(self, grad_output: Tensor) -> Tensor: ...
    def columns(self, grad_output: Tensor) -> Tensor: ...
    def uncolumns(self, columns: Tensor, like: Tensor) -> Tensor: ...


class LinearOps:
    """``input`` (M, in), ``weight`` (out, in), ``grad_output`` (M, out)."""

    def prepare(self, input: Tensor) -> Tensor:
        return input

    def output(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def grad_input(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return grad_output @ weight  # (M, out) @ (out, in)

    def grad_weight(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return grad_output.T @ input  # (out, M) @ (M, in)

    def grad_bias(self, grad_output: Tensor) -> Tensor:
        return grad_output.sum(0)

    def columns(self, grad_output: Tensor) -> Tensor:
        return grad_output

    def uncolumns(self, columns: Tensor, like: Tensor) -> Tensor:
        return columns

    def __repr__(self) -> str:
        return "linear"


@dataclass(frozen=True)
class ConvOps:
    """N-d convolution with integer padding; ``pad`` is an extra zero pad (asymmetric ``"same"``)
    applied to the quantized input, whose adjoint is a crop of ``grad_input``."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pad: tuple[int, ...] | None = None

    def prepare(self, input: Tensor) -> Tensor:
        return input if self.pad is None else F.pad(input, self.pad)

    def output(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = F.conv1d if len(self.stride) == 1 else F.conv2d
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _backward(self, grad_output: Tensor, input: Tensor, weight: Tensor, which: int) -> Tensor:
        mask = [which == 0, which == 1, False]
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            input,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            mask,
        )
        return grads[which]

    def grad_input(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        grad = self._backward(grad_output, input, weight, 0)
        return grad if self.pad is None else F.pad(grad, [-p for p in self.pad])

    def grad_weight(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return self._backward(grad_output, input, weight, 1)

    def grad_bias(self, grad_output: Tensor) -> Tensor:
        return grad_output.sum([0, *range(2, grad_output.dim())])

    def columns(self, grad_output: Tensor) -> Tensor:
        # (N, C, *S) -> (N·S, C): the weight-gradient GEMM sums over samples and positions, so a
        # scale can factor out of it only per output channel.
        return grad_output.movedim(1, -1).reshape(-1, grad_output.shape[1])

    def uncolumns(self, columns: Tensor, like: Tensor) -> Tensor:
        spatial = like.shape[2:]
        return columns.reshape(like.shape[0], *spatial, like.shape[1]).movedim(-1, 1)


_LINEAR = LinearOps()


def check_finite(grad_output: Tensor, name: str) -> None:
    """``FQTConfig(check_finite=True)``: raise, naming the layer, on NaN/Inf in grad_output."""
    if not bool(torch.isfinite(grad_output).all()):
        raise FloatingPointError(
            f"FQT layer {name!r}: grad_output holds NaN or Inf; cannot quantize it "
            "(set FQTConfig(check_finite=False) to let it propagate as NaN instead)"
        )


class PlanSource(Protocol):
    """Where the autograd Function reads its plan: at forward for the forward quantizers, and
    again at backward for the gradient quantizers (so a measurement can switch a layer to exact
    backward between backward passes of one forward, see ``FQTModule.exact_backward``)."""

    plan: FQTPlan

    def generator(self, device: torch.device) -> torch.Generator | None: ...

    def on_grad_output(self, grad_output: Tensor) -> None:
        """Called in backward with the ``grad_output`` the quantizers see (for measurements)."""
        ...


@dataclass(frozen=True)
class FixedPlan:
    """A plan and generator that never change (the functional forms use it)."""

    plan: FQTPlan
    fixed_generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        return self.fixed_generator

    def on_grad_output(self, grad_output: Tensor) -> None:
        pass


def _quantize_grad(quantizer: Quantizer, grad: Tensor, generator: torch.Generator | None) -> Tensor:
    return grad if isinstance(quantizer, Identity) else quantizer(grad, generator)


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
        weight_q = plan.weight(weight)
        device_type = input.device.type
        if torch.is_autocast_enabled(device_type):
            # The forward GEMM runs in the autocast dtype, as autocast would; the output keeps the
            # input's dtype (float32 for float32 activations, as the int8 backend does), so the
            # gradient that comes back is not rounded to bf16/fp16 between layers, which would
            # bias it (round-to-nearest of a random value: E[round(g)] ≠ E[g]).
            dtype = torch.get_autocast_dtype(device_type)
            input_q, weight_q = input_q.to(dtype), weight_q.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            output = ops.output(input_q, weight_q, bias).to(input.dtype)
        ctx.save_for_backward(input_q, weight_q)
        ctx.ops, ctx.source, ctx.name = ops, source, name
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input_q, weight_q = ctx.saved_tensors
        ops: GemmOps = ctx.ops
        plan: FQTPlan = ctx.source.plan  # read now: a measurement may have switched it
        generator = ctx.source.generator(grad_output.device)
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        # The backward GEMMs run in float32 (float64 stays float64) on exact operands: under
        # autocast, rounding Q(grad_output) back to bf16/fp16 would bias it (E[round(Q(G))] ≠ G).
        # The saved forward operands upcast exactly, so QAT (identity quantizers) runs the same
        # GEMMs and stays the reference of E[FQT gradient].
        dtype = torch.promote_types(weight_q.dtype, torch.float32)
        grad_output = grad_output.to(dtype)
        input_q, weight_q = input_q.to(dtype), weight_q.to(dtype)
        ctx.source.on_grad_output(grad_output)
        grad_input = grad_weight = grad_bias = None
        with torch.autocast(grad_output.device.type, enabled=False):
            if need_input:
                grad = _quantize_grad(plan.grad_output, grad_output, generator)
                grad_input = ops.grad_input(grad, input_q, weight_q)
            if need_weight or need_bias:
                grad = grad_output
                if not isinstance(plan.grad_output_weight, Identity):
                    columns = plan.grad_output_weight(ops.columns(grad_output), generator)
                    grad = ops.uncolumns(columns, grad_output)
                if need_weight:
                    grad_weight = ops.grad_weight(grad, input_q, weight_q)
                if need_bias:
                    grad_bias = ops.grad_bias(grad)
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


def fqt_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    plan: FQTPlan | PlanSource,
    generator: torch.Generator | None = None,
    name: str = "",
) -> Tensor:
    """``F.linear`` under an FQT plan; ``input`` is ``(*, in_features)``."""
    source = FixedPlan(plan, generator) if isinstance(plan, FQTPlan) else plan
    flat = input.reshape(-1, input.shape[-1]) if input.dim() != 2 else input  # (M, in)
    output = None
    if source.plan.backend == "int8":
        from ..backends.int8 import int8_linear

        output = int8_linear(flat, weight, bias, source, name)
        if output is None:
            warnings.warn(
                f"FQT layer {name!r}: torch._int_mm cannot run shape "
                f"{tuple(flat.shape)} x {tuple(weight.shape)} on {flat.device}; "
                "using the simulate backend",
                RuntimeWarning,
                stacklevel=3,
            )
    if output is None:
        output = fqt_gemm(flat, weight, bias, _LINEAR, source, name)  # (M, out)
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
    """``F.conv1d`` / ``F.conv2d`` under an FQT plan; ``input`` is ``(N, C, *spatial)``."""
    source = FixedPlan(plan, generator) if isinstance(plan, FQTPlan) else plan
    if source.plan.backend == "int8":
        from ..backends.int8_conv import int8_conv2d

        output = int8_conv2d(input, weight, bias, ops, source, name)
        if output is not None:
            return output
        warnings.warn(
            f"FQT layer {name!r}: this convolution cannot run on integer GEMMs (grouped, 1-d "
            "or not on the CPU); using the simulate backend",
            RuntimeWarning,
            stacklevel=3,
        )
    return fqt_gemm(input, weight, bias, ops, source, name)
