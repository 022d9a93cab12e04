"""Built-in models, by the names the CLI's ``--model`` takes."""

from .registry import build_model, get_model_info, list_models, register_model

__all__ = ["build_model", "get_model_info", "list_models", "register_model"]
