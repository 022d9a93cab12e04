"""The benchmark scripts run and print their ratios (no timing is asserted: speed is measured
by running them, docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "gemm.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gemm_prints_every_variant_with_ratios():
    done = _run("--shapes", "64x32x16", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in ("fp32", "bf16_autocast", "int_mm", "int_mm_bt"):
        assert any(line.startswith(variant + " ") for line in done.stdout.splitlines()), variant
    assert "fp32/x" in done.stdout and "bf16/x" in done.stdout


def test_gemm_bad_shape_is_one_line():
    done = _run("--shapes", "64x32")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("--shapes: expected MxKxN")
