"""``quantize_model`` / ``dequantize_model``: swap float layers for FQT layers and back, in place.

The FQT layers reuse the original Parameter objects, so an optimizer built before the swap keeps
working and ``state_dict()`` keys and values are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import FQTConfig
from .nn.modules import FQTConv1d, FQTConv2d, FQTLinear, FQTModule

__all__ = [
    "dequantize_model",
    "fqt_modules",
    "generator_states",
    "load_generator_states",
    "quantize_model",
    "reseed",
]

log = logging.getLogger(__name__)

ConfigFn = Callable[[nn.Module, str], "FQTConfig | None"]
_SWAPS: dict[type[nn.Module], type[FQTModule]] = {
    nn.Linear: FQTLinear,
    nn.Conv1d: FQTConv1d,
    nn.Conv2d: FQTConv2d,
}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _config_for(config: FQTConfig | ConfigFn, module: nn.Module, name: str) -> FQTConfig | None:
    if isinstance(config, FQTConfig):
        return config
    chosen = config(module, name)
    if chosen is not None and not isinstance(chosen, FQTConfig):
        raise TypeError(
            f"the config callable must return an FQTConfig or None, got {type(chosen).__name__} "
            f"for module {name!r}"
        )
    return chosen


def quantize_model(
    model: nn.Module,
    config: FQTConfig | ConfigFn,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of ``model`` for its FQT layer.

    Args:
        model: converted in place (and returned; if ``model`` itself is a Linear/Conv, the new
            FQT layer is returned and must be used instead).
        config: one :class:`FQTConfig` for all layers, or a callable
            ``(module, qualified_name) -> FQTConfig | None`` (``None`` leaves that layer float).
        module_filter_fn: ``(module, qualified_name) -> bool``; only layers it accepts are swapped.

    Only these exact types are swapped (subclasses such as attention's ``out_projection``, whose
    forward bypasses the module, are left alone). Raises ``ValueError`` when nothing is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(config, FQTConfig) or callable(config)):
        raise TypeError(f"config must be an FQTConfig or a callable, got {type(config).__name__}")
    candidates = [(n, m) for n, m in model.named_modules() if type(m) in _SWAPS]
    if module_filter_fn is not None:
        candidates = [(n, m) for n, m in candidates if module_filter_fn(m, n)]
    swapped = 0
    for name, module in candidates:
        layer_config = _config_for(config, module, name)
        if layer_config is None:
            continue
        fqt = _SWAPS[type(module)](module, layer_config, name=name).train(module.training)
        if not name:
            return fqt
        _set_submodule(model, name, fqt)
        swapped += 1
    if swapped == 0:
        found = sum(type(m) in _SWAPS for _, m in model.named_modules())
        why = "the module filter / config callable accepted none" if found else "there are none"
        raise ValueError(
            f"quantize_model swapped no layer: {found} nn.Linear/nn.Conv1d/nn.Conv2d modules "
            f"found, and {why}"
        )
    log.debug("quantize_model: %d layers swapped for FQT layers", swapped)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every FQT layer back for the float layer on the same Parameters (in place)."""
    if isinstance(model, FQTModule):
        return model.to_float()
    for name, module in list(model.named_modules()):
        if isinstance(module, FQTModule):
            _set_submodule(model, name, module.to_float())
    return model


def fqt_modules(model: nn.Module) -> dict[str, FQTModule]:
    """The FQT layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FQTModule)}


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every FQT layer's noise stream from ``seed`` (e.g. ``seed + rank`` under DDP)."""
    for module in fqt_modules(model).values():
        module.reseed(seed)


def generator_states(model: nn.Module) -> dict[str, Tensor]:
    """The generator state of every FQT layer that has drawn noise (for checkpoints)."""
    states = {n: m.generator_state() for n, m in fqt_modules(model).items()}
    return {n: s for n, s in states.items() if s is not None}


def load_generator_states(
    model: nn.Module, states: dict[str, Tensor], device: torch.device | str = "cpu"
) -> None:
    """Restore what :func:`generator_states` saved; unknown layer names raise ``KeyError``."""
    layers = fqt_modules(model)
    unknown = sorted(set(states) - set(layers))
    if unknown:
        raise KeyError(f"generator states for layers that are not FQT layers here: {unknown}")
    for name, state in states.items():
        layers[name].set_generator_state(state, torch.device(device))
