"""How an FQT layer's three GEMMs run. ``fqtorch.nn`` depends on this package, never the reverse.

One module per backend, each with ``linear(input, weight, bias, source, name)`` and
``conv(input, weight, bias, ops, source, name)`` that run a layer call or raise
:class:`~fqtorch.backends.base.Unsupported` saying why:

- ``simulate`` (:mod:`.simulate`): float GEMMs on dequantized operands; runs everything.
- ``int8`` (:mod:`.int8` for Linear, :mod:`.int8_conv` for Conv2d): ``torch._int_mm`` on the
  integer codes.
- ``fp8`` (:mod:`.fp8`): ``torch._scaled_mm`` on the FP8 codes, Linear only (a convolution falls
  back to simulate with a warning).
- ``auto``: int8 where the device has integer units and the quantizers fit, else simulate,
  decided per device at the first call and said in one log line (:mod:`.auto`).

A new backend is one new module here, its entry in :data:`_MODULES`, and its name in
``fqtorch.config.BACKENDS``. :func:`linear` and :func:`conv` dispatch on ``source.plan.backend``
and fall back to ``simulate`` with a warning where the backend cannot run a call.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType, ModuleType

from torch import Tensor

from . import auto, simulate
from .base import ConvOps, FixedPlan, FQTPlan, GemmOps, LinearOps, PlanSource, Unsupported
from .notes import warn_once

__all__ = [
    "ConvOps",
    "FQTPlan",
    "FixedPlan",
    "GemmOps",
    "LinearOps",
    "PlanSource",
    "Unsupported",
    "conv",
    "get_backend",
    "linear",
]

# backend name -> (module running Linear, module running convolutions); read-only.
_MODULES = MappingProxyType(
    {
        "simulate": ("simulate", "simulate"),
        "int8": ("int8", "int8_conv"),
        "fp8": ("fp8", "fp8"),
    }
)


def get_backend(name: str, kind: str = "linear") -> ModuleType:
    """The module that runs ``kind`` (``"linear"`` or ``"conv"``) layer calls for ``name``."""
    try:
        modules = _MODULES[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(_MODULES)}"
        ) from None
    return importlib.import_module(f"{__name__}.{modules[kind == 'conv']}")


def _fallback(name: str, why: Unsupported) -> None:
    # once per layer and reason: torch.compile resets Python's own once-per-location memo
    warn_once(f"FQT layer {name!r}: {why}; using the simulate backend")


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, source: PlanSource, name: str
) -> Tensor:
    """``input`` (M, in) @ ``weight`` (out, in)ᵀ on ``source.plan.backend``."""
    backend = source.plan.backend
    if backend == "auto":
        backend = auto.resolve(source.plan, input.device)
    if backend != "simulate":
        try:
            return get_backend(backend).linear(input, weight, bias, source, name)
        except Unsupported as why:
            _fallback(name, why)
    return simulate.linear(input, weight, bias, source, name)


def conv(
    input: Tensor, weight: Tensor, bias: Tensor | None, ops: ConvOps, source: PlanSource, name: str
) -> Tensor:
    """A convolution (``ops``) on ``source.plan.backend``."""
    backend = source.plan.backend
    if backend == "auto":
        backend = auto.conv_backend(auto.resolve(source.plan, input.device), input.device.type)
    if backend != "simulate":
        try:
            return get_backend(backend, "conv").conv(input, weight, bias, ops, source, name)
        except Unsupported as why:
            _fallback(name, why)
    return simulate.conv(input, weight, bias, ops, source, name)
