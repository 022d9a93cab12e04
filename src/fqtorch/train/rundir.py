"""Where a run's files go: a new directory for every run, or the one ``--out``/``--resume`` names.

With no ``--out``, every ``fqtorch train`` starts a new directory ``runs/<date>_<time>`` (with
``-2``, ``-3``, ... when two runs start within the same second), so running the same command twice
just works. ``--resume`` with no directory continues the run under ``runs/`` whose checkpoint was
written last, with the options it was started with (flags given now override them).
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["RUNS", "latest_run", "new_run_dir", "resume_options"]

RUNS = Path("runs")


def new_run_dir(root: Path = RUNS, now: datetime | None = None) -> Path:
    """Create and return a new, empty run directory ``root/<YYYY-MM-DD_HH-MM-SS>[-n]``.

    The name is claimed by ``mkdir`` (which fails if it exists), so two runs started at once
    never share a directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def latest_run(root: Path = RUNS) -> Path:
    """The run directory directly under ``root`` whose checkpoint was written last."""
    runs = [p.parent for p in root.glob("*/checkpoint.pt")] if root.is_dir() else []
    if not runs:
        raise CheckpointError(
            f"--resume: no run with a checkpoint under {root}/; name the run to continue: "
            "--resume DIR"
        )
    return max(runs, key=lambda run: (run / "checkpoint.pt").stat().st_mtime_ns)


def resume_options(values: dict[str, Any], root: Path = RUNS) -> dict[str, Any]:
    """The options of a resumed run: those it was started with (its ``config.json``), under
    ``values`` (a config file and flags given now). ``values["out"]`` names the run; without it,
    the latest run under ``root``."""
    out = Path(values["out"]) if values.get("out") else latest_run(root)
    return {**_saved_options(out), **values, "out": str(out), "resume": True}


def _saved_options(run_dir: Path) -> dict[str, Any]:
    """What ``config.json`` in ``run_dir`` says the run was started with ({} if it is missing:
    then the checkpoint alone decides, and ``restore()`` refuses one that does not fit)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {k: v for k, v in saved.items() if k not in ("out", "resume")}
