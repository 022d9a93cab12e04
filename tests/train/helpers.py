"""Running ``fqtorch`` as a user types it: in this process (``fqtorch.cli.main``) or as a
subprocess (for the few end-to-end runs that need a real process: signals, SIGKILL, torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fqtorch.cli import main
from fqtorch.train import load_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fqtorch_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m fqtorch ARGS`` in a new process."""
    result = subprocess.run(
        [sys.executable, "-m", "fqtorch", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fqtorch {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def fqtorch_main(*args: str | Path) -> int:
    """``fqtorch ARGS`` in this process; returns the exit code."""
    return main([str(a) for a in args])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_seconds(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def assert_same_parameters(a: Path, b: Path) -> None:
    """The two checkpoints hold bit-identical model states."""
    ma, mb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
