"""``FQTConfig``: which quantizer sits on which tensor of a layer's three GEMMs (docs/method.md §2).

    output      = input @ weight.T           forward:  Q_input(input), Q_weight(weight)
    grad_input  = grad_output @ weight       backward: Q_grad(grad_output)         (grad_bits)
    grad_weight = grad_output.T @ input      backward: Q_grad_weight(grad_output) (grad_weight_bits)

One frozen dataclass, validated on construction, passed explicitly to every layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .quantizers.base import (
    ROUNDINGS,
    check_bits,
    get_quantizer,
    has_random_transform,
    is_registered,
    list_quantizers,
)
from .quantizers.formats import is_format
from .quantizers.transforms import TRANSFORMS, with_transform

__all__ = ["BACKENDS", "FQTConfig", "fp8_refusal", "int8_refusal"]

BACKENDS = ("simulate", "int8", "auto", "fp8")
# backend="int8": the quantizers each field may name, what that means, and why (_check_int8).
_INT8_QUANTIZERS = {
    "input_quantizer": (
        ("ptq", "symmetric"),
        "one scale per tensor",
        "the forward GEMM sums over the input's columns, the weight-gradient GEMM over its rows",
    ),
    "weight_quantizer": (
        ("ptq", "symmetric"),
        "one scale per tensor",
        "the forward GEMM sums over the weight's columns, the grad_input GEMM over its rows",
    ),
    "grad_quantizer": (
        (None, "identity", "ptq", "symmetric", "psq", "symmetric_per_row", "bhq", "rht"),
        "one scale per tensor or per row, after a row transform or not",
        "the grad_input GEMM sums over grad_output's columns",
    ),
    "grad_weight_quantizer": (
        (None, "identity", "ptq", "symmetric", "per_column"),
        "one scale per tensor or per column and no row transform",
        "the weight-gradient GEMM sums over grad_output's rows",
    ),
}
# backend="fp8" (docs/method.md §12): the same rule with FP8 formats, whose power-of-two scales
# leave ``torch._scaled_mm`` exactly. The presets "fp8_e4m3" and "fp8_e5m2" fit it.
_FP8_TENSOR = ("fp8_e4m3", "fp8_e5m2")
_FP8_ROW = (*_FP8_TENSOR, "fp8_e4m3_per_row", "fp8_e5m2_per_row")
_FP8_QUANTIZERS = {
    "input_quantizer": (
        _FP8_TENSOR,
        "a per-tensor FP8 format",
        "the forward GEMM sums over the input's columns, the weight-gradient GEMM over its rows",
    ),
    "weight_quantizer": (
        _FP8_TENSOR,
        "a per-tensor FP8 format",
        "the forward GEMM sums over the weight's columns, the grad_input GEMM over its rows",
    ),
    "grad_quantizer": (
        (None, "identity", *_FP8_ROW),
        "a per-tensor or per-row FP8 format",
        "the grad_input GEMM sums over grad_output's columns",
    ),
    "grad_weight_quantizer": (
        (None, "identity", *_FP8_ROW),
        "a per-tensor or per-column FP8 format (a *_per_row name scales columns here)",
        "the weight-gradient GEMM sums over grad_output's rows",
    ),
}
_PRESET = re.compile(r"^(ptq|psq|bhq)([2-8])$")
# Float-format recipes (docs/method.md §12): forward quantizer (round-to-nearest), gradient
# quantizer on both backward GEMMs (stochastic rounding), and the transform before it.
_FORMAT_PRESETS = {
    "fp8_e4m3": ("fp8_e4m3", "fp8_e4m3", None),
    "fp8_e5m2": ("fp8_e4m3", "fp8_e5m2", None),  # E4M3 forward, E5M2 gradients
    "mxfp8": ("mxfp8", "mxfp8", None),
    "mxfp4_sr": ("mxfp8", "mxfp4", None),  # MXFP4 backward GEMMs, MXFP8 forward
    "mxfp4_rht_sr": ("mxfp8", "mxfp4", "rht32"),
    "nvfp4_sr": ("nvfp4", "nvfp4", None),
    "nvfp4_rht_sr": ("nvfp4", "nvfp4", "rht16"),
}
# The axis of each role's 2-D view its GEMM sums over: blocks and transforms run along it.
_REDUCTION_DIM = {"input": 1, "weight": 1, "grad_output": 1, "grad_output_weight": 0}


def _refusal(backend: str, table: dict, names: dict[str, str | None], hint: str = "") -> str | None:
    """Why ``backend`` cannot take the quantizers ``names`` (field -> quantizer name, the four
    ``*_quantizer`` fields) under its ``table``, naming the first field at fault; ``None`` when
    it can."""
    for field, (allowed, expected, reason) in table.items():
        name = names[field]
        if name not in allowed:
            return (
                f"backend={backend!r} needs {'an' if field[0] in 'aeiou' else 'a'} {field} "
                f"with {expected} "
                f"({' or '.join(map(repr, allowed))}), got {name!r}: {reason}{hint}"
            )
    return None


def int8_refusal(names: dict[str, str | None]) -> str | None:
    """Why ``backend="int8"`` cannot take the quantizers ``names`` (see :func:`_refusal`)."""
    return _refusal("int8", _INT8_QUANTIZERS, names)


def fp8_refusal(names: dict[str, str | None]) -> str | None:
    """Why ``backend="fp8"`` cannot take the quantizers ``names`` (see :func:`_refusal`)."""
    return _refusal(
        "fp8", _FP8_QUANTIZERS, names, " (e.g. FQTConfig.preset('fp8_e5m2', backend='fp8'))"
    )


def _check_quantizer(field: str, name: object) -> None:
    if not isinstance(name, str) or not is_registered(name):
        raise ValueError(
            f"{field}={name!r} is not a registered quantizer; known quantizers: "
            f"{', '.join(list_quantizers())}"
        )


@dataclass(frozen=True)
class FQTConfig:
    """The quantization plan of an FQT layer.

    Args:
        input_bits, weight_bits: forward bit widths (round-to-nearest), 2..8.
        input_quantizer: forward quantizer of ``input`` (default per-tensor ``"ptq"``).
        weight_quantizer: forward quantizer of ``weight`` (default ``"symmetric"``: per tensor,
            real zero exactly on a code; ``"symmetric_per_row"`` for one scale per output channel).
        grad_bits: bits of ``grad_output`` in the activation-gradient GEMM.
        grad_quantizer: quantizer of ``grad_output`` for ``grad_input``; ``None`` means QAT
            (forward quantized, backward exact).
        grad_weight_bits: bits of ``grad_output`` in the weight-gradient GEMM (default 8).
        grad_weight_quantizer: its quantizer; default ``"ptq"`` when ``grad_quantizer == "ptq"``,
            else ``"per_column"`` (one scale per output feature / output channel), as in the paper.
            ``None`` with ``grad_quantizer=None`` keeps that branch exact too.
        grad_rounding: ``"stochastic"`` (unbiased) or ``"nearest"`` (the biased ablation).
        backend: how the GEMMs run: ``"simulate"`` (float GEMMs on dequantized values),
            ``"int8"`` (``torch._int_mm`` on the integer codes, for Linear and Conv2d layers; a
            grouped or 1-d convolution, or a convolution on CUDA, falls back to simulate with
            a warning) or ``"auto"``: int8 where the device has integer units (a CPU with
            AVX-512 VNNI or AMX, a CUDA GPU of compute capability ≥ 7.5) and the
            quantizers allow it, simulate elsewhere — decided per device at the first layer
            call, with one log line saying which and why (``fqtorch.backends.auto``), so a
            config built on one machine runs well on another. ``"int8"`` takes the quantizers
            whose scales leave the integer GEMMs (docs/method.md §8): per-tensor forward
            operands, per-tensor or per-row ``grad_quantizer``, per-tensor or per-column
            ``grad_weight_quantizer``. ``"fp8"``: ``torch._scaled_mm`` on the FP8 codes, for
            Linear layers (CUDA compute capability ≥ 8.9, or the CPU; convolutions fall back to
            simulate with a warning; ``"auto"`` never picks it). It takes per-tensor FP8 forward
            quantizers and per-tensor or per-row FP8 gradient quantizers, e.g.
            ``FQTConfig.preset("fp8_e5m2", backend="fp8")`` (docs/method.md §12).
        fused: ``None`` (default): ``True`` for ``backend="int8"``, ``"fp8"`` and ``"auto"``
            (their fast path: compiled quantizers and integer-GEMM epilogues), ``False`` for
            simulate;
            resolved when the config is built (``replace`` derives it again for a new
            ``backend`` unless it was given). ``fused=False`` with int8
            runs every kernel eagerly (the debugging path, same codes as simulate's).
            ``True``: run every quantizer's rounding as a ``torch.compile``'d kernel (compiled
            lazily on first use, with dynamic shapes; eager where compilation is off or fails,
            with the same codes; BHQ's and RHT's row transforms stay eager), with its
            stochastic-rounding noise computed inside the kernel by a counter-based hash keyed
            from the layer's generator instead of ``torch.rand``: ≈ 3–7× faster quantization
            on CPU after a few seconds of compilation per quantizer. A different noise stream
            than ``fused=False`` (both unbiased and reproducible from ``seed``); both backends
            give the same codes under either.
        seed: seeds each layer's generator together with the layer's qualified name.
        check_finite: raise ``FloatingPointError`` naming the layer when ``grad_output`` holds NaN
            or Inf. Off by default: then the affected quantization groups turn NaN, which a
            training loop or ``GradScaler`` detects (a device sync per backward when on).
        attention_products: in ``nn.MultiheadAttention``, also run the attention score and value
            products (``Q·Kᵀ`` and ``A·V``) as FQT GEMMs with the same quantizers (``Q`` and
            ``A`` as inputs, ``K`` and ``V`` as weights), not only its input and output
            projections. Off by default: the products then run in float, exactly as torch runs
            them. They run on the simulate backend under either ``backend``.
        grad_transform: ``None``, ``"rht16"`` or ``"rht32"``: a random Hadamard transform of
            blocks of 16 or 32 along the reduction dimension in front of both gradient
            quantizers (docs/method.md §12), signs from the layer's generator. Simulate only.

    A float-format quantizer (``fp8_*``, ``mxfp8``, ``mxfp4``, ``nvfp4``) fixes its own bit width
    (the ``*_bits`` fields are ignored for it) and takes its block direction from its role: along
    the columns of ``grad_output`` for ``grad_input``, along its rows for ``grad_weight``. With one
    as ``grad_quantizer``, ``grad_weight_quantizer`` defaults to the same format.
    """

    input_bits: int = 8
    weight_bits: int = 8
    input_quantizer: str = "ptq"
    weight_quantizer: str = "symmetric"
    grad_bits: int = 8
    grad_quantizer: str | None = None
    grad_weight_bits: int = 8
    grad_weight_quantizer: str | None = None
    grad_rounding: str = "stochastic"
    backend: str = "simulate"
    fused: bool | None = None
    seed: int = 0
    check_finite: bool = False
    attention_products: bool = False
    grad_transform: str | None = None

    def __post_init__(self) -> None:
        for field in ("input_bits", "weight_bits", "grad_bits", "grad_weight_bits"):
            check_bits(getattr(self, field), field)
        for field in ("input_quantizer", "weight_quantizer"):
            _check_quantizer(field, getattr(self, field))
            if has_random_transform(getattr(self, field)):
                raise ValueError(
                    f"{field}={getattr(self, field)!r} draws random signs on every call; a "
                    "forward quantizer must be deterministic (the FQT gradient estimates the "
                    "gradient of a fixed quantized forward): use it as grad_quantizer, or give "
                    "ptq, psq, symmetric or a format here"
                )
        if self.grad_quantizer is not None:
            _check_quantizer("grad_quantizer", self.grad_quantizer)
            if self.grad_weight_quantizer is None:
                default = "ptq" if self.grad_quantizer == "ptq" else "per_column"
                if is_format(self.grad_quantizer):
                    default = self.grad_quantizer  # the format on both backward GEMMs
                object.__setattr__(self, "grad_weight_quantizer", default)
        if self.grad_weight_quantizer is not None:
            _check_quantizer("grad_weight_quantizer", self.grad_weight_quantizer)
        if self.grad_rounding not in ROUNDINGS:
            raise ValueError(
                f"grad_rounding must be one of {ROUNDINGS}, got {self.grad_rounding!r}"
            )
        if self.grad_transform is not None:
            if self.grad_transform not in TRANSFORMS:
                raise ValueError(
                    f"grad_transform must be one of {sorted(TRANSFORMS)} or None, "
                    f"got {self.grad_transform!r}"
                )
            if self.is_qat:
                raise ValueError("grad_transform needs a grad_quantizer to act before, got None")
            for field in ("grad_quantizer", "grad_weight_quantizer"):
                if getattr(self, field) in ("bhq", "rht"):
                    raise ValueError(
                        f"grad_transform={self.grad_transform!r} cannot precede "
                        f"{field}={getattr(self, field)!r}, which has a transform of its own: "
                        "set grad_transform=None"
                    )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "int8":
            self._check_int8()
        if self.backend == "fp8":
            self._check_fp8()
        # Whether fused came from the backend (not given): replace() re-derives it then.
        object.__setattr__(self, "_fused_derived", self.fused is None)
        if self.fused is None:
            object.__setattr__(self, "fused", self.backend != "simulate")
        if not isinstance(self.fused, bool):
            raise TypeError(f"fused must be a bool or None, got {self.fused!r}")
        if not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {self.check_finite!r}")
        if not isinstance(self.attention_products, bool):
            raise TypeError(f"attention_products must be a bool, got {self.attention_products!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        # Build each quantizer once so that bad options fail here, not in the first backward.
        self.build_quantizers()

    def _check_int8(self) -> None:
        """Refuse, naming the field, a quantizer whose scale cannot leave an integer GEMM.

        A scale and zero point come out of a GEMM only if they are constant along the axis
        it sums over (docs/method.md §2, §8). ``input`` and ``weight`` each enter two GEMMs
        that together sum over both of their axes: one scale per tensor (``ptq``,
        ``symmetric``). ``grad_output`` enters ``grad_input``, summed over its columns: per
        tensor or per row, a row transform allowed (``ptq``, ``symmetric``, ``psq``,
        ``symmetric_per_row``, ``bhq``, ``rht``); and ``grad_weight``, summed over its rows:
        per tensor or per column, no transform (``ptq``, ``symmetric``, ``per_column``).
        ``None`` or ``identity`` runs that GEMM in float. Any other quantizer, a newly
        registered one included, is refused until it is listed here
        (``tests/backends/test_int8.py`` runs every accepted combination against simulate).
        """
        self._check_gemm_backend(int8_refusal)

    def _check_fp8(self) -> None:
        """Refuse, naming the field, a quantizer whose codes are not FP8 or whose scale cannot
        leave an FP8 GEMM: the rule of :meth:`_check_int8` with FP8 formats (``fp8_e4m3``,
        ``fp8_e5m2``; ``*_per_row`` where a row or column scale is allowed; block formats
        need block-scaled GEMMs, not implemented). ``None`` or ``identity`` runs that backward
        GEMM in float32 (``tests/backends/test_fp8.py`` runs every accepted combination against
        simulate)."""
        self._check_gemm_backend(fp8_refusal)

    def _check_gemm_backend(self, refusal_of: Any) -> None:
        """The shared rule of :meth:`_check_int8` and :meth:`_check_fp8`: no transform, and the
        quantizers ``refusal_of`` accepts (it names the first field at fault)."""
        if self.grad_transform is not None:
            raise ValueError(
                f"backend={self.backend!r} needs grad_transform=None, got "
                f"{self.grad_transform!r}: the transform runs on the simulate backend only"
            )
        fields = ("input_quantizer", "weight_quantizer", "grad_quantizer", "grad_weight_quantizer")
        refusal = refusal_of({field: getattr(self, field) for field in fields})
        if refusal is not None:
            raise ValueError(refusal)

    @property
    def is_qat(self) -> bool:
        """Whether the backward pass is exact (no gradient quantizer on either branch)."""
        return self.grad_quantizer is None and self.grad_weight_quantizer is None

    def build_quantizers(self) -> dict[str, Any]:
        """The four quantizer objects, keyed by the tensor role they act on."""
        rounding, fused = self.grad_rounding, self.fused
        names = {
            "input": (self.input_quantizer, self.input_bits, "nearest"),
            "weight": (self.weight_quantizer, self.weight_bits, "nearest"),
            "grad_output": (self.grad_quantizer or "identity", self.grad_bits, rounding),
            "grad_output_weight": (
                self.grad_weight_quantizer or "identity",
                self.grad_weight_bits,
                rounding,
            ),
        }
        quantizers = {}
        for role, (name, bits, role_rounding) in names.items():
            dim = _REDUCTION_DIM[role]
            options = {"block_dim": dim} if is_format(name) else {}
            q = get_quantizer(name, bits, rounding=role_rounding, fused=fused, **options)
            if role.startswith("grad") and name != "identity":
                q = with_transform(q, self.grad_transform, dim)
            quantizers[role] = q
        return quantizers

    def replace(self, **changes: Any) -> FQTConfig:
        """A copy with some fields changed (validated again). A ``fused`` that was derived from
        the backend (not given) is derived again from a new ``backend``: int8 without flags is
        its fast path; a ``fused`` given explicitly is kept."""
        if "grad_quantizer" in changes and "grad_weight_quantizer" not in changes:
            changes["grad_weight_quantizer"] = None  # re-derive the paper's default
        if "fused" not in changes and self._fused_derived:
            changes["fused"] = None  # derived again (the same unless the backend changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FQTConfig:
        """A named configuration: ``"qat"``, ``"exact"`` (nothing quantized) or
        ``"<ptq|psq|bhq><bits>"`` (e.g. ``"bhq5"``): 8-bit forward, that gradient quantizer at
        ``bits`` on the activation-gradient GEMM and the paper's 8-bit weight-gradient branch.

        Float-format recipes (docs/method.md §12), stochastic rounding on both backward GEMMs:
        ``"fp8_e4m3"`` (E4M3 everywhere), ``"fp8_e5m2"`` (E4M3 forward, E5M2 gradients),
        ``"mxfp8"``, ``"mxfp4_sr"`` / ``"mxfp4_rht_sr"`` (MXFP4 gradients, MXFP8 forward; the
        second with a 32-entry random Hadamard transform before them), ``"nvfp4_sr"`` /
        ``"nvfp4_rht_sr"`` (NVFP4 everywhere; 16-entry transform)."""
        if name == "qat":
            return cls(**overrides)
        if name == "exact":
            fields = {"input_quantizer": "identity", "weight_quantizer": "identity"}
            return cls(**{**fields, **overrides})
        if name in _FORMAT_PRESETS:
            forward, grad, transform = _FORMAT_PRESETS[name]
            fields = {
                "input_quantizer": forward,
                "weight_quantizer": forward,
                "grad_quantizer": grad,
                "grad_transform": transform,
            }
            return cls(**{**fields, **overrides})
        match = _PRESET.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(cls.presets())}")
        quantizer, bits = match.group(1), int(match.group(2))
        return cls(**{"grad_quantizer": quantizer, "grad_bits": bits, **overrides})

    @staticmethod
    def presets() -> list[str]:
        """Names :meth:`preset` accepts."""
        integer = [f"{q}{b}" for q in ("ptq", "psq", "bhq") for b in range(2, 9)]
        return ["exact", "qat", *integer, *_FORMAT_PRESETS]
