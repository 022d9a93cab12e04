"""Whose line a warning names: the user's, not fqtorch's or PyTorch's own frames.

fqtorch warns from deep inside layer calls (under ``torch.nn.Module.__call__``), backward
passes, compiled-kernel wrappers and planners; a fixed ``stacklevel`` names one of those
internal lines. :func:`user_stacklevel` walks out to the first frame outside both packages.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["FQTWarning", "user_stacklevel"]

# Frames in these directories are fqtorch's or PyTorch's own (a layer's forward runs under
# torch.nn.Module's call machinery): a warning is attributed to the first frame outside them.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (os.path.dirname(os.path.abspath(__file__)), torch.__file__)  # fqtorch/, torch/
)


class FQTWarning(RuntimeWarning):
    """fqtorch's own warnings (a layer left on a slower path, a planner's assumption). A
    ``RuntimeWarning``, so filters on that category match them; the command line says them
    without a category, and another library's warnings with theirs."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning raised by the caller of this function to the
    first frame outside fqtorch and PyTorch: the user's line that called the layer or function,
    not ``torch/nn/modules/module.py``. Where every frame is internal (a backward pass on an
    autograd worker thread, ``python -m fqtorch``), the outermost one."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
