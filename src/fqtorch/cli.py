"""``fqtorch train | variance | plan``: the command line (argparse, tqdm progress on rank 0)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .config import BACKENDS, FQTConfig
from .quantizers import list_quantizers
from .quantizers.callers import FQTWarning
from .quantizers.transforms import TRANSFORMS
from .train.errors import (
    EXIT_DIVERGED,
    CheckpointError,
    Diverged,
    TrainingError,
    TrainingInterrupted,
)

__all__ = ["main"]

log = logging.getLogger("fqtorch")


# Where stderr is not a terminal (a log file, CI, a batch job), progress is a log line at most
# this often instead of a bar.
LOG_PROGRESS_EVERY_S = 60.0


def _transform(value: str) -> str | None:
    """``--grad-transform``'s value: a transform's name, or ``none`` (off)."""
    if value == "none":
        return None
    if value not in TRANSFORMS:
        raise argparse.ArgumentTypeError(f"{value!r}: give {', '.join(sorted(TRANSFORMS))} or none")
    return value


def _tqdm_progress(iterable: Iterable, total: int, description: str) -> Iterable:
    if not sys.stderr.isatty():
        return _logged_progress(iterable, total, description, LOG_PROGRESS_EVERY_S)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def _logged_progress(
    iterable: Iterable, total: int, description: str, every: float
) -> Iterator[Any]:
    """The items of ``iterable``, logging ``description: i/total (s)`` at most every ``every``
    seconds (never after the last item: the caller reports that)."""
    start = last = time.monotonic()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every and done < total:
            log.info("%s: %d/%d (%.0f s)", description, done, total, now - start)
            last = now


def _dataset_defaults(flag: str) -> str:
    """``default per dataset: digits 12, cifar10 200, ...`` for a training option's flag."""
    from .train.config import DATASET_DEFAULTS

    key = flag.replace("-", "_")
    values = ", ".join(
        f"{name} {d[key]:g}" if not isinstance(d[key], str) else f"{name} {d[key]}"
        for name, d in DATASET_DEFAULTS.items()
        if key != "momentum" or d["optimizer"] == "sgd"  # AdamW takes none
    )
    if key == "momentum":
        return f"SGD only; default per dataset: {values}"
    return f"default per dataset: {values}"


def _add_fqt_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization (override the preset's FQTConfig fields)")
    names = ", ".join(list_quantizers())
    for flag in ("input-bits", "weight-bits", "grad-bits", "grad-weight-bits"):
        group.add_argument(f"--{flag}", type=int, metavar="B", help="2..8")
    for flag in ("input-quantizer", "weight-quantizer", "grad-quantizer", "grad-weight-quantizer"):
        group.add_argument(f"--{flag}", metavar="NAME", help=f"one of: {names}")
    group.add_argument("--grad-rounding", choices=["stochastic", "nearest"])
    group.add_argument(
        "--grad-transform",
        type=_transform,
        metavar="{rht16,rht32,none}",
        help="a random Hadamard transform of blocks of 16 or 32 before both gradient quantizers "
        "(none: off, whatever the preset says)",
    )
    group.add_argument("--backend", choices=list(BACKENDS))
    group.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        help="compile each quantizer into one torch.compile kernel with in-kernel noise",
    )
    group.add_argument(
        "--attention-products",
        action=argparse.BooleanOptionalAction,
        help="in nn.MultiheadAttention, also quantize the score and value products",
    )


def _train_parser(sub: Any) -> None:
    from .data import list_datasets
    from .models import get_model_info, list_models

    models = "\n".join(f"  {m:<18}{get_model_info(m).summary}" for m in list_models())
    p = sub.add_parser(
        "train",
        help="train a model with FQT",
        description="Train a built-in model with fully quantized training. With no arguments: "
        "the digits CNN on the digits data set shipped with scikit-learn, BHQ 5-bit gradients.",
        epilog=f"models:\n{models}\n\npresets: {', '.join(FQTConfig.presets())}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML or JSON file of options; flags given here override it")
    p.add_argument("--dataset", choices=list_datasets())
    p.add_argument(
        "--data-dir",
        help="where the data set lies (not needed for digits; text defaults to the Python "
        "documentation, pydoc_data/topics.py)",
    )
    p.add_argument("--model", choices=list_models())
    p.add_argument(
        "--preset",
        help="an FQTConfig preset (default bhq5); 'exact' for no quantization, or a float "
        "forward under the gradient flags given with it (--grad-quantizer ...)",
    )
    for flag, kind, extra in [
        ("epochs", int, ""),
        ("batch-size", int, "per process; "),
        ("lr", float, ""),
        ("momentum", float, ""),
        ("weight-decay", float, ""),
        ("warmup-epochs", float, ""),
        ("label-smoothing", float, ""),
    ]:
        p.add_argument(f"--{flag}", type=kind, help=extra + _dataset_defaults(flag))
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help=_dataset_defaults("optimizer"))
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--out", metavar="DIR", help="run directory (default: a new runs/<date>_<time> per run)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="DIR",
        help="continue the run in DIR (or --out; default: the run under runs/ checkpointed "
        "last) with its options; --epochs N above its count extends it",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="K",
        help="also write checkpoint.pt every K steps (default: at the end of each epoch only)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="log losses, accuracy, lr and variance ratios to DIR/tensorboard",
    )
    p.add_argument(
        "--variance-every",
        type=int,
        metavar="K",
        help="every K steps, log the quantization/sampling variance ratio per layer",
    )
    p.add_argument(
        "--bits-plan",
        metavar="PLAN.JSON",
        help="per-layer gradient quantizers and bits from `fqtorch plan` (over --preset's forward)",
    )
    p.add_argument(
        "--adaptive-precision",
        type=int,
        metavar="K",
        help="every K steps, move each layer's gradient bits from the --variance-every "
        "measurements to keep quantization variance within the budget (the plan's, else 0.1)",
    )
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state with FSDP2 "
        "(fully_shard per FQT layer) instead of replicating them with DDP",
    )
    p.add_argument("--block-size", type=int, help="context length for --dataset text")
    p.add_argument("--image-size", type=int, help="crop size for --dataset imagenet")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument(
        "--nonfinite",
        choices=["stop", "skip"],
        help="on a NaN/Inf loss or gradient: stop the run (default) or skip the step",
    )
    p.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of each epoch")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress: neither the bar on a terminal nor, in a log file, the progress line "
        "at most once a minute (each epoch's line stays)",
    )
    _add_fqt_flags(p)


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options: a config file, the flags over it, and for ``--resume`` the resumed
    run's own options under both."""
    from .train import load_config_file, resume_options

    values: dict[str, Any] = load_config_file(args.config) if "config" in args else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "config")})
    resume = values.pop("resume", False)
    if not resume:
        return values
    if isinstance(resume, str):
        if "out" in args and os.path.abspath(args.out) != os.path.abspath(resume):
            raise ValueError(
                f"--out {args.out} and --resume {resume} name different runs; give one of them"
            )
        values["out"] = resume
    return resume_options(values)


def _run_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_dict(_train_options(args))
    final = train(cfg, progress=_tqdm_progress)
    if _rank() != 0:  # under torchrun, rank 0 speaks for the run
        return 0
    log.info(
        "final: val_acc %.4f val_loss %.4f after %d epoch%s -> %s",
        final["val_acc"],
        final["val_loss"],
        final["epochs"],
        "" if final["epochs"] == 1 else "s",
        final["run_dir"],
    )
    return 0


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fqtorch")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fqtorch", description="Fully quantized training.")
    parser.add_argument("--version", action="version", version=f"fqtorch {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    from .stats.cli import add_variance_parser

    add_variance_parser(sub)
    from .stats.plan_cli import add_plan_parser

    add_plan_parser(sub)
    return parser


def _name_the_flag(message: str, args: argparse.Namespace, argv: Sequence[str]) -> str:
    """Prefix an error about a field (``grad_bits must be ...``) with the flag the user typed
    for it (``--grad-bits``), when they typed one."""
    field = message.split(" ", 1)[0].split("=", 1)[0]
    flag = "--" + field.replace("_", "-")
    if field in vars(args) and any(a == flag or a.startswith(flag + "=") for a in argv):
        return f"{flag}: {message}"
    return message


def _worker_error_line(message: str) -> str:
    """The error a DataLoader worker raised, from the message the main process re-raises it
    with (``Caught X in DataLoader worker process 0.`` and the worker's traceback, whose last
    line is ``module.X: the error``); other messages as they are."""
    lines = message.strip().splitlines()
    if not (lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]):
        return message
    last = lines[-1]
    name, sep, rest = last.partition(": ")
    return rest if sep and " " not in name else last


def _os_error_line(exc: OSError) -> str:
    """The operating system's error on a path, said with what to do (``str(exc)`` is
    ``[Errno 20] Not a directory: '...'``); other errors as they are."""
    if exc.filename is None or exc.errno is None:
        return str(exc)
    path = exc.filename
    if exc.errno == errno.ENOTDIR:
        return f"{path}: part of this path is a file, not a folder; give another path"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: {exc.strerror.lower()}; give a path this user can write and read"
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; free some, or give a path on another disk"
    if exc.errno == errno.ENOENT:
        return f"{path}: no such file or folder"
    return f"{path}: {exc.strerror}"


def _dispatch(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Log lines while a progress bar is up (an epoch's, Ctrl-C's notice) go above the bar, not
    # onto its line.
    with logging_redirect_tqdm():
        if args.command == "train":
            return _run_train(args)
        if args.command in ("plan", "autobits"):
            from .stats.plan_cli import run_plan

            return run_plan(args)
        from .stats.cli import run_variance

        return run_variance(args)


def _warning_line(command: str) -> Any:
    """A ``warnings.formatwarning`` that says a warning in one line instead of the module's two
    (``/path/bin/fqtorch:8: RuntimeWarning: ...`` and the source line ``sys.exit(main())``, both
    meaningless to a user of the command line): ``fqtorch CMD: warning: MESSAGE`` for
    fqtorch's own (:class:`FQTWarning`), and another library's with its category and where it
    was raised, so that it is not taken for fqtorch's. Only the text changes: filters,
    once-per-location and ``catch_warnings(record=True)`` act as before."""

    def format_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        line: str | None = None,
    ) -> str:
        if issubclass(category, FQTWarning):
            return f"fqtorch {command}: warning: {message}\n"
        return f"fqtorch {command}: warning: {category.__name__}: {message} ({filename}:{lineno})\n"

    return format_warning


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        argv_given = argv is not None
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up: nothing was written yet
        print("fqtorch: interrupted", file=sys.stderr)
        return 130
    # Under torchrun rank 0 speaks for the run; the other ranks log warnings and errors only.
    level = logging.INFO if _rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    format_warning = warnings.formatwarning
    warnings.formatwarning = _warning_line(args.command)  # the command's own, restored below
    try:
        return _dispatch(args)
    except (
        ValueError,
        TypeError,
        OSError,
        FloatingPointError,
        CheckpointError,
        TrainingError,
    ) as exc:
        # Bad input and stopped runs: one clear line, not a traceback (bugs keep theirs). A
        # diverged run has its own exit status, for scripts.
        status = EXIT_DIVERGED if isinstance(exc, Diverged) else 2
        if getattr(exc, "every_rank", False) and _rank() != 0:
            return status  # every rank stopped alike: rank 0 says it for all
        line = _os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        line = _worker_error_line(line)
        message = _name_the_flag(line, args, argv)
        print(f"fqtorch {args.command}: error: {message}", file=sys.stderr)
        return status
    except TrainingInterrupted as exc:  # Ctrl-C in training: what was saved, how to resume
        _ignore_further_interrupts(argv_given)
        if _rank() == 0:  # under torchrun every rank stops alike; rank 0 says it for all
            print(f"fqtorch {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _ignore_further_interrupts(argv_given)
        print(f"fqtorch {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not _peer_gone(exc):
            raise
        # Under torchrun, a rank whose peer stopped on an error of its own: that error (one
        # line, above) is the cause; this rank's traceback would bury it.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"fqtorch {args.command}: rank {_rank()} stopped: another process of this run "
            f"ended ({first[:160]}); the first error above, if any, or torchrun's summary below "
            "is the cause",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.formatwarning = format_warning


def _peer_gone(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective failing because another rank is gone (under torchrun
    only): torch.distributed's errors, and gloo's closed connections."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    closed = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    # Not any DistError: timeouts and backend errors of a mismatched collective are bugs whose
    # traceback matters.
    return isinstance(exc, dist.DistNetworkError) or any(s in str(exc) for s in closed)


def _ignore_further_interrupts(argv_given: bool) -> None:
    """The program is stopping on Ctrl-C and has said what it kept: one more Ctrl-C (people
    press it twice) would land in the interpreter's shutdown as a traceback; it exits at once
    instead. Only when ``main`` runs as the program (no ``argv`` passed): a caller in Python
    keeps its own Ctrl-C."""
    if not argv_given and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_once)


def _exit_at_once(signum: int, frame: Any) -> None:
    """One more Ctrl-C while the program winds down: leave now, quietly (a hung shutdown, a
    loader worker that does not end, can still be stopped)."""
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
