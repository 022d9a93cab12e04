"""Variance-budgeted precision (docs/method.md §11): choose each FQT layer's gradient quantizer and
bits, per backward branch, so that the quantization variance of the whole gradient stays within a
budget of its sampling variance, at a low GEMM cost (a greedy choice).

Why per layer and per branch: layers differ by orders of magnitude in how much quantization noise
they add to the gradient (the variance profile, §3), so one recipe for all layers spends bits
where they buy nothing. The framework says what matters is the total quantization variance against
the sampling variance; one more bit cuts a quantizer's variance about 4×, a scaling measured here
per layer rather than assumed.

Procedure of :func:`plan_precision`:

1. the sampling variance ``S`` of the QAT minibatch gradient on ``batches``;
2. for each FQT layer, branch (``grad``: ``grad_quantizer``/``grad_bits`` on the ``grad_input``
   GEMM; ``grad_weight``: ``grad_weight_quantizer``/``grad_weight_bits`` on the weight-gradient
   GEMM) and candidate quantizer, the variance of the *whole* gradient with only that branch
   quantized, at the quantizer's fewest and most candidate bits. Stochastic rounding on a grid
   of ``2^b − 1`` bins has variance ∝ bins⁻² (≈ 4× per bit, more at few bits); the two probes
   fit the exponent, ``V(b) = V_lo · ((2^lo − 1)/(2^b − 1))^(2κ)`` with ``κ`` from
   ``V_lo/V_hi`` (1 for a uniform grid; a format that follows another law gets its own), which
   predicts the bit widths between; the per-bit factor ``(V_lo/V_hi)^(1/(hi − lo))`` is reported;
3. a choice with ``Σ V ≤ AIM · budget · S`` (contributions of independent unbiased
   quantizers add), by a greedy walk on each branch's cost/variance frontier (not guaranteed
   the cheapest where a frontier is not convex); a ``grad`` probe runs the weight-gradient GEMM
   exactly, so it sees that branch's noise alone;
4. the chosen plan measured again, with fresh noise: all of it at once (the total) and each
   branch alone (its share), reported beside the prediction; a plan measured over the budget
   is chosen again with the prediction scaled by measured/predicted and measured once more.

Cost model: a branch's cost is its GEMM's multiply-accumulates × the bits per element of the
quantized gradient operand × the bits of the other operand (the forward-quantized weight or
input; 32 when that one is not quantized): the area and energy of a ``b_a × b_b``-bit multiplier
grow with ``b_a · b_b``. A quantizer's bits per element are its ``bits_per_element`` attribute when
it has one (block formats whose scales cost extra bits), else its ``bits``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FQTConfig
from ..convert import fqt_modules, quantize_model
from ..nn.modules import FQTModule
from ..quantizers.base import get_quantizer, is_registered, list_quantizers
from ..quantizers.callers import FQTWarning, user_stacklevel
from .estimators import (
    Batch,
    LossFn,
    _as_batches,
    _Forward,
    _Moments,
    _Params,
    _require_fqt,
    _restored_buffers,
    few_batches_caveat,
    kept_generators,
    kept_random_streams,
    sampling_variance,
)

__all__ = [
    "BACKWARD_FIELDS",
    "BRANCHES",
    "DEFAULT_CANDIDATES",
    "FORWARD_FIELDS",
    "SNR_THRESHOLD",
    "LayerPlan",
    "PrecisionController",
    "PrecisionPlan",
    "bits_per_element",
    "load_plan",
    "plan_precision",
    "set_layer_config",
]

BRANCHES = ("grad", "grad_weight")
Candidate = tuple[str, int]
Progress = Callable[[Iterable, int, str], Iterable]
# BHQ or PSQ on the grad_input GEMM, per-column on the weight-gradient GEMM (the paper's axes,
# docs/method.md §2), 4..8 bits.
DEFAULT_CANDIDATES: dict[str, tuple[Candidate, ...]] = {
    "grad": tuple((q, b) for q in ("psq", "bhq") for b in range(4, 9)),
    "grad_weight": tuple(("per_column", b) for b in range(4, 9)),
}
_FIELDS = {
    "grad": ("grad_quantizer", "grad_bits"),
    "grad_weight": ("grad_weight_quantizer", "grad_weight_bits"),
}
_ASSUMED_PER_BIT = 4.0
AIM = 0.8  # plans aim at this fraction of the budget (the prediction is an estimate)
REQUIRED_KEYS = (
    "budget",
    "sampling_variance",
    "predicted_quantization_variance",
    "measured_quantization_variance",
    "layers",
)
FORWARD_FIELDS = ("input_quantizer", "input_bits", "weight_quantizer", "weight_bits")
# Backward settings a plan's variances were measured under besides its own quantizers: a run
# with others (nearest rounding, a transform before the quantizers, quantized attention
# products) has other variances, or a biased gradient.
BACKWARD_FIELDS = ("grad_rounding", "grad_transform", "attention_products")
LAYER_KEYS = ("name", "grad_quantizer", "grad_bits", "grad_weight_quantizer", "grad_weight_bits")


# ------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class LayerPlan:
    """One FQT layer's gradient quantizers, and what planning measured about them.

    ``predicted`` / ``measured``: per branch, the variance of the whole gradient with only that
    branch quantized (at the chosen setting); ``per_bit``: the measured variance factor per bit;
    ``macs``: the branch's GEMM size (0 when its GEMM does not run: ``grad_input`` of a layer
    whose input needs no gradient)."""

    name: str
    grad_quantizer: str
    grad_bits: int
    grad_weight_quantizer: str
    grad_weight_bits: int
    predicted: dict[str, float] = dataclasses.field(default_factory=dict)
    measured: dict[str, float] = dataclasses.field(default_factory=dict)
    per_bit: dict[str, float] = dataclasses.field(default_factory=dict)
    macs: dict[str, int] = dataclasses.field(default_factory=dict)
    frontier: dict[str, list[list]] = dataclasses.field(default_factory=dict)

    def choice(self, branch: str) -> Candidate:
        q, b = _FIELDS[branch]
        return getattr(self, q), getattr(self, b)

    def config(self, base: FQTConfig) -> FQTConfig:
        """``base`` (the forward quantization, rounding, backend, seed) with this layer's
        gradient quantizers."""
        return base.replace(
            grad_quantizer=self.grad_quantizer,
            grad_bits=self.grad_bits,
            grad_weight_quantizer=self.grad_weight_quantizer,
            grad_weight_bits=self.grad_weight_bits,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in LAYER_KEYS}
        for branch in BRANCHES:
            for what in ("predicted", "measured"):
                if branch in getattr(self, what):
                    out[f"{branch}_{what}_variance"] = getattr(self, what)[branch]
            if branch in self.per_bit:
                out[f"{branch}_per_bit_factor"] = self.per_bit[branch]
            if branch in self.macs:
                out[f"{branch}_macs"] = self.macs[branch]
            if branch in self.frontier:
                out[f"{branch}_frontier"] = [list(row) for row in self.frontier[branch]]
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> LayerPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {', '.join(LAYER_KEYS)}")
        missing = [k for k in LAYER_KEYS if k not in d]
        if missing:
            raise ValueError(f"{where} lacks the keys {missing}")
        for key in LAYER_KEYS:
            value = d[key]
            want_int = key.endswith("bits")
            ok = (
                isinstance(value, int) and not isinstance(value, bool)
                if want_int
                else isinstance(value, str)
            )
            if not ok:
                kind = "an integer" if want_int else "a string"
                raise ValueError(f"{where}.{key} must be {kind}, got {value!r}")
        for key in ("grad_quantizer", "grad_weight_quantizer"):
            if not is_registered(d[key]):
                raise ValueError(
                    f"{where}.{key}={d[key]!r} is not a registered quantizer; known: "
                    f"{', '.join(list_quantizers())}"
                )
        try:  # the bit widths each quantizer takes, checked where the file is named
            FQTConfig().replace(**{k: d[k] for k in LAYER_KEYS[1:]})
        except ValueError as exc:
            raise ValueError(f"{where} (layer {d['name']!r}): {exc}") from None
        extras: dict[str, dict] = {
            "predicted": {},
            "measured": {},
            "per_bit": {},
            "macs": {},
            "frontier": {},
        }
        for branch in BRANCHES:
            for what, key in (
                ("predicted", f"{branch}_predicted_variance"),
                ("measured", f"{branch}_measured_variance"),
                ("per_bit", f"{branch}_per_bit_factor"),
                ("macs", f"{branch}_macs"),
                ("frontier", f"{branch}_frontier"),
            ):
                if d.get(key) is not None:
                    extras[what][branch] = _checked_extra(what, d[key], f"{where}.{key}")
        return cls(**{k: d[k] for k in LAYER_KEYS}, **extras)


@dataclass(frozen=True)
class PrecisionPlan:
    """Per-layer gradient quantizers chosen within a variance budget (:func:`plan_precision`).

    ``budget``: the allowed total quantization variance as a fraction of ``sampling_variance``.
    ``feasible``: ``False`` when the budget is not met even with every branch at its most
    precise candidate (the plan then keeps them all there), as measured. ``cost``: the plan's
    cost (module docstring); ``cost_highest``: the cost of every branch at its most precise
    candidate, for scale. ``measured_with``: the batch size, the number of minibatches the
    sampling variance came from, and the forward and backward settings measured under.
    ``sampling_variance_rse``: the sampling variance's relative standard error, from its batches'
    spread (``None``: too few to say); the budget and every share are fractions of an estimate
    this uncertain. ``first_plan``: where the first choice measured over the budget and the
    planner chose again (``predicted`` and ``measured``, as fractions of the sampling variance,
    and their ``scale``), else ``None`` (a prediction runs low where the branches' variances do
    not add up: at low bits noise from the branches above can widen the ranges below). Use it
    with :meth:`config_fn` (the callable form :func:`~fqtorch.quantize_model` takes) or
    :meth:`apply`; :meth:`save` / :func:`load_plan` write and read ``plan.json``."""

    budget: float
    sampling_variance: float
    predicted_quantization_variance: float
    measured_quantization_variance: float | None
    layers: tuple[LayerPlan, ...]
    feasible: bool = True
    cost: float | None = None
    cost_highest: float | None = None
    measured_within_budget: bool | None = None
    measured_with: dict[str, Any] | None = None  # batch size and forward config (if known)
    sampling_variance_rse: float | None = None
    first_plan: dict[str, float] | None = None

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"plan layers: names {dupes} appear more than once")

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def config_fn(self, base: FQTConfig | None = None) -> Callable[[nn.Module, str], FQTConfig]:
        """``(module, name) -> FQTConfig`` for :func:`~fqtorch.quantize_model`: ``base`` (default
        ``FQTConfig()``, 8-bit forward) with the layer's gradient quantizers; a layer the plan
        does not name is a ``ValueError`` (a plan made for another model)."""
        base = base or FQTConfig()
        by_name = {layer.name: layer for layer in self.layers}

        def config(module: nn.Module, name: str) -> FQTConfig:
            if name not in by_name:
                raise ValueError(
                    f"the bits plan has no layer {name!r} (a plan for another model?); its "
                    f"layers: {_preview(self.names)}"
                )
            return by_name[name].config(base)

        return config

    def __call__(self, module: nn.Module, name: str) -> FQTConfig:
        """The plan is itself the callable form: ``quantize_model(model, plan)`` uses
        ``config_fn()`` (8-bit forward); use :meth:`config_fn` for another forward."""
        return self.config_fn()(module, name)

    def apply(self, model: nn.Module, base: FQTConfig | None = None) -> nn.Module:
        """Quantize the float ``model`` with this plan (:func:`~fqtorch.quantize_model`) and
        check that its FQT layers are exactly the plan's; FQT layers built inside another one
        (an attention layer's ``out_proj``) get their own entry's quantizers. Returns the model
        (as ``quantize_model`` does)."""
        model = quantize_model(model, self.config_fn(base))
        layers = fqt_modules(model)
        missing = [n for n in self.names if n not in layers]
        extra = [n for n in layers if n not in self.names]
        if missing or extra:
            raise ValueError(
                "the bits plan's layer names do not match the model's FQT layers: "
                + "; ".join(
                    f"{what} {_preview(names)}"
                    for what, names in (
                        ("the plan names, the model lacks:", missing),
                        ("the model has, the plan lacks:", extra),
                    )
                    if names
                )
            )
        for name, layer in layers.items():
            config = self.layer(name).config(base or FQTConfig())
            if layer.config != config:  # a layer built inside another one (out_proj)
                set_layer_config(layer, config)
        return model

    def average_bits(self) -> dict[str, float]:
        """GEMM-size-weighted mean gradient bits per branch (bits per element); NaN for a
        branch whose GEMM sizes the plan does not record (a plan.json without ``*_macs``)."""
        out = {}
        for branch in BRANCHES:
            num = den = 0.0
            if any(branch not in layer.macs for layer in self.layers):
                out[branch] = math.nan
                continue
            for layer in self.layers:
                macs = layer.macs[branch]
                num += macs * bits_per_element(*layer.choice(branch))
                den += macs
            out[branch] = num / den if den else math.nan
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "sampling_variance": self.sampling_variance,
            "sampling_variance_rse": self.sampling_variance_rse,
            "predicted_quantization_variance": self.predicted_quantization_variance,
            "measured_quantization_variance": self.measured_quantization_variance,
            "feasible": self.feasible,
            "measured_within_budget": self.measured_within_budget,
            "measured_with": self.measured_with,
            "cost": self.cost,
            "cost_highest": self.cost_highest,
            "first_plan": self.first_plan,
            "cost_model": "GEMM multiply-accumulates x gradient bits per element x other "
            "operand bits",
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> PrecisionPlan:
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a JSON object with keys {', '.join(REQUIRED_KEYS)}")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(f"{where} lacks the keys {missing}")
        for key in REQUIRED_KEYS[:4]:
            value = d[key]
            if key == "measured_quantization_variance" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}.{key} must be a number, got {value!r}")
        for key in ("budget", "sampling_variance"):  # the budget's unit and fraction
            if not 0 < d[key] < math.inf:
                raise ValueError(f"{where}.{key} must be a finite number > 0, got {d[key]!r}")
        rse = d.get("sampling_variance_rse")
        if rse is not None and not (_is_number(rse) and 0 <= rse < math.inf):
            raise ValueError(
                f"{where}.sampling_variance_rse must be a finite number >= 0 or null, got "
                f"{rse!r:.60}"
            )
        for key in ("cost", "cost_highest"):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not _is_number(value)):
                raise ValueError(f"{where}.{key} must be a number or null, got {value!r}")
        first = d.get("first_plan")
        if first is not None and not (
            isinstance(first, Mapping)
            and all(_is_number(first.get(k)) for k in ("predicted", "measured", "scale"))
        ):
            raise ValueError(
                f"{where}.first_plan must be null or a mapping of predicted, measured and scale "
                f"to numbers, got {first!r:.60}"
            )
        with_ = d.get("measured_with")
        if with_ is not None and not isinstance(with_, Mapping):
            raise ValueError(
                f"{where}.measured_with must be a mapping (batch_size, forward, ...) or null, "
                f"got {with_!r:.60}"
            )
        for part in ("forward", "backward"):
            if with_ and with_.get(part) is not None and not isinstance(with_[part], Mapping):
                raise ValueError(
                    f"{where}.measured_with.{part} must be a mapping of FQTConfig fields or "
                    f"null, got {with_[part]!r:.60}"
                )
        if not isinstance(d["layers"], list) or not d["layers"]:
            raise ValueError(f"{where}.layers must be a non-empty list of layer entries")
        layers = tuple(
            LayerPlan.from_dict(entry, f"{where}.layers[{i}]")
            for i, entry in enumerate(d["layers"])
        )
        try:
            return cls._of(d, layers)
        except ValueError as exc:  # the layer names' check, said with the file
            raise ValueError(f"{where}: {exc}") from None

    @classmethod
    def _of(cls, d: Mapping[str, Any], layers: tuple[LayerPlan, ...]) -> PrecisionPlan:
        return cls(
            budget=float(d["budget"]),
            sampling_variance=float(d["sampling_variance"]),
            predicted_quantization_variance=float(d["predicted_quantization_variance"]),
            measured_quantization_variance=None
            if d["measured_quantization_variance"] is None
            else float(d["measured_quantization_variance"]),
            layers=layers,
            feasible=bool(d.get("feasible", True)),
            cost=d.get("cost"),
            cost_highest=d.get("cost_highest"),
            measured_within_budget=d.get("measured_within_budget"),
            measured_with=d.get("measured_with"),
            sampling_variance_rse=d.get("sampling_variance_rse"),
            first_plan=None if d.get("first_plan") is None else dict(d["first_plan"]),
        )

    def save(self, path: str | Path) -> Path:
        """Write plan.json whole or not at all (a stop mid-write leaves no half file that a
        script checking for the file would take as a plan)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def table(self) -> str:
        """The plan as a table: per layer and branch, the choice and its variance as a fraction
        of the sampling variance, predicted and measured alone."""
        s = self.sampling_variance
        rows = [
            f"{'layer':<24} {'branch':<12} {'choice':<14} {'predicted':>10} {'measured':>10}",
        ]
        for layer in self.layers:
            for branch in BRANCHES:
                q, b = layer.choice(branch)
                pred, meas = layer.predicted.get(branch), layer.measured.get(branch)
                rows.append(
                    f"{layer.name:<24} {branch:<12} {choice_label(q, b):<14} "
                    f"{_share(pred, s):>10} {_share(meas, s):>10}"
                )
        measured = self.measured_quantization_variance
        rows.append(
            f"total quantization variance / sampling variance: predicted "
            f"{_share(self.predicted_quantization_variance, s)}, measured (all on) "
            f"{_share(measured, s)}; budget {self.budget:g}"
            + ("" if self.feasible else " NOT MET even at the highest precision")
        )
        if self.first_plan:
            rows.append(
                f"chosen again: the first plan measured {self.first_plan['measured']:.3g} of the "
                f"sampling variance, {self.first_plan['scale']:.3g}x its prediction "
                f"{self.first_plan['predicted']:.3g}, so the budget was scaled down by that "
                "factor"
            )
        if self.cost is not None and self.cost_highest:
            rows.append(f"cost {self.cost / self.cost_highest:.3f} of all-highest-precision")
        rows.append(self._sampling_error())
        return "\n".join(rows)

    def _sampling_error(self) -> str:
        count = (self.measured_with or {}).get("sampling_batches")
        source = f"{count} minibatches" if count else "its minibatches"
        if self.sampling_variance_rse is None and count is not None and count >= 3:
            return f"sampling variance from {source}: its error not recorded (an older plan)"
        if self.sampling_variance_rse is None:
            return (
                f"sampling variance from {source}: too few to estimate its own error (3 or more "
                "around their mean: --sampling-batches)"
            )
        return (
            f"sampling variance from {source}: relative standard error "
            f"{self.sampling_variance_rse:.2g} (the budget and every share above are fractions "
            f"of it){few_batches_caveat(count)}"
        )


def choice_label(quantizer: str, bits: int) -> str:
    """A plan's choice as tables print it: ``bhq3``, ``per_column4``, ``ptq:8`` (a name ending in
    a digit), and a format by its name alone (``mxfp4``: it fixes its own width)."""
    if quantizer != "identity" and _fixed_width(quantizer, bits):
        return quantizer  # a format: its name says its width
    return f"{quantizer}:{bits}" if quantizer[-1].isdigit() else f"{quantizer}{bits}"


def _share(value: float | None, sampling: float) -> str:
    return "-" if value is None or not sampling else f"{value / sampling:.3g}"


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_plan(path: str | Path) -> PrecisionPlan:
    """Read a ``plan.json``; a missing file or a malformed plan is a one-line ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"bits plan {path} is a folder; name its plan.json")
    if not path.is_file():
        raise ValueError(f"bits plan {path} does not exist (write one with `fqtorch plan`)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"bits plan {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None
    return PrecisionPlan.from_dict(payload, where=f"bits plan {path}")


# ------------------------------------------------------------------------------------ plumbing
def set_layer_config(layer: FQTModule, config: FQTConfig) -> None:
    """Give an FQT layer another config in place (its quantizer plan rebuilt). The backward reads
    the plan when it runs, so the next backward uses it; the layer's generator is untouched."""
    layer.config = config  # the property rebuilds the plan


@contextmanager
def _branches(
    model: nn.Module, assignment: Mapping[str, Mapping[str, Candidate]]
) -> Iterator[None]:
    """Within the block, only the branches named in ``assignment`` (layer -> branch ->
    (quantizer, bits)) quantize their gradient; every other backward GEMM is exact."""
    saved = {}
    try:
        for name, layer in fqt_modules(model).items():
            saved[name] = (layer.config, layer.plan)
            chosen = assignment.get(name, {})
            g, w = chosen.get("grad"), chosen.get("grad_weight")
            # A grad_transform acts in front of both gradient quantizers and needs a
            # grad_quantizer: with only the weight-gradient branch on, grad_quantizer is
            # "identity" (exact) so that the transform stays in front of that branch; with
            # neither on, the transform goes too.
            transform = layer.config.grad_transform if g or w else None
            g_name = g[0] if g else ("identity" if transform else None)
            # "identity", not None, for an exact weight-gradient GEMM: with None the config
            # fills in a default weight-gradient quantizer whenever grad_quantizer is set.
            config = layer.config.replace(
                grad_quantizer=g_name,
                grad_bits=g[1] if g else layer.config.grad_bits,
                grad_weight_quantizer=w[0] if w else ("identity" if g_name else None),
                grad_weight_bits=w[1] if w else layer.config.grad_weight_bits,
                grad_transform=transform,
            )
            set_layer_config(layer, config)
        yield
    finally:
        layers = fqt_modules(model)
        for name, (config, plan) in saved.items():
            layers[name].config, layers[name].plan = config, plan


def bits_per_element(quantizer: str, bits: int) -> float:
    """Storage bits per gradient element of ``quantizer`` at ``bits``: its ``bits_per_element``
    when it says (a block format's shared scales add a fraction), 32 for ``identity`` (float),
    else ``bits``."""
    if quantizer == "identity":
        return 32.0
    q = get_quantizer(quantizer, bits)
    value = getattr(q, "bits_per_element", None)
    if callable(value):
        value = value()
    return float(q.bits if value is None else value)


def _bins(bits: int) -> int:
    return 2**bits - 1


def _other_bits(config: FQTConfig, branch: str) -> float:
    """Bits of the GEMM operand that is not the gradient: the weight (``grad_input``) or the
    input (weight gradient), as the forward quantizes it."""
    if branch == "grad":
        return bits_per_element(config.weight_quantizer, config.weight_bits)
    return bits_per_element(config.input_quantizer, config.input_bits)


def _sharing(layers: Mapping[str, nn.Module]) -> set[str]:
    """The FQT layers holding a parameter another one holds too (a tied weight): its gradient
    is read on one layer's entry, so their weight-gradient branches are probed one at a time on
    the whole gradient, not together each on its own parameters."""
    holders: dict[int, list[str]] = {}
    for name, layer in layers.items():
        for param in layer.parameters(recurse=False):
            holders.setdefault(id(param), []).append(name)
    return {name for names in holders.values() if len(names) > 1 for name in names}


def _gemm_sizes(model: nn.Module, batch: Batch) -> dict[str, dict[str, int]]:
    """Per FQT layer and branch, the multiply-accumulates of its backward GEMM on ``batch``: the
    forward's (output entries × weight entries per output feature), summed over the layer's
    calls; 0 for ``grad_input`` when the layer's input needs no gradient and for
    ``grad_weight`` when its weights need none (frozen): those GEMMs are skipped."""
    layers = fqt_modules(model)
    sizes: dict[str, dict[str, int]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and weight.dim() >= 2:
                channels = out.shape[1] if weight.dim() >= 3 else out.shape[-1]
                per_output = weight.numel() // max(channels, 1)
            else:  # a layer with several weight matrices (attention's input projections): the
                # ones it holds itself (out_proj is an FQT layer of its own), once per token
                held = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
                per_output = held // max(out.shape[-1], 1)
            macs = int(out.numel()) * int(per_output)
            given = (*args, *kwargs.values())  # an input passed by keyword counts too
            needs = any(isinstance(a, Tensor) and a.requires_grad for a in given)
            # the weight-gradient GEMMs run for weights that need a gradient (a bias alone
            # is a sum, not a GEMM)
            trained = any(p.requires_grad for p in module.parameters(recurse=False) if p.dim() >= 2)
            # a layer called more than once (shared) runs its GEMMs once per call
            seen = sizes.get(name, {"grad": 0, "grad_weight": 0})
            sizes[name] = {
                "grad": seen["grad"] + (macs if needs else 0),
                "grad_weight": seen["grad_weight"] + (macs if trained else 0),
            }

        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in layers.items()]
    try:
        with _restored_buffers(model), torch.enable_grad():
            model(batch[0])
    finally:
        for h in handles:
            h.remove()
    return sizes


def _measure(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[Batch],
    samples: int,
    assignments: list[Mapping[str, Mapping[str, Candidate]]],
    progress: Progress | None,
    description: str,
) -> list[float]:
    """The quantization variance of the whole gradient (``E‖g − E g‖²`` over the rounding noise,
    averaged over ``batches``) under each assignment: one forward per batch serves them all."""
    params = _Params.of(model)
    names = sorted(set(params.layers))
    index = torch.tensor([names.index(layer) for layer in params.layers])
    totals: list[Any] = [0.0] * len(assignments)
    steps: Iterable = ((b, k) for b in range(len(batches)) for k in range(len(assignments)))
    count = len(batches) * len(assignments)
    if progress is not None:
        steps = progress(steps, count, description)
    forward = None
    with _restored_buffers(model):
        for b, k in steps:
            if k == 0:
                forward = _Forward(model, loss_fn, batches[b], params)
            moments = _Moments()
            with _branches(model, assignments[k]):
                for _ in range(samples):
                    moments.add(forward.gradient())
            per_param = moments.variance().split(params.sizes)
            sums = torch.zeros(len(names), dtype=torch.float64)
            sums.index_add_(0, index, torch.stack([p.double().sum() for p in per_param]))
            totals[k] = totals[k] + sums / len(batches)
    return [(float(t.sum()), dict(zip(names, t.tolist(), strict=True))) for t in totals]


def _unpack(keys: list, measured: list[tuple[float, dict[str, float]]]) -> dict:
    """Probe results by key: a key (a tuple) takes the whole gradient's variance; a list of
    keys (one pass probing several weight-gradient branches), each its own layer's."""
    out = {}
    for key, (total, per_layer) in zip(keys, measured, strict=True):
        if isinstance(key, list):
            out.update({k: per_layer.get(k[0], 0.0) for k in key})
        else:
            out[key] = total
    return out


def _check_candidates(
    candidates: Sequence[Candidate] | Mapping[str, Sequence[Candidate]],
) -> dict[str, list[Candidate]]:
    if isinstance(candidates, Mapping):
        unknown = sorted(set(candidates) - set(BRANCHES))
        if unknown:
            raise ValueError(f"candidates: unknown branches {unknown}; expected {BRANCHES}")
        per_branch = {b: list(candidates.get(b, ())) for b in BRANCHES}
    else:
        per_branch = {b: list(candidates) for b in BRANCHES}
    for branch, cands in per_branch.items():
        if not cands:
            raise ValueError(f"candidates[{branch!r}] is empty; give (quantizer, bits) pairs")
        for cand in cands:
            if not (isinstance(cand, (tuple, list)) and len(cand) == 2):
                raise ValueError(
                    f"candidates[{branch!r}]: expected (quantizer, bits), got {cand!r}"
                )
            name, bits = cand
            if not isinstance(name, str) or not is_registered(name):
                raise ValueError(
                    f"candidates[{branch!r}]: {name!r} is not a registered quantizer; known: "
                    f"{', '.join(list_quantizers())}"
                )
            get_quantizer(name, bits)  # bits checked here, with the quantizer's own message
        # a format fixes its own width: one candidate at that width, whatever bits were asked
        per_branch[branch] = sorted(
            {(str(n), get_quantizer(n, b).bits if _fixed_width(n, b) else int(b)) for n, b in cands}
        )
    return per_branch


@dataclass
class _Option:
    candidate: Candidate
    cost: float
    variance: float
    width: float = 0.0  # bits per element, the tie-breaker


def _frontier(options: list[_Option]) -> list[_Option]:
    """Options by rising cost, each strictly less variance than every cheaper one (ties: fewest
    bits first, so a branch whose GEMM does not run takes the narrowest candidate)."""
    ordered = sorted(options, key=lambda o: (o.cost, o.variance, o.width))
    kept: list[_Option] = []
    for option in ordered:
        if not kept or option.variance < kept[-1].variance:
            kept.append(option)  # an equal-cost one sorts after by variance: never kept
    return kept


def _choose(frontiers: Mapping[Any, list[_Option]], target: float) -> tuple[dict[Any, int], bool]:
    """The index chosen on each frontier, greedily (not guaranteed the cheapest where a frontier
    is not convex): from the cheapest options, buy step by step the upgrade with the most
    variance removed per unit of cost, then give back any step the budget can spare.
    Infeasible (``False``): each at its last, most precise option."""
    last = {k: len(f) - 1 for k, f in frontiers.items()}
    if sum(f[-1].variance for f in frontiers.values()) > target:
        return last, False
    at = {k: 0 for k in frontiers}
    total = sum(f[0].variance for f in frontiers.values())
    while total > target:
        best, best_rate = None, -1.0
        for k, f in frontiers.items():
            if at[k] < last[k]:
                cur, nxt = f[at[k]], f[at[k] + 1]
                rate = (cur.variance - nxt.variance) / max(nxt.cost - cur.cost, 1e-300)
                if rate > best_rate:
                    best, best_rate = k, rate
        if best is None:  # float drift: every branch at its last option, the target just met
            break
        total += frontiers[best][at[best] + 1].variance - frontiers[best][at[best]].variance
        at[best] += 1
    changed = True
    while changed:  # give back the most expensive steps the budget can spare
        changed = False
        steps = sorted(
            (k for k in frontiers if at[k] > 0),
            key=lambda k: frontiers[k][at[k]].cost - frontiers[k][at[k] - 1].cost,
            reverse=True,
        )
        for k in steps:
            f = frontiers[k]
            extra = f[at[k] - 1].variance - f[at[k]].variance
            if total + extra <= target:
                total += extra
                at[k] -= 1
                changed = True
    return at, True


# ------------------------------------------------------------------------------------ planning
def plan_precision(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batch | Iterable[Batch],
    *,
    budget: float = 0.1,
    candidates: Sequence[Candidate] | Mapping[str, Sequence[Candidate]] = DEFAULT_CANDIDATES,
    samples: int = 8,
    full_data: Iterable[Batch] | None = None,
    verify_batches: Batch | Iterable[Batch] | None = None,
    sampling_batches: Batch | Iterable[Batch] | None = None,
    progress: Progress | None = None,
) -> PrecisionPlan:
    """Choose each FQT layer's gradient quantizers (per branch) so that the quantization variance
    of the whole gradient is at most ``budget`` × its sampling variance, greedily at a low cost
    (module docstring: procedure and cost model).

    Args:
        model: a model already converted by :func:`~fqtorch.quantize_model` (its forward
            quantization is what the plan is measured under; its gradient quantizers are
            replaced while measuring and restored after, generators included).
        loss_fn: ``loss_fn(model(inputs), targets)``.
        batches: minibatches (at least 2: the sampling variance is their spread, unless
            ``full_data`` is given) of the training batch size.
        budget: allowed quantization variance as a fraction of the sampling variance.
        candidates: ``(quantizer, bits)`` pairs for both branches, or ``{"grad": [...],
            "grad_weight": [...]}``; any registered quantizer name.
        samples: backward passes per minibatch per measurement.
        full_data: as in :func:`~fqtorch.stats.sampling_variance`.
        verify_batches: minibatches for the independent re-measurement of the chosen plan
            (fresh data as well as fresh noise); default ``batches``.
        sampling_batches: minibatches the sampling variance is estimated from (default
            ``batches``). It is cheap (one exact backward each) and the budget is a fraction
            of it, so give more than ``batches`` where you can: from a few minibatches the
            estimate, and with it every share and ``measured_within_budget``, can be off by a
            third or more.
        progress: ``progress(iterable, total, description)`` wraps the measuring loops (tqdm).

    A budget the prediction does not meet even with every branch at its most precise candidate
    gives that most precise plan, measured: ``feasible=False`` and an :class:`FQTWarning` when
    the measurement does not meet it either (a measurement within it makes the plan feasible,
    as on the retry's path).
    """
    layers = _require_fqt(model)
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not 0 < budget < math.inf
    ):
        raise ValueError(f"budget must be a finite positive number, got {budget!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    per_branch = _check_candidates(candidates)
    batches = _as_batches(batches)
    checked_on = batches if verify_batches is None else _as_batches(verify_batches)
    sampled = batches if sampling_batches is None else _as_batches(sampling_batches)
    if full_data is None and len(sampled) < 2:
        raise ValueError(
            "batches: give at least 2 minibatches (or full_data) to measure the sampling variance"
        )
    with kept_generators(model):
        estimate = sampling_variance(model, loss_fn, sampled, full_data)
        sampling = estimate.total
        if not sampling > 0:
            raise ValueError("the sampling variance is 0 (identical minibatches?); no budget")
        sizes = _gemm_sizes(model, batches[0])
        tied = _sharing(layers)
        # A grad branch's noise flows into every layer below: probed one layer at a time, read
        # on the whole gradient. A weight-gradient branch's noise stays in its own layer's
        # parameters: all layers probed in one pass, each read on its own parameters.
        probes, keys = [], []
        for branch in BRANCHES:
            for q in sorted({c[0] for c in per_branch[branch]}):
                bits = sorted(b for n, b in per_branch[branch] if n == q)
                for b in dict.fromkeys((bits[0], bits[-1])):
                    run = [n for n in layers if sizes.get(n, {}).get(branch, 1) != 0]
                    if branch == "grad_weight":
                        together = [n for n in run if n not in tied]
                        if together:
                            probes.append({n: {branch: (q, b)} for n in together})
                            keys.append([(n, branch, q, b) for n in together])
                        run = [n for n in run if n in tied]  # alone, on the whole gradient
                    for name in run:
                        probes.append({name: {branch: (q, b)}})
                        keys.append((name, branch, q, b))
        measured = _measure(model, loss_fn, batches, samples, probes, progress, "planning")
        probe = _unpack(keys, measured)
        frontiers, per_bit, assumed, options_by_branch = {}, {}, [], {}
        for name, layer in layers.items():
            for branch in BRANCHES:
                macs = sizes.get(name, {}).get(branch, 0)
                options = []
                for q, b in per_branch[branch]:
                    bits = sorted(bb for n, bb in per_branch[branch] if n == q)
                    lo, hi = bits[0], bits[-1]
                    if macs == 0:
                        variance, factor = 0.0, math.nan
                    else:
                        v_lo, v_hi = probe[(name, branch, q, lo)], probe[(name, branch, q, hi)]
                        if hi > lo and v_lo > 0 and v_hi > 0:
                            factor = (v_lo / v_hi) ** (1.0 / (hi - lo))
                            kappa = math.log(v_lo / v_hi) / (2 * math.log(_bins(hi) / _bins(lo)))
                        elif hi > lo:
                            factor, kappa = _ASSUMED_PER_BIT, 1.0
                            assumed.append(f"{name}/{branch}/{q}")
                        else:  # one bit width of this quantizer (a format): nothing to fit
                            factor, kappa = math.nan, 1.0
                        variance = v_lo * (_bins(lo) / _bins(b)) ** (2 * kappa)
                    per_bit[(name, branch, q)] = factor
                    width = bits_per_element(q, b)
                    cost = macs * width * _other_bits(layer.config, branch)
                    options.append(_Option((q, b), cost, variance, width))
                frontiers[(name, branch)] = _frontier(options)
                options_by_branch[(name, branch)] = options
        if assumed:
            warnings.warn(
                f"plan_precision: variance 0 measured at some bits for {_preview(assumed)}; "
                f"assumed variance ∝ bins^-2 there (about {_ASSUMED_PER_BIT:g}x per bit)",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )
        # Aim below the budget: the prediction is itself an estimate, and a plan that fills the
        # budget to its edge measures over it about half the time.
        target = AIM * budget * sampling
        at, feasible = _choose(frontiers, target)
        if not feasible:  # the aim is not met; the budget itself may still be
            at, feasible = _choose(frontiers, budget * sampling)
        predicted_feasible = feasible
        chosen = {k: frontiers[k][i] for k, i in at.items()}
        most_precise = {  # least variance, then most bits (a GEMM not run)
            k: min(opts, key=lambda o: (o.variance, -o.width))
            for k, opts in options_by_branch.items()
        }
        if not feasible:
            chosen = most_precise
        alone = [(n, b) for n in layers for b in BRANCHES if sizes.get(n, {}).get(b, 0)]
        predicted_total = sum(o.variance for o in chosen.values())
        out_of_reach = None  # the retry's measured/predicted scale, where it left no choice
        first_plan = None  # the first choice's prediction and measurement, where it was redone
        for attempt in range(2):
            full = {n: {b: chosen[(n, b)].candidate for b in BRANCHES} for n in layers}
            grads = [(n, b) for n, b in alone if b == "grad" or n in tied]
            weights = [(n, b) for n, b in alone if b == "grad_weight" and n not in tied]
            checks: list = [full] + [{n: {b: full[n][b]}} for n, b in grads]
            check_keys: list = [None, *grads]
            if weights:
                checks.append({n: {b: full[n][b]} for n, b in weights})
                check_keys.append(weights)
            verified = _measure(model, loss_fn, checked_on, samples, checks, progress, "verifying")
            alone_measured = _unpack(check_keys[1:], verified[1:])
            measured_total = verified[0][0]
            done = measured_total <= budget * sampling or not feasible or attempt
            if done or not predicted_total:
                break
            # Measured over the budget: the prediction was low by verified/predicted; choose
            # again against the budget scaled down by that factor, and measure once more.
            scale = measured_total / predicted_total
            first_plan = {
                "predicted": predicted_total / sampling,
                "measured": measured_total / sampling,
                "scale": scale,
            }
            at, ok = _choose(frontiers, AIM * budget * sampling / scale)
            if not ok:
                at, ok = _choose(frontiers, budget * sampling / scale)
            chosen = {k: frontiers[k][i] for k, i in at.items()}
            if not ok:  # scaled by the measurement, the budget is out of reach: most precise
                out_of_reach = scale
                chosen = most_precise
            predicted_total = sum(o.variance for o in chosen.values())
        within = measured_total <= budget * sampling
        if not predicted_feasible:  # every branch at its most precise: the measurement decides
            feasible = within
            if not within:
                warnings.warn(
                    f"plan_precision: budget {budget:g} x sampling variance is not met even "
                    "with every branch at its most precise candidate (predicted "
                    f"{predicted_total / sampling:.3g}, measured {measured_total / sampling:.3g})",
                    FQTWarning,
                    stacklevel=user_stacklevel(),
                )
        elif out_of_reach is not None and not within:  # measured, not only predicted
            feasible = False
            warnings.warn(
                f"plan_precision: the first plan measured {out_of_reach:.3g} x its prediction; "
                "with every branch at its most precise candidate the plan still measures "
                f"{measured_total / sampling:.3g} x the sampling variance, over the budget "
                f"{budget:g}: not met even at the highest precision",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )
        elif feasible and not within:
            warnings.warn(
                f"plan_precision: the plan measures {measured_total / sampling:.3g} x the sampling "
                f"variance, over the budget {budget:g} (predicted "
                f"{predicted_total / sampling:.3g}); plan.json records "
                "measured_within_budget: false",
                FQTWarning,
                stacklevel=user_stacklevel(),
            )
    plan_layers = []
    for name in layers:
        g, w = full[name]["grad"], full[name]["grad_weight"]
        plan_layers.append(
            LayerPlan(
                name,
                g[0],
                g[1],
                w[0],
                w[1],
                predicted={b: chosen[(name, b)].variance for b in BRANCHES},
                measured={b: alone_measured.get((name, b), 0.0) for b in BRANCHES},
                per_bit={
                    b: per_bit[(name, b, full[name][b][0])]
                    for b in BRANCHES
                    if not math.isnan(per_bit[(name, b, full[name][b][0])])
                },
                macs={b: sizes.get(name, {}).get(b, 0) for b in BRANCHES},
                frontier={
                    b: [[*o.candidate, o.cost, o.variance] for o in frontiers[(name, b)]]
                    for b in BRANCHES
                },
            )
        )
    config = next(iter(layers.values())).config
    return PrecisionPlan(
        measured_with={
            "batch_size": len(batches[0][1]),
            "sampling_batches": len(sampled),
            "forward": {k: getattr(config, k) for k in FORWARD_FIELDS},
            "backward": {k: getattr(config, k) for k in BACKWARD_FIELDS},
        },
        budget=float(budget),
        sampling_variance=sampling,
        sampling_variance_rse=estimate.relative_standard_error,
        first_plan=first_plan,
        predicted_quantization_variance=predicted_total,
        measured_quantization_variance=measured_total,
        layers=tuple(plan_layers),
        feasible=feasible,
        measured_within_budget=within,
        cost=sum(o.cost for o in chosen.values()),
        cost_highest=sum(max(o.cost for o in f) for f in frontiers.values()),
    )


# ------------------------------------------------------------------------- adaptive precision
SNR_THRESHOLD = 10.0
# A branch is raised on its own (rule 2) when its estimate is past this many times its share:
# one bit's growth (4x, 3.2x the share at the aim) is caught; the noise of one window's
# estimate (one probe of 2 passes over S from micro-batches) is not.
SHARE_TOLERANCE = 2.0


class PrecisionController:
    """Re-plan gradient quantizers during training from cheap measurements (docs/method.md §11,
    "In training").

    **What is measured.** Every ``--variance-every`` steps :class:`~fqtorch.stats.VarianceMonitor`
    gives the total ``ΣQ/ΣS`` (every quantizer on, all parameters, normalisation layers
    included), which is what the budget is about. A layer's own ratio says little about its own
    branches: noise from a ``grad`` branch lands in the gradients of every layer below. So
    :meth:`probe` measures branches by source, at their current choices, for
    ``2 · probe_samples`` more backward passes per measurement:

    - every weight-gradient branch in one set of passes (the others exact): a weight-gradient
      branch's noise stays in its own layer's weight gradient, so each layer's measured variance
      is that branch's contribution;
    - one ``grad`` branch alone, the next one in turn (round robin): its contribution to the
      whole gradient.

    **The estimate per branch.** Each probed branch keeps its measured variance relative to its
    frontier's prediction (its *drift*); branches not yet probed take the total's ``R / P`` (``P``:
    the predicted total at the current choices). The branches' estimates (drift × the frontier's
    variance) are then scaled together so that they sum to the measured total ``R``: the probes
    say who is noisy, the total says how noisy in all.

    **The decision** (:meth:`replan`, every K steps). Nothing changes while
    ``lower_below · budget ≤ R ≤ budget`` and no branch's estimate is past its *share* of the
    budget (its part of the budget at the last decision, in proportion to its estimate then; at
    the start, its part of the plan's prediction). Otherwise each branch's frontier is scaled by
    its own estimate / prediction and the greedy of :func:`plan_precision` chooses again, aiming
    at ``AIM · budget``: a branch whose variance grew is the cheapest place to buy variance back,
    so it is raised first; the others are lowered where the budget has room. The greedy is
    deterministic, so steady measurements choose the same plan again (no oscillation), and the
    new shares put every branch's estimate below its share. Without probes (:meth:`observe`
    without ``branches``) every branch drifts like the total. The frontiers come from ``plan``
    (``plan.json``); without one every branch gets the same assumed frontier over
    ``[min_bits, max_bits]`` of its quantizer (∝ bins⁻², about 4× per bit; equal shares) until it
    is probed.
    Fixed-width formats (bits ignored) never move, but their measured variance counts.

    A layer whose own branches are at their most precise option and whose gradient
    signal-to-quantization-noise ratio is below ``snr_threshold`` is named in a warning
    (:meth:`low_snr`, once per layer). Signal: ``‖g‖² − S − Q`` of the training step's
    gradient (whose expectation is ``‖∇L‖² + S + Q``), averaged over the window; noise: ``Q``.
    """

    def __init__(
        self,
        layers: Mapping[str, FQTModule],
        *,
        budget: float = 0.1,
        plan: PrecisionPlan | None = None,
        min_bits: int = 4,
        max_bits: int = 8,
        lower_below: float = 0.25,
        snr_threshold: float = SNR_THRESHOLD,
        probe_samples: int = 2,
    ) -> None:
        if not layers:
            raise ValueError("adaptive precision needs FQT layers")
        if probe_samples < 2:
            raise ValueError(f"probe_samples must be >= 2, got {probe_samples!r}")
        if not budget > 0:
            raise ValueError(f"budget must be > 0, got {budget!r}")
        self.layers = dict(layers)
        self.budget, self.lower_below = float(budget), float(lower_below)
        self.snr_threshold = float(snr_threshold)
        start = [b for m in self.layers.values() for b in (m.config.grad_bits,)]
        start += [m.config.grad_weight_bits for m in self.layers.values()]
        self.min_bits, self.max_bits = min(int(min_bits), *start), max(int(max_bits), *start)
        self.frontiers: dict[tuple[str, str], list[_Option]] = {}
        by_name = {} if plan is None else {lay.name: lay for lay in plan.layers}
        scale = plan.sampling_variance if plan is not None else 1.0
        for name, layer in self.layers.items():
            for branch in BRANCHES:
                rows = by_name[name].frontier.get(branch) if name in by_name else None
                self.frontiers[(name, branch)] = (
                    _rows_to_frontier(rows, scale, f"plan layer {name!r} {branch}_frontier")
                    if rows
                    else self._assumed(layer.config, branch)
                )
        self.at = {k: self._index(k) for k in self.frontiers}
        self.window: dict[str, float] = {}
        self.warned: list[str] = []
        self.probe_samples = int(probe_samples)
        # per branch: measured / predicted variance at the choice it was probed at (or, for a
        # branch whose frontier predicts 0, the measured variance itself), the last probe's
        self.drift: dict[tuple[str, str], float] = {}
        self.share: dict[tuple[str, str], float] = {}  # its part of the budget (fraction of S)
        self.probed = 0  # grad branches probed so far (the round robin's position)
        # branches whose GEMM does not run (a grad branch whose input needs no gradient), found
        # at the first probe: one option, no variance, never probed
        self.idle: set[tuple[str, str]] | None = None
        self.below = 0  # consecutive windows whose total was below the band
        self.last_ratio: float | None = None  # the last window's total Q / S (None: unmeasured)
        self.pending: set[tuple[str, str]] = set()  # past their share in the last window

    def _assumed(self, config: FQTConfig, branch: str) -> list[_Option]:
        q_field, b_field = _FIELDS[branch]
        q, b = getattr(config, q_field), getattr(config, b_field)
        if q is None or q == "identity" or _fixed_width(q, b):
            return [_Option((q or "identity", b), 0.0, 0.0)]
        return [
            _Option((q, bits), float(bits), float(_bins(self.min_bits) / _bins(bits)) ** 2)
            for bits in range(self.min_bits, self.max_bits + 1)
        ]

    def _index(self, key: tuple[str, str]) -> int:
        """Where the layer's current setting sits on the branch's frontier (same quantizer,
        nearest bits; a setting off the frontier takes the nearest option)."""
        layer = self.layers[key[0]]
        q_field, b_field = _FIELDS[key[1]]
        q, b = getattr(layer.config, q_field) or "identity", getattr(layer.config, b_field)
        options = self.frontiers[key]
        same = [i for i, o in enumerate(options) if o.candidate[0] == q] or range(len(options))
        return min(same, key=lambda i: (abs(options[i].candidate[1] - b), i))

    def bits(self) -> dict[str, list[int]]:
        return {n: [m.config.grad_bits, m.config.grad_weight_bits] for n, m in self.layers.items()}

    def bits_per_element(self) -> dict[str, list[float]]:
        """Per layer, ``[grad, grad_weight]`` storage bits per gradient element
        (:func:`bits_per_element`): a block format's scales count, so a change between formats
        or between a format and an integer grid of the same bits shows (32: an exact branch)."""
        out = {}
        for name, m in self.layers.items():
            cfg = m.config
            out[name] = [
                bits_per_element(cfg.grad_quantizer or "identity", cfg.grad_bits),
                bits_per_element(cfg.grad_weight_quantizer or "identity", cfg.grad_weight_bits),
            ]
        return out

    def predicted(self) -> float:
        """The plan's predicted total at the current choices (fraction of sampling variance)."""
        return sum(self.frontiers[k][i].variance for k, i in self.at.items())

    def _choice(self, key: tuple[str, str]) -> Candidate:
        return self.frontiers[key][self.at[key]].candidate

    def _probe_plan(self) -> tuple[list[dict[str, dict[str, Candidate]]], list[Any]]:
        """The next probe's assignments (for :func:`_branches`) and their keys (as
        :func:`_unpack` reads them): the weight-gradient branches together, then the next
        ``grad`` branch in turn. Branches with an exact GEMM (``identity``) are left out."""
        idle = self.idle or set()
        on = {k for k in self.frontiers if self._choice(k)[0] != "identity" and k not in idle}
        weight = [(n, "grad_weight") for n in self.layers if (n, "grad_weight") in on]
        grads = [(n, "grad") for n in self.layers if (n, "grad") in on]
        assignments: list[dict[str, dict[str, Candidate]]] = []
        keys: list[Any] = []
        if weight:
            assignments.append({n: {b: self._choice((n, b))} for n, b in weight})
            keys.append(weight)
        if grads:
            n, b = grads[self.probed % len(grads)]
            assignments.append({n: {b: self._choice((n, b))}})
            keys.append((n, b))
        return assignments, keys

    def probe(
        self, model: nn.Module, loss_fn: LossFn, batch: Batch
    ) -> dict[tuple[str, str], float]:
        """Measure branches by source at their current choices on ``batch`` (the class doc):
        ``probe_samples`` backward passes of one forward with every weight-gradient branch on,
        and as many with the next ``grad`` branch alone. Returns each probed branch's
        quantization variance (the same units as the monitor's). Pass it to :meth:`observe`
        with the measurement of the same batch."""
        with kept_random_streams(model, batch[0].device):  # training's draws stay as they were
            if self.idle is None:
                sizes = _gemm_sizes(model, batch)
                self._set_idle(
                    {(n, b) for n in self.layers for b in BRANCHES if sizes.get(n, {}).get(b) == 0}
                )
            assignments, keys = self._probe_plan()
            if not assignments:
                return {}
            measured = _measure(model, loss_fn, [batch], self.probe_samples, assignments, None, "")
        self.probed += any(isinstance(k, tuple) for k in keys)
        return _unpack(keys, measured)

    def _set_idle(self, idle: set[tuple[str, str]]) -> None:
        """Branches whose GEMM does not run keep their current choice as their only option,
        with no cost and no variance (as :func:`plan_precision`'s frontiers give them)."""
        self.idle = set(idle)
        for key in self.idle:
            self.frontiers[key] = [_Option(self._choice(key), 0.0, 0.0)]
            self.at[key] = 0
            self.share.pop(key, None)
            self.drift.pop(key, None)

    def observe(
        self,
        quantization: Mapping[str, float],
        sampling: Mapping[str, float],
        grad_norm_sq: Mapping[str, float] | None = None,
        ranks: int = 1,
        branches: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        """One measurement (:class:`~fqtorch.stats.VarianceRatio`'s per-layer quantization and
        sampling variance, all parameters), the step's per-layer gradient squared norms
        (layers without a gradient left out), and :meth:`probe`'s per-branch variances of the
        same batch (optional).

        ``ranks``: the gradient is the mean of that many ranks' gradients (DDP), each with the
        measured variances, so its own are ``1/ranks`` of them: both are scaled by that (the
        ratio ``ΣQ/ΣS`` does not change; the signal ``‖g‖² − (S + Q)/ranks`` stays unbiased
        and the noise is the update's)."""
        if ranks > 1:
            quantization = {k: v / ranks for k, v in quantization.items()}
            sampling = {k: v / ranks for k, v in sampling.items()}
            branches = {k: v / ranks for k, v in (branches or {}).items()}
        q_total, s_total = sum(quantization.values()), sum(sampling.values())
        if not (math.isfinite(q_total) and math.isfinite(s_total) and s_total > 0):
            return
        w = self.window
        w["q"] = w.get("q", 0.0) + q_total
        w["s"] = w.get("s", 0.0) + s_total
        w["count"] = w.get("count", 0.0) + 1
        for (name, branch), q in (branches or {}).items():
            if (name, branch) in self.frontiers and math.isfinite(q):
                w[f"pq/{name}/{branch}"] = w.get(f"pq/{name}/{branch}", 0.0) + q
                w[f"pn/{name}/{branch}"] = w.get(f"pn/{name}/{branch}", 0.0) + 1
        for name in self.layers:
            g2 = None if grad_norm_sq is None else grad_norm_sq.get(name)
            q, s = quantization.get(name), sampling.get(name)
            if g2 is None or q is None or s is None or not math.isfinite(g2):
                continue
            w[f"signal/{name}"] = w.get(f"signal/{name}", 0.0) + g2 - s - q
            w[f"noise/{name}"] = w.get(f"noise/{name}", 0.0) + q

    def window_keys(self) -> list[str]:
        """The window's sums in a fixed order (to all-reduce them across ranks)."""
        names = [f"{w}/{n}" for w in ("signal", "noise") for n in self.layers]
        probes = [f"{w}/{n}/{b}" for w in ("pq", "pn") for n, b in self.frontiers]
        return ["q", "s", "count", *names, *probes]

    def estimates(self, ratio: float) -> dict[tuple[str, str], float]:
        """Each branch's quantization variance at its current choice (fraction of S), the
        probes' drifts (``R / P`` for a branch never probed) scaled to sum to ``ratio``."""
        predicted = self.predicted()
        level = ratio / predicted if predicted > 0 else 0.0
        shape = {}
        for key, i in self.at.items():
            v = self.frontiers[key][i].variance
            drift = self.drift.get(key)
            shape[key] = (level * v if drift is None else drift * v) if v > 0 else (drift or 0.0)
        total = sum(shape.values())
        if not total > 0 and ratio > 0:  # every probe measured 0: fall back to the total's level
            shape = {k: level * self.frontiers[k][i].variance for k, i in self.at.items()}
            total = sum(shape.values())
        return {k: e * ratio / total for k, e in shape.items()} if total > 0 else shape

    def _scaled(self, estimates: Mapping[tuple[str, str], float]) -> dict[Any, list[_Option]]:
        """The frontiers scaled by each branch's estimate / prediction at its choice."""
        out = {}
        for key, f in self.frontiers.items():
            v = f[self.at[key]].variance
            if v > 0:
                c = estimates[key] / v
                out[key] = [dataclasses.replace(o, variance=o.variance * c) for o in f]
            else:  # a fixed-width format: one option, its measured variance (none: 0)
                out[key] = [dataclasses.replace(o, variance=estimates[key]) for o in f]
        return out

    def _set_shares(self, estimates: Mapping[tuple[str, str], float]) -> None:
        """Each branch's part of the budget, in proportion to its estimate, and at least a
        tenth of an equal part (a branch estimated at 0 would otherwise have no room at all,
        and its next positive reading would send it to its most bits)."""
        total = sum(estimates.values())
        floor = 0.1 / len(estimates)
        self.share = {
            k: self.budget * max(e / total if total > 0 else 0.0, floor)
            for k, e in estimates.items()
        }

    def replan(self) -> list[dict[str, Any]]:
        """Apply the decision; one record per changed layer (the window is cleared)."""
        w = self.window
        self._snr = {
            n: w[f"signal/{n}"] / w[f"noise/{n}"]
            for n in self.layers
            if w.get(f"noise/{n}", 0.0) > 0
        }
        # the layers at their most precise options while the window was measured (low_snr
        # judges the window's SNR against these, not against the choices made below)
        self._measured_at_top = self._at_top()
        self.window = {}
        self.last_ratio = None
        if not w.get("count") or not w.get("s"):
            return []
        for (name, branch), i in self.at.items():  # the window was measured at these choices
            probes = w.get(f"pn/{name}/{branch}", 0.0)
            if probes > 0:
                # the probes' mean over the window's mean S (all its measurements: a ratio of
                # sums, not of one probe's Q to that one batch's S)
                measured = (w[f"pq/{name}/{branch}"] / probes) / (w["s"] / w["count"])
                v = self.frontiers[(name, branch)][i].variance
                if measured > 0 or v == 0:
                    self.drift[(name, branch)] = measured / v if v > 0 else measured
                else:  # no noise this window (no gradient reached it): it drifts like the total
                    self.drift.pop((name, branch), None)
        ratio = self.last_ratio = w["q"] / w["s"]
        if not self.predicted() > 0:
            return []
        if not self.share:  # the start: each branch's part of the plan's prediction
            self._set_shares({k: self.frontiers[k][i].variance for k, i in self.at.items()})
        estimates = self.estimates(ratio)
        frontiers = self._scaled(estimates)
        past = {
            k
            for k, e in estimates.items()
            if e > SHARE_TOLERANCE * self.share.get(k, math.inf)
            and self.at[k] < len(frontiers[k]) - 1
        }
        over = sorted(past & self.pending)  # past it for the second window running
        self.pending = past
        low = ratio < self.lower_below * self.budget
        self.below = self.below + 1 if low else 0
        if ratio > self.budget or (low and self.below >= 2):
            # the total out of its band: choose every branch again, aiming at AIM · budget, and
            # give each branch its new share of the budget. Above the budget no branch is
            # lowered (its noisy estimate would trade bits between branches on every excursion);
            # below the band, for the second window running (one low window is as likely a
            # noisy one: raising is safe, lowering waits for confirmation), every branch may
            # move.
            self.below, self.pending = 0, set()
            floor = dict(self.at) if ratio > self.budget else dict.fromkeys(self.at, 0)
            above = {k: f[floor[k] :] for k, f in frontiers.items()}
            at, ok = _choose(above, AIM * self.budget)
            if not ok:
                at, _ = _choose(above, self.budget)
            at = {k: i + floor[k] for k, i in at.items()}
            self._set_shares({k: frontiers[k][i].variance for k, i in at.items()})
            trigger = "total above the budget" if ratio > self.budget else "total below the band"
        elif over:
            # a branch past its share (SHARE_TOLERANCE times it): raise it to its cheapest
            # option within the share; the others and the shares stay
            at = dict(self.at)
            for k in over:
                f = frontiers[k]
                at[k] = next(
                    (j for j in range(at[k] + 1, len(f)) if f[j].variance <= self.share[k]),
                    len(f) - 1,
                )
            self.pending -= set(over)
            trigger = "past their share: " + ", ".join(f"{n} {b}" for n, b in over)
        else:
            return []
        changes = []
        for name, layer in self.layers.items():
            old = {b: self._choice((name, b)) for b in BRANCHES}
            new = {b: frontiers[(name, b)][at[(name, b)]].candidate for b in BRANCHES}
            if new == old:
                continue
            self._set(layer, new)
            changes.append(
                {
                    "layer": name,
                    "ratio": ratio,
                    "trigger": trigger,
                    "bits": [old["grad"][1], old["grad_weight"][1]],
                    "new_bits": [new["grad"][1], new["grad_weight"][1]],
                    "quantizers": [new["grad"][0], new["grad_weight"][0]],
                    "estimates": [estimates[(name, b)] for b in BRANCHES],
                }
            )
        self.at = at
        predicted_ratio = sum(frontiers[k][i].variance for k, i in at.items())
        for change in changes:
            change["predicted_ratio"] = predicted_ratio
        return changes

    def _at_top(self) -> set[str]:
        """Layers whose branches are all at their most precise options."""
        return {
            n
            for n in self.layers
            if all(self.at[(n, b)] == len(self.frontiers[(n, b)]) - 1 for b in BRANCHES)
        }

    @staticmethod
    def _set(layer: FQTModule, choice: Mapping[str, Candidate]) -> None:
        (gq, gb), (wq, wb) = choice["grad"], choice["grad_weight"]
        set_layer_config(
            layer,
            layer.config.replace(
                grad_quantizer=None if gq == "identity" else gq,
                grad_bits=gb,
                grad_weight_quantizer=wq,
                grad_weight_bits=wb,
            ),
        )

    def grad_norm_sq(self) -> dict[str, float]:
        """Each layer's squared gradient norm from its parameters' ``.grad``, for :meth:`observe`.
        A parameter held by several layers (tied weights) counts once, under the first: the
        variance measurement puts its noise there too. Layers with no gradient (a skipped
        non-finite step) are left out."""
        seen: set[int] = set()
        norms = {}
        for name, layer in self.layers.items():
            own = [p for p in layer.parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in own)
            grads = [p.grad for p in own if p.requires_grad and p.grad is not None]
            if grads:
                norms[name] = sum(float(g.double().square().sum()) for g in grads)
        return norms

    def low_snr(self) -> list[str]:
        """Layers whose signal-to-quantization-noise ratio fell below the threshold in the last
        window while they were at their most precise options (the choices the window was
        measured under, before that re-plan changed them), not named before."""
        snr = getattr(self, "_snr", {})
        top = getattr(self, "_measured_at_top", set())
        new = [
            n
            for n, value in snr.items()
            if value < self.snr_threshold and n in top and n not in self.warned
        ]
        self.warned += new
        self._snr = {}
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits(),
            "at": [[n, b, i] for (n, b), i in self.at.items()],
            "frontiers": [
                [n, b, [[*o.candidate, o.cost, o.variance] for o in f]]
                for (n, b), f in self.frontiers.items()
            ],
            "window": dict(self.window),
            "warned": list(self.warned),
            "drift": [[n, b, v] for (n, b), v in self.drift.items()],
            "share": [[n, b, v] for (n, b), v in self.share.items()],
            "probed": self.probed,
            "below": self.below,
            "pending": [list(k) for k in sorted(self.pending)],
            "idle": None if self.idle is None else [list(k) for k in sorted(self.idle)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state["bits"]) - set(self.layers))
        if unknown:
            raise ValueError(f"precision state for layers the model lacks: {unknown}")
        for n, b, rows in state["frontiers"]:
            self.frontiers[(n, b)] = _rows_to_frontier(rows, 1.0, f"precision state {n} {b}")
        self.at = {(n, b): int(i) for n, b, i in state["at"]}
        for name, layer in self.layers.items():
            self._set(
                layer,
                {b: self.frontiers[(name, b)][self.at[(name, b)]].candidate for b in BRANCHES},
            )
        self.window = {k: float(v) for k, v in state["window"].items()}
        self.warned = list(state["warned"])
        # absent from checkpoints written before the per-branch probes: start without them
        self.drift = {(n, b): float(v) for n, b, v in state.get("drift", [])}
        self.share = {(n, b): float(v) for n, b, v in state.get("share", [])}
        self.probed = int(state.get("probed", 0))
        self.below = int(state.get("below", 0))
        self.pending = {(str(n), str(b)) for n, b in state.get("pending", [])}
        idle = state.get("idle")
        self.idle = None if idle is None else {(str(n), str(b)) for n, b in idle}


def _fixed_width(quantizer: str, bits: int) -> bool:
    """A format whose width is its own (fp8, mx, nvfp): its ``bits`` ignore the request."""
    widths = {get_quantizer(quantizer, b).bits for b in {bits, 4, 8}}
    return len(widths) == 1 or get_quantizer(quantizer, bits).bits != bits


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_extra(what: str, value: Any, where: str) -> Any:
    """A layer entry's recorded measurement, checked as plan.json holds it: variances and
    per-bit factors non-negative numbers, GEMM sizes non-negative integers, frontier rows
    ``[quantizer, bits, cost, variance]`` of a registered quantizer at bits it takes."""
    if what == "frontier":
        _rows_to_frontier(value, 1.0, where)
        for q, b, _, _ in value:
            if not (isinstance(q, str) and is_registered(q)):
                raise ValueError(f"{where}: {q!r} is not a registered quantizer")
            try:
                get_quantizer(q, int(b))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return value
    ok = isinstance(value, int) if what == "macs" else _is_number(value)
    if not ok or isinstance(value, bool) or not 0 <= value < math.inf:
        kind = "a non-negative integer" if what == "macs" else "a finite number >= 0"
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return value


def _rows_to_frontier(rows: Any, scale: float, where: str) -> list[_Option]:
    """Frontier rows ``[quantizer, bits, cost, variance]`` (variance divided by ``scale``)."""
    try:
        out = [_Option((str(q), int(b)), float(c), float(v) / scale) for q, b, c, v in rows]
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: expected rows [quantizer, bits, cost, variance], got {rows!r:.80}"
        ) from None
    if not out:
        raise ValueError(f"{where}: empty frontier")
    return out
