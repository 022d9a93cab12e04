"""``quantize_model`` / ``dequantize_model``: swap float layers for FQT layers and back, in place,
through a registry of layer conversions; ``conversion_summary`` says what is FQT and what is not.

The FQT layers adopt the original Parameter objects, so an optimizer built before the swap keeps
working and ``state_dict()`` keys and values are unchanged.

**The registry** (``register_layer``) is the one deliberate piece of global state here, like the
quantizer registry: it maps a float layer type to the function that builds its FQT layer.
``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.MultiheadAttention`` and transformers' ``Conv1D``
(GPT-2) are registered through it below. ``quantize_model(..., layers=...)`` overrides it for one
call. A module matches the registration of its class or of the nearest registered base class; a
subclass is converted only when it keeps that base's ``forward`` (as torchao decides), since a
subclass with its own ``forward`` may compute something else. A registered layer is converted
whole or left whole: the submodules of ``nn.MultiheadAttention``, whose forward reads their
weights directly, are never converted on their own.

Module swapping sees modules only: a product that a ``forward`` computes from raw parameters
(``F.linear(x, self.w)``, ``x @ self.w``, ``torch.einsum``) stays float. The summary names the
modules that own such parameters, and the layers that hold matrix products fqtorch does not convert
(LSTM, transposed convolutions, ...).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from .config import FQTConfig
from .nn.attention import FQTMultiheadAttention
from .nn.modules import FQTConv1d, FQTConv2d, FQTLinear, FQTModule, FQTTransposedLinear

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


def _check_key(float_type: object) -> None:
    if isinstance(float_type, str):
        if "." not in float_type.strip("."):
            raise ValueError(
                f"a layer type given by name must be 'package.module.Class', got {float_type!r}"
            )
    elif not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
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
    Subclasses of ``float_type`` that keep its ``forward`` are converted too. Registering a type
    twice raises unless ``replace=True``. :func:`conversion_summary` and :func:`dequantize_model`
    pick the registration up.
    """
    _check_key(float_type)
    if not callable(to_fqt):
        raise TypeError(f"to_fqt must be callable (module, config, name) -> FQT layer: {to_fqt!r}")
    if from_fqt is not None and not callable(from_fqt):
        raise TypeError(f"from_fqt must be callable (fqt_layer) -> float layer: {from_fqt!r}")
    if float_type in _REGISTRY and not replace:
        raise ValueError(
            f"{_type_name(float_type)} is already registered (to_fqt "
            f"{_REGISTRY[float_type].to_fqt!r}); pass replace=True to change it"
        )
    _REGISTRY[float_type] = LayerConversion(float_type, to_fqt, from_fqt)


def unregister_layer(float_type: type[nn.Module] | str) -> LayerConversion:
    """Remove a registration (as given to :func:`register_layer`) and return it."""
    try:
        return _REGISTRY.pop(float_type)
    except (KeyError, TypeError):
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
    """``layers`` (consulted first; ``None`` leaves that type in float), then the registry."""
    if layers is None:
        return (_REGISTRY,)
    if not isinstance(layers, Mapping):
        raise TypeError(
            f"layers must be a mapping of layer type to to_fqt (or None), got "
            f"{type(layers).__name__}"
        )
    overrides: dict[type[nn.Module] | str, LayerConversion | None] = {}
    for key, to_fqt in layers.items():
        _check_key(key)
        if to_fqt is not None and not callable(to_fqt):
            raise TypeError(f"layers[{_type_name(key)}] must be callable or None, got {to_fqt!r}")
        overrides[key] = None if to_fqt is None else LayerConversion(key, to_fqt)
    return (overrides, _REGISTRY)


def _lookup(cls: type, tables: Tables) -> tuple[type, LayerConversion | None] | None:
    """The nearest class in ``cls``'s MRO with an entry, and that entry."""
    for base in cls.__mro__:
        for table in tables:
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


def _registered_reason(module: nn.Module, base: type, conversion: LayerConversion | None) -> str:
    """Why a module of a registered type cannot be converted ("" when it can)."""
    if conversion is None:
        return f"layers= maps {_type_name(base)} to None"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer not initialized yet: run one forward pass before quantize_model"
    if type(module).forward is not base.forward:
        return (
            f"subclass of {_type_name(base)} with its own forward, which fqtorch cannot know; "
            f"register a conversion for {_type_name(type(module))} with fqtorch.register_layer"
        )
    return ""


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
            yield _Entry(name, module, kind, conversion, reason)
            continue
        reason = _float_reason(module)
        if reason:
            yield _Entry(name, module, "float", reason=reason)


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
    stays float. ``already_quantized``: the FQT layers the model held before this
    :func:`quantize_model` call. ``notes``: other changes the conversion made. Products a forward
    computes from raw parameters inside a module fqtorch knows are not seen (see the module
    docstring).
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
            lines = [head + "; no other module holds matrix products"]
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
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FQTModule):
            source = module.float_type
            origin = f" ({_type_name(source)})" if source is not None else ""
            quantized[name] = f"{type(module).__name__}{origin}"
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
            notes.append(
                f"{name or '<model>'} (nn.TransformerEncoder): nested-tensor inference path "
                "turned off (use_nested_tensor=False); FQT layers take padded tensors"
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
    subclasses that keep the parent's ``forward``) for its FQT layer, in place.

    Args:
        model: converted in place and returned (if ``model`` itself is a registered layer, its
            FQT layer is returned and must be used instead).
        config: one :class:`FQTConfig` for all layers, or a callable
            ``(module, qualified_name) -> FQTConfig | None`` (``None`` leaves that layer float).
            A layer converted whole (``nn.MultiheadAttention``) runs all its GEMMs under one.
        module_filter_fn: ``(module, qualified_name) -> bool``; only layers it accepts are swapped.
        layers: ``{float_type: to_fqt or None}`` consulted before the registry, for this call
            only; ``None`` leaves that type in float.

    Logs (INFO) a :class:`ConversionSummary`: the FQT layers, and what holds matrix products in
    float and why (:func:`conversion_summary` gives it as an object). Raises ``ValueError`` when
    nothing is converted, saying why (among others: the model is already quantized).
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
    root = model
    for entry in entries:
        if entry.kind == "float":
            left_float[entry.name] = _described(entry.module, entry.reason)
        if entry.kind != "convert":
            continue
        fqt = converted.get(id(entry.module))
        if fqt is None:
            outcome = _converted(entry, config, module_filter_fn)
            if isinstance(outcome, str):
                left_float[entry.name] = _described(entry.module, outcome)
                continue
            fqt = converted[id(entry.module)] = outcome
        if entry.name:
            _set_submodule(model, entry.name, fqt)
        else:
            root = fqt
    if not converted:
        candidates = sum(e.kind == "convert" for e in entries)
        raise ValueError(_nothing_converted(model, entries, candidates, tables))
    already = tuple(e.name for e in entries if e.kind == "fqt")
    summary = _summary(root, left_float, already, _keep_fqt_layers_called(root))
    log.info("%s", summary)
    return root


def _converted(
    entry: _Entry,
    config: FQTConfig | ConfigFn,
    module_filter_fn: Callable[[nn.Module, str], bool] | None,
) -> FQTModule | str:
    """The FQT layer for ``entry``, or why it stays float."""
    if module_filter_fn is not None and not module_filter_fn(entry.module, entry.name):
        return "excluded by module_filter_fn"
    layer_config = _config_for(config, entry.module, entry.name)
    if layer_config is None:
        return "the config callable returned None for it"
    fqt = entry.conversion.to_fqt(entry.module, layer_config, entry.name)
    if not isinstance(fqt, FQTModule):
        raise TypeError(
            f"to_fqt for {_type_name(entry.conversion.float_type)} must return an FQTModule, "
            f"got {type(fqt).__name__} for {entry.name!r}"
        )
    return fqt


def _to_float(layer: FQTModule) -> nn.Module:
    source = layer.float_type
    found = _lookup(source, (_REGISTRY,)) if source is not None else None
    from_fqt = found[1].from_fqt if found is not None and found[1] is not None else None
    return layer.to_float() if from_fqt is None else from_fqt(layer)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every FQT layer back for its float layer on the same Parameters (in place; the float
    layer of the source's own class, through the registration's ``from_fqt`` when it has one)."""
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
    log.debug("dequantize_model: %d FQT layers swapped back", len(restored))
    return model


# ------------------------------------------------------------------------------ FQT layers
def fqt_modules(model: nn.Module) -> dict[str, FQTModule]:
    """The FQT layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FQTModule)}


def reseed(model: nn.Module, seed: int) -> None:
    """Restart every FQT layer's noise stream from ``seed`` (e.g. ``seed + rank`` under DDP)."""
    for module in fqt_modules(model).values():
        module.reseed(seed)


def generator_states(model: nn.Module) -> dict[str, Tensor]:
    """The generator state of every FQT layer that has drawn noise (for checkpoints)."""
    states = {n: m.generator_state() for n, m in fqt_modules(model).items()}
    return {n: s for n, s in states.items() if s is not None}


def load_generator_states(
    model: nn.Module, states: dict[str, Tensor], device: torch.device | str = "cpu"
) -> None:
    """Restore what :func:`generator_states` saved; unknown layer names raise ``KeyError``."""
    layers = fqt_modules(model)
    unknown = sorted(set(states) - set(layers))
    if unknown:
        raise KeyError(f"generator states for layers that are not FQT layers here: {unknown}")
    for name, state in states.items():
        layers[name].set_generator_state(state, torch.device(device))
