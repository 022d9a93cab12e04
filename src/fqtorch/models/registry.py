"""A registry of model builders: ``build_model(name, num_classes=..., **options)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["ModelInfo", "build_model", "get_model_info", "list_models", "register_model"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    task: str  # "image" or "text"
    summary: str


_MODELS: dict[str, ModelInfo] = {}


def register_model(name: str, *, task: str, summary: str) -> Callable:
    """Decorator: make a builder available as ``--model name``; a duplicate name raises."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, builder, task, summary)
        return builder

    return decorate


def _load() -> None:
    from . import cnn, gpt, resnet  # noqa: F401  (registration side effect)


def list_models() -> list[str]:
    _load()
    return sorted(_MODELS)


def get_model_info(name: str) -> ModelInfo:
    _load()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build_model(name: str, **options: object) -> nn.Module:
    """Build the model registered as ``name`` (options go to its builder)."""
    return get_model_info(name).builder(**options)
