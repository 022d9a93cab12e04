"""Rounding onto an integer grid: round-to-nearest and stochastic rounding.

Stochastic rounding ``SR(v) = floor(v) + [u < frac(v)]``, ``u ~ U[0, 1)``, rounds up with
probability ``frac(v)``, so ``E[SR(v)] = v`` and ``Var[SR(v)] = frac(v)(1 − frac(v)) ≤ 1/4``
(docs/method.md §4). The CPU generator's float32 uniforms and the hash's (any dtype) are
multiples of ``2**-24``, so the probability is ``frac(v)`` up to that resolution: exactly for a
float32 ``|v| ≥ 1/2`` (its fraction is such a multiple), high by less than ``2**-24`` grid steps
elsewhere (float32 below 1/2, float64 with hash noise). CUDA's generator draws at another
resolution (about ``2**-25`` steps off). The textbook ``floor(v + u)`` is worse in floating
point: the sum rounds to nearest first, so it rounds up with probability ``frac(v) + ulp(v)/2``,
a bias that grows with ``|v|`` (``2**-17`` steps at ``v ≈ 255``). The exact form costs two more
elementwise passes and a temporary in eager code (nothing in a compiled kernel).

The uniforms come from one of two explicit sources, so a seed fixes every draw either way:

* a ``torch.Generator``: ``torch.rand`` (the default, fastest without ``torch.compile``);
* a pair of 32-bit *keys* (an int32 tensor drawn from the generator by :func:`draw_keys`):
  :func:`hash_uniform`, a counter-based hash of ``(keys, element index)``. It is pure integer
  arithmetic, so a ``torch.compile``'d kernel computes it inside the fused quantize loop — no
  separate pass to draw noise — and gives bit for bit the same uniforms as the eager code.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Noise", "draw_keys", "hash_uniform", "round_to_grid", "stochastic_round_"]

# Where the uniforms come from: a generator (``torch.rand``), hash keys, or ``None`` (the
# default generator; only for nearest rounding or ad hoc use).
Noise = torch.Generator | Tensor | None

# Odd 32-bit multipliers of a xor-shift / multiply mixer. The arithmetic runs on int32 tensors
# and relies on two's-complement wrap-around of the products (what PyTorch's CPU and CUDA
# kernels, Inductor's C++ and Triton code do); right shifts are masked, so they act as logical
# shifts on the 32-bit pattern. tests/quantizers/test_fused.py checks the values against a pure
# Python reference.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - 2**32  # as a signed int32
_UNIFORM_BITS = 24  # float32 holds every multiple of 2**-24 in [0, 1) exactly


def _mix32(x: Tensor) -> Tensor:
    """A bijective mixer of 32-bit patterns (int32 tensors), ``lowbias32``'s rounds."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def draw_keys(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Two fresh 32-bit keys (an int32 tensor on ``device``) for :func:`hash_uniform`.

    Drawn on the generator's own device, so nothing waits on the host on CUDA.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.randint(
        -(2**31), 2**31, (2,), generator=generator, dtype=torch.int64, device=gen_device
    )
    return keys.to(device=device, dtype=torch.int32, non_blocking=True)


def index_halves(index: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit halves of int64 indices, as int32 bit patterns."""
    low = ((index & 0xFFFFFFFF) ^ 0x80000000).sub_(0x80000000).to(torch.int32)
    return low, (index >> 32).to(torch.int32)


def hash_uniform(shape: torch.Size | tuple[int, ...], keys: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniforms on ``[0, 1)`` (multiples of ``2**-24``), one per element, from ``keys``.

    Element ``i`` (row-major index, split in 32-bit halves) gets the top 24 bits of
    ``mix(mix(lo(i) ^ k0) ^ (k1 + hi(i)))``: the same keys give the same draws, distinct
    indices or keys independent-looking ones.
    """
    numel = 1
    for size in shape:
        numel *= size
    if numel < 2**31:
        low = torch.arange(numel, dtype=torch.int32, device=keys.device)
        high_key = keys[1]
    else:  # past int32 indices: split the int64 index into two 32-bit halves
        low, high = index_halves(torch.arange(numel, dtype=torch.int64, device=keys.device))
        high_key = keys[1] + high
    h = _mix32(_mix32(low ^ keys[0]) ^ high_key)
    top = (h >> (32 - _UNIFORM_BITS)) & ((1 << _UNIFORM_BITS) - 1)
    return (top.to(dtype) * (2.0**-_UNIFORM_BITS)).reshape(shape)


def stochastic_round_(v: Tensor, uniform: Tensor) -> Tensor:
    """``floor(v) + [uniform < frac(v)]``, overwriting ``v`` and ``uniform`` (temporaries).

    ``frac(v) = v − floor(v)`` is exact for ``v ≥ 0`` and ``v ≤ −1/2`` (Sterbenz's lemma); for
    ``−1/2 < v < 0`` it is ``1 − |v|`` rounded once (by at most ``2**-25`` in float32).
    """
    whole = torch.floor(v)
    up = uniform.lt_(v.sub_(whole))  # 1.0 where the uniform falls below the fraction
    return whole.add_(up)


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
        rounded = stochastic_round_(v, uniform)
    return rounded.clamp_(low, high)


def to_codes(rounded: Tensor, offset: int) -> Tensor:
    """Shift grid indices ``0..2**bits - 1`` by ``-offset`` into an ``int8`` container."""
    if offset:
        rounded = rounded.sub_(offset)
    return rounded.to(torch.int8)
