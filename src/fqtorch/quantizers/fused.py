"""Fused quantization kernels: the quantizers' tensor code, compiled lazily by ``torch.compile``.

A quantizer built with ``fused=True`` runs its whole encode — range reduction, scaling, noise,
stochastic rounding, clamping, int8 conversion (and BHQ's transform) — as one compiled graph, whose
uniforms come from :func:`~fqtorch.quantizers.rounding.hash_uniform` inside the loop instead of a
separate ``torch.rand`` pass. Eager and compiled runs of the same kernel give the same codes, so:

* compilation happens on the first call, not at import; ``torch.compile`` caches a graph per
  shape (and switches to a dynamic-shape graph once it sees a second shape);
* with ``torch.compile`` disabled (``TORCH_COMPILE_DISABLE=1``) or unable to build a kernel
  here (say, no C++ compiler), the same function runs eagerly — slower, same results — after
  one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LazyCompiled", "lazy_compile"]


class LazyCompiled:
    """``fn``, compiled by ``torch.compile`` on first call; eager ``fn`` where compiling fails.

    The wrapper is a memo of compiled code (like ``torch.compile``'s own cache); it holds no
    state that changes results: eager and compiled runs compute the same thing.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._broken = False

    def __call__(self, *args: Any) -> Any:
        if self._broken:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args)
        except Exception as error:  # any compiler failure: fall back below
            result = self.fn(*args)  # a genuine error in fn raises here, unchanged
            self._broken = True
            warnings.warn(
                f"fqtorch: torch.compile failed for {self.fn.__qualname__} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                "running it eagerly from now on (same results, slower)",
                RuntimeWarning,
                stacklevel=2,
            )
            return result

    def __repr__(self) -> str:
        return f"LazyCompiled({self.fn.__qualname__})"


def lazy_compile(fn: Callable[..., Any]) -> LazyCompiled:
    """Decorator form of :class:`LazyCompiled`."""
    return LazyCompiled(fn)
