"""One log line per distinct message: which path a backend takes and why (logger
``fqtorch.backends``, shown by the CLI; ``logging.basicConfig(level=logging.INFO)`` elsewhere).

A layer call can ask on every step; the line is said once per process, like a warning.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from ..quantizers.callers import FQTWarning, user_stacklevel

__all__ = ["compile_disabled", "outside_tracing", "say_once", "warn_once"]

logger = logging.getLogger("fqtorch.backends")


def outside_tracing(memo):
    """``memo`` (a :func:`functools.cache`) run eagerly when a compiled model calls it: traced,
    dynamo would skip the cache (warning about it) and log, warn or probe from inside the graph.
    ``cache_clear`` and ``cache_info`` kept."""
    run = torch.compiler.disable(memo)
    run.cache_clear, run.cache_info = memo.cache_clear, memo.cache_info
    return run


@outside_tracing
@functools.cache
def say_once(message: str) -> None:
    """Log ``message`` at INFO the first time it is asked for: a process-wide memo of what was
    said, keyed by the text (what a line says, not who asked), grown once per distinct line and
    read afterwards; tests clear it with ``say_once.cache_clear()``."""
    logger.info(message)


@outside_tracing
@functools.cache
def warn_once(message: str, category: type[Warning] = FQTWarning) -> None:
    """Warn ``message`` the first time it is asked for, attributed to the user's line. Python's
    own once-per-location filter is not enough: ``torch.compile`` and autograd reset or bypass
    it, so a layer's fallback was warned on every pass (``say_once``'s memo, for warnings)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def compile_disabled() -> bool:
    """Whether ``torch.compile`` runs functions eagerly here (``TORCH_COMPILE_DISABLE=1``)."""
    return bool(torch._dynamo.config.disable)
