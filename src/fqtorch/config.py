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

from .quantizers.base import ROUNDINGS, check_bits, get_quantizer, is_registered, list_quantizers

__all__ = ["BACKENDS", "FQTConfig"]

BACKENDS = ("simulate", "int8")
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
_PRESET = re.compile(r"^(ptq|psq|bhq)([2-8])$")


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
        backend: how the GEMMs run: ``"simulate"`` (float GEMMs on dequantized values) or
            ``"int8"`` (``torch._int_mm`` on the integer codes, for Linear and Conv2d layers; a
            grouped or 1-d convolution, or a convolution on CUDA, falls back to simulate with
            a warning). It takes the quantizers whose scales leave the integer GEMMs
            (docs/method.md §8): per-tensor forward operands, per-tensor or per-row
            ``grad_quantizer``, per-tensor or per-column ``grad_weight_quantizer``.
        fused: run every quantizer's rounding as a ``torch.compile``'d kernel (compiled
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
    fused: bool = False
    seed: int = 0
    check_finite: bool = False
    attention_products: bool = False

    def __post_init__(self) -> None:
        for field in ("input_bits", "weight_bits", "grad_bits", "grad_weight_bits"):
            check_bits(getattr(self, field), field)
        _check_quantizer("input_quantizer", self.input_quantizer)
        _check_quantizer("weight_quantizer", self.weight_quantizer)
        if self.grad_quantizer is not None:
            _check_quantizer("grad_quantizer", self.grad_quantizer)
            if self.grad_weight_quantizer is None:
                default = "ptq" if self.grad_quantizer == "ptq" else "per_column"
                object.__setattr__(self, "grad_weight_quantizer", default)
        if self.grad_weight_quantizer is not None:
            _check_quantizer("grad_weight_quantizer", self.grad_weight_quantizer)
        if self.grad_rounding not in ROUNDINGS:
            raise ValueError(
                f"grad_rounding must be one of {ROUNDINGS}, got {self.grad_rounding!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "int8":
            self._check_int8()
        if not isinstance(self.fused, bool):
            raise TypeError(f"fused must be a bool, got {self.fused!r}")
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
        for field, (allowed, expected, reason) in _INT8_QUANTIZERS.items():
            name = getattr(self, field)
            if name not in allowed:
                raise ValueError(
                    f"backend='int8' needs a {field} with {expected} "
                    f"({' or '.join(map(repr, allowed))}), got {name!r}: {reason}"
                )

    @property
    def is_qat(self) -> bool:
        """Whether the backward pass is exact (no gradient quantizer on either branch)."""
        return self.grad_quantizer is None and self.grad_weight_quantizer is None

    def build_quantizers(self) -> dict[str, Any]:
        """The four quantizer objects, keyed by the tensor role they act on."""
        rounding, fused = self.grad_rounding, self.fused
        return {
            "input": get_quantizer(
                self.input_quantizer, self.input_bits, rounding="nearest", fused=fused
            ),
            "weight": get_quantizer(
                self.weight_quantizer, self.weight_bits, rounding="nearest", fused=fused
            ),
            "grad_output": get_quantizer(
                self.grad_quantizer or "identity", self.grad_bits, rounding=rounding, fused=fused
            ),
            "grad_output_weight": get_quantizer(
                self.grad_weight_quantizer or "identity",
                self.grad_weight_bits,
                rounding=rounding,
                fused=fused,
            ),
        }

    def replace(self, **changes: Any) -> FQTConfig:
        """A copy with some fields changed (validated again)."""
        if "grad_quantizer" in changes and "grad_weight_quantizer" not in changes:
            changes["grad_weight_quantizer"] = None  # re-derive the paper's default
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FQTConfig:
        """A named configuration: ``"qat"``, ``"exact"`` (nothing quantized) or
        ``"<ptq|psq|bhq><bits>"`` (e.g. ``"bhq5"``): 8-bit forward, that gradient quantizer at
        ``bits`` on the activation-gradient GEMM and the paper's 8-bit weight-gradient branch."""
        if name == "qat":
            return cls(**overrides)
        if name == "exact":
            fields = {"input_quantizer": "identity", "weight_quantizer": "identity"}
            return cls(**{**fields, **overrides})
        match = _PRESET.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(cls.presets())}")
        quantizer, bits = match.group(1), int(match.group(2))
        return cls(**{"grad_quantizer": quantizer, "grad_bits": bits, **overrides})

    @staticmethod
    def presets() -> list[str]:
        """Names :meth:`preset` accepts."""
        return ["exact", "qat"] + [f"{q}{b}" for q in ("ptq", "psq", "bhq") for b in range(2, 9)]
