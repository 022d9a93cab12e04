"""Where a run's files go: a new directory for every run, or the one ``--out``/``--resume`` names.

With no ``--out``, every ``fqtorch train`` starts a new directory ``runs/<date>_<time>`` (with
``-2``, ``-3``, ... when two runs start within the same second), so running the same command twice
just works. ``--resume`` with no directory continues the run under ``runs/`` whose checkpoint was
written last, with the options it was started with (flags given now override them).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .errors import CheckpointError, TrainingError

__all__ = [
    "LOCK",
    "RUNS",
    "SAME_ON_RESUME",
    "latest_run",
    "lock_run",
    "new_run_dir",
    "resume_options",
    "unlock_run",
]

log = logging.getLogger(__name__)
RUNS = Path("runs")
LOCK = "lock"  # in a run directory while a process writes it: that process's id


def new_run_dir(root: Path = RUNS, now: datetime | None = None) -> Path:
    """Create and return a new, empty run directory ``root/<YYYY-MM-DD_HH-MM-SS>[-n]``.

    The name is claimed by ``mkdir`` (which fails if it exists), so two runs started at once
    never share a directory.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"{root} is a file, not the folder runs are made in; move it or pass --out DIR"
        )
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
    holders = {run: _holder(run) for run in runs}
    newest = max(runs, key=lambda run: (run / "checkpoint.pt").stat().st_mtime_ns, default=None)
    if isinstance(holders.get(newest), str):  # another host's lock: its process is not seen
        raise TrainingError(
            f"--resume: the latest run, {newest}, is locked by process {holders[newest]}; if no "
            f"run is going on there, delete {newest / LOCK}, or name the run: --resume DIR"
        )
    busy = [run for run in runs if holders[run] is not None]
    if busy and os.environ.get("RANK", "0") == "0":
        log.info("--resume: passing over %s, in use by a running process", _names(busy))
    runs = [run for run in runs if run not in busy]
    if not runs:
        raise CheckpointError(
            f"--resume: no run with a checkpoint under {root}/; name the run to continue: "
            "--resume DIR"
        )
    return max(runs, key=lambda run: (run / "checkpoint.pt").stat().st_mtime_ns)


def lock_run(run_dir: Path) -> None:
    """Claim ``run_dir`` for this process (``run_dir/lock`` holds its id, host name and start
    time, created with ``O_EXCL``); a lock left by a process that is gone is taken over, and so
    is one whose id now belongs to another process (a restarted machine reuses small ids: the
    start time differs). A directory a live process holds is a :class:`TrainingError`: two
    runs would write over each other."""
    path = run_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(run_dir)
            if holder is not None and holder != os.getpid():
                raise TrainingError(
                    f"{run_dir} is in use by another fqtorch train (process {holder}); wait for "
                    f"it to end, or give another --out (if no run is going on there, delete {path})"
                ) from None
            path.unlink(missing_ok=True)  # stale (or this process's own): take it over
            continue
        pid = os.getpid()
        with os.fdopen(fd, "w") as f:
            f.write(f"{pid} {socket.gethostname()} {_start_time(pid) or '-'}\n")
        return


def unlock_run(run_dir: Path) -> None:
    """Release ``run_dir`` if this process holds it (by its id alone: the host's name may have
    changed since the lock was written)."""
    try:
        pid = int((run_dir / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid == os.getpid():
        (run_dir / LOCK).unlink(missing_ok=True)


def _holder(run_dir: Path) -> int | str | None:
    """Who holds ``run_dir``: the id of the live local process, ``"<id> on <host>"`` for
    another host's (not checked: it may be gone), ``None`` for no lock or a stale one (the
    process is gone, or its id now names a process that started at another time)."""
    try:
        pid, *rest = (run_dir / LOCK).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    host, started = [*rest, "-", "-"][:2] if rest else (None, "-")
    if host is not None and host != socket.gethostname():
        return f"{pid} on {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return pid
    now = _start_time(pid)
    if started != "-" and now is not None and now != started:
        return None  # the id was reused
    return pid


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``; ``None``
    elsewhere or when it cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _names(runs: list[Path]) -> str:
    return ", ".join(str(run) for run in sorted(runs))


# A checkpoint written with other values of these cannot be continued by this run.
SAME_ON_RESUME = (
    "dataset",
    "model",
    "preset",
    "fqt",
    "batch_size",
    "optimizer",
    "warmup_epochs",
    "label_smoothing",
    "block_size",
    "image_size",
    "data_dir",
    "seed",
    "fsdp",
    "bits_plan",
    "adaptive_precision",
)


def resume_options(values: dict[str, Any], root: Path = RUNS) -> dict[str, Any]:
    """The options of a resumed run: those it was started with (its ``config.json``), under
    ``values`` (a config file and flags given now). ``values["out"]`` names the run; without it,
    the latest run under ``root``. A value given now that the run cannot take (one of
    :data:`SAME_ON_RESUME`, other than the run's) is a ``ValueError`` naming the run's."""
    out = Path(values["out"]) if values.get("out") else latest_run(root)
    saved = _saved_options(out)
    for key in SAME_ON_RESUME:
        if key == "fqt":  # given in parts (a file's fqt:, flags): restore() compares the merge
            continue
        if key in saved and key in values and _differ(key, values[key], saved[key]):
            raise ValueError(
                f"{key}={values[key]!r}: {out} was trained with {key}={saved[key]!r}; leave it "
                "out to continue the run as it was, or start a new run"
            )
    return {**saved, **values, "out": str(out), "resume": True}


def _differ(key: str, given: Any, saved: Any) -> bool:
    """Whether an option given anew differs from the run's: a path compared as the file or
    folder it names (``~/data``, its absolute form and a link to it are the same); one the
    run's no longer names from here (the data moved; a relative path saved by a run started
    in another folder) is not held against the one given. A number a config file gave as text
    (YAML's ``1e-1``) compares as the number."""
    if key in ("data_dir", "bits_plan") and isinstance(given, str) and isinstance(saved, str):
        here, there = _path(given), _path(saved)
        if here == there or not (os.path.exists(here) and os.path.exists(there)):
            return False
        return not os.path.samefile(here, there)
    if isinstance(given, str) and isinstance(saved, (int, float)) and not isinstance(saved, bool):
        try:
            return float(given) != saved
        except ValueError:
            return True
    return given != saved


def _path(name: str) -> str:
    return os.path.abspath(os.path.expanduser(name))


def _saved_options(run_dir: Path) -> dict[str, Any]:
    """What ``config.json`` in ``run_dir`` says the run was started with; if it is missing or
    does not parse, what its checkpoint says (with a warning; {} without a checkpoint either:
    then ``train()`` says there is none to resume)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    if not isinstance(saved, dict):
        saved = _checkpoint_options(run_dir / "checkpoint.pt")
        if saved is None:
            return {}
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it for all
            log.warning(
                "%s is missing or unreadable; resuming with the options saved in %s%s",
                path,
                run_dir / "checkpoint.pt",
                " (the file is kept as config.json.unreadable)" if path.is_file() else "",
            )
    return {k: v for k, v in saved.items() if k not in ("out", "resume")}


def _checkpoint_options(path: Path) -> dict[str, Any] | None:
    """The options saved in the checkpoint ``path`` (``None`` when there is none; one that is
    corrupt is a :class:`CheckpointError`)."""
    if not path.is_file():
        return None
    saved = json.loads(load_checkpoint(path).get("config", "{}"))
    return saved if isinstance(saved, dict) else None
