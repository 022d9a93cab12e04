"""Fused quantization kernels: the quantizers' tensor code, compiled lazily by ``torch.compile``.

A quantizer built with ``fused=True`` runs its rounding — cast, range reduction, scaling, noise,
stochastic rounding, clamping, int8 conversion — as one compiled graph (and its decode as
another), whose uniforms come from :func:`~fqtorch.quantizers.rounding.hash_uniform` inside the
loop instead of a separate ``torch.rand`` pass. BHQ's row transform is computed inside its
compiled passes on the CPU (its group sums in a fixed order, not a compiled scatter-add); RHT's
stays eager (see their modules). Eager and compiled runs of the same kernel give the same codes, so:

* compilation happens on the first call, not at import, with dynamic shapes: one graph per
  kernel and static configuration (granularity, rounding, dtype, device), whatever the layer
  shapes — a model needs a handful, so each kernel may keep up to :data:`GRAPHS_PER_KERNEL`;
* with ``torch.compile`` disabled (``TORCH_COMPILE_DISABLE=1``) the same function runs eagerly
  — slower, same results; where it cannot build a kernel (say, no C++ compiler), likewise, after
  one warning.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch

from .callers import FQTWarning, user_stacklevel

__all__ = ["GRAPHS_PER_KERNEL", "Kernel", "LazyCompiled"]

# Graphs one kernel may hold (dynamo's default limit, 8, is meant for one call site; a quantizer
# kernel serves every layer and tensor role of a model).
GRAPHS_PER_KERNEL = 64


# Recent torch.compile takes the recompile limit per function; on older ones it is set around
# each call (torch._dynamo.config.patch: ~30 us a call, and a ResNet step makes ~200 of them).
_LIMIT_PER_FUNCTION = "recompile_limit" in inspect.signature(torch.compile).parameters


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with dynamic shapes, allowed :data:`GRAPHS_PER_KERNEL` graphs."""
    if _LIMIT_PER_FUNCTION:
        return torch.compile(fn, dynamic=True, recompile_limit=GRAPHS_PER_KERNEL)
    return torch.compile(fn, dynamic=True)


# The limit's name in dynamo's config: recompile_limit, cache_size_limit before it was renamed.
_LIMIT_KEY = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)


def _limit_per_call() -> contextlib.AbstractContextManager[Any]:
    """What a compiled call runs in: the recompile limit, where torch cannot take it per
    function."""
    if _LIMIT_PER_FUNCTION:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(**{_LIMIT_KEY: GRAPHS_PER_KERNEL})


class Kernel(Protocol):
    """A quantizer kernel: called, it runs compiled; ``fn`` is the same computation, eager."""

    fn: Callable[..., Any]

    def __call__(self, *args: Any) -> Any: ...


class LazyCompiled:
    """``fn``, compiled by ``torch.compile`` on first call; eager ``fn`` where compiling fails,
    from then on for arguments of those dtypes and devices (one float64 call that Inductor
    cannot compile leaves float32 calls compiled).

    The wrapper is a memo of compiled code (like ``torch.compile``'s own cache); it holds no
    state that changes results: eager and compiled runs compute the same thing (the
    quantizers' codes bit for bit, tested; float epilogues to float32 rounding, since the
    compiler may contract a multiply and an add).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._broken: set[tuple[torch.dtype | None, str]] = set()  # the data's dtype, device
        self._label = f"fqtorch::{fn.__qualname__}"

    @staticmethod
    def _key(args: tuple[Any, ...]) -> tuple[torch.dtype | None, str]:
        """The dtype and device type of the data (the first tensor argument, if any)."""
        data = next((a for a in args if isinstance(a, torch.Tensor)), None)
        return (None, "") if data is None else (data.dtype, data.device.type)

    def compiles(self, data: torch.Tensor) -> bool:
        """Whether a call on ``data`` (its dtype and device) runs compiled: no failure for them
        before (whether or not it has been called yet)."""
        return self._key((data,)) not in self._broken

    def __call__(self, *args: Any) -> Any:
        key = self._key(args)
        if key in self._broken:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = _compile(self.fn)
        # Quantization is not differentiated through: detached arguments keep requires_grad out
        # of the graph guards (one graph serves a layer's input and its weight alike).
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            # Named in a torch.profiler trace (there it is otherwise an anonymous compiled graph);
            # the label costs ~10 us a call, so only while a profiler records.
            named = (
                torch.profiler.record_function(self._label)
                if torch.autograd.profiler._is_profiler_enabled
                else contextlib.nullcontext()
            )
            with named, _limit_per_call():
                return self._compiled(*args)
        except Exception as error:  # any compiler failure: fall back below
            result = self.fn(*args)  # a genuine error in fn raises here, unchanged
            self._broken.add(key)
            kind = f"{key[1]} {str(key[0]).removeprefix('torch.')}"
            warnings.warn(
                f"fqtorch: torch.compile failed for {self.fn.__qualname__} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                f"running it eagerly from now on for {kind} tensors (the same computation, "
                "slower)",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )
            return result

    def __repr__(self) -> str:
        return f"LazyCompiled({self.fn.__qualname__})"
