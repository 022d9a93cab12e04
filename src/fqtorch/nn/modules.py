"""FQT modules: layers that take over a float layer's Parameters and run the FQT plan.

Each layer owns the ``torch.Generator`` its stochastic rounding draws from, seeded from the config's
seed and the layer's qualified name: the same seed gives the same gradients, while different
layers, and successive backward passes of one layer, draw different noise.

An FQT layer *adopts* its float source: the very same Parameter, buffer and submodule objects and
the source's plain attributes (``in_features``, ``stride``, ...), so optimisers built before the
swap keep working, ``state_dict()`` is unchanged, and :meth:`FQTModule.to_float` rebuilds the
source's own class (a subclass of ``nn.Linear`` comes back as that subclass). ``FQTLinear``,
``FQTConv1d``, ``FQTConv2d`` (and ``FQTMultiheadAttention``, in ``attention.py``) also subclass
their float layer, so ``isinstance(m, nn.Linear)`` / ``nn.Conv2d`` checks in user code still hold
after the swap.
"""

from __future__ import annotations

import hashlib
import operator
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import FQTConfig
from ..quantizers.callers import FQTWarning, user_stacklevel
from .functional import ConvOps, FQTPlan, fqt_conv, fqt_linear

__all__ = [
    "FQTConv1d",
    "FQTConv2d",
    "FQTLinear",
    "FQTModule",
    "FQTTransposedLinear",
    "layer_seed",
]

# What every nn.Module holds itself (hooks, the parameter/buffer/submodule dicts, ``training``),
# and ``layer.compile()``'s compiled forward of the *float* layer (adopted, it would run in place
# of the FQT forward): not a float layer's own attributes, so never adopted as one.
_MODULE_STATE = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed that depends on the run's seed and the layer's qualified name."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _keep_module_call(module: nn.Module, args: Any) -> None:
    """The forward pre-hook every FQT layer holds. torch's fused inference paths
    (``nn.TransformerEncoderLayer`` in eval mode under ``no_grad``) read their submodules'
    weights and skip their ``forward`` -- running float GEMMs -- unless a submodule has a hook.
    It refuses ``nn.DataParallel``'s replicas: rebuilt from the layer every step, each would
    start the layer's noise stream again from its seed (the same rounding noise every step, on
    every device), and none would advance the layer's own."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            f"FQT layer {getattr(module, 'name', '')!r} runs in an nn.DataParallel replica, "
            "which would draw the same gradient noise every step on every device; use "
            "DistributedDataParallel (torchrun; fqtorch train does) with "
            "fqtorch.reseed(model, seed + rank) on each rank"
        )


class FQTModule(nn.Module):
    """What every FQT layer shares: its config, its quantizer plan and its generator.

    A subclass that converts a float layer calls :meth:`adopt` in its ``__init__`` (after this
    one) and gets :meth:`to_float` for free. FQT layers that also subclass their float layer list
    ``FQTModule`` first: ``FQTModule.__init__`` initialises ``nn.Module`` directly, because the
    float layer's ``__init__`` would allocate new Parameters instead of taking the source's.
    """

    def __init__(self, config: FQTConfig, name: str = "") -> None:
        nn.Module.__init__(self)
        self.name = name
        self._seed_name = name  # the name the seed is mixed with (fqtorch.reseed may set another)
        self._seed = layer_seed(config.seed, name) if isinstance(config, FQTConfig) else 0
        self.config = config  # builds the plan
        self._generator: torch.Generator | None = None
        self._grad_output_observers: list[Callable[[Tensor], None]] = []
        self._float_type: type[nn.Module] | None = None
        self._float_attrs: tuple[str, ...] = ()
        self.register_forward_pre_hook(_keep_module_call)

    @property
    def config(self) -> FQTConfig:
        """The layer's :class:`FQTConfig`. Assigning another rebuilds the layer's quantizers
        (``plan``): the next forward uses them, and so does the next backward, of graphs built
        before too; a new ``seed`` restarts the layer's noise stream from it."""
        return self._config

    @config.setter
    def config(self, config: FQTConfig) -> None:
        if not isinstance(config, FQTConfig):
            raise TypeError(f"config must be an FQTConfig, got {type(config).__name__}")
        old = self.__dict__.get("_config")
        self._config = config
        self.plan = FQTPlan.from_config(config)
        if old is not None and old.seed != config.seed:
            self.reseed(config.seed)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A layer pickled whole before ``config`` became a property kept it as ``config``.
        if "config" in state and "_config" not in state:
            state["_config"] = state.pop("config")
        state.setdefault("_seed_name", state.get("name", ""))  # one pickled before it existed
        super().__setstate__(state)

    def adopt(self, source: nn.Module, expected: type[nn.Module] | None = None) -> None:
        """Take over ``source``: its Parameters, buffers and submodules (the same objects, in the
        same order, so ``state_dict()`` keys and values are unchanged), its plain attributes and
        its training mode; remember its class for :meth:`to_float`. ``expected``: the float type
        this layer converts (a ``TypeError`` for any other source).

        Not taken over: the source's hooks (``quantize_model`` leaves a layer with hooks or a
        parametrization in float, saying so) and the compiled forward of a layer compiled on its
        own (``layer.compile()``): the FQT layer runs uncompiled; compile after conversion."""
        if expected is not None and not isinstance(source, expected):
            raise TypeError(
                f"{type(self).__name__} converts an nn.{expected.__name__}, "
                f"got {type(source).__name__}"
            )
        own = {k for k in vars(source) if k not in _MODULE_STATE}
        # the FQT layer's attributes, and the names its classes define (methods, properties):
        # an adopted instance attribute would shadow them
        defined = {n for c in type(self).__mro__ if issubclass(c, FQTModule) for n in vars(c)}
        clash = sorted(own & (set(vars(self)) | defined))
        if clash:
            raise TypeError(
                f"cannot convert {type(source).__qualname__} to {type(self).__name__}: its "
                f"attributes {clash} clash with the FQT layer's own"
            )
        for key in own:
            self.__dict__[key] = vars(source)[key]
        self._parameters.update(source._parameters)
        self._buffers.update(source._buffers)
        self._non_persistent_buffers_set.update(source._non_persistent_buffers_set)
        self._modules.update(source._modules)
        self.training = source.training
        self._float_type = type(source)
        self._float_attrs = tuple(k for k in vars(source) if k in own)

    def _user_hooks(self) -> list[str]:
        """The hook dicts that hold hooks besides the FQT layer's own ``_keep_module_call``."""
        held = []
        for key in _HOOK_DICTS:
            hooks = getattr(self, key, {})
            if any(hook is not _keep_module_call for hook in hooks.values()):
                held.append(key.strip("_").replace("_", " "))
        return held

    @property
    def float_type(self) -> type[nn.Module] | None:
        """The class of the float layer this layer adopted (``None`` if it adopted none)."""
        return self._float_type

    def to_float(self) -> nn.Module:
        """The float layer again, of the source's own class, on the same Parameters, buffers and
        attributes (FQT submodules are turned back too). Hooks registered on the FQT layer are
        not carried over (their handles belong to it): a ``RuntimeWarning`` names them."""
        cls = self._float_type
        hooks = self._user_hooks()
        if hooks:
            warnings.warn(
                f"FQT layer {self.name!r}: its {', '.join(hooks)} are not carried over to the "
                "float layer; register them on the float layer again",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )
        if cls is None:
            raise NotImplementedError(
                f"{type(self).__name__} did not adopt a float layer (FQTModule.adopt); "
                "define its to_float() or register a from_fqt with fqtorch.register_layer"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for key in self._float_attrs:
            layer.__dict__[key] = self.__dict__[key]
        layer._parameters.update(self._parameters)
        layer._buffers.update(self._buffers)
        layer._non_persistent_buffers_set.update(self._non_persistent_buffers_set)
        for key, child in self._modules.items():
            layer._modules[key] = child.to_float() if isinstance(child, FQTModule) else child
        layer.training = self.training
        return layer

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

    def reseed(self, seed: int, name: str | None = None) -> None:
        """Restart the layer's noise stream from ``seed`` mixed with ``name`` (default: the name
        the last reseed used, at first the one it was converted under; :func:`fqtorch.reseed`
        passes its name in the model given, which a later ``layer.config = ...`` with another
        seed keeps)."""
        try:
            seed = operator.index(seed)  # an int, numpy's too
        except TypeError:
            raise TypeError(f"seed must be an int, got {seed!r}") from None
        if name is not None:
            self._seed_name = name
        self._seed = layer_seed(seed, self._seed_name)
        if self._generator is not None:
            self._generator.manual_seed(self._seed)

    @contextmanager
    def kept_generator(self) -> Iterator[None]:
        """Within the block, draws advance the layer's generator as usual; on exit it is back
        where it was (not yet created, if it was not)."""
        saved = self._generator
        state = None if saved is None else saved.get_state()
        try:
            yield
        finally:
            if saved is not None and state is not None:
                saved.set_state(state)
            self._generator = saved

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


class FQTLinear(FQTModule, nn.Linear):
    """``nn.Linear`` with quantized forward and backward GEMMs; adopts the source's Parameters.

    Also an ``nn.Linear`` (``isinstance`` checks pass); ``to_float()`` gives the source's class
    back (e.g. ``NonDynamicallyQuantizableLinear``)."""

    def __init__(self, source: nn.Linear, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.adopt(source, nn.Linear)

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"FQTLinear {self.name!r} expects input of shape (*, {self.in_features}), "
                f"got {tuple(input.shape)}"
            )
        return fqt_linear(input, self.weight, self.bias, self, name=self.name)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._plan_repr()}"
        )


class FQTTransposedLinear(FQTModule):
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored
    transposed, ``(in_features, out_features)``, and ``output = input @ weight + bias``.

    Runs the FQT GEMMs of ``nn.Linear`` on ``weight.T`` (so the weight quantizer's rows are output
    features, as for ``FQTLinear``); the gradient reaches ``weight`` through the transpose. Adopts
    any layer with ``nx`` inputs, ``nf`` outputs and that layout, without importing transformers.
    """

    def __init__(self, source: nn.Module, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        weight = getattr(source, "weight", None)
        nx, nf = getattr(source, "nx", None), getattr(source, "nf", None)
        if not isinstance(weight, Tensor) or weight.shape != (nx, nf):
            raise TypeError(
                f"FQTTransposedLinear converts a layer with attributes nx, nf and a weight of "
                f"shape (nx, nf), like transformers' Conv1D; got {type(source).__name__}"
            )
        self.adopt(source)

    def forward(self, input: Tensor) -> Tensor:
        if input.shape[-1:] != (self.nx,):
            raise ValueError(
                f"FQTTransposedLinear {self.name!r} expects input of shape (*, {self.nx}), "
                f"got {tuple(input.shape)}"
            )
        return fqt_linear(input, self.weight.T, self.bias, self, name=self.name)

    def extra_repr(self) -> str:
        return f"nx={self.nx}, nf={self.nf}, bias={self.bias is not None}, {self._plan_repr()}"


class _FQTConvNd(FQTModule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with quantized GEMMs; adopts the source's Parameters."""

    _conv_type: type[nn.Module] = nn.Conv2d

    def __init__(self, source: nn.Conv1d | nn.Conv2d, config: FQTConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.adopt(source, self._conv_type)
        self._pre_pad = list(source._reversed_padding_repeated_twice)
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

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode}, {self._plan_repr()}"
        )


class FQTConv1d(_FQTConvNd, nn.Conv1d):
    """``nn.Conv1d`` with quantized GEMMs (also an ``nn.Conv1d``)."""

    _conv_type = nn.Conv1d


class FQTConv2d(_FQTConvNd, nn.Conv2d):
    """``nn.Conv2d`` with quantized GEMMs (also an ``nn.Conv2d``)."""

    _conv_type = nn.Conv2d
