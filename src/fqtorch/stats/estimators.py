"""Estimators of the statistical framework (docs/method.md §3, §7): QAT gradient, sampling and
quantization variance, the bias z-test, grad_output error against its bound, and the variance
profile.

Conventions: a batch is an ``(inputs, targets)`` pair and the loss is
``loss_fn(model(inputs), targets)``. ``Var[v]`` is ``E‖v − E v‖²`` (the trace of the
covariance), reported per parameter tensor, per layer (the module that owns the parameters) and in
total. The forward pass is deterministic, so one forward serves many stochastic backward passes
(``retain_graph``); the model's buffers (BatchNorm statistics) are restored afterwards and no
``.grad`` is touched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import fqt_modules
from ..nn.modules import FQTModule
from .null import DEFAULT_ALPHA, check_test_parameters, z2_threshold

__all__ = [
    "BiasReport",
    "GradOutputError",
    "GradientVariance",
    "LossFn",
    "QuantizationReport",
    "VarianceProfile",
    "bias_test",
    "check_unbiased",
    "exact_backward",
    "grad_output_errors",
    "measure_quantization",
    "qat_gradient",
    "quantization_variance",
    "sampling_variance",
    "variance_profile",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]


# ------------------------------------------------------------------------------------ plumbing
@dataclass(frozen=True)
class _Params:
    """The trainable parameters, flattened into one vector, with their names and layers."""

    names: list[str]
    layers: list[str]
    tensors: list[Tensor]

    @classmethod
    def of(cls, model: nn.Module) -> _Params:
        """Each trainable parameter once, as ``model.parameters()`` gives it. A parameter
        shared by several modules (tied embeddings) belongs to the first FQT layer that holds
        it (its weight-gradient noise lands there), else to the first module."""
        holders: dict[int, list[tuple[str, str, nn.Module]]] = {}
        order: list[Tensor] = []
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    if id(p) not in holders:
                        holders[id(p)] = []
                        order.append(p)
                    holders[id(p)].append((module_name, pname, module))
        names, layers, tensors = [], [], []
        for p in order:
            found = holders[id(p)]
            module_name, pname, _ = next(
                (h for h in found if isinstance(h[2], FQTModule)), found[0]
            )
            names.append(f"{module_name}.{pname}" if module_name else pname)
            layers.append(module_name)
            tensors.append(p)
        return cls(names, layers, tensors)

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.tensors]

    def per_parameter(self, per_entry: Tensor) -> dict[str, float]:
        """Sum a per-entry quantity (a flat vector) over each parameter tensor."""
        parts = per_entry.split(self.sizes)
        return {n: float(part.sum()) for n, part in zip(self.names, parts, strict=True)}


@contextmanager
def _restored_buffers(model: nn.Module) -> Iterator[None]:
    saved = {k: v.clone() for k, v in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


@contextmanager
def kept_random_streams(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Measure without disturbing training: on exit, the global random state (dropout's: the
    CPU's, and that of ``device`` and of every CUDA device holding a parameter) and every FQT
    layer's rounding generator are as on entry, so a run that measures every K steps trains
    exactly as one that does not. Other accelerators' (MPS, XPU) global streams are not kept."""
    cuda = {p.device for p in model.parameters() if p.device.type == "cuda"}
    cuda |= {device} if device.type == "cuda" else set()
    indices = {torch.cuda.current_device() if d.index is None else d.index for d in cuda}
    with torch.random.fork_rng(devices=sorted(indices)), kept_generators(model):
        yield


@contextmanager
def kept_generators(model: nn.Module) -> Iterator[None]:
    """On exit, every FQT layer's rounding generator is as on entry (not yet created, if it was
    not); the global random state is left alone."""
    with ExitStack() as stack:
        for layer in fqt_modules(model).values():
            stack.enter_context(layer.kept_generator())
        yield


@contextmanager
def exact_backward(model: nn.Module, keep: Sequence[str] = ()) -> Iterator[None]:
    """Within the block, every FQT layer of ``model`` except those named in ``keep`` has an exact
    backward (its gradient quantizers off); restored on exit."""
    with ExitStack() as stack:
        for name, layer in fqt_modules(model).items():
            if name not in keep:
                stack.enter_context(layer.exact_backward())
        yield


class _Forward:
    """One forward pass of ``model`` on ``batch``, reused by many backward passes."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Batch, params: _Params) -> None:
        inputs, targets = batch
        self.params = params
        self.loss = loss_fn(model(inputs), targets)

    def gradient(self) -> Tensor:
        """One (stochastic, under FQT) backward pass: the flat gradient in float64."""
        grads = torch.autograd.grad(
            self.loss, self.params.tensors, retain_graph=True, allow_unused=True
        )
        flat = [
            torch.zeros_like(p) if g is None else g
            for g, p in zip(grads, self.params.tensors, strict=True)
        ]
        return torch.cat([g.reshape(-1) for g in flat]).double()


class _Moments:
    """Streaming mean and variance per entry (Welford), in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: Tensor) -> None:
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = x.clone(), torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    def variance(self) -> Tensor:
        return self.m2 / max(self.count - 1, 1)


def _as_batches(batches: Batch | Iterable[Batch]) -> list[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise ValueError("no batches given: pass an (inputs, targets) pair or a list of them")
    return out


# ---------------------------------------------------------------------------------- estimators
@dataclass(frozen=True)
class GradientVariance:
    """``E‖g − E g‖²`` of a gradient, per parameter tensor; ``layers`` maps parameter to layer.

    ``relative_standard_error``: of :attr:`total`, where the estimate says it
    (:func:`sampling_variance`: from the spread across its minibatches; ``None`` when too few)."""

    per_parameter: dict[str, float]
    layers: dict[str, str]
    relative_standard_error: float | None = None

    @property
    def per_layer(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in self.per_parameter.items():
            out[self.layers[name]] = out.get(self.layers[name], 0.0) + value
        return out

    @property
    def total(self) -> float:
        return float(sum(self.per_parameter.values()))


def qat_gradient(model: nn.Module, loss_fn: LossFn, batch: Batch) -> dict[str, Tensor]:
    """The QAT gradient (forward quantized, exact backward) per parameter name."""
    params = _Params.of(model)
    with _restored_buffers(model), exact_backward(model):
        flat = _Forward(model, loss_fn, batch, params).gradient()
    return dict(zip(params.names, flat.split(params.sizes), strict=True))


def sampling_variance(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    full_data: Iterable[Batch] | None = None,
) -> GradientVariance:
    """Variance of the QAT minibatch gradient around the full-data QAT gradient.

    The full-data gradient is the sample-weighted mean over ``full_data`` (all the data, or as
    much as you can afford); without it, the mean of ``batches`` is used and the variance gets the
    ``B/(B − 1)`` correction. ``full_data`` short of all the data makes the centre an estimate
    too: for minibatches of ``b`` samples drawn apart from its ``M``, the variance then reads
    high by about ``b/M`` of itself (25% for batches of 64 around 256 samples).

    The result's ``relative_standard_error`` says how far the total itself can be off, from the
    minibatches' spread (:func:`_relative_standard_error`): 2 batches around their own mean
    cannot say (``None``).
    """
    params = _Params.of(model)
    batches = _as_batches(batches)
    if full_data is None and len(batches) < 2:
        raise ValueError(
            f"sampling_variance needs 2 or more batches to estimate a spread around their mean, "
            f"got {len(batches)}; pass more, or full_data to measure around"
        )
    with _restored_buffers(model), exact_backward(model):
        grads = [_Forward(model, loss_fn, b, params).gradient() for b in batches]
        if full_data is not None:
            total, count = None, 0
            for b in full_data:
                n = len(b[1])
                g = _Forward(model, loss_fn, b, params).gradient() * n
                total, count = (g if total is None else total + g), count + n
            center, dof = total / count, len(grads)
        else:
            center, dof = torch.stack(grads).mean(0), len(grads) - 1
    per_entry, spread = torch.zeros_like(center), []
    for g in grads:
        square = (g - center).square()
        per_entry += square
        spread.append(float(square.sum(dtype=torch.float64)))
    return GradientVariance(
        params.per_parameter(per_entry / dof),
        dict(zip(params.names, params.layers, strict=True)),
        _relative_standard_error(spread, centred=full_data is None),
    )


# Below this many minibatches the reported error reads low: ±2 standard errors held the true
# variance in 66–80% of Gaussian draws at 2–4 (tests/stats/test_sampling_error.py).
FEW_BATCHES = 6


def few_batches_caveat(count: int | None) -> str:
    """What to add where a sampling variance's error from ``count`` minibatches is printed."""
    if count is None or count >= FEW_BATCHES:
        return ""
    return (
        f"; from {count} minibatches it reads low (±2 standard errors held the true variance in "
        f"66–80% of Gaussian draws at 2–4): {FEW_BATCHES} or more for a fair one"
    )


def _relative_standard_error(spread: list[float], centred: bool) -> float | None:
    """Standard error of the sampling variance over its value, from ``spread``: each batch's
    ``d_b = ‖g_b − centre‖²``.

    Around ``full_data``'s gradient (``centred=False``) the ``d_b`` are independent draws and the
    variance is their mean: ``sd(d) / (mean(d) · √B)``. Around the batches' own mean they are
    not (the centre is theirs): the delete-one jackknife over the batches, which for this
    statistic works out to the same with a factor ``(B − 1)/(B − 2)``, needs ``B ≥ 3``. Both
    assume independent batches and a finite fourth moment; under Gaussian gradient noise they
    cover the true variance within ±2 standard errors about 90% of the time at 8–16 batches
    (tests/stats/test_sampling_error.py), 66–80% at 2–4 (:data:`FEW_BATCHES`).
    """
    n = len(spread)
    if n < (3 if centred else 2):
        return None
    d = torch.tensor(spread, dtype=torch.float64)
    mean = d.mean()
    if not mean > 0:
        return None
    rse = d.std() / (mean * math.sqrt(n))
    return float(rse * (n - 1) / (n - 2) if centred else rse)


# The bias test's random directions per parameter tensor, and their seed (fixed: the test is a
# deterministic function of the draws).
_RANDOM_DIRECTIONS = 8
_DIRECTIONS_SEED = 20201207


class _Directions:
    """The directions the bias test projects each parameter tensor's gradient on (docs/method.md
    §7): ``count`` random ±1 vectors from a fixed seed, all ones, and the sign of the batch's QAT
    gradient. A projection sums every entry's rounding noise, so it is closer to Gaussian than a
    single entry that a few rare, large roundings feed; not Gaussian where those few roundings
    feed the whole tensor (docs/method.md §7 measures that case)."""

    def __init__(self, params: _Params, count: int = _RANDOM_DIRECTIONS) -> None:
        gen = torch.Generator().manual_seed(_DIRECTIONS_SEED)
        self.sizes = params.sizes
        # (count, n) bool per tensor: True where the direction is +1 (one byte per entry each)
        self.signs = [
            torch.randint(0, 2, (count, n), generator=gen, dtype=torch.bool).to(p.device)
            for n, p in zip(self.sizes, params.tensors, strict=True)
        ]
        self.per_tensor = count + 2
        # (J,) the parameter tensor each projection belongs to
        self.owner = torch.arange(len(self.sizes)).repeat_interleave(self.per_tensor)

    def project(self, flat: Tensor, qat_signs: list[Tensor]) -> Tensor:
        """(J,) projections of a flat gradient: per tensor, its random directions, then all
        ones, then ``qat_signs`` (the sign of the QAT gradient, per tensor)."""
        out = []
        for part, signs, sign in zip(flat.split(self.sizes), self.signs, qat_signs, strict=True):
            # one direction at a time: a temporary of the tensor's size, not count times it
            out += [torch.where(plus, part, -part).sum() for plus in signs]
            out += [part.sum(), sign @ part]
        return torch.stack(out)


@dataclass(frozen=True)
class _Draws:
    qat: Tensor  # (P,) QAT gradient
    mean: Tensor  # (P,) mean FQT gradient
    variance: Tensor  # (P,) per-entry variance of the FQT gradient
    samples: int
    projections: Tensor | None = None  # (S, J) each draw projected on the bias test's directions
    qat_signs: list[Tensor] | None = None  # per parameter tensor, the sign of the QAT gradient


def _draw(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    samples: int,
    params: _Params,
    keep: Sequence[str] | None = None,
    forward: _Forward | None = None,
    qat: Tensor | None = None,
    directions: _Directions | None = None,
) -> _Draws:
    """The QAT gradient and ``samples`` FQT backward passes from one forward (``forward``, or a
    new one; ``qat``, its QAT gradient, when already known); only the layers in ``keep``
    quantize their gradients when given. With ``directions``, every draw is also projected on
    them (the bias test's statistic), and a non-finite QAT gradient raises ``ValueError`` (the
    test has no reference); a variance measurement keeps its NaN."""
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate a variance, got {samples}")
    forward = forward or _Forward(model, loss_fn, batch, params)
    if qat is None:
        with exact_backward(model):
            qat = forward.gradient()
    if directions is not None and not bool(torch.isfinite(qat).all()):
        parts = zip(params.names, qat.split(params.sizes), strict=True)
        bad = [name for name, t in parts if not bool(torch.isfinite(t).all())]
        raise ValueError(
            f"the QAT (exact-backward) gradient is not finite in {', '.join(bad[:4])}"
            f"{' …' if len(bad) > 4 else ''} on this batch: "
            "the test compares FQT with a finite reference; check the model and loss on it"
        )
    moments = _Moments()
    signs = None if directions is None else [t.sign() for t in qat.split(params.sizes)]
    projections = []
    with exact_backward(model, keep) if keep is not None else ExitStack():
        for _ in range(samples):
            g = forward.gradient()
            moments.add(g)
            if directions is not None:
                projections.append(directions.project(g, signs))
    stacked = torch.stack(projections) if projections else None
    return _Draws(qat, moments.mean, moments.variance(), samples, stacked, signs)


def _require_fqt(model: nn.Module) -> dict[str, FQTModule]:
    layers = fqt_modules(model)
    if not layers:
        raise ValueError("the model has no FQT layers; call fqtorch.quantize_model first")
    return layers


@dataclass(frozen=True)
class LayerBias:
    """One layer's verdict: ``z_rms`` over its projections (judged against ``limit``);
    ``z_max``, the largest per-entry |z|, is informational. ``retest``: the same test on fresh
    draws, ``RETEST_FACTOR`` times as many, run when this one failed; the layer is biased only
    when both fail (:class:`BiasReport`)."""

    name: str
    z_rms: float
    z_max: float
    limit: float
    entries: int
    directions: int = 0  # projections judged (per parameter tensor: random, ones, sign(QAT))
    retest: LayerBias | None = None
    nonfinite: bool = False  # a draw had a NaN or an infinite entry: fails, never retested

    @property
    def passed(self) -> bool:
        if self.nonfinite:
            return False
        return self.z_rms <= self.limit or (self.retest is not None and self.retest.passed)


@dataclass(frozen=True)
class BiasReport:
    """z-scores of the mean FQT gradient against the QAT gradient, per layer.

    Each parameter tensor's gradient is projected on fixed directions (8 random ±1 vectors, all
    ones, the sign of the QAT gradient); per projection ``u``, ``z = (mean_s u·g_s − u·g_QAT) /
    (std_s(u·g_s) / √S)``, Student-t with ``ν = S − 1`` when unbiased and the projection's noise
    Gaussian (a projection sums every entry's rounding noise, so it is closer to Gaussian than
    single entries; docs/method.md §7 says where it is not). A layer fails when its RMS z over
    its projections and the B batches exceeds ``limit``, the square root of
    :func:`~fqtorch.stats.null.z2_threshold` at level ``alpha / L`` for L layers (Bonferroni): a
    threshold from the null distribution alone (samples and batches, with the projections'
    correlation at its worst), so the whole report raises a false alarm with probability at most
    ``alpha``. ``z_max``, the largest per-entry |z|, is reported, not judged: over many entries
    Student-t tails make large values expected, and an entry's standard error from S draws
    misses rare large roundings.

    A layer that fails is tested again on fresh draws of the same batches, ``RETEST_FACTOR`` × S
    per batch, at the same level (``LayerBias.retest``), and is reported biased only when that
    fails too. The reported layers are a subset of those the retest rejects, and the retest is a
    level-``alpha`` test over all L layers, so under Gaussian projection noise the false-alarm rate
    stays at most ``alpha`` whatever the dependence between the two stages. Where rare, large
    roundings make the projections heavy-tailed and S draws underestimate their spread, a false
    alarm needs a second exceedance on draws that are fresh given the batch, with four times the
    roundings (docs/method.md §7 measures both stages). Power: at most the first test's, and close
    to it, since a real bias has four times the non-centrality in the retest. A layer with no
    spread that misses its QAT value (``+inf``) is retested too: a real deterministic bias stays
    ``+inf``, while an entry fed by a few roundings that all went the same way by chance does not.
    """

    layers: list[LayerBias]
    samples: int
    batches: int
    z_rms: float
    z_max: float
    alpha: float
    suspect: str | None = None  # the topmost failing layer
    culprits: list[str] | None = None  # layers whose quantizers alone bias (check_unbiased)

    @property
    def passed(self) -> bool:
        return all(layer.passed for layer in self.layers)

    def failing(self) -> list[str]:
        return [layer.name for layer in self.layers if not layer.passed]

    def retested(self) -> list[str]:
        """The layers whose first test failed and that were tested again on fresh draws."""
        return [layer.name for layer in self.layers if layer.retest is not None]

    def summary(self) -> str:
        if self.passed:
            state = "passed"
        elif self.culprits:
            state = f"FAILED: the gradient quantizers of {self.culprits} are biased"
        elif self.culprits is not None:
            state = (
                f"FAILED (topmost biased gradient: layer {self.suspect!r}; no layer's "
                "quantizers are biased alone: the bias needs several layers quantized together)"
            )
        else:
            state = f"FAILED (topmost biased gradient: layer {self.suspect!r})"
        broken = [layer.name for layer in self.layers if layer.nonfinite]
        if broken:
            state += f"; NaN or infinite FQT gradients in layers {broken}"
        retested = self.retested()
        again = ""
        if retested:
            kept = [n for n in retested if n not in self.failing()]
            again = (
                f"; retested on {RETEST_FACTOR * self.samples} fresh backward passes per batch: "
                f"{len(kept)} of {len(retested)} layer(s) passed"
            )
        return (
            f"unbiasedness check {state}: RMS z {self.z_rms:.3f} "
            f"over {self.batches} batch(es) × {self.samples} backward passes "
            f"(a layer's RMS z limit {self.layers[0].limit:.2f} at false-alarm level "
            f"{self.alpha:g}; max |z| of single entries {self.z_max:.2f}, for information)"
            f"{again}"
        )


# A layer failing the bias test is tested again on this many times the draws (BiasReport).
RETEST_FACTOR = 4


class BiasError(AssertionError):
    """``check_unbiased(..., raise_on_failure=True)`` found a biased FQT gradient."""


def _forward_order(model: nn.Module, loss_fn: LossFn, batch: Batch) -> list[str]:
    """FQT layer names in the order the forward pass calls them."""
    order: list[str] = []
    names = {id(m): n for n, m in fqt_modules(model).items()}
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(names[id(mod)]))
        for m in fqt_modules(model).values()
    ]
    try:
        with torch.no_grad(), _restored_buffers(model):
            model(batch[0])
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


@dataclass(frozen=True)
class QuantizationReport:
    """What repeated FQT backward passes on fixed minibatches tell: the quantization variance and
    the bias z-test, from the same draws."""

    variance: GradientVariance
    bias: BiasReport


def measure_quantization(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batch | Iterable[Batch],
    samples: int = 16,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> QuantizationReport:
    """Per minibatch: one forward, the QAT gradient, and ``samples`` FQT backward passes; the
    per-entry variance (averaged over batches) and z-scores against the QAT gradient, judged
    at family-wise false-alarm level ``alpha`` (:class:`BiasReport`)."""
    check_test_parameters(samples, alpha)
    batches = _as_batches(batches)
    variance, z2_batches, z_max, params, owner, nonfinite = _measure(
        model, loss_fn, batches, samples
    )
    bias = _retested(
        _bias_report(params, owner, z2_batches, z_max, samples, alpha, nonfinite),
        lambda: _measure(model, loss_fn, batches, RETEST_FACTOR * samples),
    )
    if not bias.passed:
        order = _forward_order(model, loss_fn, batches[0])
        bias = dataclasses.replace(bias, suspect=_topmost(bias.failing(), order))
    return QuantizationReport(variance, bias)


# _measure's output: variance, z² per batch, per-entry max |z|, params, owners, non-finite flags
_Measured = tuple[Any, list[Tensor], Tensor, _Params, Tensor, Tensor]


def _retested(first: BiasReport, measure_again: Callable[[], _Measured]) -> BiasReport:
    """``first`` with each failing layer's retest attached (:class:`BiasReport`);
    ``measure_again()`` draws the fresh ``RETEST_FACTOR`` × S backward passes (``_measure``'s
    output), only when some layer failed for a reason a retest can clear: a layer with a
    non-finite draw fails whatever the retest gives, and is not retested."""
    suspects = [r.name for r in first.layers if not r.passed and not r.nonfinite]
    if not suspects:
        return first
    _, z2_batches, z_max, params, owner, nonfinite = measure_again()
    again = _bias_report(
        params, owner, z2_batches, z_max, RETEST_FACTOR * first.samples, first.alpha, nonfinite
    )
    retests = {r.name: r for r in again.layers if r.name in suspects}
    layers = [dataclasses.replace(r, retest=retests.get(r.name)) for r in first.layers]
    return dataclasses.replace(first, layers=layers)


def _topmost(failing: list[str], order: list[str]) -> str | None:
    """The failing layer nearest the loss (last in forward ``order``), else the first by name."""
    suspect = next((n for n in reversed(order) if n in failing), None)
    return suspect if suspect is not None or not failing else sorted(failing)[0]


def _measure(
    model: nn.Module, loss_fn: LossFn, batches: list[Batch], samples: int, z: bool = True
) -> tuple[GradientVariance, list[Tensor], Tensor | None, _Params, Tensor | None, Tensor]:
    """The quantization variance and (``z=True``) each batch's projection z², the largest
    per-entry |z|, each projection's parameter tensor and, per parameter tensor, whether any
    draw had a non-finite entry."""
    _require_fqt(model)
    params = _Params.of(model)
    directions = _Directions(params) if z else None
    stats = _ZStats(params, directions) if z else None
    var_sum = None
    with _restored_buffers(model):
        for b in batches:
            d = _draw(model, loss_fn, b, samples, params, directions=directions)
            var_sum = d.variance if var_sum is None else var_sum + d.variance
            if stats is not None:
                stats.add(d)
    layer_of = dict(zip(params.names, params.layers, strict=True))
    variance = GradientVariance(params.per_parameter(var_sum / len(batches)), layer_of)
    if stats is None:
        return variance, [], None, params, None, torch.zeros(len(params.sizes), dtype=torch.bool)
    return variance, *stats.result()


class _ZStats:
    """The bias test's statistics over batches of draws: each batch's projection z², the
    largest per-entry |z|, and per parameter tensor whether any draw had a NaN or an infinite
    entry (its mean or variance is then not finite)."""

    def __init__(self, params: _Params, directions: _Directions) -> None:
        self.params, self.directions = params, directions
        self.z2: list[Tensor] = []
        self.z_max: Tensor | None = None
        self.nonfinite = torch.zeros(len(params.sizes), dtype=torch.bool)

    def add(self, d: _Draws) -> None:
        entries, projected = _z_scores(d, self.params, self.directions)
        self.z2.append(projected.square())
        z = entries.abs()
        self.z_max = z if self.z_max is None else torch.fmax(self.z_max, z)
        bad = ~(torch.isfinite(d.mean) & torch.isfinite(d.variance))
        self.nonfinite |= torch.stack([t.any() for t in bad.split(self.params.sizes)]).cpu()

    def result(self) -> tuple[list[Tensor], Tensor | None, _Params, Tensor, Tensor]:
        """``_measure``'s output after the variance."""
        return self.z2, self.z_max, self.params, self.directions.owner, self.nonfinite


def _z(diff: Tensor, se: Tensor, scale: Tensor) -> Tensor:
    """``diff / se``; where ``se`` is at float-rounding level of ``scale`` (≤ 1e-7): NaN if
    ``diff`` is within 1e-3 of ``scale`` (no spread, matches), else ``+inf``. ``+inf`` wherever
    ``diff`` or ``se`` is not finite (a NaN or infinite FQT gradient fails, never matches)."""
    matches = diff.abs() <= 1e-3 * scale + 1e-30
    verdict = torch.where(matches, math.nan, math.inf).to(diff.dtype)
    z = torch.where(se <= 1e-7 * scale, verdict, diff / se.clamp(min=1e-300))
    return torch.where(torch.isfinite(diff) & torch.isfinite(se), z, math.inf)


def _z_scores(d: _Draws, params: _Params, directions: _Directions) -> tuple[Tensor, Tensor]:
    """Per entry ``z = (mean − QAT)/(std/√S)`` and per projection on ``directions`` (the judged
    one, :class:`BiasReport`); NaN where an entry has no spread and matches, ``+inf`` where it has
    no spread and does not.

    An entry whose spread is at float-rounding level (≤ 1e-7 of its tensor's largest gradient)
    carries no variance to test against: only grid end points feed it, or every draw happened to
    round the same way (an entry fed by a few roundings does that by chance under the null, so it
    must not count as biased). It matches when it is within 1e-3 of that scale: float32
    dequantization of a grid end point errs by ~1 ulp of the grid's range, summed over the rows of
    a GEMM; a biased rounding (nearest at 2-4 bits) errs by 1e-2 or more.

    Projections take every entry's difference, with spread or without: whether an entry showed
    spread depends on the draws (one that rounds up rarely shows none in most sets of draws, and
    then sits below its QAT value), so leaving such entries out selects on the draws and biases
    the projections (``tests/stats/test_bias_projections.py``: z ≈ 19 on a null of rare
    roundings). An entry without spread adds the same value to every draw's projection: it moves
    the projection's mean, which is what is tested, and not its spread. A tensor without any
    entry with spread gets its entries' verdict on every projection (NaN: all match; ``+inf``:
    one misses). A projection whose spread is at float-rounding level (≤ 1e-7 of ``√n·max|g|``
    for a tensor of n entries) gets the same verdict at 1e-3 of that value; an ``+inf`` (no
    spread, misses) fails its layer (:func:`_mean_z2`).
    """
    diff = d.mean - d.qat
    se = (d.variance / d.samples).sqrt()
    sizes = torch.tensor(params.sizes, device=diff.device)
    tensor_scale = torch.stack([t.abs().amax() for t in d.qat.split(params.sizes)])
    entries = _z(diff, se, tensor_scale.repeat_interleave(sizes))

    owner = directions.owner.to(diff.device)
    projected_diff = directions.project(diff, d.qat_signs)
    projected_se = (d.projections.var(0) / d.samples).sqrt()
    # float rounding of a sum of n terms of size <= max|g| grows like sqrt(n), as does the
    # rounding noise's own spread on a ±1 direction
    reach = (sizes.to(diff.dtype).sqrt() * tensor_scale)[owner]
    projected = _z(projected_diff, projected_se, reach)
    # tensors none of whose entries has spread: their entries' verdict
    for i, part in enumerate(entries.split(params.sizes)):
        if not bool(torch.isfinite(part).any()):
            verdict = math.inf if bool(torch.isinf(part).any()) else math.nan
            projected[owner == i] = verdict
    return entries, projected


def _mean_z2(z2: Tensor) -> Tensor:
    """A layer's statistic on one batch: the mean z² over its projections with spread; ``inf``
    if any projection has none and misses the QAT value (a deterministic, biased tensor, such as
    nearest rounding gives, even beside a stochastic one); 0 if none has spread (an exact
    backward)."""
    if bool(torch.isinf(z2).any()):
        return z2.new_tensor(math.inf)
    stochastic = torch.isfinite(z2)
    return z2[stochastic].mean() if bool(stochastic.any()) else z2.new_tensor(0.0)


def _bias_report(
    params: _Params,
    owner: Tensor,
    z2_batches: list[Tensor],
    z_max: Tensor,
    samples: int,
    alpha: float,
    nonfinite: Tensor | None = None,
) -> BiasReport:
    """Per-layer verdicts at family-wise level ``alpha`` from each batch's projection z²
    (``owner[j]``: the parameter tensor of projection ``j``) and the per-entry ``z_max``;
    ``nonfinite[i]``: parameter tensor i had a non-finite draw (its layer fails). No retest and
    no suspect (the caller's)."""
    batches = len(z2_batches)
    layer_names = list(dict.fromkeys(params.layers))
    limit = math.sqrt(z2_threshold(samples, batches, alpha / len(layer_names)))
    owner = owner.cpu()
    reports = []
    for name in layer_names:
        keep = [i for i, layer in enumerate(params.layers) if layer == name]
        mine = torch.isin(owner, torch.tensor(keep))
        per_batch = torch.stack([_mean_z2(z2.cpu()[mine]) for z2 in z2_batches])
        n = sum(params.sizes[i] for i in keep)
        zmax = torch.cat([z_max.split(params.sizes)[i] for i in keep])
        zmax = float(zmax.nan_to_num(0.0, posinf=math.inf).max())
        rms = float(per_batch.mean().sqrt())
        bad = nonfinite is not None and bool(nonfinite[keep].any())
        reports.append(LayerBias(name, rms, zmax, limit, n, int(mine.sum()), nonfinite=bad))
    z_rms = float(torch.stack([_mean_z2(z2) for z2 in z2_batches]).mean().sqrt())
    z_max = float(z_max.nan_to_num(0.0, posinf=math.inf).max())
    return BiasReport(reports, samples, batches, z_rms, z_max, alpha)


def quantization_variance(
    model: nn.Module, loss_fn: LossFn, batches: Batch | Iterable[Batch], samples: int = 16
) -> GradientVariance:
    """Variance of the FQT gradient over its quantization noise on fixed minibatches (``samples``
    backward passes from one forward each), averaged over ``batches``."""
    return _measure(model, loss_fn, _as_batches(batches), samples, z=False)[0]


def bias_test(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batch | Iterable[Batch],
    samples: int = 32,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> BiasReport:
    """z-test of ``E[FQT gradient | batch] = QAT gradient`` (docs/method.md), per layer, at
    family-wise false-alarm level ``alpha``."""
    return measure_quantization(model, loss_fn, batches, samples, alpha=alpha).bias


def _isolate_culprits(
    model: nn.Module, loss_fn: LossFn, batches: list[Batch], samples: int, alpha: float
) -> list[str]:
    """The FQT layers whose gradient quantizers alone (all others exact) bias the gradient: one
    test per layer switched on alone, retested like the whole model's (:class:`BiasReport`), each
    at family-wise level ``alpha / L`` over the L configurations (Bonferroni), so that naming an
    unbiased layer has probability at most ``alpha`` for the whole list."""
    params = _Params.of(model)
    directions = _Directions(params)
    culprits = []
    with _restored_buffers(model):
        # one forward and QAT gradient per batch, shared by every layer's test (the graphs of all
        # batches are kept until the last layer is tested)
        forwards = []
        for b in batches:
            forward = _Forward(model, loss_fn, b, params)
            with exact_backward(model):
                forwards.append((b, forward, forward.gradient()))

        def measure(name: str, draws: int) -> _Measured:
            stats = _ZStats(params, directions)
            for b, forward, qat in forwards:
                stats.add(_draw(model, loss_fn, b, draws, params, [name], forward, qat, directions))
            return None, *stats.result()

        layers = list(fqt_modules(model))
        for name in layers:
            _, z2, z_max, _, owner, nonfinite = measure(name, samples)
            first = _bias_report(params, owner, z2, z_max, samples, alpha / len(layers), nonfinite)
            report = _retested(first, lambda name=name: measure(name, RETEST_FACTOR * samples))
            if not report.passed:
                culprits.append(name)
    return culprits


def check_unbiased(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    samples: int = 32,
    alpha: float = DEFAULT_ALPHA,
    raise_on_failure: bool = False,
) -> BiasReport:
    """Self-test: is this model's FQT gradient an unbiased estimate of its QAT gradient?

    ``batch`` is an ``(inputs, targets)`` pair or a list of them (several batches make the test
    sharper). Returns a :class:`BiasReport` (``.passed``, per-layer z-scores); an unbiased
    gradient whose projections' noise is near Gaussian fails with probability at most
    ``alpha`` (docs/method.md §7: a tensor whose mean rests on a few entries that round up
    rarely, next to small noise elsewhere, can fail far more often, since S draws that miss
    the rare rounding understate both the mean and its spread). When the test fails, each FQT
    layer's
    quantizers are switched on alone to find the layers whose quantizers introduce the bias
    (``report.culprits``); with ``raise_on_failure`` a biased gradient raises
    :class:`BiasError` naming them.
    """
    batches = _as_batches(batch)
    report = bias_test(model, loss_fn, batches, samples, alpha=alpha)
    if not report.passed:
        culprits = _isolate_culprits(model, loss_fn, batches, samples, alpha)
        report = dataclasses.replace(report, culprits=culprits)
    if raise_on_failure and not report.passed:
        raise BiasError(f"{report.summary()}; biased gradients in layers {report.failing()}")
    return report


@dataclass(frozen=True)
class GradOutputError:
    """Measured ``E‖Q(G) − G‖²`` of a layer's activation-gradient quantizer on its actual
    ``grad_output`` G, next to the quantizer's ``variance_bound(G)``."""

    name: str
    quantizer: str
    error: float
    bound: float


def grad_output_errors(
    model: nn.Module, loss_fn: LossFn, batch: Batch, repeats: int = 8, seed: int = 0
) -> list[GradOutputError]:
    """Record each FQT layer's ``grad_output`` in one FQT backward pass and measure its
    activation-gradient quantizer on it (``repeats`` draws) against the bound. A layer called
    more than once per forward (shared weights) quantizes each call's ``grad_output``: its
    calls' errors and bounds are summed (a sum of bounds bounds the sum)."""
    layers = _require_fqt(model)
    recorded: dict[str, list[Tensor]] = {}
    params = _Params.of(model)
    with ExitStack() as stack, _restored_buffers(model):
        for name, layer in layers.items():
            stack.enter_context(
                layer.observe_grad_output(
                    lambda g, name=name: recorded.setdefault(name, []).append(g.detach())
                )
            )
        _Forward(model, loss_fn, batch, params).gradient()
    gen = torch.Generator(device=batch[0].device).manual_seed(seed)
    out = []
    for name, layer in layers.items():
        if name not in recorded:
            continue
        q = layer.plan.grad_output
        err = bound = 0.0
        for grad in (g.float() for g in recorded[name]):
            for _ in range(repeats):
                err += float((q(grad, gen) - grad).double().square().sum()) / repeats
            bound += float(q.variance_bound(grad))
        out.append(GradOutputError(name, repr(q), err, bound))
    return out


@dataclass(frozen=True)
class VarianceProfile:
    """``matrix[l, k]``: the contribution of the quantizers of FQT layer ``rows[l]`` to the
    gradient variance of layer ``columns[k]``; the last row is the sampling variance.
    Lower-triangular in forward order (docs/method.md §3): a layer's quantizers only reach its own
    weight gradient and those of the layers below it."""

    rows: list[str]
    columns: list[str]
    matrix: list[list[float]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "columns": self.columns, "matrix": self.matrix}


def variance_profile(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batch | Iterable[Batch],
    samples: int = 8,
    sampling: GradientVariance | None = None,
) -> VarianceProfile:
    """Measure each FQT layer's contribution by quantizing its gradients alone (all others exact)
    and reading the spread of every layer's gradient: one forward and one QAT backward per
    batch, then ``L × samples`` backward passes from it. ``sampling`` adds the sampling row."""
    layers = _require_fqt(model)
    params = _Params.of(model)
    batches = _as_batches(batches)
    order = _forward_order(model, loss_fn, batches[0])
    order += [n for n in layers if n not in order]
    columns = list(dict.fromkeys(params.layers))  # registration order: forward order, usually
    per_entry: dict[str, Tensor] = {}
    with _restored_buffers(model):
        for b in batches:
            forward = _Forward(model, loss_fn, b, params)
            with exact_backward(model):
                qat = forward.gradient()
            for name in order:
                v = _draw(model, loss_fn, b, samples, params, [name], forward, qat).variance
                per_entry[name] = v if name not in per_entry else per_entry[name] + v
    layer_of = dict(zip(params.names, params.layers, strict=True))
    matrix = []
    for name in order:
        per_layer = GradientVariance(
            params.per_parameter(per_entry[name] / len(batches)), layer_of
        ).per_layer
        matrix.append([per_layer.get(c, 0.0) for c in columns])
    rows = list(order)
    if sampling is not None:
        rows.append("sampling")
        matrix.append([sampling.per_layer.get(c, 0.0) for c in columns])
    return VarianceProfile(rows, columns, matrix)
