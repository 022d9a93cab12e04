"""Checkpoints that survive faults.

Written atomically (a temporary file in the same folder, fsync, then ``os.replace``), so a crash
mid-write leaves the previous good checkpoint intact. Read with ``torch.load(weights_only=True)``:
a checkpoint holds only tensors and plain containers, so loading one cannot run code.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "rng")
# How torch's zip writer reports a write that did not complete (a full disk, a quota).
_SHORT_WRITE = ("unexpected pos", "file write failed")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically. Temporary files of ``path`` that an earlier
    process left (killed mid-write: nothing could remove them) are removed first; a run
    directory has one writer (its lock)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Created as open() would create the file (0666 less the umask, like the run's other
    # records), not private as tempfile.mkstemp makes it (0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except RuntimeError as exc:
        Path(tmp).unlink(missing_ok=True)
        if not any(sign in str(exc) for sign in _SHORT_WRITE):
            raise
        raise CheckpointError(
            f"could not write {path} ({str(exc).splitlines()[0]}): is the disk full? The "
            f"previous {path.name}, if any, is kept"
        ) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _other_copy(path: Path) -> str:
    """Where a run's other checkpoint may help, said after a corrupt one."""
    best = Path(path).with_name("best.pt")
    if Path(path).name == "checkpoint.pt" and best.is_file():
        return f"; {best} (its best epoch) may still load: copy it over to resume from there"
    return ""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error when it is bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is corrupt or not an fqtorch checkpoint ({_load_failure(exc)})"
            + _other_copy(path)
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not an fqtorch checkpoint: it lacks the keys {REQUIRED_KEYS}; found {found}"
        )
    return state


def _load_failure(exc: Exception) -> str:
    """What ``torch.load`` found wrong, in a few words, without its advice to retry with
    ``weights_only=False`` (wrong for a corrupt file, and unsafe for an untrusted one)."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL (\S+?)(?:\s|$)", text)  # a class or function, named
    if unsafe:
        return (
            f"it holds Python objects ({unsafe.group(1)}), not only tensors and containers; "
            "fqtorch reads checkpoints with torch.load(weights_only=True), which runs no code"
        )
    if isinstance(exc, EOFError) or "zip archive" in text:
        return "truncated, or not a torch.save file"
    if isinstance(exc, (pickle.UnpicklingError, KeyError)):
        return "not a torch.save file"
    first = text.strip().splitlines()[0][:120] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
