"""The contract between FQT layers (``fqtorch.nn``) and the backends that run their GEMMs.

A layer hands a backend its operands, a :class:`PlanSource` (the quantizers of its tensor roles,
read again at backward, and its generator) and the :class:`GemmOps` of its type (how Linear,
convolution or batched matmul lay out the three GEMMs, docs/method.md §2):

    output      = Q_input(input) @ Q_weight(weight).T        (+ bias)
    grad_input  = Q_grad(grad_output) @ Q_weight(weight)
    grad_weight = Q_grad_weight(grad_output).T @ Q_input(input)   (bias grad: same branch)
"""

from __future__ import annotations

import dataclasses
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
    "Unsupported",
    "channels_last",
    "check_finite",
    "hwc_rows",
]


class Unsupported(Exception):
    """A backend cannot run this layer call; the message says why (the caller falls back to
    the simulate backend and says so)."""


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

    @property
    def exact(self) -> bool:
        """Whether every quantizer is the identity (the ``exact`` preset): the layer's GEMMs
        are the float layer's."""
        roles = (self.input, self.weight, self.grad_output, self.grad_output_weight)
        return all(isinstance(q, Identity) for q in roles)

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
    def grad_bias(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor: ...
    def grad_weight_and_bias(
        self, grad_output: Tensor, input: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]: ...
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

    def grad_bias(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return grad_output.sum(0)

    def grad_weight_and_bias(
        self, grad_output: Tensor, input: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.grad_weight(grad_output, input, weight), grad_output.sum(0)

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

    def _backward(
        self, grad_output: Tensor, input: Tensor, weight: Tensor, which: int, bias: bool = False
    ) -> Any:
        """``convolution_backward``'s gradient ``which`` (0: input, 1: weight); with ``bias``,
        the pair (weight, bias) from one call."""
        mask = [which == 0, which == 1, bias]
        grads = torch.ops.aten.convolution_backward(
            grad_output,
            input,
            weight,
            [weight.shape[0]] if bias else None,  # the bias's size
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0] * len(self.stride),
            self.groups,
            mask,
        )
        return (grads[1], grads[2]) if bias else grads[which]

    def grad_input(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        grad = self._backward(grad_output, input, weight, 0)
        return grad if self.pad is None else F.pad(grad, [-p for p in self.pad])

    def grad_weight(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        return self._backward(grad_output, input, weight, 1)

    def grad_bias(self, grad_output: Tensor, input: Tensor, weight: Tensor) -> Tensor:
        # The bias alone (a frozen weight): a plain sum. ATen's own call would compute the
        # weight's gradient as well on the CPU (oneDNN); its reduction order differs, so here
        # the exact preset's bias gradient is the float layer's to float rounding only.
        return grad_output.sum([0, *range(2, grad_output.dim())])

    def grad_weight_and_bias(
        self, grad_output: Tensor, input: Tensor, weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        # One call, as autograd makes for the float layer: the exact preset gives its weight
        # and bias gradients bit for bit, at the cost of the weight's alone.
        return self._backward(grad_output, input, weight, 1, bias=True)

    def columns(self, grad_output: Tensor) -> Tensor:
        # (N, C, *S) -> (N·S, C): the weight-gradient GEMM sums over samples and positions, so a
        # scale can factor out of it only per output channel.
        return grad_output.movedim(1, -1).reshape(-1, grad_output.shape[1])

    def uncolumns(self, columns: Tensor, like: Tensor) -> Tensor:
        spatial = like.shape[2:]
        return columns.reshape(like.shape[0], *spatial, like.shape[1]).movedim(-1, 1)


def channels_last(t: Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels-last, by its strides as ATen reads them (a
    1-channel tensor is contiguous either way; its channel stride says which it was made as)."""
    return (
        t.dim() == 4
        and t.stride(1) == 1
        and t.shape[2] * t.shape[3] > 1
        and t.is_contiguous(memory_format=torch.channels_last)
    )


def hwc_rows(quantizer: Quantizer, grad: Tensor) -> Tensor | None:
    """A 2-d convolution's ``grad`` (N, C, H, W) as its (N, H, W, C) view, whose rows (one per
    sample, in (H, W, C) order) the per-sample quantizer reads, or ``None`` where it reads the
    (C, H, W) rows as usual: other ranks (a 1-d convolution's (N, C, L) keeps (C, L)), and
    quantizers that are not
    :attr:`~fqtorch.quantizers.base.Quantizer.column_equivariant` (block formats, transforms
    along the row), whose values would change with the order.

    The order changes no distribution (each element gets its own uniform; groups are whole rows
    or tensors), and it is the order of channels-last memory, which the int8 convolution's
    output hands back: there the gradient and its codes need no transposing copy. It does not
    depend on the layout, so every backend gives the same codes from the same seed whatever
    layout a model's gradients arrive in (an NCHW gradient is copied)."""
    if grad.dim() != 4 or not quantizer.column_equivariant:
        return None
    return grad.permute(0, 2, 3, 1)


def check_finite(grad_output: Tensor, name: str) -> None:
    """``FQTConfig(check_finite=True)``: raise, naming the layer, on NaN/Inf in grad_output."""
    if not bool(torch.isfinite(grad_output).all()):
        raise FloatingPointError(
            f"FQT layer {name!r}: grad_output holds NaN or Inf; cannot quantize it "
            "(set FQTConfig(check_finite=False) to let it propagate as NaN instead)"
        )


def refuse_second_derivative(differentiable: bool, name: str) -> None:
    """Raise, naming the layer, when a backward builds a graph (``create_graph=True``) through a
    layer whose backward is not the float layer's differentiable one: its saved operands are
    quantized codes, or were cast (autocast) or padded inside the layer, all cut off from
    autograd, and stochastic rounding has no useful derivative, so a second derivative would be
    silently wrong. ``differentiable``: the layer's backward is differentiable (only the
    simulate backend's, with the ``exact`` plan both at forward and now, on operands it saved as
    they came)."""
    if torch.is_grad_enabled() and not differentiable:
        raise RuntimeError(
            f"FQT layer {name!r}: a second derivative (a backward with create_graph=True: a "
            "gradient penalty, a Hessian-vector product) through quantized GEMMs, or through "
            "operands the layer cast (autocast) or padded itself, is not defined; leave the "
            "layers it passes through in float (quantize_model's module_filter_fn)"
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
