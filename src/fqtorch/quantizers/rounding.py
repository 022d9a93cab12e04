"""Rounding onto an integer grid: round-to-nearest and stochastic rounding.

Stochastic rounding ``SR(v) = floor(v + u)``, ``u ~ U[0, 1)``, rounds up with probability
``frac(v)``, so ``E[SR(v)] = v`` and ``Var[SR(v)] = frac(v)(1 − frac(v)) ≤ 1/4`` (PAPER.md §4).

The uniforms come from one of two explicit sources, so a seed fixes every draw either way:

* a ``torch.Generator``: ``torch.rand`` (the default, fastest without ``torch.compile``);
* a pair of 32-bit *keys* (an int64 tensor drawn from the generator by :func:`draw_keys`):
  :func:`hash_uniform`, a counter-based hash of ``(keys, element index)``. It is pure integer
  arithmetic, so a ``torch.compile``'d kernel computes it inside the fused quantize loop — no
  separate pass to draw noise — and gives bit for bit the same uniforms as the eager code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Noise", "draw_keys", "hash_uniform", "round_to_grid"]

# Where the uniforms come from: a generator (``torch.rand``), hash keys, or ``None`` (the
# default generator; only for nearest rounding or ad hoc use).
Noise = torch.Generator | Tensor | None

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so the int64
# arithmetic never overflows (well defined in eager, C++ and Triton code alike).
_MUL1 = 0x7FEB352D
_MUL2 = 0x4C1B3C6D
_UNIFORM_BITS = 24  # float32 holds every multiple of 2**-24 in [0, 1) exactly


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mixer (xor-shift / multiply rounds) on int64 values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def draw_keys(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Two fresh 32-bit keys (int64 tensor on ``device``) for :func:`hash_uniform`.

    Drawn on the generator's own device, so nothing waits on the host on CUDA.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.randint(
        0, 2**32, (2,), generator=generator, dtype=torch.int64, device=gen_device
    )
    return keys.to(device, non_blocking=True)


def hash_uniform(shape: torch.Size | tuple[int, ...], keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniforms on ``[0, 1)`` (multiples of ``2**-24``), one per element, from ``keys``.

    Element ``i`` (row-major index) gets ``mix(mix(lo32(i) ^ k0) ^ (k1 + hi32(i)))``'s top 24
    bits: distinct indices give independent-looking draws, and the same keys the same draws.
    """
    numel = 1
    for size in shape:
        numel *= size
    index = torch.arange(numel, dtype=torch.int64, device=keys.device)
    high_key = (keys[1] + (index >> 32)) & _MASK32
    h = _mix32(_mix32((index & _MASK32) ^ keys[0]) ^ high_key)
    uniform = (h >> (32 - _UNIFORM_BITS)).to(dtype) * (2.0**-_UNIFORM_BITS)
    return uniform.reshape(shape)


def round_to_grid(v: Tensor, rounding: str, low: float, high: float, noise: Noise = None) -> Tensor:
    """Round ``v`` (in grid units) to an integer in ``[low, high]``, as a float tensor.

    ``v`` must be a temporary: it is overwritten. ``noise`` is a generator or hash keys.
    """
    if rounding == "nearest":
        rounded = v.round_()
    else:
        if isinstance(noise, Tensor):
            uniform = hash_uniform(v.shape, noise, v.dtype)
        else:
            uniform = torch.rand(v.shape, generator=noise, dtype=v.dtype, device=v.device)
        rounded = v.add_(uniform).floor_()
    return rounded.clamp_(low, high)


def to_codes(rounded: Tensor, offset: int) -> Tensor:
    """Shift grid indices ``0..2**bits - 1`` by ``-offset`` into an ``int8`` container."""
    if offset:
        rounded = rounded.sub_(offset)
    return rounded.to(torch.int8)
