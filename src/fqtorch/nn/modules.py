"""FQT modules: thin wrappers that reuse a float layer's Parameters and run the FQT plan.

Each layer owns the ``torch.Generator`` its stochastic rounding draws from, seeded from the config's
seed and the layer's qualified name: the same seed gives the same gradients, while different
layers, and successive backward passes of one layer, draw different noise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FQTConfig
from .functional import ConvOps, FQTPlan, fqt_conv, fqt_linear

__all__ = ["FQTConv1d", "FQTConv2d", "FQTLinear", "FQTModule", "layer_seed"]


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed that depends on the run's seed and the layer's qualified name."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class FQTModule(nn.Module):
    """What every FQT layer shares: its config, its quantizer plan and its generator."""

    def __init__(self, config: FQTConfig, name: str = "") -> None:
        super().__init__()
        if not isinstance(config, FQTConfig):
            raise TypeError(f"config must be an FQTConfig, got {type(config).__name__}")
        self.config = config
        self.name = name
        self.plan = FQTPlan.from_config(config)
        self._seed = layer_seed(config.seed, name)
        self._generator: torch.Generator | None = None
        self._grad_output_observers: list[Callable[[Tensor], None]] = []

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The layer's generator on ``device`` (created and seeded on first use there)."""
        if self.config.is_qat:
            return None  # exact backward: nothing to draw
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
        return self._generator

    @contextmanager
    def exact_backward(self) -> Iterator[None]:
        """Within the block, this layer's backward is exact (its gradient quantizers are off),
        also for graphs built before the block: the backward reads the plan when it runs."""
        saved = self.plan
        self.plan = saved.exact_backward()
        try:
            yield
        finally:
            self.plan = saved

    @contextmanager
    def observe_grad_output(self, observer: Callable[[Tensor], None]) -> Iterator[None]:
        """Within the block, ``observer(grad_output)`` sees every ``grad_output`` this layer's
        backward quantizes (the 2-D ``(tokens, out)`` view for Linear)."""
        self._grad_output_observers.append(observer)
        try:
            yield
        finally:
            self._grad_output_observers.remove(observer)

    def on_grad_output(self, grad_output: Tensor) -> None:
        for observer in self._grad_output_observers:
            observer(grad_output)

    def reseed(self, seed: int) -> None:
        """Restart the layer's noise stream from ``seed`` (mixed with the layer's name)."""
        self._seed = layer_seed(seed, self.name)
        if self._generator is not None:
            self._generator.manual_seed(self._seed)

    def generator_state(self) -> Tensor | None:
        """The generator's state (a uint8 tensor, safe for ``weights_only`` checkpoints)."""
        return None if self._generator is None else self._generator.get_state()

    def set_generator_state(self, state: Tensor | None, device: torch.device | None = None) -> None:
        if state is None:
            self._generator = None
            return
        generator = self.generator(device or torch.device("cpu"))
        if generator is not None:
            generator.set_state(state)

    def _plan_repr(self) -> str:
        plan = self.plan
        return (
            f"input={plan.input}, weight={plan.weight}, grad_output={plan.grad_output}, "
            f"grad_output_weight={plan.grad_output_weight}, backend={self.config.backend}"
        )


class FQTLinear(FQTModule):
    """``nn.Linear`` with quantized forward and backward GEMMs; shares the source's Parameters."""

    def __init__(self, source: nn.Linear, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.weight = source.weight
        self.bias = source.bias

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"FQTLinear {self.name!r} expects input of shape (*, {self.in_features}), "
                f"got {tuple(input.shape)}"
            )
        return fqt_linear(input, self.weight, self.bias, self, name=self.name)

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` on the same Parameters."""
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        layer.weight = self.weight
        layer.bias = self.bias
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._plan_repr()}"
        )


class _FQTConvNd(FQTModule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with quantized GEMMs; shares the source's Parameters."""

    _float_type: type[nn.Module] = nn.Conv2d

    def __init__(self, source: nn.Conv1d | nn.Conv2d, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            setattr(self, attr, getattr(source, attr))
        self._pre_pad = list(source._reversed_padding_repeated_twice)
        self.weight = source.weight
        self.bias = source.bias
        self.ops = self._gemm_ops()

    @property
    def _dims(self) -> int:
        return len(self.kernel_size)

    def _gemm_ops(self) -> ConvOps:
        zeros = (0,) * self._dims
        pad = None
        if self.padding_mode != "zeros" or self.padding == "valid":
            padding = zeros  # non-zero modes are padded in forward(), before quantization
        elif self.padding == "same":
            lefts, rights = self._pre_pad[0::2], self._pre_pad[1::2]
            if lefts == rights:
                padding = tuple(reversed(lefts))
            else:  # even kernels: pad one side more, as nn.Conv does
                padding, pad = zeros, tuple(self._pre_pad)
        else:
            padding = tuple(self.padding)
        return ConvOps(tuple(self.stride), padding, tuple(self.dilation), self.groups, pad)

    def forward(self, input: Tensor) -> Tensor:
        batched = input.dim() == self._dims + 2
        if not batched and input.dim() != self._dims + 1:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} expects input of {self._dims + 2} dims "
                f"(N, C, ...) or {self._dims + 1} (unbatched), got shape {tuple(input.shape)}"
            )
        if not batched:
            input = input.unsqueeze(0)
        if input.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} {self.name!r} expects {self.in_channels} input channels, "
                f"got shape {tuple(input.shape)}"
            )
        if self.padding_mode != "zeros":
            input = F.pad(input, self._pre_pad, mode=self.padding_mode)
        output = fqt_conv(input, self.weight, self.bias, self.ops, self, name=self.name)
        return output if batched else output.squeeze(0)

    def to_float(self) -> nn.Module:
        """The plain convolution on the same Parameters."""
        layer = self._float_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        layer.weight = self.weight
        layer.bias = self.bias
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode}, {self._plan_repr()}"
        )


class FQTConv1d(_FQTConvNd):
    _float_type = nn.Conv1d


class FQTConv2d(_FQTConvNd):
    _float_type = nn.Conv2d
