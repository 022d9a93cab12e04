"""``quantize_model`` / ``dequantize_model``: swap float layers for FQT layers and back, in place,
through a registry of layer conversions; ``conversion_summary`` says what is FQT and what is not.

The FQT layers adopt the original Parameter objects, so an optimizer built before the swap keeps
working and ``state_dict()`` keys and values are unchanged.

**The registry** (``register_layer``) is the one deliberate piece of global state here, like the
quantizer registry: it maps a float layer type to the function that builds its FQT layer.
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention`` and transformers' ``Conv1D``
(GPT-2) are registered through it below. ``quantize_model(..., layers=...)`` overrides it for one
call, and wins over it: a module matches the entry of its class or of the nearest base class in
``layers=``, else in the registry. A subclass is converted only when it overrides none of that
base's methods (``__init__``, ``reset_parameters``, ``extra_repr`` aside): one with its own
``forward``, or its own method that ``forward`` calls (``nn.Conv2d._conv_forward``), may compute
something else. A registered layer is converted whole or left whole: the submodules of
``nn.MultiheadAttention``, whose forward reads their weights directly, are never converted on
their own. A layer that holds hooks or a ``torch.nn.utils.parametrize`` parametrization (on
itself or a submodule) stays float: the FQT layer would not run them (legacy ``weight_norm``,
``spectral_norm`` and ``prune`` are such hooks, which recompute the weight).

Module swapping sees modules only: a product that a ``forward`` computes from raw parameters
(``F.linear(x, self.w)``, ``x @ self.w``, ``torch.einsum``) stays float. The summary names the
modules that own such parameters, and the layers that hold matrix products fqtorch does not convert
(LSTM, transposed convolutions, ...).
"""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .config import FQTConfig
from .nn.attention import FQTMultiheadAttention
from .nn.modules import (
    _HOOK_DICTS,
    FQTConv1d,
    FQTConv2d,
    FQTLinear,
    FQTModule,
    FQTTransposedLinear,
)
from .quantizers.callers import FQTWarning, user_stacklevel

__all__ = [
    "ConversionSummary",
    "LayerConversion",
    "conversion_summary",
    "dequantize_model",
    "fqt_modules",
    "generator_states",
    "load_generator_states",
    "quantize_model",
    "register_layer",
    "registered_layers",
    "reseed",
    "same_streams",
    "unregister_layer",
]

log = logging.getLogger(__name__)

ConfigFn = Callable[[nn.Module, str], "FQTConfig | None"]
ToFQT = Callable[[nn.Module, FQTConfig, str], FQTModule]
FromFQT = Callable[[FQTModule], nn.Module]


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class LayerConversion:
    """How one float layer type becomes an FQT layer and back.

    ``float_type`` is a class, or its qualified name ``"package.module.Class"`` (matched without
    importing the package). ``to_fqt(module, config, name)`` returns the FQT layer (an FQT layer
    class, called as ``FQTLinear(module, config, name)``, is such a function); ``from_fqt(layer)``
    returns the float layer, by default ``layer.to_float()``.
    """

    float_type: type[nn.Module] | str
    to_fqt: ToFQT
    from_fqt: FromFQT | None = None


_REGISTRY: dict[type[nn.Module] | str, LayerConversion] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _type_name(cls: type[nn.Module] | str) -> str:
    """``nn.Linear`` for torch's layers, ``package.module.Class`` for the others."""
    if isinstance(cls, str):
        return cls
    if cls.__module__.startswith("torch.nn.modules"):
        return f"nn.{cls.__qualname__}"
    return _qualified_name(cls)


def _resolve(name: str) -> type | None:
    """The class ``name`` denotes when the longest prefix of it that is an imported module holds
    it (``"torch.nn.Bilinear"`` -> ``nn.Bilinear``, whose own name is
    ``torch.nn.modules.linear.Bilinear``); ``None`` otherwise. Looks attributes up statically,
    so nothing is imported (a lazy package's modules neither). Raises ``ValueError`` when the
    module ``name`` places the class in is imported and does not hold it."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        found: object = module
        for attr in parts[split:]:
            found = inspect.getattr_static(found, attr, None)
        if isinstance(found, type):
            return found
        if split == len(parts) - 1:
            raise ValueError(
                f"{name!r} names no class: module {module.__name__!r} is imported and holds no "
                f"class {parts[-1]!r}; give the class itself or its 'package.module.Class' name"
            )
        return None
    return None


def _names(
    float_type: type[nn.Module] | str, key: type[nn.Module] | str
) -> list[type[nn.Module] | str]:
    """The registry keys that denote the same layer type as ``float_type`` (resolved to
    ``key``): the class, its qualified name, and the name given."""
    names = [key] if isinstance(key, str) else [key, _qualified_name(key)]
    return [*names, float_type] if float_type not in names else names


def _key(float_type: object) -> type[nn.Module] | str:
    """``float_type`` checked, and a name resolved to its class when its module is imported (a
    name is otherwise matched against ``cls.__module__ + "." + cls.__qualname__``, so it must be
    the class's defining module, e.g. ``transformers.pytorch_utils.Conv1D``)."""
    if isinstance(float_type, str):
        if "." not in float_type.strip(".") or not all(
            part.isidentifier() for part in float_type.split(".")
        ):
            raise ValueError(
                f"a layer type given by name must be 'package.module.Class', got {float_type!r}"
            )
        resolved = _resolve(float_type)
        if resolved is None:
            return float_type
        float_type = resolved
    _check_key(float_type)
    return float_type  # type: ignore[return-value]


def _check_key(float_type: object) -> None:
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(
            f"float_type must be an nn.Module subclass or its qualified name, got {float_type!r}"
        )
    elif issubclass(float_type, FQTModule):
        raise TypeError(f"{float_type.__name__} is an FQT layer, not a float layer type")


def register_layer(
    float_type: type[nn.Module] | str,
    to_fqt: ToFQT,
    from_fqt: FromFQT | None = None,
    *,
    replace: bool = False,
) -> None:
    """Teach :func:`quantize_model` a layer type: ``to_fqt(module, config, name)`` builds its FQT
    layer (typically an :class:`~fqtorch.nn.FQTModule` subclass that calls ``self.adopt(module)``
    and so inherits ``to_float()``); ``from_fqt(fqt_layer)`` turns it back (default:
    ``fqt_layer.to_float()``).

    ``float_type`` is a class, or its qualified name ``"package.module.Class"`` to match a class
    whose package should not be imported (transformers' ``Conv1D`` is registered that way).
    Subclasses of ``float_type`` that override none of its methods are converted too.
    Registering a type twice raises unless ``replace=True``. :func:`conversion_summary` and
    :func:`dequantize_model` pick the registration up.

    A name is resolved to its class when its module is already imported (so a re-exported name
    such as ``"torch.nn.Bilinear"`` works, and a name its imported module does not hold raises);
    otherwise it must be the class's defining module and qualified name,
    ``cls.__module__ + "." + cls.__qualname__``, to match.
    """
    key = _key(float_type)
    if not callable(to_fqt):
        raise TypeError(f"to_fqt must be callable (module, config, name) -> FQT layer: {to_fqt!r}")
    if from_fqt is not None and not callable(from_fqt):
        raise TypeError(f"from_fqt must be callable (fqt_layer) -> float layer: {from_fqt!r}")
    existing = [name for name in _names(float_type, key) if name in _REGISTRY]
    if existing and not replace:
        raise ValueError(
            f"{_type_name(key)} is already registered (to_fqt "
            f"{_REGISTRY[existing[0]].to_fqt!r}); pass replace=True to change it"
        )
    for name in existing:
        del _REGISTRY[name]
    _REGISTRY[key] = LayerConversion(key, to_fqt, from_fqt)


def unregister_layer(float_type: type[nn.Module] | str) -> LayerConversion:
    """Remove a registration (as given to :func:`register_layer`) and return it."""
    try:
        key = _key(float_type)
        return next(_REGISTRY.pop(n) for n in _names(float_type, key) if n in _REGISTRY)
    except (StopIteration, TypeError, ValueError):
        raise KeyError(
            f"{float_type!r} is not registered; registered: "
            f"{', '.join(_type_name(k) for k in _REGISTRY)}"
        ) from None


def registered_layers() -> dict[type[nn.Module] | str, LayerConversion]:
    """A copy of the registry: float layer type (or its qualified name) -> conversion."""
    return dict(_REGISTRY)


register_layer(nn.Linear, FQTLinear)
register_layer(nn.Conv1d, FQTConv1d)
register_layer(nn.Conv2d, FQTConv2d)
register_layer(nn.MultiheadAttention, FQTMultiheadAttention)
register_layer("transformers.pytorch_utils.Conv1D", FQTTransposedLinear)

Tables = tuple[Mapping[type[nn.Module] | str, LayerConversion | None], ...]


def _tables(layers: Mapping[type[nn.Module] | str, ToFQT | None] | None) -> Tables:
    """``layers`` (consulted first, over a module's whole MRO; ``None`` leaves that type in
    float), then the registry."""
    if layers is None:
        return (_REGISTRY,)
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must be a mapping of layer type to to_fqt (or None), got "
            f"{type(layers).__name__}"
        )
    overrides: dict[type[nn.Module] | str, LayerConversion | None] = {}
    for key, to_fqt in layers.items():
        key = _key(key)
        if to_fqt is not None and not callable(to_fqt):
            raise TypeError(f"layers[{_type_name(key)}] must be callable or None, got {to_fqt!r}")
        overrides[key] = None if to_fqt is None else LayerConversion(key, to_fqt)
    return (overrides, _REGISTRY)


def _lookup(cls: type, tables: Tables) -> tuple[type, LayerConversion | None] | None:
    """The nearest class in ``cls``'s MRO with an entry in the first table that has one, and
    that entry: ``layers=`` overrides win over the registry, so ``layers={nn.Linear: None}``
    also keeps a registered subclass of ``nn.Linear`` float."""
    for table in tables:
        for base in cls.__mro__:
            for key in (base, _qualified_name(base)):
                if key in table:
                    return base, table[key]
    return None


# --------------------------------------------------------------------------------- the scan
_RECURRENT = "recurrent layer: its matrix products run inside one fused op; no FQT layer for it"
_FLOAT_LAYERS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.RNNBase, nn.RNNCellBase), _RECURRENT),
    (
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        "transposed convolution: no FQT layer for it",
    ),
    ((nn.Conv3d,), "3-d convolution: no FQT layer for it"),
    ((nn.Bilinear,), "bilinear product: no FQT layer for it"),
    (
        (nn.Embedding, nn.EmbeddingBag),
        "a table lookup, no matrix product in its forward; its backward (a scatter-add of "
        "gradient rows) is exact",
    ),
)


@dataclass(frozen=True)
class _Entry:
    """One module the scan reports: ``kind`` is ``"fqt"`` (an FQT layer), ``"convert"``
    (``conversion`` applies) or ``"float"`` (stays float, ``reason`` says why)."""

    name: str
    module: nn.Module
    kind: str
    conversion: LayerConversion | None = None
    reason: str = ""
    registered: bool = False  # a registered type (or a layers= entry) left float for ``reason``


def _registered_reason(module: nn.Module, base: type, conversion: LayerConversion | None) -> str:
    """Why a module of a registered type cannot be converted ("" when it can)."""
    if conversion is None:
        return f"layers= maps {_type_name(base)} to None"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer not initialized yet: run one forward pass before quantize_model"
    if parametrize.is_parametrized(module):
        return (
            "parametrized (torch.nn.utils.parametrize: its weight is computed on access), which "
            "the FQT layer would not compute; remove the parametrization "
            "(parametrize.remove_parametrizations) before quantize_model"
        )
    hooked = _hooked(module)
    if hooked:
        return (
            f"hooks on {hooked} (user hooks, or legacy weight_norm / spectral_norm / prune, which "
            "recompute the weight) that the FQT layer would not run; remove them (hook handles' "
            "remove(), torch.nn.utils.remove_weight_norm, prune.remove, ...) before quantize_model"
        )
    replaced = _replaced_on_instance(module)
    if replaced:
        return (
            f"its {'/'.join(replaced)} replaced on the instance (a wrapper's or a hook library's "
            "patch), which the FQT layer would run instead of its own; convert before patching, "
            "or remove the patch (del module.forward) before quantize_model"
        )
    overridden = _overridden(type(module), base)
    if overridden:
        return (
            f"subclass of {_type_name(base)} with its own {'/'.join(overridden)}, which fqtorch "
            f"cannot know; register a conversion for {_type_name(type(module))} with "
            "fqtorch.register_layer"
        )
    return ""


# Methods a subclass may override and still be converted: they build or describe the layer, the
# FQT layer never runs them.
_HARMLESS_OVERRIDES = frozenset({"__init__", "extra_repr", "reset_parameters", "__repr__"})


def _overridden(cls: type, base: type) -> list[str]:
    """The methods (and properties) of ``base`` that a subclass ``cls`` defines again, except
    :data:`_HARMLESS_OVERRIDES`: ``base.forward`` may call any of them (``nn.Conv2d.forward``
    calls ``_conv_forward``), so a subclass that changes one may compute something else."""
    names = []
    for klass in cls.__mro__[: cls.__mro__.index(base)]:
        for name, value in vars(klass).items():
            is_method = callable(value) or isinstance(value, (staticmethod, classmethod, property))
            if (
                is_method
                and name not in _HARMLESS_OVERRIDES
                and hasattr(base, name)
                and name not in names
            ):
                names.append(name)
    return names


def _replaced_on_instance(module: nn.Module) -> list[str]:
    """Methods of ``module``'s class that an instance attribute shadows (``module.forward =
    patched``, as accelerate's hooks do): the FQT layer would adopt the attribute and run it."""
    cls = type(module)
    return sorted(
        k
        for k, v in vars(module).items()
        if callable(v) and callable(getattr(cls, k, None)) and not isinstance(v, nn.Module)
    )


def _hooked(module: nn.Module) -> str:
    """Where ``module`` or a submodule (a conversion takes them whole) holds hooks or a
    parametrization: ``"itself"`` and/or submodule names; "" when nowhere."""
    hooked = []
    for name, sub in module.named_modules():
        if isinstance(sub, FQTModule):  # its own pre-hook aside
            held = bool(sub._user_hooks())
        else:
            held = any(getattr(sub, key, None) for key in _HOOK_DICTS)
        if held or (sub is not module and parametrize.is_parametrized(sub)):
            hooked.append("itself" if sub is module else repr(name))
    return ", ".join(hooked)


def _float_reason(module: nn.Module) -> str:
    """Why an unregistered module may hold matrix products ("" when it holds none)."""
    for types, reason in _FLOAT_LAYERS:
        if isinstance(module, types):
            return reason
    matrices = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if not matrices:
        return ""
    return (
        f"owns {'/'.join(matrices)} (>= 2-d) and a forward fqtorch does not know: products it "
        "computes from them (F.linear, @, einsum) stay float; register a conversion for it "
        "with fqtorch.register_layer"
    )


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def _scan(model: nn.Module, tables: Tables) -> Iterator[_Entry]:
    """Pre-order walk over every path (shared modules at each of theirs). FQT layers and
    registered layers are taken whole: their submodules are not visited."""
    whole: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(_inside(name, prefix) for prefix in whole):
            continue
        if isinstance(module, FQTModule):
            whole.append(name)
            yield _Entry(name, module, "fqt")
            continue
        found = _lookup(type(module), tables)
        if found is not None:
            whole.append(name)
            base, conversion = found
            reason = _registered_reason(module, base, conversion)
            kind = "float" if reason else "convert"
            yield _Entry(name, module, kind, conversion, reason, registered=bool(reason))
            if reason and not isinstance(module, nn.MultiheadAttention):
                yield from _inside_float(name, module, tables)
            continue
        reason = _float_reason(module)
        if reason:
            yield _Entry(name, module, "float", reason=reason)


def _inside_float(name: str, layer: nn.Module, tables: Tables) -> Iterator[_Entry]:
    """The layers inside a registered layer left float (a LoRA adapter's, in a subclass with a
    forward of its own), named as float with it: the layer is taken whole, since only its own
    forward knows whether it calls them (converted, one it never called would be counted as
    quantized). An attention layer's ``out_proj`` is not listed: its reason covers it."""
    seen: list[str] = []
    for sub_name, sub in layer.named_modules(remove_duplicate=False):
        if not sub_name or any(_inside(sub_name, prefix) for prefix in seen):
            continue
        if isinstance(sub, FQTModule):  # converted before: quantized, listed as such
            seen.append(sub_name)
        elif _lookup(type(sub), tables) is not None:
            seen.append(sub_name)
            yield _Entry(
                f"{name}.{sub_name}" if name else sub_name,
                sub,
                "float",
                reason=f"inside {name or '<model>'!r}, which stays float (taken whole: register "
                "a conversion for its type, or convert these layers on their own)",
            )


# ------------------------------------------------------------------------------- the summary
def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


@dataclass(frozen=True)
class ConversionSummary:
    """What a model holds after a conversion: its FQT layers, and the modules that hold (or may
    hold) matrix products in float, with the reason for each.

    ``quantized``: qualified name -> ``"FQTLinear (nn.Linear)"`` for every FQT layer (the
    ``out_proj`` of an FQT attention layer included). ``left_float``: qualified name -> why it
    stays float (an ``FQTMultiheadAttention`` whose score and value products run in float is in
    both). ``already_quantized``: the FQT layers the model held before this
    :func:`quantize_model` call. ``notes``: other changes the conversion made, layers compiled
    on their own (now run uncompiled), and ``attention_products=True`` with no attention layer
    to apply it to. Products a forward computes from raw parameters inside a module fqtorch knows
    are not seen (see the module docstring).
    """

    quantized: dict[str, str]
    left_float: dict[str, str]
    already_quantized: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        kinds = Counter(d.split(" ", 1)[0] for d in self.quantized.values())
        counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        head = f"FQT conversion: {len(self.quantized)} FQT layers" + (
            f" ({counts})" if counts else ""
        )
        if self.already_quantized:
            head += f", {len(self.already_quantized)} of them FQT before this call"
        if not self.left_float:
            # what module swapping can see: products in a forward's own code it cannot
            lines = [head + "; no other module owns a matrix-shaped parameter"]
        else:
            lines = [head + f"; left in float ({len(self.left_float)}):"]
            lines += [f"  {name or '<model>'} -- {why}" for name, why in self.left_float.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _summary(
    model: nn.Module,
    left_float: dict[str, str],
    already: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
) -> ConversionSummary:
    quantized = {}
    left_float = dict(left_float)
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FQTModule):
            source = module.float_type
            origin = f" ({_type_name(source)})" if source is not None else ""
            quantized[name] = f"{type(module).__name__}{origin}"
        if isinstance(module, FQTMultiheadAttention) and not module.config.attention_products:
            left_float[name] = (
                f"{type(module).__name__}: its score and value products (Q·Kᵀ, A·V) run in "
                "float (its projections are FQT); FQTConfig(attention_products=True) quantizes "
                "them too"
            )
        out_proj = getattr(module, "out_proj", None)
        if isinstance(module, FQTMultiheadAttention) and not isinstance(out_proj, FQTModule):
            left_float.setdefault(  # quantize_model says why; seen later, it says where
                f"{name}.out_proj" if name else "out_proj",
                _described(out_proj, "the FQT attention layer's output projection, left float"),
            )
    return ConversionSummary(quantized, left_float, already, notes)


def _described(module: nn.Module, reason: str) -> str:
    return f"{_type_name(type(module))}: {reason}"


def conversion_summary(
    model: nn.Module, *, layers: Mapping[type[nn.Module] | str, ToFQT | None] | None = None
) -> ConversionSummary:
    """The FQT layers of ``model`` as it is now, and every module that holds matrix products in
    float, with the reason (the summary :func:`quantize_model` logs; ``str()`` renders it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    left_float = {}
    for entry in _scan(model, _tables(layers)):
        if entry.kind == "convert":
            left_float[entry.name] = _described(
                entry.module,
                "registered for FQT but float: quantize_model was not run on it, or its "
                "module_filter_fn / config callable excluded it",
            )
        elif entry.kind == "float":
            left_float[entry.name] = _described(entry.module, entry.reason)
    return _summary(model, left_float)


# -------------------------------------------------------------------------------- conversion
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _config_for(config: FQTConfig | ConfigFn, module: nn.Module, name: str) -> FQTConfig | None:
    if isinstance(config, FQTConfig):
        return config
    chosen = config(module, name)
    if chosen is not None and not isinstance(chosen, FQTConfig):
        raise TypeError(
            f"the config callable must return an FQTConfig or None, got {type(chosen).__name__} "
            f"for module {name!r}"
        )
    return chosen


def _keep_fqt_layers_called(model: nn.Module) -> tuple[str, ...]:
    """``nn.TransformerEncoder``'s nested-tensor inference path hands its layers nested tensors,
    which FQT layers do not take: turn it off where the encoder holds FQT layers."""
    notes = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.TransformerEncoder)
            and getattr(module, "use_nested_tensor", False)
            and any(isinstance(m, FQTModule) for m in module.modules())
        ):
            module.use_nested_tensor = False
            module._fqtorch_use_nested_tensor = True  # dequantize_model turns it back on
            notes.append(
                f"{name or '<model>'} (nn.TransformerEncoder): nested-tensor inference path "
                "turned off (use_nested_tensor=False); FQT layers take padded tensors (in eval, "
                "outputs at padded positions are then computed values, where that path gave 0)"
            )
    return tuple(notes)


def _nothing_converted(
    model: nn.Module, entries: list[_Entry], candidates: int, tables: Tables
) -> str:
    fqt = [name or "<model>" for name in fqt_modules(model)]
    if fqt:
        return (
            f"quantize_model converted no layer: the model is already quantized ({len(fqt)} FQT "
            f"layers: {_preview(fqt)}); call fqtorch.dequantize_model(model) first to convert "
            "it again with another config"
        )
    if candidates:
        return (
            f"quantize_model converted no layer: {candidates} convertible layers found, and the "
            "module filter / config callable accepted none"
        )
    refused = [
        f"{e.name or '<model>'} ({_described(e.module, e.reason)})" for e in entries if e.registered
    ]
    if refused:
        return (
            f"quantize_model converted no layer: the layers of a registered type it holds stay "
            f"float: {'; '.join(refused)}"
        )
    known = sorted({_type_name(k) for table in tables for k, v in table.items() if v is not None})
    floats = [f"{e.name or '<model>'} ({_type_name(type(e.module))})" for e in entries]
    held = f"; matrix products it holds stay float: {', '.join(floats)}" if floats else ""
    return (
        f"quantize_model converted no layer: the model holds no layer of a registered type "
        f"({', '.join(known)}){held}; add a layer type with fqtorch.register_layer"
    )


def quantize_model(
    model: nn.Module,
    config: FQTConfig | ConfigFn,
    *,
    module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
    layers: Mapping[type[nn.Module] | str, ToFQT | None] | None = None,
) -> nn.Module:
    """Swap every layer of a registered type (:func:`register_layer`: ``nn.Linear``,
    ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention``, transformers' ``Conv1D``, and their
    subclasses that override none of the parent's methods) for its FQT layer, in place; layers
    with hooks or parametrizations stay float (module docstring).

    Args:
        model: converted in place and returned (if ``model`` itself is a registered layer, its
            FQT layer is returned and must be used instead: ``model.head =
            quantize_model(model.head, config)``).
        config: one :class:`FQTConfig` for all layers, or a callable
            ``(module, qualified_name) -> FQTConfig | None`` (``None`` leaves that layer float).
            A layer converted whole (``nn.MultiheadAttention``) runs its GEMMs under its own;
            an FQT layer built inside it (its ``out_proj``) gets the callable's answer for its
            own name (``None``: it stays float).
        module_filter_fn: ``(module, qualified_name) -> bool``; only layers it accepts are swapped
            (asked about an attention layer's ``out_proj`` too, under its own name).
        layers: ``{float_type: to_fqt or None}`` consulted before the registry, for this call
            only; ``None`` leaves that type (and its subclasses, registered or not) in float,
            an attention layer's ``out_proj`` included.

    Logs (INFO) a :class:`ConversionSummary`: the FQT layers, and what holds matrix products in
    float and why (:func:`conversion_summary` gives it as an object). Raises ``ValueError`` when
    nothing is converted, saying why (among others: the model is already quantized); a layer
    that cannot be converted (an attribute that clashes with the FQT layer's) raises naming it,
    before anything is swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(config, FQTConfig) or callable(config)):
        raise TypeError(f"config must be an FQTConfig or a callable, got {type(config).__name__}")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(f"module_filter_fn must be callable, got {module_filter_fn!r}")
    tables = _tables(layers)
    entries = list(_scan(model, tables))
    converted: dict[int, FQTModule] = {}  # by id of the float layer: a shared layer stays shared
    left_float: dict[str, str] = {}
    swaps: list[tuple[str, FQTModule]] = []
    for entry in entries:  # every FQT layer is built before any is swapped in
        if entry.kind == "float":
            left_float[entry.name] = _described(entry.module, entry.reason)
        if entry.kind != "convert":
            continue
        fqt = converted.get(id(entry.module))
        if fqt is None:
            try:
                outcome = _converted(entry, config, module_filter_fn, tables, left_float)
            except (TypeError, ValueError) as exc:  # the model is left as it was
                kind = TypeError if isinstance(exc, TypeError) else ValueError
                raise kind(
                    f"quantize_model: {entry.name or '<model>'} "
                    f"({_type_name(type(entry.module))}): {exc}; nothing was converted"
                ) from exc
            if isinstance(outcome, str):
                left_float[entry.name] = _described(entry.module, outcome)
                continue
            fqt = converted[id(entry.module)] = outcome
        swaps.append((entry.name, fqt))
    root = model
    for name, fqt in swaps:
        if name:
            _set_submodule(model, name, fqt)
        else:
            root = fqt
    if not converted:
        candidates = sum(e.kind == "convert" for e in entries)
        raise ValueError(_nothing_converted(model, entries, candidates, tables))
    already = tuple(e.name for e in entries if e.kind == "fqt")
    notes = _keep_fqt_layers_called(root) + _conversion_notes(entries, converted, root)
    if root is not model:  # not in place: only the returned object is quantized
        notes += (
            f"the model is itself a {type(model).__name__}, which cannot be swapped in place: "
            f"use the returned {type(root).__name__} (the object passed in stays float)",
        )
    summary = _summary(root, left_float, already, notes)
    log.info("%s", summary)
    _same_streams_note(root)
    return root


def _conversion_notes(
    entries: list[_Entry], converted: dict[int, FQTModule], root: nn.Module
) -> tuple[str, ...]:
    """Notes on layers compiled on their own, and on ``attention_products=True`` with no
    attention layer to apply it to."""
    notes = []
    for entry in entries:
        if id(entry.module) in converted and "_compiled_call_impl" in vars(entry.module):
            notes.append(
                f"{entry.name or '<model>'}: compiled on its own (layer.compile()); its FQT layer "
                "runs uncompiled: compile after quantize_model"
            )
    asked = any(layer.config.attention_products for layer in converted.values())
    asked_for_none = asked and not any(isinstance(m, FQTMultiheadAttention) for m in root.modules())
    if asked_for_none:
        notes.append(
            "attention_products=True, but no nn.MultiheadAttention was converted: attention "
            "computed in a forward (F.scaled_dot_product_attention, torch.matmul; Hugging Face "
            "models) is not seen by module swapping, and its products stay float"
        )

    # attention modules of other libraries (by name: they own no weight of their own, so the
    # ≥ 2-d parameter rule does not list them) compute their two products functionally
    def attention(m: nn.Module) -> bool:  # LlamaAttention, BertSelfAttention: not AttentionMask
        return type(m).__name__.endswith("Attention") and not isinstance(
            m, (FQTMultiheadAttention, FQTModule, nn.MultiheadAttention)
        )

    functional = [  # the innermost ones (an HF Attention wraps its SelfAttention)
        name or "<model>"
        for name, m in root.named_modules()
        if attention(m) and not any(attention(c) for c in m.modules() if c is not m)
    ]
    if functional and not asked_for_none:  # that note says it already
        notes.append(
            f"{len(functional)} attention module(s) ({', '.join(functional[:3])}"
            f"{', ...' if len(functional) > 3 else ''}) compute their score and value products "
            "in their forward: module swapping does not see them, and they stay float"
        )
    return tuple(notes)


def _choice(
    module: nn.Module,
    name: str,
    config: FQTConfig | ConfigFn,
    module_filter_fn: Callable[[nn.Module, str], bool] | None,
) -> FQTConfig | str:
    """``module``'s config, or why the filter or the config callable keeps it float (each asked
    once)."""
    if module_filter_fn is not None and not module_filter_fn(module, name):
        return "excluded by module_filter_fn"
    chosen = _config_for(config, module, name)
    return "the config callable returned None for it" if chosen is None else chosen


def _converted(
    entry: _Entry,
    config: FQTConfig | ConfigFn,
    module_filter_fn: Callable[[nn.Module, str], bool] | None,
    tables: Tables,
    left_float: dict[str, str],
) -> FQTModule | str:
    """The FQT layer for ``entry``, or why it stays float. An FQT layer built inside it (an
    attention layer's ``out_proj``) is asked about under its own name: the filter, the config
    callable and ``layers=`` may keep it float (its float layer is put back, and said in
    ``left_float``) or give it its own config."""
    layer_config = _choice(entry.module, entry.name, config, module_filter_fn)
    if isinstance(layer_config, str):
        return layer_config
    fqt = entry.conversion.to_fqt(entry.module, layer_config, entry.name)
    if not isinstance(fqt, FQTModule):
        raise TypeError(
            f"to_fqt for {_type_name(entry.conversion.float_type)} must return an FQTModule, "
            f"got {type(fqt).__name__} for {entry.name!r}"
        )
    for name, inner in list(fqt_modules(fqt).items()):
        if inner is fqt:
            continue
        try:  # the float layer it was built from, where the source has one by that name
            source = entry.module.get_submodule(name)
        except AttributeError:
            source = inner
        if source is inner:  # an FQT layer it held before: kept as it is
            continue
        full = f"{entry.name}.{name}" if entry.name else name
        found = _lookup(type(source), tables)
        own: FQTConfig | str
        if found is not None and found[1] is None:
            own = f"layers= maps {_type_name(found[0])} to None"
        else:
            own = _choice(source, full, config, module_filter_fn)
        if isinstance(own, str):
            _set_submodule(fqt, name, source)
            left_float[full] = _described(source, own)
        elif own != inner.config:
            inner.config = own
    return fqt


def _to_float(layer: FQTModule) -> nn.Module:
    source = layer.float_type
    found = _lookup(source, (_REGISTRY,)) if source is not None else None
    from_fqt = found[1].from_fqt if found is not None and found[1] is not None else None
    return layer.to_float() if from_fqt is None else from_fqt(layer)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every FQT layer back for its float layer on the same Parameters (in place; the float
    layer of the source's own class, through the registration's ``from_fqt`` when it has one).
    An ``nn.TransformerEncoder`` whose nested-tensor path :func:`quantize_model` turned off gets
    it back."""
    parametrized = [
        n or "<model>"
        for n, m in model.named_modules()
        if isinstance(m, FQTModule) and parametrize.is_parametrized(m)
    ]
    if parametrized:  # the float layer would lose them (and its weight with them)
        raise ValueError(
            f"FQT layers {parametrized} were parametrized after quantize_model "
            "(torch.nn.utils.parametrize); remove the parametrizations "
            "(parametrize.remove_parametrizations) before dequantize_model, and add them to "
            "the float layers again after it"
        )
    if isinstance(model, FQTModule):
        return _to_float(model)
    restored: dict[int, nn.Module] = {}
    done: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, FQTModule) and not any(_inside(name, d) for d in done):
            if id(module) not in restored:
                restored[id(module)] = _to_float(module)
            _set_submodule(model, name, restored[id(module)])
            done.append(name)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and vars(module).pop(
            "_fqtorch_use_nested_tensor", False
        ):
            module.use_nested_tensor = True
    log.debug("dequantize_model: %d FQT layers swapped back", len(restored))
    return model


# ------------------------------------------------------------------------------ FQT layers
def fqt_modules(model: nn.Module) -> dict[str, FQTModule]:
    """The FQT layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FQTModule)}


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every FQT layer's noise stream from ``seed`` (e.g. ``seed + rank`` under DDP),
    mixed with the layer's qualified name in ``model``: layers converted in separate calls
    (blocks one at a time, each with a layer named ``fc``) get streams of their own."""
    for name, module in fqt_modules(model).items():
        module.reseed(seed, name)


def same_streams(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of distinct FQT layers of ``model`` whose noise streams start from the same seed:
    converted in separate :func:`quantize_model` calls under one ``FQTConfig.seed`` (each named
    the same within its call). Their rounding noise is the same draws, so a layer's noise is
    correlated with the gradient that reaches the layer below it, whose gradient is then biased
    (measured: |z| up to 9 on a 2-layer model at 2 bits). :func:`reseed` on the whole model
    separates them."""
    by_seed: dict[int, list[str]] = {}
    for name, module in fqt_modules(model).items():
        if not module.config.is_qat:  # an exact backward draws nothing
            by_seed.setdefault(module._seed, []).append(name)
    return [tuple(names) for names in by_seed.values() if len(names) > 1]


def _same_streams_note(model: nn.Module) -> None:
    groups = same_streams(model)
    if groups:
        shown = "; ".join(", ".join(repr(n) for n in g[:3]) + ("..." if len(g) > 3 else "")
                          for g in groups[:3])  # fmt: skip
        warnings.warn(
            f"FQT layers draw the same rounding noise ({shown}): they were converted in "
            "separate quantize_model calls under one seed, which biases the gradient of the "
            "layers below them; call fqtorch.reseed(model, seed) on the whole model (or "
            "convert it in one call)",
            FQTWarning,
            stacklevel=user_stacklevel(),
        )


def generator_states(model: nn.Module) -> dict[str, Tensor]:
    """The generator state of every FQT layer that has drawn noise (for checkpoints)."""
    states = {n: m.generator_state() for n, m in fqt_modules(model).items()}
    return {n: s for n, s in states.items() if s is not None}


def load_generator_states(
    model: nn.Module, states: dict[str, Tensor], device: torch.device | str = "cpu"
) -> None:
    """Restore what :func:`generator_states` saved; unknown layer names raise ``KeyError``.

    A layer missing from ``states`` had not drawn noise when they were saved, so it is put back
    to not having drawn any: its stream restarts from the layer's seed at its first draw.
    """
    layers = fqt_modules(model)
    unknown = sorted(set(states) - set(layers))
    if unknown:
        raise KeyError(f"generator states for layers that are not FQT layers here: {unknown}")
    for name, layer in layers.items():
        layer.set_generator_state(states.get(name), torch.device(device))
