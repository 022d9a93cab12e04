"""The quantizer interface and the registry every tool looks quantizers up in.

A quantizer maps a floating-point tensor onto a grid of ``2**bits`` levels and back. Rows are dim 0:
a tensor of more dims is viewed as ``(rows, -1)`` (one row per sample), a 1-D tensor as a column.

Every quantizer can hand out its integer codes (:meth:`Quantizer.encode`) as a
:class:`QuantizedTensor` whose value is ``transform.inverse(codes * scale + bias)``: ``scale`` and
``bias`` broadcast over the 2-D view (one per tensor, row or column), and ``transform`` is an
optional invertible row-mixing map (BHQ's block Householder reflection, docs/method.md §4).
An integer backend runs its GEMM on ``codes`` and applies ``scale``, ``bias`` and ``transform``
outside it.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from .fused import Kernel, LazyCompiled
from .rounding import Noise, draw_keys

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "ROUNDINGS",
    "QuantizedTensor",
    "Quantizer",
    "RowTransform",
    "get_quantizer",
    "list_quantizers",
    "register_quantizer",
]

MIN_BITS = 2
MAX_BITS = 8
ROUNDINGS = ("stochastic", "nearest")


class RowTransform(Protocol):
    """An invertible map that mixes rows (a left multiplication ``T @ x``)."""

    def forward(self, x: Tensor) -> Tensor: ...

    def inverse(self, y: Tensor) -> Tensor: ...

    def inverse_column_norms_sq(self) -> Tensor:
        """``‖T⁻¹ e_i‖²`` for every row ``i``: how much noise on row ``i`` of ``T x`` costs."""
        ...


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes with what it takes to turn them back into values.

    ``value = transform.inverse(codes * scale + bias)`` reshaped to ``shape``; ``codes`` is the
    2-D ``(rows, cols)`` view in an ``int8`` container whatever the bit width (the FP8 formats
    store theirs as ``float8_e4m3fn`` / ``float8_e5m2``; block formats subclass this:
    :mod:`.formats`).
    """

    codes: Tensor  # (rows, cols) int8
    scale: Tensor  # broadcasts to codes: (1, 1), (rows, 1) or (1, cols)
    bias: Tensor  # same shape as scale
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    transform: RowTransform | None = None

    def dequantize(self, fused: bool = False) -> Tensor:
        """The values; ``fused=True`` decodes in one compiled kernel (same result)."""
        decode = _decode_fused if fused else _decode
        values = decode(self.codes, self.scale, self.bias)
        if self.transform is not None:
            values = self.transform.inverse(values)
        return values.reshape(self.shape).to(self.dtype)


def _decode(codes: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    # ``codes * scale + bias``, in place on a fresh copy of the codes (copy=True: never on the
    # codes themselves, whatever their dtype) to spare two full-size temporaries; out of place
    # where scale or bias would widen the result's shape or dtype (the same values either way).
    values = codes.to(scale.dtype, copy=True)
    widens = torch.broadcast_shapes(codes.shape, scale.shape, bias.shape) != codes.shape
    if widens or _result_dtype(values, bias) != values.dtype:
        return values * scale + bias
    return values.mul_(scale).add_(bias)


def _result_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """``torch.result_type(a, b)`` for floating tensors, from their dtypes and dimensions alone:
    traceable (``torch.compile`` breaks its graph on ``result_type``). A 0-dim tensor beside a
    dimensioned one of the same category takes the other's dtype."""
    if (a.dim() == 0) == (b.dim() == 0):
        return torch.promote_types(a.dtype, b.dtype)
    return a.dtype if b.dim() == 0 else b.dtype


_decode_fused = LazyCompiled(_decode)


def as_rows(x: Tensor) -> Tensor:
    """The 2-D ``(rows, -1)`` view a quantizer works on (a 1-D tensor is a column)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], -1)


def compute_dtype(x: Tensor) -> torch.dtype:
    """Statistics and rounding run in float32 (float64 stays float64, for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_bits(bits: object, what: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{what} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{what} must be in {MIN_BITS}..{MAX_BITS} (integer codes in an int8 container), "
            f"got {bits}"
        )
    return bits


def check_rounding(rounding: object) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding  # type: ignore[return-value]


class Quantizer(abc.ABC):
    """Base class: ``q(x, generator=None) -> Tensor`` of the same shape and dtype.

    Subclasses implement :meth:`encode` and :meth:`variance_bound`; calling the quantizer returns
    the dequantized values. With ``rounding="stochastic"`` the quantizer is unbiased,
    ``E[q(x)] = x``; with ``"nearest"`` it is deterministic and biased.

    A bf16 or fp16 ``x`` is quantized in float32 and its values are returned in ``x``'s dtype,
    rounded to nearest: grid points are rarely bf16/fp16 numbers, so that final rounding biases
    each entry by up to half an ulp of the dtype. For unbiased values of a half-precision
    tensor, pass ``x.float()`` (the FQT layers quantize gradients in float32: docs/method.md §9).

    ``fused=True`` runs the quantizer as a ``torch.compile``'d kernel (:mod:`.fused`) whose
    uniforms come from a counter-based hash keyed by two draws from the generator, instead of
    ``torch.rand``: a different (equally unbiased, equally reproducible) noise stream, the same
    codes compiled or eager.
    """

    name: str = "?"
    # Whether encoding treats a row's elements alike, so that quantizing ``x[:, π]`` for a
    # permutation ``π`` of the columns gives the values of quantizing ``x``, permuted by ``π``
    # (exactly for nearest rounding, in distribution for stochastic rounding): groups of whole
    # rows or of single columns, transforms that mix rows only. The backends then read a
    # convolution's gradient sample as (H, W, C), the order of channels-last memory
    # (:func:`fqtorch.backends.base.hwc_rows`). Block formats and transforms along the row are
    # not.
    column_equivariant: bool = False
    # Whether encoding draws random numbers of its own (a random transform's signs), so that
    # it is random even with round-to-nearest: not a forward quantizer (FQTConfig refuses it
    # there), whose value the QAT gradient takes as fixed (docs/method.md §3).
    random_transform: bool = False

    def __init__(self, bits: int = 8, *, rounding: str = "stochastic", fused: bool = False) -> None:
        self.bits = check_bits(bits)
        self.rounding = check_rounding(rounding)
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        self.fused = fused

    def noise(self, generator: torch.Generator | None, device: torch.device) -> Noise:
        """What :func:`~.rounding.round_to_grid` draws from: hash keys when fused, else the
        generator (nothing for nearest rounding)."""
        if self.rounding == "nearest":
            return None
        return draw_keys(generator, device) if self.fused else generator

    def kernel(self, fused_kernel: Kernel) -> Callable[..., Any]:
        """The compiled kernel when the quantizer is fused, else its eager function."""
        return fused_kernel if self.fused else fused_kernel.fn

    @property
    def unbiased(self) -> bool:
        """Whether ``E[q(x)] = x`` for every float32/float64 ``x``, up to floating-point
        rounding: stochastic rounding is unbiased for the grid position as computed (to the
        uniforms' resolution, under ``2**-24`` of a step: :mod:`.rounding`), and the float32
        arithmetic of that position and of the decoded grid points moves each entry's mean by a
        few ulp of its group's largest magnitude (docs/method.md §4); a bf16/fp16 result is
        rounded to nearest in its dtype: see the class docstring."""
        return self.rounding == "stochastic"

    @property
    def levels(self) -> int:
        """Number of grid points of the code, ``2**bits``; ``B = levels - 1`` bins."""
        return 2**self.bits

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_float(x, self.name)
        return self.encode(x, generator).dequantize(fused=self.fused)

    @abc.abstractmethod
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> QuantizedTensor:
        """Quantize ``x`` to integer codes; the random draws come from ``generator``."""

    @abc.abstractmethod
    def variance_bound(self, x: Tensor) -> Tensor:
        """A 0-d tensor bounding ``E‖q(x) − x‖²_F`` (docs/method.md §4)."""

    def __repr__(self) -> str:
        fused = ", fused" if self.fused else ""
        return f"{self.name}({self.bits}, {self.rounding}{fused})"


def check_float(x: object, who: str, empty: bool = False) -> None:
    """A floating-point tensor, with elements unless ``empty`` (the identity quantizer)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0 and not empty:  # (FQT layers pass empty batches around quantizers)
        raise ValueError(
            f"{who} expects a tensor with elements, got shape {tuple(x.shape)}: there is nothing "
            "to quantize"
        )


def uniform_bound(count_per_group: int | Tensor, steps: Tensor) -> Tensor:
    """``Σ_groups count · Δ²/4``: the rounding-noise bound of a uniform grid with step ``Δ``.

    Stochastic rounding of a value at fraction ``f`` of a step has variance ``f(1 − f)Δ² ≤ Δ²/4``;
    nearest rounding errs by at most ``Δ/2``, so the same bound holds for it.
    """
    steps = torch.nan_to_num(steps, nan=math.inf)
    return (count_per_group * steps.square() / 4).sum()


_REGISTRY: dict[str, type[Quantizer]] = {}

Q = TypeVar("Q", bound=type[Quantizer])


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator: make a :class:`Quantizer` subclass available under ``name``.

    Every tool (layers, variance analysis, CLI) then picks it up. A duplicate name raises.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"quantizer name must be a Python identifier, got {name!r}")

    def decorate(cls: Q) -> Q:
        if name in _REGISTRY:
            raise ValueError(
                f"a quantizer named {name!r} is already registered ({_REGISTRY[name].__qualname__})"
            )
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"@register_quantizer({name!r}) expects a Quantizer subclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_quantizers() -> list[str]:
    """Names of all registered quantizers, sorted."""
    return sorted(_REGISTRY)


def get_quantizer(name: str, bits: int = 8, **options: object) -> Quantizer:
    """Build the quantizer registered as ``name`` (``rounding=...`` and quantizer options)."""
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantizer {name!r}; known quantizers: {', '.join(list_quantizers())}"
        ) from None
    return cls(bits, **options)  # type: ignore[arg-type]


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def has_random_transform(name: str) -> bool:
    """Whether the quantizer registered as ``name`` draws random numbers whatever its rounding
    (``Quantizer.random_transform``)."""
    cls = _REGISTRY.get(name)
    return cls is not None and cls.random_transform
