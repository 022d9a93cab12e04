"""Checkpoints that survive faults.

Written atomically (a temporary file in the same folder, fsync, then ``os.replace``), so a crash
mid-write leaves the previous good checkpoint intact. Read with ``torch.load(weights_only=True)``:
a checkpoint holds only tensors and plain containers, so loading one cannot run code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable fqtorch checkpoint (truncated or corrupt?): {exc}"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} lacks checkpoint keys {REQUIRED_KEYS}; found {found}")
    return state
