"""A random Hadamard transform in front of any quantizer (docs/method.md §12).

``Q'(x) = T⁻¹ Q(T x)`` with ``T`` a block-diagonal Walsh–Hadamard matrix with random signs
(:class:`~.hadamard.RandomizedHadamardTransform`, blocks of 16 or 32), applied along the GEMM's
reduction dimension (``dim``: 1 mixes within a row, 0 within a column), so that in a real GEMM it
could be folded into the other operand (``G W = (G T)(Tᵀ W)``); in the simulation its inverse is
applied after quantization. ``T`` is orthogonal and drawn independently of the rounding noise, so
``Q'`` is unbiased whenever ``Q`` is, and ``‖Q'(x) − x‖ = ‖Q(Tx) − Tx‖``. It spreads an outlier
over its block: the block's scale, set by its largest magnitude, shrinks towards the block's RMS
(the recipe of the MXFP4 and NVFP4 training papers).

The signs come from the layer's generator, drawn before the quantizer's own noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import QuantizedTensor, Quantizer, as_rows, check_float, compute_dtype
from .hadamard import RandomizedHadamardTransform, block_exponents

__all__ = [
    "TRANSFORMS",
    "ChannelLayout",
    "ColumnTransform",
    "HadamardThen",
    "channels_view",
    "is_channel_tensor",
    "with_transform",
]

# Transform names FQTConfig accepts, and their block sizes.
TRANSFORMS = {"rht16": 16, "rht32": 32}


@dataclass(frozen=True)
class ColumnTransform:
    """A row transform applied to the transpose: mixes the columns of a 2-D tensor."""

    rows: RandomizedHadamardTransform

    def forward(self, x: Tensor) -> Tensor:
        return self.rows.forward(x.T).T

    def inverse(self, y: Tensor) -> Tensor:
        return self.rows.inverse(y.T).T


def is_channel_tensor(x: Tensor, dim: int) -> bool:
    """Whether ``x`` is a convolution tensor ``(N, C, *S)`` (4-D or 5-D) whose GEMM reduction runs
    along its channels: ``dim == 1``. Its 2-D row view ``(N, C·S)`` would put a block over the
    spatial positions of one channel; blocks and transforms must mix channels at one ``(n, s)``.
    3-D tensors keep the row view: a conv1d ``(N, C, L)`` cannot be told from a batched matmul
    operand ``(B, M, K)``, whose reduction is its last dim (docs/method.md §12)."""
    return dim == 1 and x.dim() >= 4


def channels_view(x: Tensor) -> Tensor:
    """``(N, C, *S)`` as ``(N·S, C)``: one row per sample and position, channels along it."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def from_channels(view: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of :func:`channels_view` for a tensor of ``shape``."""
    return view.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


@dataclass(frozen=True)
class ChannelLayout:
    """Undoes a channel view (:func:`channels_view`) at decode time, with what was applied in it.

    ``first``: the inner quantizer's own transform, undone on its 2-D view; ``mixing``: a row
    transform of the ``(N·S, C)`` view, undone last; ``mixed_shape``: the shape of what the
    inner quantizer was handed (channels padded to whole transform blocks). Returns a tensor of
    ``shape``.
    """

    shape: torch.Size
    first: object | None = None
    mixing: ColumnTransform | None = None
    mixed_shape: torch.Size | None = None

    def inverse(self, values: Tensor) -> Tensor:
        if self.first is not None:
            values = self.first.inverse(values)  # type: ignore[attr-defined]
        if self.mixing is None:
            return from_channels(values, self.shape)
        view = self.mixing.inverse(channels_view(values.reshape(self.mixed_shape or self.shape)))
        return from_channels(view, self.shape)


class HadamardThen(Quantizer):
    """``inner`` after a random Hadamard transform of ``block`` entries along ``dim``.

    Quantizers with their own transform (``bhq``, ``rht``) are refused: a second transform in
    front of theirs has no use the transform alone lacks.
    """

    def __init__(self, inner: Quantizer, block: int = 16, dim: int = 1) -> None:
        if not isinstance(inner, Quantizer):
            raise TypeError(f"HadamardThen expects a Quantizer, got {type(inner).__name__}")
        if inner.name in ("bhq", "rht", "identity"):
            raise ValueError(
                f"a Hadamard transform cannot precede {inner.name!r}: it needs a quantizer "
                "without a transform of its own"
            )
        if block not in TRANSFORMS.values():
            raise ValueError(f"transform block must be one of {sorted(TRANSFORMS.values())}")
        if dim not in (0, 1):
            raise ValueError(f"transform dim must be 0 or 1 (an axis of the 2-D view), got {dim}")
        self.inner, self.block, self.dim = inner, block, dim
        self.bits, self.rounding, self.fused = inner.bits, inner.rounding, inner.fused
        self.name = f"{inner.name}+rht{block}"

    @property
    def unbiased(self) -> bool:
        return self.inner.unbiased

    @property
    def bits_per_element(self) -> float:
        return float(getattr(self.inner, "bits_per_element", self.inner.bits))

    def _length(self, x2d: Tensor, dim: int) -> tuple[int, int]:
        length = x2d.shape[dim]
        return length, -(-length // self.block) * self.block

    def _view(self, x: Tensor) -> tuple[Tensor, int, bool]:
        """(2-D view, the axis mixed in it, whether it is the channel view)."""
        if is_channel_tensor(x, self.dim):
            return channels_view(x), 1, True
        return as_rows(x), self.dim, False

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        check_float(x, self.name)
        x2d, dim, channels = self._view(x)
        x2d = x2d.to(compute_dtype(x))
        length, padded = self._length(x2d, dim)
        bits = torch.randint(0, 2, (padded,), generator=generator, device=x.device)
        signs = (2 * bits - 1).to(x2d.dtype)
        # One exact 2^-e for the whole tensor (.hadamard), not one per block as rht's: the inner
        # quantizer's groups (a row's grid along the blocks, per tensor, MX blocks of 32 after
        # rht16) can span several blocks, and scaled unevenly their noise passed the bound 12x.
        lines = x2d if dim == 0 else x2d.T  # mixed along dim 0
        exponent = block_exponents(lines, padded)
        rows = RandomizedHadamardTransform(signs, self.block, length, exponent)
        transform = rows if dim == 0 else ColumnTransform(rows)
        if channels:
            # The inner quantizer sees the mixed tensor in x's shape and lays it out as it would x.
            mixed_shape = torch.Size((x.shape[0], padded, *x.shape[2:]))  # channels padded
            mixed = from_channels(transform.forward(x2d), mixed_shape)
            encoded = self.inner.encode(mixed, generator)
            layout = ChannelLayout(x.shape, encoded.transform, transform, mixed_shape)  # type: ignore[arg-type]
            return dataclasses.replace(encoded, transform=layout, shape=x.shape, dtype=x.dtype)
        encoded = self.inner.encode(transform.forward(x2d), generator)
        return dataclasses.replace(encoded, transform=transform, shape=x.shape, dtype=x.dtype)

    def variance_bound(self, x: Tensor) -> Tensor:
        """A bound for every sign draw. Entry ``j`` of ``T x`` is at most
        ``a_j = Σ_{k∈block(j)} |x_k| / √block`` in magnitude. A float format's bound grows with
        magnitudes (:meth:`~.formats.FormatQuantizer.mixed_bound` of ``a``); a uniform grid's with
        its groups' ranges, at most ``2·max a`` for ``Tx`` and at least ``max a`` for ``a`` with
        alternating (checkerboard) signs, so 4× the inner bound of that tensor bounds it."""
        check_float(x, self.name)
        x2d, dim, channels = self._view(x)
        x2d = x2d.to(torch.float64)
        lines = x2d if dim == 0 else x2d.T  # mixed along dim 0
        length, padded = self._length(x2d, dim)
        a = torch.cat([lines.abs(), lines.new_zeros(padded - length, lines.shape[1])])
        sums = a.reshape(-1, self.block, a.shape[1]).sum(1) / self.block**0.5
        a = sums.repeat_interleave(self.block, dim=0)  # padded too: the inner quantizes them
        a = a if dim == 0 else a.T
        rows, cols = (torch.arange(n, device=a.device) for n in a.shape)
        index = rows[:, None] + cols[None, :]
        checker = 1 - 2 * (index % 2).to(a.dtype)
        a, signed = a, a * checker
        if channels:  # the inner quantizer's bound of the tensor it is handed
            mixed_shape = torch.Size((x.shape[0], padded, *x.shape[2:]))
            a, signed = from_channels(a, mixed_shape), from_channels(signed, mixed_shape)
        mixed_bound = getattr(self.inner, "mixed_bound", None)
        if mixed_bound is not None:
            return mixed_bound(a)
        return 4 * self.inner.variance_bound(signed)

    def __repr__(self) -> str:
        return f"rht{self.block}(dim={self.dim})->{self.inner!r}"


def with_transform(quantizer: Quantizer, transform: str | None, dim: int) -> Quantizer:
    """``quantizer`` behind the named transform along ``dim`` (unchanged for ``None``)."""
    if transform is None:
        return quantizer
    if transform not in TRANSFORMS:
        raise ValueError(
            f"transform must be one of {sorted(TRANSFORMS)} or None, got {transform!r}"
        )
    return HadamardThen(quantizer, TRANSFORMS[transform], dim)
