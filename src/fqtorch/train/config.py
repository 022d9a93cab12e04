"""``TrainConfig``: everything a training run needs, resolved from defaults, a file and flags.

Per-dataset defaults follow the paper's recipes (docs/method.md §6); the digits default is the small
embedded job the README runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FQTConfig
from ..quantizers.formats import is_format

__all__ = ["DATASET_DEFAULTS", "FQT_FIELDS", "TrainConfig", "load_config_file"]

FQT_FIELDS = (
    "input_bits",
    "weight_bits",
    "input_quantizer",
    "weight_quantizer",
    "grad_bits",
    "grad_quantizer",
    "grad_weight_bits",
    "grad_weight_quantizer",
    "grad_rounding",
    "grad_transform",
    "backend",
    "fused",
    "attention_products",
)

# Each bit width and the quantizer that uses it (TrainConfig._check_bits_used).
_BITS_OF = {
    "input_bits": "input_quantizer",
    "weight_bits": "weight_quantizer",
    "grad_bits": "grad_quantizer",
    "grad_weight_bits": "grad_weight_quantizer",
}
_BITS_EXAMPLE = {
    "input_quantizer": "ptq",
    "weight_quantizer": "symmetric",
    "grad_quantizer": "bhq",
    "grad_weight_quantizer": "per_column",
}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(
        model="digits_cnn",
        epochs=12,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        warmup_epochs=1.0,
        label_smoothing=0.0,
        optimizer="sgd",
    ),
    "cifar10": dict(
        model="preact_resnet56",
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        warmup_epochs=0.0,
        label_smoothing=0.0,
        optimizer="sgd",
    ),
    "imagenet": dict(
        model="resnet18",
        epochs=90,
        batch_size=50,
        lr=0.4,
        momentum=0.875,
        weight_decay=2**-15,
        warmup_epochs=4.0,
        label_smoothing=0.1,
        optimizer="sgd",
    ),
    "text": dict(
        model="char_gpt",
        epochs=5,
        batch_size=32,
        lr=3e-3,
        momentum=0.9,
        weight_decay=0.1,
        warmup_epochs=0.2,
        label_smoothing=0.0,
        optimizer="adamw",
    ),
}


# A field's declared type: what to call it in an error, and the values that have it.
_EXPECTED: dict[str, tuple[str, tuple[type, ...]]] = {
    "int": ("an integer", (int,)),
    "float": ("a number", (int, float)),
    "str": ("a string", (str,)),
    "bool": ("true or false", (bool,)),
    "dict": ("a mapping", (dict,)),
}


@dataclass(frozen=True)
class TrainConfig:
    """A training run. ``None`` fields take the dataset's default (``DATASET_DEFAULTS``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None
    preset: str = "bhq5"
    fqt: dict[str, Any] = field(default_factory=dict)  # FQTConfig field overrides
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    optimizer: str | None = None
    seed: int = 0
    out: str | None = None  # None: a new directory under runs/ (fqtorch.train.rundir)
    resume: bool = False
    checkpoint_every: int = 0  # also checkpoint every K steps (0: at the end of each epoch only)
    tensorboard: bool = False
    variance_every: int = 0
    bits_plan: str | None = None  # a plan.json of `fqtorch plan`: per-layer gradient bits
    adaptive_precision: int = 0  # re-plan gradient bits every K steps (needs variance_every)
    device: str = "auto"
    fsdp: bool = False  # shard with FSDP2 (fully_shard) instead of DDP; needs torchrun
    block_size: int = 64
    image_size: int = 224
    workers: int = 0
    nonfinite: str = "stop"
    max_steps_per_epoch: int | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("out", "bits_plan"):  # ~ as a shell would (a config file's value too)
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))
        if isinstance(self.data_dir, str):  # absolute: a resume from another folder finds it
            object.__setattr__(self, "data_dir", os.path.abspath(os.path.expanduser(self.data_dir)))
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; known: {', '.join(DATASET_DEFAULTS)}"
            )
        given = {key for key in DATASET_DEFAULTS[self.dataset] if getattr(self, key) is not None}
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        unknown = sorted(set(self.fqt) - set(FQT_FIELDS))
        if unknown:
            raise ValueError(f"unknown FQT fields {unknown}; known: {', '.join(FQT_FIELDS)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("variance_every", "checkpoint_every", "workers", "adaptive_precision"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._check_ranges()
        if self.fsdp and self.variance_every:
            raise ValueError(
                "variance_every needs each rank's whole gradients, which fsdp shards; leave out "
                "--variance-every or --fsdp"
            )
        if self.variance_every and self.batch_size < 2:
            raise ValueError(
                "variance_every estimates the sampling variance from micro-batches of each "
                f"batch, so it needs batch_size >= 2 (per process), got {self.batch_size}"
            )
        if self.bits_plan is not None:
            self._check_bits_plan()
        if self.adaptive_precision and not (self.variance_every and self.fqt_config()):
            raise ValueError(
                "adaptive_precision re-plans from the variance_every measurements of FQT "
                "gradients; give --variance-every K and a quantized --preset or --bits-plan"
            )
        if self.adaptive_precision and self.fqt_config().is_qat and self.bits_plan is None:
            raise ValueError(
                "adaptive_precision moves gradient bits, and this preset has no gradient "
                "quantizers (QAT); give a preset such as bhq5 or a --bits-plan"
            )
        if self.resume and self.out is None:
            raise ValueError("resume needs the run directory to continue (out)")
        fqt = self.fqt_config()  # validate the quantization plan now
        if not self.resume:  # a run started before these checks keeps the options it has
            self._check_bits_used(fqt)
            self._check_options_used(fqt, given)

    def _check_bits_used(self, cfg: FQTConfig | None) -> None:
        """A bit width given for a GEMM operand whose quantizer takes none (none at all, the
        identity, or a float format, whose width is its own) would be recorded in the run's
        header and config.json and do nothing: refused, naming what would use it."""
        if cfg is None:
            return
        for bits, role in _BITS_OF.items():
            if bits not in self.fqt:
                continue
            quantizer = getattr(cfg, role)
            if quantizer is None or quantizer == "identity":
                what = f"{role} is {quantizer or 'None (its gradient stays exact)'}"
                fix = f"give --{role.replace('_', '-')} (e.g. {_BITS_EXAMPLE[role]})"
            elif is_format(quantizer):
                what = f"{role} is the float format {quantizer}, whose width is its own"
                fix = "leave it out, or pick an integer quantizer"
            else:
                continue
            raise ValueError(
                f"{bits}={self.fqt[bits]} has no effect with preset {self.preset}: {what}; {fix}"
            )

    def _check_options_used(self, cfg: FQTConfig | None, given: set[str]) -> None:
        """Other options that this run would record and never read (``given``: the dataset
        defaults given, not filled in), refused with what to do instead."""
        recorded = DATASET_DEFAULTS[self.dataset]["momentum"]  # what a run records, unread
        if "momentum" in given and self.optimizer == "adamw" and self.momentum != recorded:
            raise ValueError(
                f"momentum={self.momentum} has no effect with optimizer adamw (its betas are "
                "(0.9, 0.95)); leave out --momentum, or give --optimizer sgd"
            )
        field_defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, dataset in (("block_size", "text"), ("image_size", "imagenet")):
            if getattr(self, name) != field_defaults[name] and self.dataset != dataset:
                raise ValueError(
                    f"{name}={getattr(self, name)} has no effect with dataset {self.dataset} "
                    f"(only {dataset} reads it); leave out --{name.replace('_', '-')}"
                )
        if self.variance_every and cfg is None:
            raise ValueError(
                "variance_every measures the quantization variance of the gradients, and "
                "--preset exact quantizes nothing; leave out --variance-every, or give a "
                "quantized --preset"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(FQTConfig)}
        unused = [  # a plan's layers take the base config's rounding and transform
            k
            for k in ("grad_rounding", "grad_transform")
            if k in self.fqt and self.fqt[k] != defaults[k] and self.bits_plan is None
        ]
        exact = cfg is not None and cfg.grad_quantizer is None and cfg.grad_weight_quantizer is None
        if unused and exact:
            raise ValueError(
                f"{unused[0]}={self.fqt[unused[0]]} has no effect with preset {self.preset}: "
                "its gradients stay exact; give a gradient quantizer (e.g. --preset bhq5 or "
                "--grad-quantizer bhq) or leave it out"
            )

    def _check_ranges(self) -> None:
        """Numbers a run could take without failing but would train wrongly with, refused with
        the option named (after the dataset's defaults are filled in)."""
        if not 0 <= self.seed < 2**63:  # torch.manual_seed and the layers' streams take it
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if not 0 < self.lr < math.inf:  # also NaN
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "warmup_epochs"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:  # SGD's velocity grows without bound at 1 and past it
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("block_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(
                f"max_steps_per_epoch must be >= 1 (or left out), got {self.max_steps_per_epoch}"
            )
        if self.device != "auto":
            import torch

            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda", "mps", "xpu"):
                raise ValueError(
                    "device must be auto, cpu, cuda, cuda:N (or mps, xpu where present: untested "
                    f"there), got {self.device!r}"
                )

    def _check_types(self) -> None:
        """Every option of the type its field declares (a config file can hold anything): a
        ``ValueError`` naming the option. A number YAML reads as a string (``1e-3``, which
        YAML 1.1 does not take for a float) is taken as the number."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, _, rest = str(f.type).partition(" | ")
            if value is None and "None" in rest:
                continue
            if kind == "float" and isinstance(value, str):
                try:
                    object.__setattr__(self, f.name, float(value))
                    continue
                except ValueError:
                    pass
            expected, types = _EXPECTED[kind.split("[")[0]]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ValueError(f"{f.name}: expected {expected}, got {value!r}")

    def _check_bits_plan(self) -> None:
        """The plan file reads (a one-line error naming it otherwise), and no flag sets the
        gradient quantizers it sets per layer."""
        from ..stats.plan import load_plan

        given = [
            k
            for k in ("grad_quantizer", "grad_bits", "grad_weight_quantizer", "grad_weight_bits")
            if k in self.fqt
        ]
        if given:
            raise ValueError(
                f"bits_plan sets the gradient quantizers of every layer; leave out {given}"
            )
        load_plan(self.bits_plan)

    @property
    def quantized(self) -> bool:
        return self.preset != "exact" or bool(self.fqt) or self.bits_plan is not None

    def fqt_config(self) -> FQTConfig | None:
        """The layers' plan, or ``None`` for ``--preset exact`` with no FQT overrides."""
        if not self.quantized:
            return None
        return FQTConfig.preset(self.preset, seed=self.seed, **self.fqt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(FQT_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown config keys {unknown}; known: {', '.join(sorted(names))}; and the "
                f"FQT fields, at the top level or under fqt: {', '.join(FQT_FIELDS)}"
            )
        nested = values.get("fqt") or {}
        if not isinstance(nested, dict):
            raise ValueError(
                f"fqt must be a mapping of FQTConfig fields to values (e.g. {{grad_bits: 4}}), "
                f"got {nested!r}"
            )
        fqt = dict(nested)  # a top-level field (a flag) takes precedence over fqt's
        fqt.update({k: v for k, v in values.items() if k in FQT_FIELDS})
        plain = {k: v for k, v in values.items() if k in names and k != "fqt"}
        return cls(**plain, fqt=fqt)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict; a file that does not
    parse is a ``ValueError`` naming the file, line and column."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; name a .yaml, .yml or .json file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); save it as UTF-8 YAML or JSON") from None  # fmt: skip
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    elif path.suffix != ".json":
        raise ValueError(f"config file {path}: expected a .yaml, .yml or .json file")
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    nested = values.get("fqt")
    if isinstance(nested, dict):
        twice = sorted(
            k for k in set(nested) & set(values) if k in FQT_FIELDS and nested[k] != values[k]
        )
        if twice:
            raise ValueError(
                f"{path} sets {', '.join(twice)} twice, at the top level and under fqt, to "
                f"different values; keep one of them"
            )
    return values


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error in one line: the problem and where (its message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
    return f"{problem}{where}"
