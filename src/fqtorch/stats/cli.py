"""``fqtorch variance``: measure the variance decomposition of a model across quantizers and bits.

Writes ``variance.json`` (schema below), ``variance_vs_bits.png``, ``variance_profile.png`` and,
last, ``variance_details.json`` (the profile's matrix, the sampling variance per layer, the
run's settings; its absence marks an unfinished run). ``variance.json``::

    {"model", "dataset", "batch_size", "seed", "sampling_variance",
     "sampling_variance_rse" (its relative standard error, from the minibatches' spread),
     "results": [{"quantizer", "bits", "bits_per_element", "rounding", "quantization_variance",
                  "bias_z_rms", "bias_passed" (every layer's RMS z within its limit, or its
                  retest on fresh draws passed), "bias_retested" (the layers whose first
                  test failed), "bias_retest" ({layer: {"z_rms", "limit"}} of those retests
                  on 4x the draws), "bias_failing" (the layers reported biased),
                  "bias_z_limit", "bias_z_max", "layers": [{"name", "quantization_variance",
                              "grad_output_error", "grad_output_error_bound"}]}]}

A layer's ``quantization_variance`` is the quantization variance of that layer's own parameter
gradients (all quantizers on); the profile shows where it comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ..config import FQTConfig
from ..convert import dequantize_model, fqt_modules, quantize_model
from ..quantizers.base import MAX_BITS, MIN_BITS, is_registered, list_quantizers
from ..quantizers.formats import is_format
from ..quantizers.transforms import TRANSFORMS
from .estimators import RETEST_FACTOR, few_batches_caveat
from .null import DEFAULT_ALPHA, check_test_parameters

log = logging.getLogger(__name__)

__all__ = ["add_variance_parser", "run_variance"]


# The help of options fqtorch variance and fqtorch plan share.
DATA_DIR_HELP = (
    "where the data set lies (not needed for digits; text defaults to the Python documentation, "
    "pydoc_data/topics.py)"
)
BLOCK_SIZE_HELP = "context length for --dataset text (default: the --checkpoint's, else 64)"


def add_model_and_data(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dataset`` and ``--data-dir``, as fqtorch variance and plan take them."""
    from ..data import list_datasets
    from ..models import list_models

    p.add_argument(
        "--model",
        default=None,
        choices=list_models(),
        help="default: the --checkpoint's model, else the data set's default",
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=list_datasets(),
        help="default: the --checkpoint's data set (and its --data-dir), else digits",
    )
    p.add_argument("--data-dir", help=DATA_DIR_HELP)


def add_variance_parser(sub: Any) -> None:

    p = sub.add_parser(
        "variance",
        help="measure sampling vs quantization variance, bias and bounds",
        description="Measure the FQT gradient's bias and variance decomposition "
        "(docs/method.md §3) for each quantizer and bit width. Defaults: digits data, "
        "digits_cnn, ptq/psq/bhq/rht at 4..8 bits.",
    )
    add_model_and_data(p)
    p.add_argument(
        "--quantizers",
        default="ptq,psq,bhq,rht",
        help="comma-separated names; NAME+rht16 / NAME+rht32 puts a random Hadamard transform "
        "before it; a float format (fp8_*, mxfp8, mxfp4, nvfp4) fixes its own bits and is "
        "measured once, whatever --bits says (default: %(default)s)",
    )
    p.add_argument(
        "--bits", default="4,5,6,7,8", help="comma-separated bit widths (default: %(default)s)"
    )
    p.add_argument(
        "--grad-rounding",
        default="stochastic",
        choices=["stochastic", "nearest"],
        help="the gradient quantizers' rounding; nearest is the biased ablation the bias test "
        "should flag (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="minibatch size (default: %(default)s)"
    )
    p.add_argument(
        "--batches", type=int, default=4, help="minibatches measured (default: %(default)s)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=16,
        help="FQT backward passes per minibatch (default: %(default)s)",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="false-alarm level of each configuration's bias test (all layers together; "
        "default: %(default)s)",
    )
    p.add_argument(
        "--full-batches",
        type=int,
        default=None,
        help="cap on the batches of 256 used for the full-data gradient (default: all); a cap "
        "makes it an estimate, and the sampling variance reads high by about batch size / "
        "(256 x cap) of itself",
    )
    p.add_argument(
        "--profile",
        default=None,
        metavar="QUANTIZER[:BITS]",
        help="configuration of the variance profile (default: first quantizer, fewest bits; "
        "BITS left out: the fewest of --bits); 'none' skips it (it costs L x (profile samples "
        "+ 1) backward passes a batch, L layers)",
    )
    p.add_argument(
        "--profile-samples",
        type=int,
        default=8,
        help="FQT backward passes per minibatch for the profile (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint", help="a checkpoint.pt of fqtorch train, to measure a trained model"
    )
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument(
        "--fused",
        action="store_true",
        help="torch.compile'd quantizers with in-kernel noise (faster after compiling)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=None, help=BLOCK_SIZE_HELP)
    p.add_argument("--out", default="runs/variance", metavar="DIR", help="(default: %(default)s)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results already in --out (without it they are kept: a new --out)",
    )


# What a measurement writes in --out (variance_details.json last: the sign that it finished).
VARIANCE_OUTPUTS = (
    "variance.json",
    "variance_vs_bits.png",
    "variance_profile.png",
    "variance_details.json",
)


def check_overwrite(out: Path, outputs: tuple[str, ...], overwrite: bool) -> None:
    """Refuse to write over an earlier run's results in ``out`` unless ``--overwrite``."""
    held = [name for name in outputs if (out / name).exists()]
    if held and not overwrite:
        raise ValueError(
            f"--out {out} already holds results ({', '.join(held)}); name another --out, or "
            "pass --overwrite to replace them"
        )


def _replace_outputs(out: Path) -> None:
    """--overwrite: remove the earlier run's files as this one writes its first, so that none
    stays behind it, and a run stopped before it has measured anything loses none."""
    for name in VARIANCE_OUTPUTS:
        (out / name).unlink(missing_ok=True)


def _grad_fields(name: str, bits: int) -> dict[str, Any]:
    """The FQTConfig fields of a ``--quantizers`` entry: ``NAME`` or ``NAME+TRANSFORM``."""
    quantizer, _, transform = name.partition("+")
    return {"grad_quantizer": quantizer, "grad_bits": bits, "grad_transform": transform or None}


def check_quantizer_entry(flag: str, name: str) -> None:
    """Refuse a ``--quantizers`` entry (``NAME`` or ``NAME+TRANSFORM``) that is no gradient
    quantizer, in the words of the flag the user typed (not FQTConfig's field names)."""
    quantizer, plus, transform = name.partition("+")
    forms = " or ".join(f"NAME+{t}" for t in sorted(TRANSFORMS))
    if not is_registered(quantizer):
        raise ValueError(
            f"{flag}: {quantizer!r} is not a registered quantizer; give NAME or {forms} with NAME "
            f"one of: {', '.join(list_quantizers())}"
        )
    if plus and transform not in TRANSFORMS:
        raise ValueError(
            f"{flag}: {name!r} names no known transform; give NAME or {forms} (a random "
            "Hadamard transform of blocks of 16 or 32 before NAME), e.g. psq+rht16"
        )
    if quantizer == "identity" and transform:  # a label that would say both branches
        raise ValueError(
            f"{flag}: {name!r}: identity quantizes nothing, so +{transform} would transform the "
            f"weight-gradient branch alone; put +{transform} after a quantizer, e.g. "
            f"psq+{transform}"
        )
    try:
        FQTConfig(**_grad_fields(name, MAX_BITS)).build_quantizers()
    except ValueError as exc:
        if not transform:
            raise ValueError(f"{flag}: {exc}") from None
        raise ValueError(
            f"{flag}: {name!r}: {quantizer} takes no transform before it (it has one of its "
            f"own); give {quantizer} alone, or +{transform} after another quantizer, e.g. "
            f"psq+{transform}"
        ) from None


def _profile_choice(text: str | None, quantizers: list[str], bits: list[int]) -> tuple | None:
    """``--profile``'s (quantizer, bits), checked; ``None`` for ``none``. Default: the first
    quantizer at the fewest bits; ``QUANTIZER`` alone: that quantizer at the fewest bits."""
    if text == "none":
        return None
    if not text:
        return quantizers[0], min(bits)
    name, colon, b_text = text.partition(":")
    try:
        b = int(b_text) if colon else min(bits)
    except ValueError:
        raise ValueError(
            f"--profile: expected QUANTIZER[:BITS] (e.g. bhq:4, or bhq for the fewest of --bits), "
            f"got {text!r}"
        ) from None
    if not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"--profile: bits must be in {MIN_BITS}..{MAX_BITS}, got {b}")
    check_quantizer_entry("--profile", name)
    return name, b


def _parse_list(text: str, kind: type, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--{what} must be a comma-separated list, got {text!r}") from exc
    if not values:
        raise ValueError(f"--{what} is empty")
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"--{what} names {', '.join(repeated)} more than once")
    return values


def _model_and_data(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    from ..data import build_datasets
    from ..models import build_model
    from ..train.config import DATASET_DEFAULTS

    state, made_with = _read_checkpoint(args)
    # what the flags leave out, the checkpoint's run says (its data folder and context length
    # with its data set)
    if args.dataset is None:
        args.dataset = made_with.get("dataset") or "digits"
    same_data = args.dataset == made_with.get("dataset")
    if args.data_dir is None and same_data:
        args.data_dir = made_with.get("data_dir")
    if args.block_size is None:
        args.block_size = (made_with.get("block_size") if same_data else None) or 64
    _check_device_and_block_size(args)
    spec = build_datasets(args.dataset, args.data_dir, seed=args.seed, block_size=args.block_size)
    name = args.model or made_with.get("model") or DATASET_DEFAULTS[args.dataset]["model"]
    torch.manual_seed(args.seed)
    if spec.task == "text":
        model = build_model(name, num_classes=spec.num_classes, block_size=spec.block_size)
    else:
        model = build_model(name, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            from ..train.errors import CheckpointError
            from ..train.loop import _state_dict_error

            raise CheckpointError(
                f"--checkpoint {args.checkpoint} does not fit --model {name} on --dataset "
                f"{args.dataset}: {_state_dict_error(exc)}"
            ) from None
    return model.to(args.device).train(), spec, name


def _check_device_and_block_size(args: argparse.Namespace) -> None:
    """``--device`` names a device this torch has, ``--block-size`` is positive: a one-line
    ``ValueError`` before any work."""
    if args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(
            f"--device {args.device!r} is not a device; give cpu, cuda or cuda:N"
        ) from None
    from ..train.loop import check_device_available

    check_device_available(str(device), instead="cpu")


def _read_checkpoint(args: argparse.Namespace) -> tuple[dict | None, dict]:
    """The checkpoint of ``--checkpoint`` (or ``None``) and the options it was made with; a
    checkpoint of another model or data set than the flags name is refused, naming its own."""
    if not args.checkpoint:
        return None, {}
    from ..train.checkpoint import load_checkpoint
    from ..train.errors import CheckpointError

    state = load_checkpoint(args.checkpoint)
    try:
        made_with = json.loads(state.get("config", "{}"))
    except (TypeError, ValueError):
        made_with = {}
    for flag, value in (("model", args.model), ("dataset", args.dataset)):
        saved = made_with.get(flag)
        if value is not None and saved is not None and saved != value:
            raise CheckpointError(
                f"--checkpoint {args.checkpoint} was made with --model {made_with.get('model')} "
                f"on --dataset {made_with.get('dataset')}, not --{flag} {value}; pass those "
                "(or leave --model out: it defaults to the checkpoint's)"
            )
    return state, made_with


@contextlib.contextmanager
def _conversion_summary_said() -> Iterator[None]:
    """Quiet ``quantize_model``'s conversion summary (INFO) within: the run converts the same
    model once per configuration, and its first conversion has said which layers are FQT and
    which stay float. Warnings still show; the logger's level is restored after."""
    logger = logging.getLogger("fqtorch.convert")
    level = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(level)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _measure_config(
    model: nn.Module, cfg: FQTConfig, batches: list, samples: int, alpha: float
) -> dict:
    from . import grad_output_errors, measure_quantization

    quantize_model(model, cfg)
    try:
        report = measure_quantization(model, _loss, batches, samples, alpha=alpha)
        errors = {e.name: e for e in grad_output_errors(model, _loss, batches[0])}
        per_layer = report.variance.per_layer
        layers = [
            {
                "name": name,
                "quantization_variance": per_layer.get(name, 0.0),
                "grad_output_error": errors[name].error if name in errors else 0.0,
                "grad_output_error_bound": errors[name].bound if name in errors else 0.0,
            }
            for name in fqt_modules(model)
        ]
    finally:
        dequantize_model(model)
    grad_q = cfg.build_quantizers()["grad_output"]
    name = cfg.grad_quantizer + (f"+{cfg.grad_transform}" if cfg.grad_transform else "")
    return {
        "quantizer": name,
        "bits": grad_q.bits,  # a float format's own width, else grad_bits
        "bits_per_element": float(getattr(grad_q, "bits_per_element", grad_q.bits)),
        "rounding": cfg.grad_rounding,
        "quantization_variance": report.variance.total,
        "bias_z_rms": report.bias.z_rms,
        "bias_z_max": report.bias.z_max,
        "bias_z_limit": report.bias.layers[0].limit,
        "bias_passed": report.bias.passed,
        "bias_retested": report.bias.retested(),
        "bias_retest": {
            r.name: {"z_rms": r.retest.z_rms, "limit": r.retest.limit}
            for r in report.bias.layers
            if r.retest is not None
        },
        "bias_failing": report.bias.failing(),
        "layers": layers,
    }


def _retest_note(result: dict, samples: int) -> str:
    """The layers whose first bias test failed and were tested again (``BiasReport``)."""
    if not result["bias_retested"]:
        return ""
    confirmed = [n for n in result["bias_retested"] if n in result["bias_failing"]]
    outcome = f"biased: {', '.join(confirmed)}" if confirmed else "passed"
    draws = RETEST_FACTOR * samples
    return f"  (retested {', '.join(result['bias_retested'])} on {draws} fresh draws: {outcome})"


def run_variance(args: argparse.Namespace) -> int:
    from . import sampling_variance, variance_profile

    quantizers = _parse_list(args.quantizers, str, "quantizers")
    bits = _parse_list(args.bits, int, "bits")
    for q in quantizers:  # names checked before any work
        check_quantizer_entry("--quantizers", q)
    for b in bits:
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(f"--bits: each must be in {MIN_BITS}..{MAX_BITS}, got {b}")
    check_test_parameters(args.samples, args.alpha)  # the error names the flag (fqtorch.cli)
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if args.full_batches is not None and args.full_batches < 1:
        raise ValueError(f"--full-batches must be >= 1 (or left out: all), got {args.full_batches}")
    profile_choice = _profile_choice(args.profile, quantizers, bits)  # checked before the grid
    if profile_choice is not None and args.profile_samples < 2:
        raise ValueError(f"--profile-samples must be >= 2, got {args.profile_samples}")
    model, spec, model_name = _model_and_data(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a directory for the results")
    check_overwrite(out, VARIANCE_OUTPUTS, args.overwrite)
    start = time.perf_counter()

    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        spec.train,
        args.batch_size,
        drop_last=True,
        sampler=RandomSampler(spec.train, generator=gen),
    )
    if len(loader) < args.batches:
        raise ValueError(
            f"--batches {args.batches} × --batch-size {args.batch_size} exceeds the "
            f"{len(spec.train)} training samples"
        )
    out.mkdir(parents=True, exist_ok=True)  # only once the input is known to be good
    device = torch.device(args.device)
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == args.batches:
            break
    full = DataLoader(spec.train, 256)
    full_batches = [
        (x.to(device), y.to(device))
        for i, (x, y) in enumerate(full)
        if args.full_batches is None or i < args.full_batches
    ]

    # The one conversion summary of the run: every configuration converts the same layers.
    quantize_model(model, FQTConfig.preset("qat", seed=args.seed))
    sampling = sampling_variance(model, _loss, batches, full_data=full_batches)
    dequantize_model(model)
    rse = sampling.relative_standard_error
    log.info(
        "sampling variance %.4g (%d minibatches of %d; relative standard error %s%s)",
        sampling.total,
        len(batches),
        args.batch_size,
        "unknown" if rse is None else f"{rse:.2g}",
        "" if rse is None else few_batches_caveat(len(batches)),
    )

    results = []
    log.info(
        "bias test: per layer, RMS z of 10 projections per parameter tensor over %d batches x "
        "%d passes against its null limit (false alarms <= %g); max |z| of single entries is "
        "informational (Student-t tails over many entries)",
        args.batches,
        args.samples,
        args.alpha,
    )
    log.info(
        "%-8s %4s %14s %10s %8s %8s %13s   %s",
        "quant",
        "bits",
        "quant. var",
        "/ sampling",
        "RMS z",
        "limit",
        "max |z| (info)",
        "progress",
    )
    # A float format fixes its width: sweeping --bits would repeat one measurement.
    configs = [
        (q, b) for q in quantizers for b in (bits[:1] if is_format(q.partition("+")[0]) else bits)
    ]
    payload = {
        "model": model_name,
        "dataset": args.dataset,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "sampling_variance": sampling.total,
        "sampling_variance_rse": sampling.relative_standard_error,
        "results": results,
    }
    for done, (q, b) in enumerate(configs, start=1):
        cfg = FQTConfig(
            **_grad_fields(q, b), seed=args.seed, fused=args.fused, grad_rounding=args.grad_rounding
        )
        try:
            with _conversion_summary_said():
                r = _measure_config(model, cfg, batches, args.samples, args.alpha)
        except KeyboardInterrupt:  # keep what was measured (variance_details.json: not done)
            if results:
                interrupted = {**payload, "interrupted": f"after {len(results)} of {len(configs)}"}
                _replace_outputs(out)
                (out / "variance.json").write_text(json.dumps(interrupted, indent=2) + "\n")
                log.warning(
                    "interrupted: the %d configuration(s) measured are in %s/variance.json",
                    len(results),
                    out,
                )
            raise
        results.append(r)
        log.info(
            "%-8s %4d %14.4g %10.3g %8.3f %8.2f %13.4g   %d/%d, %.0fs%s",
            q,
            r["bits"],
            r["quantization_variance"],
            r["quantization_variance"] / sampling.total,
            r["bias_z_rms"],
            r["bias_z_limit"],
            r["bias_z_max"],
            done,
            len(configs),
            time.perf_counter() - start,
            ("" if r["bias_passed"] else "  BIASED") + _retest_note(r, args.samples),
        )

    # The grid's results are on disk before the profile runs.
    _replace_outputs(out)
    (out / "variance.json").write_text(json.dumps(payload, indent=2) + "\n")

    profile = None
    if profile_choice is not None:
        profile_q, profile_b = profile_choice
        log.info(
            "variance profile: %s at %d bits (--profile; 'none' skips it), %d samples a batch",
            profile_q,
            profile_b,
            args.profile_samples,
        )
        cfg = FQTConfig(
            **_grad_fields(profile_q, profile_b),
            seed=args.seed,
            fused=args.fused,
            grad_rounding=args.grad_rounding,
        )
        with _conversion_summary_said():
            quantize_model(model, cfg)
        profile = variance_profile(model, _loss, batches, args.profile_samples, sampling=sampling)
        dequantize_model(model)

    extra = {
        "profile": None
        if profile is None
        else {"quantizer": profile_q, "bits": profile_b, **profile.to_dict()},
        "sampling_per_layer": sampling.per_layer,
        "batches": args.batches,
        "samples": args.samples,
        "alpha": args.alpha,
        "fused": args.fused,
        "bias_passed": [r["bias_passed"] for r in results],
        "seconds": time.perf_counter() - start,
    }
    profile_name = "" if profile_choice is None else "".join(map(str, profile_choice))
    figures = _plots(out, payload, profile, profile_name)
    # Written last: a measurement is complete when this file exists (experiments/reproduce.py).
    (out / "variance_details.json").write_text(json.dumps(extra, indent=2) + "\n")
    log.info(
        "wrote %s/variance.json, variance_details.json%s (%.1fs)",
        out,
        "".join(f", {name}" for name in figures) or " and no figures",
        time.perf_counter() - start,
    )
    return 0


_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1))), ("P", (0, (1, 1)))]


def _plots(out: Path, payload: dict, profile: Any, profile_name: str) -> list[str]:
    """Write the figures; returns the names of the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dependency; only a broken install gets here
        log.warning("matplotlib does not import (pip install matplotlib): no figures written")
        return []
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    by_q: dict[str, list[tuple[int, float]]] = {}
    for r in payload["results"]:
        by_q.setdefault(r["quantizer"], []).append((r["bits"], r["quantization_variance"]))
    # Each quantizer its own marker and line style, markers shrinking in drawing order, so that
    # lines on top of each other (PSQ and RHT often are) all stay visible.
    for i, (q, points) in enumerate(by_q.items()):
        points.sort()
        marker, style = _STYLES[i % len(_STYLES)]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=marker,
            linestyle=style,
            markersize=max(3.0, 9.0 - 1.5 * i),
            markerfacecolor="none" if i % 2 else None,
            label=q.upper(),
        )
    ax.axhline(payload["sampling_variance"], color="k", linestyle="--", label="sampling (QAT)")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["bits"] for r in payload["results"]}))
    ax.set_xlabel("gradient bits (activation-gradient GEMM; weight-gradient GEMM at 8 bits)")
    ax.set_ylabel("variance of the gradient")
    ax.set_title(f"{payload['model']} on {payload['dataset']}, batch {payload['batch_size']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "variance_vs_bits.png", dpi=120)
    plt.close(fig)
    written = ["variance_vs_bits.png"]

    if profile is None:
        return written
    # Columns: the gradients of layers with quantizers (a BatchNorm's column would only hold
    # what reaches it from the layers above, and no row of its own).
    keep = [k for k, name in enumerate(profile.columns) if name in profile.rows]
    matrix = np.array(profile.matrix, dtype=float)[:, keep]
    columns = [profile.columns[k] for k in keep]
    zero = matrix <= 0
    floor = matrix[~zero].min() if (~zero).any() else 1e-30
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * len(columns), 1.4 + 0.4 * len(profile.rows)))
    # exactly zero (masked, drawn white): no path from those quantizers to that gradient
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(
        np.ma.masked_array(np.log10(np.maximum(matrix, floor)), zero), cmap=cmap, aspect="auto"
    )
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(profile.rows)), profile.rows, fontsize=7)
    ax.set_xlabel("gradient of layer")
    ax.set_ylabel("quantizers of layer")
    ax.set_title(f"variance profile ({profile_name}); white: exactly 0", fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("log10 variance added to that layer's gradient", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "variance_profile.png", dpi=120)
    plt.close(fig)
    written.append("variance_profile.png")
    return written
