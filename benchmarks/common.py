"""Shared benchmark helpers: warm-up, median timing, environment record, JSON output."""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fqtorch


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
        return out.stdout.strip() or "unknown"
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
        "commit": git_commit(),
    }


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")


def step_variants(base: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """``name -> (model, autocast)``: fp32, bf16 autocast, QAT, and FQT-simulate / FQT-int8 with
    PTQ, PSQ and BHQ at 5 bits, each FQT model a converted copy of ``base``."""
    out: dict[str, tuple[nn.Module, bool]] = {"fp32": (base, False), "bf16_autocast": (base, True)}
    cfg = fqtorch.FQTConfig.preset("qat")
    out["qat"] = (fqtorch.quantize_model(copy.deepcopy(base), cfg), False)
    for backend in ("simulate", "int8"):
        for q in ("ptq", "psq", "bhq"):
            cfg = fqtorch.FQTConfig.preset(f"{q}5", backend=backend)
            out[f"fqt_{backend}_{q}5"] = (fqtorch.quantize_model(copy.deepcopy(base), cfg), False)
    return out
