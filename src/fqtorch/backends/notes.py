"""One log line per distinct message: which path a backend takes and why (logger
``fqtorch.backends``, shown by the CLI; ``logging.basicConfig(level=logging.INFO)`` elsewhere).

A layer call can ask on every step; the line is said once per process, like a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

__all__ = ["compile_disabled", "say_once", "user_stacklevel"]

# Frames in these directories are fqtorch's or PyTorch's own (a layer's forward runs under
# torch.nn.Module's call machinery): a warning is attributed to the first frame outside them.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (os.path.dirname(__file__), torch.__file__)  # fqtorch/, torch/
)

logger = logging.getLogger("fqtorch.backends")


@functools.cache
def say_once(message: str) -> None:
    """Log ``message`` at INFO the first time it is asked for: a process-wide memo of what was
    said, keyed by the text (what a line says, not who asked), grown once per distinct line and
    read afterwards; tests clear it with ``say_once.cache_clear()``."""
    logger.info(message)


def compile_disabled() -> bool:
    """Whether ``torch.compile`` runs functions eagerly here (``TORCH_COMPILE_DISABLE=1``)."""
    return bool(torch._dynamo.config.disable)


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised by the caller of this function to the
    first frame outside fqtorch and PyTorch: the user's line that called the layer or function,
    not ``torch/nn/modules/module.py``."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
