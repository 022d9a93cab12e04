"""Shared benchmark helpers: warm-up, median timing, environment record, JSON output."""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fqtorch


def matrix_shapes(text: str, form: str = "ROWSxCOLS") -> list[tuple[int, ...]]:
    """``--shapes`` of ``form`` (``ROWSxCOLS``, ``MxKxN``: as many sizes as it names),
    comma-separated, as tuples of positive sizes; a one-line ``SystemExit`` otherwise."""
    count = len(form.split("x"))
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",")]
        if any(len(s) != count or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--shapes: expected {form}[,...] of sizes >= 1, got {text!r}") from None
    return shapes


def check_args(args: argparse.Namespace) -> None:
    """The options every benchmark shares, checked before anything is measured: one line that
    says what was expected (a traceback or a silent default otherwise)."""
    if args.repeats < 1:
        raise SystemExit(f"--repeats: expected an integer >= 1, got {args.repeats}")
    if getattr(args, "batch", None) is not None and args.batch < 1:
        raise SystemExit(f"--batch: expected an integer >= 1, got {args.batch}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise SystemExit(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(
                f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; "
                "use --device cpu"
            )
        # fp32 means fp32: cuDNN's convolutions default to TF32 (matmuls do not), which would
        # make the fp32 baseline of the convolution benchmarks a 10-bit-mantissa one
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def fallbacks(step: Callable[[], Any]) -> list[str]:
    """Run ``step`` once and return the warnings of FQT layers that left the backend asked for
    (to simulate). fqtorch says each once per process (``warn_once``): its memo is cleared first,
    so that every variant's own fallbacks are seen, not only the first variant's."""
    from fqtorch.backends.notes import warn_once

    warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    return [str(w.message) for w in caught if "using the simulate backend" in str(w.message)]


def fallback_note(messages: list[str]) -> str:
    """A row's note for :func:`fallbacks`: the count, and the first reason."""
    if not messages:
        return ""
    return f"  ({len(messages)} layer(s) fell back to simulate: {messages[0][:120]})"


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median, min and max wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "runs": repeats,
    }


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median, min and max seconds of each function, run in turn ``repeats`` times (after two
    warm-up rounds), so that the machine's drift falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 2):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
        for name, t in times.items()
    }


def ms_cell(t: dict[str, float], digits: int = 2) -> str:
    """``median [min–max]`` of :func:`median_seconds`'s result, in milliseconds."""
    return (
        f"{t['median'] * 1e3:.{digits}f} [{t['min'] * 1e3:.{digits}f}–{t['max'] * 1e3:.{digits}f}]"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        # "+dirty": the code measured is not the commit's (tracked files changed)
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # TF32 in fp32 products (check_args turns both off for a CUDA run)
        "tf32": {
            "cudnn": torch.backends.cudnn.allow_tf32,
            "matmul": torch.backends.cuda.matmul.allow_tf32,
        },
        "commit": git_commit(),
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


VARIANTS = (
    ["fp32", "bf16_autocast", "qat"]
    + [
        f"fqt_{backend}_{q}5{suffix}"
        for backend in ("simulate", "int8")
        for suffix in ("", "_fused")
        for q in ("ptq", "psq", "bhq")
    ]
    + ["fqt_auto_psq5", "fqt_auto_bhq5"]
    # the FP8 backend (torch._scaled_mm): E4M3 forward, E5M2 gradients, per tensor
    + ["fqt_fp8_e4m3"]
    # not a training setting: round-to-nearest gradients (biased), to measure what the
    # stochastic rounding's noise costs the compiled int8 step
    + ["fqt_int8_psq5_fused_nearest"]
)


def select(patterns: str | None) -> list[str]:
    """The variants matching comma-separated shell patterns (all when ``None``)."""
    if not patterns:
        return list(VARIANTS)
    chosen = [v for v in VARIANTS if any(fnmatch.fnmatch(v, p) for p in patterns.split(","))]
    if not chosen:
        raise SystemExit(f"no variant matches {patterns!r}; variants: {', '.join(VARIANTS)}")
    return chosen


def step_variants(
    base: nn.Module, names: list[str] | None = None
) -> dict[str, tuple[nn.Module, bool]]:
    """``name -> (model, autocast)`` for the variants in ``names`` (default all of
    :data:`VARIANTS`): fp32, bf16 autocast, QAT, and FQT-simulate / FQT-int8 with PTQ, PSQ and
    BHQ at 5 bits, eager (``fused=False``) or ``_fused`` (compiled quantizers and, on int8,
    compiled epilogues), ``fqt_auto_*`` (``backend="auto"`` with its defaults),
    ``fqt_fp8_e4m3`` (``backend="fp8"``: ``torch._scaled_mm``, E4M3 forward, E5M2 gradients) and
    ``*_nearest`` (gradients rounded to nearest: biased, only to measure what the noise costs),
    each FQT model a converted copy of ``base``."""
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name in names or VARIANTS:
        if name in ("fp32", "bf16_autocast"):
            out[name] = (base, name == "bf16_autocast")
            continue
        if name == "qat":
            cfg = fqtorch.FQTConfig.preset("qat")
        elif name == "fqt_fp8_e4m3":
            cfg = fqtorch.FQTConfig(
                backend="fp8",
                input_quantizer="fp8_e4m3",
                weight_quantizer="fp8_e4m3",
                grad_quantizer="fp8_e5m2",
                grad_weight_quantizer="fp8_e5m2",
            )
        else:
            _, backend, preset, *flags = name.split("_")
            default = None if backend == "auto" else False
            cfg = fqtorch.FQTConfig.preset(
                preset, backend=backend, fused=True if "fused" in flags else default
            )
            if "nearest" in flags:
                cfg = cfg.replace(grad_rounding="nearest")
        out[name] = (fqtorch.quantize_model(copy.deepcopy(base), cfg), False)
    return out


def add_variant_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variants",
        metavar="PATTERNS",
        help="comma-separated shell patterns of the variants to run (default: all), e.g. "
        "'fp32,bf16*,*psq5*'; variants: " + ", ".join(VARIANTS),
    )


def peak_memory(device: str) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset; ``None`` on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return None


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def with_baselines(names: list[str]) -> list[str]:
    """``names`` with fp32 and bf16 autocast first: every ratio is against those two, measured in
    the same process."""
    return ["fp32", "bf16_autocast"] + [n for n in names if n not in ("fp32", "bf16_autocast")]


def print_table(results: dict[str, dict[str, Any]], memory_key: str | None = None) -> None:
    """One row per variant: median ms [min–max], ratios fp32/x and bf16/x (> 1: faster)."""
    fp32, bf16 = results["fp32"]["median"], results["bf16_autocast"]["median"]
    header = f"{'variant':<26}{'ms':>10}{'[min-max]':>20}{'fp32/x':>9}{'bf16/x':>9}"
    print(header + (f"{memory_key:>16}" if memory_key else ""))
    for name, t in results.items():
        ms = t["median"]
        spread = f"[{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}]" if "min" in t else ""
        row = f"{name:<26}{ms * 1e3:>10.1f}{spread:>20}{fp32 / ms:>9.2f}{bf16 / ms:>9.2f}"
        if memory_key:
            value = t.get(memory_key)
            row += f"{'-' if value is None else f'{value / 2**20:.1f} MiB':>16}"
        print(row)


def print_header(env: dict[str, Any]) -> None:
    print(
        f"# {env['cpu']} ({env['cpu_capability']}), {env['threads']} threads, "
        f"torch {env['torch']}, cuda {env['cuda']}, commit {env['commit']}"
    )


def outside_int_mm(step: Callable[[], Any], device: str, steps: int = 2) -> dict[str, float]:
    """Seconds per step outside ``aten::_int_mm`` and inside it, from ``torch.profiler`` over
    ``steps`` steps (on the CPU every op's own time; on CUDA the GPU kernels' time, which leaves
    out the host: a step of small kernels can take several times its kernel time). The
    overhead measure of the integer step: compared with the fp32 step of the same process, it
    does not depend on how fast the machine's integer GEMMs are."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    if device == "cuda":
        # A kernel's time is its own row's and, again, the launching operator's own device
        # time: summing every row counted such kernels twice (docs/bench/gpu_h200, an int8
        # Conv2d step on an NVIDIA H200: all rows 3.68 ms = CUDA rows 2.01 + operator rows 1.67).
        # The CUDA rows are the kernels, less the user annotations (record_function spans,
        # compiled regions), which kineto also files as CUDA and which span kernels again;
        # torch's own table leaves them out too. The part under ``_int_mm`` is that operator's
        # device time.
        total = sum(
            e.self_device_time_total
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        )
        gemm = sum(
            e.device_time_total
            for e in events
            if e.device_type == DeviceType.CPU and e.key == "aten::_int_mm"
        )
    else:
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key == "aten::_int_mm")
    return {"outside_int_mm": (total - gemm) / steps / 1e6, "int_mm": gemm / steps / 1e6}


INTEGER_KERNELS = ("onednn::qconv2d_pointwise", "onednn::qconv_prepack", "aten::_int_mm")


def integer_breakdown(step, steps: int = 2, top: int = 0) -> dict[str, Any]:
    """Seconds per step inside the integer kernels and outside them (every op's own CPU time,
    ``torch.profiler``; the profiler's own overhead lands outside); with ``top``, also the
    ``top`` ops with the most own time (``"top_ops"``: [op, seconds per step, calls per step])."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kernels = {k: sum(e.self_cpu_time_total for e in events if e.key == k) for k in INTEGER_KERNELS}
    inside = sum(kernels.values())
    compiled = sum(e.self_cpu_time_total for e in events if "CompiledFxGraph" in e.key)
    out: dict[str, Any] = {
        "integer_kernels": inside / steps / 1e6,
        "outside_integer_kernels": (total - inside) / steps / 1e6,
        # every compiled graph: the fused quantizers and the int8 epilogues (key kept for the
        # JSON files already written)
        "compiled_quantizers": compiled / steps / 1e6,
        **{k: v / steps / 1e6 for k, v in kernels.items()},
    }
    if top:
        ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
        out["top_ops"] = [
            [e.key, e.self_cpu_time_total / steps / 1e6, e.count / steps] for e in ranked
        ]
        # fqtorch's compiled kernels by name, with the anonymous compiled graph they call
        named = [e for e in events if e.key.startswith("fqtorch::")]
        out["fqtorch_kernels"] = [
            [e.key, e.cpu_time_total / steps / 1e6, e.count / steps]
            for e in sorted(named, key=lambda e: -e.cpu_time_total)
        ]
    return out


# The float step's products on the CPU: convolutions (forward and backward) and matrix products,
# each with everything it calls (an op nested in another of these counts once, in the outer).
FLOAT_PRODUCTS = (
    "aten::convolution",
    "aten::convolution_backward",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
)


def _profiled(step: Callable[[], Any]) -> Any:
    """One step's profiler events (``torch.profiler``, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.events()


def _float_parts(events: Any) -> tuple[float, float]:
    """Seconds in the products (:data:`FLOAT_PRODUCTS`, each with the ops it calls, counted
    once where they nest) and in every other op (own CPU time) of one profiled step."""

    def outermost(e: Any) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name in FLOAT_PRODUCTS:
                return False
            parent = parent.cpu_parent
        return True

    total = sum(e.self_cpu_time_total for e in events)
    inside = sum(e.cpu_time_total for e in events if e.name in FLOAT_PRODUCTS and outermost(e))
    return inside / 1e6, (total - inside) / 1e6


def ceiling(products: float, outside: float, kernels: float) -> float:
    """The fp32 step's op time (``products`` + ``outside``) over ``kernels`` + ``outside``."""
    return (products + outside) / (kernels + outside)


def integer_ceiling(
    fp32_step: Callable[[], Any], int_step: Callable[[], Any], pairs: int = 5
) -> dict[str, float]:
    """An estimate of the most an integer step could gain over fp32 with its integer kernels as
    they are: the fp32 step's op time over (the integer kernels + the fp32 step's op time
    outside its products, :func:`ceiling`). The integer step keeps that float work
    (normalization, activations, the loss, the optimizer) and adds its quantizers and epilogues
    to it; not a strict bound, since the kept ops need not cost it what they cost fp32 (its
    activations are channels-last: BatchNorm's forward is faster there, its backward slower).
    The two steps are profiled in turn, ``pairs`` times, and the median of the pairs' ceilings
    taken, so that a slow spell of the machine meets both steps of a pair rather than one side
    of every ratio. Also the medians of the three parts (JSON keys as named)."""
    rows = []
    for _ in range(pairs):
        products, outside = _float_parts(_profiled(fp32_step))
        events = _profiled(int_step)
        kernels = sum(e.self_cpu_time_total for e in events if e.name in INTEGER_KERNELS) / 1e6
        rows.append((products, outside, kernels, ceiling(products, outside, kernels)))
    keys = ("float_products", "outside_float_products", "integer_kernels_median", "ceiling")
    return {k: statistics.median(r[i] for r in rows) for i, k in enumerate(keys)}


def print_top_ops(t: dict[str, Any]) -> None:
    """The ``top_ops`` (own time) and ``fqtorch_kernels`` (with their compiled graphs) of an
    :func:`integer_breakdown`."""
    for op, seconds, calls in t.get("top_ops", []):
        print(f"  {op[:60]:<62}{seconds * 1e3:>9.1f} ms/step {calls:>7.0f} calls")
    if t.get("fqtorch_kernels"):
        print("  fqtorch's compiled kernels (each with the compiled graph it calls):")
    for op, seconds, calls in t.get("fqtorch_kernels", []):
        print(f"    {op[:58]:<60}{seconds * 1e3:>9.1f} ms/step {calls:>7.0f} calls")


def layer_step(
    layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast: bool, device: str
) -> None:
    """One training step of a single layer: forward, then backward from ``grad_out``."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.backward(grad_out.to(out.dtype))
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(layer: nn.Module, x: torch.Tensor, autocast: bool, device: str) -> int:
    """Bytes the forward pass of ``layer`` saves for its backward (activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device, dtype=torch.bfloat16, enabled=autocast),
    ):
        layer(x)
    return total
