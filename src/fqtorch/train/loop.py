"""The training loop behind ``fqtorch train``: one process or many (``torchrun``: DDP, or FSDP2
with ``--fsdp``).

Reproducibility: at the start of every epoch the quantizers' noise, the augmentation and the
global RNG are reseeded from ``(seed, rank, epoch)`` and the data order from ``(seed, epoch)``,
so a run resumed from an end-of-epoch checkpoint replays exactly what the uninterrupted run would
have done. A checkpoint written within an epoch (``checkpoint_every``, Ctrl-C) also holds every
rank's RNG states and the epoch's partial sums; resuming it skips the indices of the batches
already done (without loading them) and continues the noise streams where they stopped, so it is
exact too.

Learning rate: linear warm-up, then a cosine decay to 0 at the end of ``epochs``. The schedule is
a function of the step and of the run's current ``epochs``, so extending a run
(``--resume --epochs N``) recomputes it for N epochs from the step reached: the lr becomes what an
N-epoch run has at that step (a finished run extended to twice its length: half the peak with no
warm-up, a little more with one: 0.53 for the digits default's 1 of 12 epochs) and decays to 0 at
epoch N.

FSDP2 (``--fsdp``): every FQT layer, then the root, is sharded with ``fully_shard``; each rank
holds a shard of the parameters and optimizer state. Checkpoints hold the full (gathered) states,
the same model state as a DDP run's, so a run can be inspected or evaluated without FSDP; the
optimizer state is keyed by parameter name, so a run resumes with the ``fsdp`` it started with.

Outputs (rank 0): see :func:`train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, Subset

import fqtorch

from ..data import DataSpec, build_datasets, fingerprint
from ..models import build_model, get_model_info
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, Diverged, TrainingError, TrainingInterrupted
from .interrupt import StopRequest
from .rundir import SAME_ON_RESUME, _differ, lock_run, new_run_dir, unlock_run

__all__ = ["TrainingError", "train"]

log = logging.getLogger(__name__)
Progress = Callable[[Iterable, int, str], Iterable]

# Given anew with --resume, these replace the checkpoint's (restore() applies them after loading
# the optimizer's and the schedule's saved states, which hold the old ones).
HYPERPARAMETERS = ("lr", "weight_decay", "momentum")


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_device_available(device: str, instead: str = "cpu or auto") -> None:
    """A one-line ``ValueError`` unless this torch build has ``device``'s kind (CUDA, MPS, XPU),
    naming what to use ``instead``."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use {instead})")
    for kind in ("mps", "xpu"):
        backend = getattr(torch, kind, None) if kind == "xpu" else torch.backends.mps
        if device.startswith(kind) and not (backend is not None and backend.is_available()):
            raise ValueError(f"--device {device}: {kind} is not available here (use {instead})")


def _setup_runtime(device: str) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device_available(device)
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return Runtime(dist.get_rank(), dist.get_world_size(), torch.device(device))
    return Runtime(0, 1, torch.device(device))


def _shard(model: nn.Module) -> None:
    """FSDP2: shard every FQT layer (innermost first), then the root, in place; each layer's
    parameters are gathered just for its own GEMMs and its gradients reduce-scattered."""
    from torch.distributed.fsdp import fully_shard

    for layer in reversed(list(fqtorch.fqt_modules(model).values())):
        fully_shard(layer)
    fully_shard(model)


def _full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor (an FSDP2 parameter, or a norm over them) gathered; any
    other tensor as it is. Every rank must call it on the same DTensors (a collective)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _state_options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**62)


def _buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Copies of the model's buffers (BatchNorm's running statistics and step counts), to put
    back with :func:`_put_back`; an expanded one (a stride 0: one value seen many times, which
    no forward updates in place) is left alone."""
    return [(b, b.clone()) for b in model.buffers() if not _expanded(b)]


def _expanded(t: Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape, strict=True))


def _put_back(kept: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, saved in kept:
            buffer.copy_(saved)


def _all_reduce(values: list[float], rt: Runtime, op: str = "sum") -> list[float]:
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _git_commit() -> str | None:
    """fqtorch's commit, ``-dirty`` when its tracked files have changes; ``None`` unless this
    package runs from its own source checkout (an installed copy inside another git repository,
    a virtual environment in a project, must not record that project's commit)."""
    package = Path(__file__).resolve().parents[1]
    root = package.parents[1]
    if package != root / "src" / "fqtorch" or not (root / "pyproject.toml").is_file():
        return None
    try:
        git = ["git", "-C", str(root)]
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=5)
        head = run([*git, "rev-parse", "--show-toplevel", "HEAD"])
        lines = head.stdout.split()
        # the checkout's own top, not a repository around a copied source tree
        if head.returncode or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return None
        commit = lines[1]
        status = run([*git, "status", "--porcelain", "--untracked-files=no"])
        return commit + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _keep_lines(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite the JSON-lines file ``path`` with only the records ``keep`` accepts. A last line
    that does not parse (a run killed while appending it) is dropped, with a warning; one
    anywhere else is an error naming the file and line."""
    if not path.exists():
        return
    lines = [(n, ln) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    kept = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i + 1 < len(lines):
                raise TrainingError(
                    f"{path} line {number} is not valid JSON ({exc.msg}); fix or delete that "
                    "line, then resume again"
                ) from None
            log.warning("%s: dropped its last line %d, cut short: %r", path, number, line[:60])
            continue
        if keep(record):
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an image", "a text")."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _build_model(cfg: TrainConfig, spec: DataSpec, rt: Runtime) -> tuple[nn.Module, str | None]:
    """The model, converted; and the bits plan's per-layer choices (JSON) when there is one."""
    info = get_model_info(cfg.model)
    if info.task != spec.task:
        raise ValueError(
            f"--model {cfg.model} is {_a(info.task)} model; --dataset {cfg.dataset} "
            f"needs {_a(spec.task)} model"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if spec.task == "text":
        model = build_model(cfg.model, num_classes=spec.num_classes, block_size=spec.block_size)
    else:
        model = build_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    fqt_config = cfg.fqt_config()
    if cfg.bits_plan is not None:
        from ..stats.plan import load_plan

        plan = load_plan(cfg.bits_plan)
        model = plan.apply(model, fqt_config)
        _check_plan_conditions(plan, cfg, fqt_config)
        choices = [[layer.name, *layer.choice("grad"), *layer.choice("grad_weight")]
                   for layer in plan.layers]  # fmt: skip
        return model.to(rt.device), json.dumps(choices)
    if fqt_config is not None:
        model = fqtorch.quantize_model(model, fqt_config)
    return model.to(rt.device), None


@contextlib.contextmanager
def _malformed(path: Path, what: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """A checkpoint entry of the wrong type or shape: one line naming the file and the entry
    (torch's loaders raise KeyError, TypeError or ValueError on them; ``also``: more types, such
    as the RuntimeError of a random state of the wrong size)."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, *also) as exc:
        raise CheckpointError(
            f"{path}: {what} is malformed ({type(exc).__name__}: {exc}); the file was not "
            "written by fqtorch train or was changed since: start a new run"
        ) from exc


def _state_dict_error(exc: RuntimeError, limit: int = 300) -> str:
    """``load_state_dict``'s error on one line: which keys are missing, unexpected or of another
    size (its first line only says that loading failed)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[1:]) or (lines[0] if lines else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_plan_conditions(plan: Any, cfg: TrainConfig, fqt_config: Any) -> None:
    """Warn (one line) when a bits plan was measured at another batch size, forward
    quantization or backward setting (rounding, transform, attention products): the variances it
    balanced depend on each."""
    with_ = plan.measured_with or {}
    if fqt_config is None:
        fqt_config = fqtorch.FQTConfig()
    differ = []
    if with_.get("batch_size") not in (None, cfg.batch_size):
        differ.append(f"batch size {with_['batch_size']} (this run {cfg.batch_size})")
    for part in ("forward", "backward"):  # backward: rounding, transform, attention products
        for key, value in (with_.get(part) or {}).items():
            if getattr(fqt_config, key, value) != value:
                differ.append(f"{key}={value!r} (this run {getattr(fqt_config, key)!r})")
    if differ:
        transform = (with_.get("backward") or {}).get("grad_transform", "unrecorded")
        hint = (
            " (--grad-transform none trains as it was measured)"
            if transform is None and fqt_config.grad_transform
            else ""
        )
        log.warning(
            "bits plan %s was measured with %s: its variances may not hold here%s",
            cfg.bits_plan,
            ", ".join(differ),
            hint,
        )


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm/LayerNorm parameters, biases and embeddings' 1-d tensors.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """The run's steps and its warm-up's, as the schedule and the run's header count them."""
    return cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)


def _schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total, warmup = _schedule_steps(cfg, steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _describe_schedule(cfg: TrainConfig, steps_per_epoch: int) -> str:
    """The optimizer and the learning rate's course, as ``_schedule`` runs it: said in the run's
    header, so that a warm-up covering the whole run (and so no decay) is not a surprise."""
    total, warmup = _schedule_steps(cfg, steps_per_epoch)
    optimizer = (
        "adamw" if cfg.optimizer == "adamw" else f"sgd with momentum {cfg.momentum:g}"
    ) + f", lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}"
    if warmup >= total:
        # the factor at the last step is total / warmup: --lr itself only when they are equal
        peak = (
            "--lr"
            if warmup == total
            else f"{total / warmup:.3g} of --lr ({cfg.lr * total / warmup:g})"
        )
        return (
            f"{optimizer}; the warm-up covers the whole run ({warmup} warm-up steps, {total} in "
            f"the run: --warmup-epochs {cfg.warmup_epochs:g} of --epochs {cfg.epochs}), so the "
            f"learning rate rises to {peak} at the last step and never decays"
        )
    rise = f"warm-up over {warmup} steps, then " if warmup else ""
    return f"{optimizer}; {rise}cosine decay to 0 over {total - warmup} steps"


def _loss(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=smoothing
    )


DATA_ORDER = "epoch_seed"  # recorded in checkpoints (before it: "seed+epoch", DDP only)


def _seed_order(sampler: Sampler[int], seed: int, epoch: int, scheme: str = DATA_ORDER) -> None:
    """Seed the epoch's data order from ``(seed, epoch)``: one permutation of the training set,
    of which each of several ranks takes every world-th index. (DistributedSampler shuffles with
    ``seed + epoch``, which would give seed s + 1 the order of seed s one epoch later: its seed is
    set whole instead, to the one process's. ``scheme="seed+epoch"``: its own way, which runs
    checkpointed before keep.)"""
    order = _epoch_seed(seed, 0, epoch)
    if isinstance(sampler, DistributedSampler) and scheme == "seed+epoch":
        sampler.seed = seed
        sampler.set_epoch(epoch)
    elif isinstance(sampler, DistributedSampler):
        sampler.seed = order
        sampler.set_epoch(0)
    else:
        sampler.generator.manual_seed(order)


def _loader_worker_init(worker_id: int) -> None:
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which finishes the step it
    is in and saves a checkpoint (interrupt.py), then shuts them down; they inherit its handlers
    when forked. Both signals reach them too when sent to the process group (Ctrl-C in a
    terminal, ``kill -- -PGID``): a worker that died of one would crash the run's next batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _ResumableSampler(Sampler[int]):
    """The indices of ``inner``, leaving out the first ``skip`` once: the batches of an epoch
    that a run resumed mid-epoch has already done, passed over without loading them."""

    def __init__(self, inner: Sampler[int]) -> None:
        self.inner = inner
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def _loaders(
    cfg: TrainConfig, spec: DataSpec, rt: Runtime
) -> tuple[DataLoader, DataLoader, Any, _ResumableSampler]:
    if rt.world > 1:
        sampler: Any = DistributedSampler(
            spec.train, rt.world, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    else:
        sampler = RandomSampler(spec.train, generator=torch.Generator())
    resumable = _ResumableSampler(sampler)
    pin = rt.device.type == "cuda"
    # The loaders own a generator, so creating an iterator does not draw from the global RNG.
    train = DataLoader(
        spec.train,
        cfg.batch_size,
        sampler=resumable,
        drop_last=True,
        num_workers=cfg.workers,
        worker_init_fn=_loader_worker_init,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    shard = Subset(spec.val, range(rt.rank, len(spec.val), rt.world))  # exact, unpadded shards
    val = DataLoader(
        shard,
        cfg.batch_size,
        num_workers=cfg.workers,
        worker_init_fn=_loader_worker_init,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(train) == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} × {rt.world} processes exceeds the "
            f"{len(spec.train)} training samples"
        )
    return train, val, sampler, resumable


def _evaluate(
    model: nn.Module, loader: DataLoader, rt: Runtime, sharded: bool = False
) -> tuple[float, float]:
    """Validation loss and accuracy over every rank's shard. With more than one rank, every
    rank first takes rank 0's buffers: after the epoch's last step each rank's BatchNorm
    statistics hold its own last batch (DDP broadcasts buffers before a training forward, not
    after), so the ranks would score their shards with different models and the metrics
    would match no model, not the checkpoint's (rank 0's). ``sharded`` (FSDP): every forward
    is a collective, so the ranks with fewer batches repeat a batch, uncounted, until all
    have run as many forwards."""
    model.eval()
    total, correct, count = 0.0, 0.0, 0.0
    batches = most = len(loader)
    if rt.world > 1:
        _broadcast_buffers(model)
    if sharded:
        most = int(_all_reduce([float(batches)], rt, "max")[0])
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            logits = model(x)
            total += float(_loss(logits, y, 0.0)) * y.numel()
            correct += float((logits.argmax(-1) == y).sum())
            count += y.numel()
        for _ in range(most - batches):
            model(_first_input(loader).to(rt.device))
    total, correct, count = _all_reduce([total, correct, count], rt)
    return total / max(count, 1), correct / max(count, 1)


def _broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), as DDP does: the
    validation metrics and the checkpoint (rank 0's) then agree with every rank's model. One
    broadcast per dtype and device, of the buffers flattened (NCCL refuses non-contiguous
    tensors). A buffer that is a broadcast view (a zero stride, e.g. an expanded
    ``position_ids``) cannot be written in place, nor changed by training in place: it is
    left as it is."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for buffer in model.buffers():
        if buffer.numel() and not _expanded(buffer):
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    with torch.no_grad():
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
                buffer.copy_(part.view_as(buffer))


def _first_input(loader: DataLoader) -> Tensor:
    """One input sample as a batch of one: from the loader's shard, or (an empty shard) from
    the data set it was cut from."""
    data = loader.dataset
    if len(data) == 0 and isinstance(data, Subset):
        data = data.dataset
    return torch.as_tensor(data[0][0]).unsqueeze(0)


def _param_checksum(model: nn.Module) -> float:
    """A checksum of the whole parameters (FSDP2's shards gathered: a collective)."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            whole = _full_tensor(p).double().cpu()
            total += whole.sum() + whole.square().sum()
    return float(total)


def _check_tensorboard() -> None:
    """Fail before any work when ``--tensorboard`` is asked and cannot be done."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise TrainingError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(metrics.jsonl holds the same numbers without it)"
        ) from None


class _TensorBoard:
    """Scalars for TensorBoard in ``<run>/tensorboard``, beside ``metrics.jsonl`` (rank 0).

    Every scalar's x-axis is the global step. A resumed run drops the events past the step it
    resumed from (``purge_step``), so the curves do not double back.
    """

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _where(epoch: int, step: int, epoch_step: int) -> str:
    """A point of the run in words: ``step 44, end of epoch 2`` or ``step 49, in epoch 3``."""
    return (
        f"step {step}, in epoch {epoch + 1}" if epoch_step else f"step {step}, end of epoch {epoch}"
    )


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best``: a higher accuracy or a lower loss (ties
    and NaN do not)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if metric == "val_acc" else value < best


def _width(quantizer: str | None, bits: int) -> str:
    """``psq 4-bit``; a format's own name alone (its width is the format's, not ``bits``)."""
    from ..quantizers.formats import is_format

    return str(quantizer) if quantizer and is_format(quantizer) else f"{quantizer} {bits}-bit"


def _describe_fqt(cfg: TrainConfig) -> str:
    """The quantization plan in one line, for the run header."""
    fqt = cfg.fqt_config()
    if fqt is None:
        return "exact (no quantization: float GEMMs)"
    name = cfg.preset + "".join(f" {k}={v}" for k, v in sorted(cfg.fqt.items()))
    if cfg.bits_plan is not None:
        grad = f"gradient quantizers and bits per layer from {cfg.bits_plan}"
    elif fqt.grad_quantizer is None and fqt.grad_weight_quantizer in (None, "identity"):
        grad = "gradients exact (QAT)"
    elif fqt.grad_quantizer is None:
        grad = (
            "grad_output exact, weight-gradient branch "
            f"{_width(fqt.grad_weight_quantizer, fqt.grad_weight_bits)}, "
            f"{fqt.grad_rounding} rounding"
        )
    else:
        grad = (
            f"grad_output {_width(fqt.grad_quantizer, fqt.grad_bits)}, weight-gradient branch "
            f"{_width(fqt.grad_weight_quantizer, fqt.grad_weight_bits)}, "
            f"{fqt.grad_rounding} rounding"
            + (f", {fqt.grad_transform} transform first" if fqt.grad_transform else "")
        )
    return (
        f"{name}: input {_width(fqt.input_quantizer, fqt.input_bits)}, weight "
        f"{_width(fqt.weight_quantizer, fqt.weight_bits)}; {grad}; backend {fqt.backend}"
        + (", fused" if fqt.fused else "")
    )


# Options a process of a run may hold its own value of: where it finds the data and the plan
# (their contents are compared), its device, its logging.
_PER_RANK = ("out", "data_dir", "bits_plan", "device", "quiet", "tensorboard", "workers")


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _check_ranks_agree(cfg: TrainConfig, spec: DataSpec, rt: Runtime) -> None:
    """Every process of a run has the same options and data (its sets' fingerprints), or each
    raises the same ``TrainingError`` naming the first difference: a process given other options
    or another copy of the data would hang in a collective, abort in one with no cause named, or
    (data of the same length) train on silently."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in _PER_RANK}
    mine = {
        **{f"option {k}": v for k, v in options.items()},
        "training data": f"{len(spec.train)} samples, fingerprint {fingerprint(spec.train)}",
        "validation data": f"{len(spec.val)} samples, fingerprint {fingerprint(spec.val)}",
        "vocabulary": spec.vocab,
        "bits plan": None if cfg.bits_plan is None else _file_digest(cfg.bits_plan),
    }
    ranks: list[Any] = [None] * rt.world
    dist.all_gather_object(ranks, mine)
    for key, value in ranks[0].items():
        other = next((r for r in range(1, rt.world) if ranks[r].get(key) != value), None)
        if other is not None:
            raise TrainingError(
                f"the processes of this run differ in their {key}: rank 0 has {value!r}, rank "
                f"{other} {ranks[other].get(key)!r}; start every process with the same options "
                "and data",
                every_rank=True,
            )


class _Run:
    """State of one training run; ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, progress: Progress | None) -> None:
        self.cfg = cfg
        if cfg.tensorboard:
            _check_tensorboard()
        self.rt = _setup_runtime(cfg.device)
        self.out = Path(cfg.out or "runs")  # the run directory: final once _prepare_out ran
        self.progress = progress if (progress and self.rt.main and not cfg.quiet) else None
        self.spec = build_datasets(
            cfg.dataset,
            cfg.data_dir,
            seed=cfg.seed,
            block_size=cfg.block_size,
            image_size=cfg.image_size,
        )
        if self.rt.world > 1:
            _check_ranks_agree(cfg, self.spec, self.rt)
        self.model, self.bits_plan = _build_model(cfg, self.spec, self.rt)
        self.train_loader, self.val_loader, self.sampler, self.resumable = _loaders(
            cfg, self.spec, self.rt
        )
        steps = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps_per_epoch = steps
        if cfg.fsdp:
            if self.rt.world == 1:
                raise TrainingError(
                    "--fsdp shards the model across processes, and this run has one; start it "
                    "with torchrun --nproc_per_node N (N >= 2), or leave --fsdp out"
                )
            _shard(self.model)  # before the optimizer: it must hold the sharded parameters
        self.optimizer = _optimizer(cfg, self.model)
        self.scheduler = _schedule(cfg, self.optimizer, steps)
        self.ddp = self.model  # what a step runs: DDP's wrapper, or the (sharded) model
        if self.rt.world > 1 and not cfg.fsdp:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # Progress: epochs done, steps done in all, steps done in the current epoch, and the
        # current epoch's sums (train loss, counted steps, skipped steps).
        self.epoch, self.step, self.epoch_step = 0, 0, 0
        self.sums = [0.0, 0.0, 0.0]
        self.best: dict[str, Any] = {}
        self.best_metric = "val_loss" if self.spec.task == "text" else "val_acc"
        self.resumed: dict[str, int] | None = None  # where restore() found the run
        self.saved_at: str | None = None  # the last checkpoint written, in words
        # the epoch's training time in earlier invocations (a resume within it), and the clock
        # the epoch's "seconds" runs on (their sum: a stopped epoch's time is not lost)
        self.epoch_seconds = 0.0
        self._epoch_clock: float | None = None
        self._rank_rng: dict[str, Any] | None = None  # mid-epoch resume: this rank's RNG
        self.stop = StopRequest()
        self.stop_seen = False  # a stop requested on any rank, as of the last step
        self.step_lr = 0.0  # the learning rate of the step last taken (TensorBoard's train/lr)
        # how DDP seeds each epoch's order (_seed_order); a run from before "epoch_seed" keeps
        # its own, so that a resume within an epoch continues the order it was in
        self.data_order = DATA_ORDER
        self.tensorboard: _TensorBoard | None = None
        self.monitor = None
        if cfg.variance_every and cfg.quantized:
            from ..stats import VarianceMonitor

            self.monitor = VarianceMonitor(self.model, self.loss_fn)
        self.precision = None  # adaptive precision (stats.plan.PrecisionController)
        if cfg.adaptive_precision:
            from ..stats.plan import PrecisionController, load_plan

            plan = load_plan(cfg.bits_plan) if cfg.bits_plan else None
            layers = fqtorch.fqt_modules(self.model)
            budget = plan.budget if plan is not None else 0.1
            self.precision = PrecisionController(layers, budget=budget, plan=plan)
            if self.rt.main:
                log.info(
                    "adaptive precision: gradient bits re-chosen every %d steps from the "
                    "variance measured every %d (budget %g of the sampling variance)",
                    cfg.adaptive_precision,
                    cfg.variance_every,
                    budget,
                )

    @property
    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        # A partial, not a bound method: the monitor keeps it, and a reference back to the run
        # would make a cycle that outlives train() (and DDP's process group with it).
        return functools.partial(_loss, smoothing=self.cfg.label_smoothing)

    # ------------------------------------------------------------------------------ checkpoints
    def _rank_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states and epoch sums (gathered: each rank draws its own noise)."""
        mine: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "fqt": fqtorch.generator_states(self.model),
            "sums": torch.tensor(self.sums, dtype=torch.float64),
        }
        if self.rt.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.rt.device)
        if self.rt.world == 1:
            return [mine]
        gathered: list[Any] = [None] * self.rt.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def checkpoint_state(self) -> dict[str, Any]:
        """The run's state; every rank must call it (it gathers the ranks' RNG states)."""
        model, optimizer = self._states()
        return {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "epoch_seconds": self._seconds_into_epoch(),
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.rt.world,
            "rng": {"ranks": self._rank_states()},
            "best": dict(self.best),
            "config": json.dumps(self.cfg.to_dict()),
            "precision": self._precision_state(),
            "bits_plan": self.bits_plan,  # the plan's choices: its file may change later
            "data_order": self.data_order,
        }

    def _seconds_into_epoch(self) -> float:
        if not self.epoch_step or self._epoch_clock is None:
            return self.epoch_seconds if self.epoch_step else 0.0
        return time.perf_counter() - self._epoch_clock

    def _precision_state(self) -> dict[str, Any] | None:
        if self.precision is None:
            return None
        self._reduce_window()
        state = self.precision.state_dict()
        if not self.rt.main:  # rank 0 keeps the summed window; the others start again at 0
            self.precision.window = {}
        return state

    def _last_saved(self) -> str:
        """Where the last checkpoint is, for a message that stops the run (empty: none yet)."""
        return f"; the last checkpoint is at {self.saved_at}" if self.saved_at else ""

    def save(self, best: bool = False) -> None:
        """Write ``checkpoint.pt`` (and ``best.pt``, first); every rank must call it. Refuses
        (``TrainingError``) to keep non-finite weights: the last checkpoint stays good."""
        self._check_weights_finite()
        state = self.checkpoint_state()
        if self.rt.main:
            if best:
                save_checkpoint(state, self.out / "best.pt")
            save_checkpoint(state, self.out / "checkpoint.pt")
        self.saved_at = _where(self.epoch, self.step, self.epoch_step)

    def _check_same_fqt(self, path: Path, saved: dict[str, Any]) -> None:
        """The run's FQT fields as its layers resolve them (a flag that repeats what the preset
        sets is no change), the fields that differ named."""
        try:
            before = dataclasses.replace(self.cfg, preset=saved.get("preset", self.cfg.preset))
            before = dataclasses.replace(before, fqt=dict(saved["fqt"])).fqt_config()
        except (TypeError, ValueError):
            before = "unreadable"
        now = self.cfg.fqt_config()
        if before == now:
            return
        if isinstance(before, fqtorch.FQTConfig) and now is not None:
            fields = [f.name for f in dataclasses.fields(now)]
            changed = [
                f"{f}={getattr(before, f)!r} (this run {getattr(now, f)!r})"
                for f in fields
                if getattr(before, f) != getattr(now, f)
            ]
            what = ", ".join(changed)
        else:
            what = f"fqt={saved['fqt']!r} (this run {self.cfg.fqt!r})"
        raise CheckpointError(
            f"{path} was written with {what}; leave the FQT flags out to continue the run as "
            "it was, or start a new run"
        )

    def restore(self, path: Path) -> None:
        """Continue the run saved in ``path``; refuse one this run's config cannot continue."""
        state = load_checkpoint(path)
        with _malformed(path, "its config"):
            saved = json.loads(state.get("config", "{}"))
            if not isinstance(saved, dict):
                raise TypeError(f"a mapping was expected, got {type(saved).__name__}")
        for key in SAME_ON_RESUME:
            if key == "fqt" and "fqt" in saved:
                self._check_same_fqt(path, saved)
            elif key in saved and _differ(key, getattr(self.cfg, key), saved[key]):
                raise CheckpointError(
                    f"{path} was written with {key}={saved[key]!r}; this run has "
                    f"{key}={getattr(self.cfg, key)!r} (leave it out to continue the run as it "
                    "was, or start a new run)"
                )
        if state.get("bits_plan") not in (None, self.bits_plan):  # (None: before it was kept)
            raise CheckpointError(
                f"{path} was trained with another plan than {self.cfg.bits_plan} holds now (the "
                "file changed since the run started); put the run's plan back in that file to "
                "continue, or start a new run with this plan"
            )
        self.data_order = str(state.get("data_order", "seed+epoch"))
        if self.data_order not in ("seed+epoch", DATA_ORDER):
            raise CheckpointError(
                f"{path}: unknown data order {self.data_order!r}; start a new run"
            )
        with _malformed(path, "its epoch and step counts"):
            epoch, step = int(state["epoch"]), int(state["step"])
            epoch_step = int(state.get("epoch_step", 0))
        if self.cfg.epochs < epoch + (epoch_step > 0):
            raise CheckpointError(
                f"{path} has done {epoch} epochs{' and part of the next' if epoch_step else ''}; "
                f"--epochs {self.cfg.epochs} ends before that (to extend the run, pass more)"
            )
        with _malformed(path, "its random states"):
            ranks = state["rng"].get("ranks")
        if epoch_step and (ranks is None or len(ranks) != self.rt.world):
            raise CheckpointError(
                f"{path} was written within an epoch by {state.get('world_size')} processes; "
                f"resume it with as many (this run has {self.rt.world})"
            )
        self._check_steps_per_epoch(path, state)
        if epoch_step:
            self._check_rng_device(path, ranks[self.rt.rank])
        if epoch_step > self.steps_per_epoch:
            raise CheckpointError(
                f"{path} was written at step {epoch_step} of an epoch; this run's epochs have "
                f"{self.steps_per_epoch} steps (--max-steps-per-epoch or --batch-size changed?)"
            )
        try:
            with _malformed(path, "its model or optimizer state"):
                self._load_states(state["model"], state["optimizer"])
        except RuntimeError as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(
                f"{path} does not fit model {self.cfg.model}: {_state_dict_error(exc)}"
            ) from exc
        with _malformed(path, "its schedule, precision or random states", (RuntimeError,)):
            self.scheduler.load_state_dict(state["scheduler"])
            if self.precision is not None and state.get("precision"):
                self.precision.load_state_dict(state["precision"])  # the bits it had reached
                if not self.rt.main:  # the saved window is the ranks' sum: on rank 0 only
                    self.precision.window = {}
            if epoch_step:
                self.epoch_seconds = float(state.get("epoch_seconds", 0.0))
                self._rank_rng = ranks[self.rt.rank]
                self.sums = [float(v) for v in self._rank_rng["sums"]]
                # Checked now, before anything is written; loaded again where the epoch
                # starts (after its reseeding).
                self._load_rng(self._rank_rng)
        self._apply_hyperparameters(saved)
        self._apply_schedule()
        self.epoch, self.step, self.epoch_step = epoch, step, epoch_step
        with _malformed(path, "its best epoch's record"):
            self.best = dict(state.get("best") or {})
        self.resumed = {"epoch": epoch, "step": step, "epoch_step": epoch_step}
        self.resumed["epochs"] = int(saved.get("epochs", self.cfg.epochs))
        self.saved_at = _where(epoch, step, epoch_step)

    def _check_rng_device(self, path: Path, states: Any) -> None:
        """A checkpoint written within an epoch holds the random streams of the device it ran
        on (a CUDA generator's state does not fit a CPU generator, nor the other way): it goes
        on within the epoch on that kind of device only."""
        if not isinstance(states, dict):
            return  # malformed: said where the states are loaded
        saved = "cuda" if "cuda" in states else "cpu"
        here = self.rt.device.type
        if saved != here and "cpu" in (saved, here):
            raise CheckpointError(
                f"{path} was written within an epoch on {saved}; its random streams are "
                f"{saved}'s, so it goes on within that epoch on {saved} only (this run is on "
                f"{here}). Resume it on {saved}; a checkpoint of an epoch's end resumes anywhere"
            )

    def _check_steps_per_epoch(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose epochs had another number of steps: the schedule and the
        epoch counts are in steps, so the run could not go on where it was (a checkpoint from
        before ``steps_per_epoch`` was saved is not checked)."""
        saved = state.get("steps_per_epoch")
        if saved is None or int(saved) == self.steps_per_epoch:
            return
        world = state.get("world_size")
        processes = (
            f" on {world} processes (this run has {self.rt.world})"
            if world is not None and int(world) != self.rt.world
            else ""
        )
        raise CheckpointError(
            f"{path} was written by a run of {saved} steps per epoch{processes}; this run's "
            f"epochs have {self.steps_per_epoch} (--max-steps-per-epoch, --batch-size or the "
            "number of processes changed): resume with the run's own, or start a new run"
        )

    def _apply_hyperparameters(self, saved: dict[str, Any]) -> None:
        """Give the restored optimizer and schedule this run's lr, weight decay and momentum
        (loading their states brought back the checkpoint's), and say which were given anew.
        The schedule keeps its shape: a new lr scales it, from the step reached."""
        cfg, groups = self.cfg, self.optimizer.param_groups
        for group in groups:
            group["initial_lr"] = cfg.lr
            if cfg.optimizer == "sgd":
                group["momentum"] = cfg.momentum
        groups[0]["weight_decay"] = cfg.weight_decay  # the second group never decays
        self.scheduler.base_lrs = [cfg.lr] * len(groups)
        changed = [
            f"{key} {saved[key]:g} -> {getattr(cfg, key):g}"
            for key in HYPERPARAMETERS
            if key in saved
            and saved[key] != getattr(cfg, key)
            and (key != "momentum" or cfg.optimizer == "sgd")
        ]
        if changed and self.rt.main:
            log.info("resume: %s (given anew; the schedule goes on from here)", ", ".join(changed))

    def _states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and optimizer's states; under FSDP gathered to whole tensors on rank 0's
        CPU (collectives: every rank calls it; the other ranks get empty dicts)."""
        if not self.cfg.fsdp:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = _state_options(cpu_offload=True)
        return (
            get_model_state_dict(self.model, options=options),
            get_optimizer_state_dict(self.model, self.optimizer, options=options),
        )

    def _load_states(self, model: dict[str, Any], optimizer: dict[str, Any]) -> None:
        """Load the model's and optimizer's saved states (under FSDP, every rank takes its
        shards of the full states, which every rank has read)."""
        if not self.cfg.fsdp:
            self.model.load_state_dict(model)
            self.optimizer.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(self.model, model, options=_state_options())
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=_state_options())

    def _apply_schedule(self) -> None:
        """Set the lr of the step reached from this run's schedule (identical to the saved lr
        when ``epochs`` is unchanged; the extended schedule's value when it grew)."""
        sched = self.scheduler
        for group, base, factor in zip(
            self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(sched.last_epoch)

    def _load_rng(self, states: dict[str, Any]) -> None:
        torch.set_rng_state(states["torch"])
        fqtorch.load_generator_states(self.model, states["fqt"], self.rt.device)
        if "cuda" in states and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(states["cuda"], self.rt.device)

    # -------------------------------------------------------------------------------- messages
    def resume_command(self) -> str:
        command = f"fqtorch train --resume {self.out}"
        return command + (" (under torchrun, as before)" if self.rt.world > 1 else "")

    def interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(
            f"interrupted; saved {self.out / 'checkpoint.pt'} at {self.saved_at}. "
            f"Resume with: {self.resume_command()}",
            self.stop.exit_code,
        )

    def stopped_at_once(self) -> TrainingInterrupted:
        if self.saved_at is None:
            message = (
                f"stopped at once, before the first checkpoint; nothing to resume in {self.out}"
            )
        else:
            message = (
                f"stopped at once; {self.out / 'checkpoint.pt'} ({self.saved_at}) is intact. "
                f"Resume with: {self.resume_command()}"
            )
        return TrainingInterrupted(message, self.stop.exit_code)

    def announce(self) -> None:
        """The run header: where, what model, what data, which quantization, which device."""
        if not self.rt.main:
            return
        cfg, spec, rt = self.cfg, self.spec, self.rt
        params = sum(p.numel() for p in self.model.parameters())  # a DTensor's: the whole
        layers = len(fqtorch.fqt_modules(self.model))
        processes = f" × {rt.world} processes" if rt.world > 1 else ""
        saves = "checkpoint.pt every epoch" + (
            f" and every {cfg.checkpoint_every} steps" if cfg.checkpoint_every else ""
        )
        saves += f"; best.pt by {self.best_metric}"
        if self.tensorboard is not None:
            saves += f"; TensorBoard in {self.out / 'tensorboard'}"
        data = (
            f"{spec.name}: {len(spec.train):,} train / {len(spec.val):,} validation samples, "
            f"batch {cfg.batch_size}{processes}, {self.steps_per_epoch} "
            f"step{'s' if self.steps_per_epoch != 1 else ''} per epoch"
        )
        if spec.transforms:
            data += f"; image transforms: {spec.transforms}"
        if spec.source:
            data += f"; from {spec.source}"
        lines = [
            f"run     {self.out} ({self._run_state()})",
            f"model   {cfg.model}: {params:,} parameters, {layers} FQT layers",
            f"data    {data}",
            f"fqt     {_describe_fqt(cfg)}",
            f"optim   {_describe_schedule(cfg, self.steps_per_epoch)}",
            f"device  {rt.device}"
            + (f", {rt.world} processes ({self._parallel})" if rt.world > 1 else ""),
            f"saves   {saves}",
        ]
        for line in lines:
            log.info("%s", line)

    @property
    def _parallel(self) -> str:
        return "FSDP2: parameters sharded per FQT layer" if self.cfg.fsdp else "DDP"

    def _run_state(self) -> str:
        if self.resumed is None:
            return f"new run, {_epochs(self.cfg.epochs)}"
        r = self.resumed
        if r["epoch"] >= self.cfg.epochs:
            return (
                f"finished its {_epochs(r['epoch'])}; evaluating it again; pass --epochs N above "
                f"{r['epoch']} to extend it"
            )
        where = (
            f"resuming in epoch {r['epoch'] + 1} at step {r['step']} "
            f"({r['epoch_step']} of its {self.steps_per_epoch} steps done)"
            if r["epoch_step"]
            else f"resuming after epoch {r['epoch']}, step {r['step']}"
        )
        if self.cfg.epochs > r["epochs"]:
            return f"{where}; extending it from {r['epochs']} to {_epochs(self.cfg.epochs)}"
        return f"{where}; {_epochs(self.cfg.epochs)}"

    # ---------------------------------------------------------------------------------- training
    def _start_epoch(self) -> None:
        seed = _epoch_seed(self.cfg.seed, self.rt.rank, self.epoch)
        torch.manual_seed(seed)
        fqtorch.reseed(self.model, seed)  # different noise on every rank and every epoch
        _seed_order(self.sampler, self.cfg.seed, self.epoch, self.data_order)
        if hasattr(self.spec.train, "set_epoch"):
            self.spec.train.set_epoch(self.epoch, self.rt.rank)
        self.resumable.skip = self.epoch_step * self.cfg.batch_size
        if self._rank_rng is not None:  # resumed mid-epoch: continue the streams where they were
            self._load_rng(self._rank_rng)
            self._rank_rng = None

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The rest of the epoch's batches (no batch is loaded past the last one)."""
        remaining = self.steps_per_epoch - self.epoch_step
        if remaining <= 0:
            return
        for i, (x, y) in enumerate(self.train_loader):
            yield x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
            if i + 1 >= remaining:
                return

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[float, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        # A skipped step leaves the model as it was: its forward updated BatchNorm's running
        # statistics (with NaN, if a NaN reached them), so they are put back.
        kept = _buffers(self.model) if self.cfg.nonfinite == "skip" else None
        loss = _loss(self.ddp(x), y, self.cfg.label_smoothing)
        loss.backward()
        loss = loss.detach()
        # After DDP's all-reduce (FSDP's reduce-scatter, the norm gathered) every rank sees the
        # same norm, so all take the same branch.
        norm = _full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))
        # One rank's loss can be non-finite with finite gradients (an infinite cross-entropy):
        # every rank looks at the sum of the losses, so all take the same branch. The same
        # collective carries the stop flag (a signal on any rank stops all after this step).
        losses, stops = _all_reduce([float(loss), float(self.stop.requested)], self.rt)
        self.stop_seen = stops > 0
        if not (math.isfinite(float(norm)) and math.isfinite(losses)):
            if self.cfg.nonfinite == "stop":
                last = f" and the last checkpoint is at {self.saved_at}" if self.saved_at else ""
                ranks = f" over {self.rt.world} processes" if self.rt.world > 1 else ""
                raise Diverged(
                    f"non-finite loss or gradient at epoch {self.epoch + 1}, step "
                    f"{self.step + 1} (mean loss{ranks} {losses / self.rt.world:.4g}, grad norm "
                    f"{float(norm):.4g}); the weights were not updated{last}. Lower --lr or "
                    "raise the bits, or pass --nonfinite skip"
                    + (f" (--resume {self.out} --lr X continues from it)." if last else "."),
                    every_rank=True,
                )
            self.optimizer.zero_grad(set_to_none=True)
            if kept is not None:
                _put_back(kept)
            with warnings.catch_warnings():  # a skipped first step: no optimizer.step() yet
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                self.scheduler.step()  # the schedule follows the steps, taken or skipped
            return float("nan"), False
        self.optimizer.step()
        self.scheduler.step()
        return float(loss), True

    def _variance(self, x: Tensor, y: Tensor) -> None:
        if self.monitor is None or self.step % self.cfg.variance_every:
            return
        if self.precision is not None:  # before measuring: the step's gradient is in .grad
            norms = self.precision.grad_norm_sq()
        report = self.monitor.measure((x, y))
        if self.precision is not None:
            branches = self.precision.probe(self.model, self.loss_fn, (x, y))
            # .grad is the mean over the ranks' gradients; the report is this rank's
            self.precision.observe(
                report.quantization, report.sampling, norms, self.rt.world, branches
            )
        if self.rt.main:
            # epochs counted from 1, as metrics.jsonl's (the measurement is within this one)
            line = {"epoch": self.epoch + 1, "step": self.step, **report.to_dict()}
            with (self.out / "variance.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
            if self.tensorboard is not None:
                ratios = {f"variance_ratio/{k}": v for k, v in report.ratio.items()}
                self.tensorboard.scalars(
                    {"variance_ratio/total": report.total_ratio, **ratios}, self.step
                )

    def _reduce_window(self) -> None:
        """Sum the adaptive-precision window over ranks (before a decision, and before a
        checkpoint: rank 0 then holds the sums and the others hold none, so a resumed run's
        next sum counts each measurement once)."""
        ctl = self.precision
        if ctl is None or self.rt.world == 1:
            return
        keys = ctl.window_keys()
        summed = _all_reduce([ctl.window.get(k, 0.0) for k in keys], self.rt)
        ctl.window = dict(zip(keys, summed, strict=True))

    def _replan(self) -> None:
        """Every ``adaptive_precision`` steps: move layers' gradient bits (PrecisionController),
        log each change to metrics.jsonl and TensorBoard, and name layers whose gradient is
        drowned in quantization noise even at the most bits."""
        ctl = self.precision
        if ctl is None or self.step % self.cfg.adaptive_precision:
            return
        self._reduce_window()  # every rank decides alike, from all ranks' measurements
        changes = ctl.replan()
        low = ctl.low_snr()
        if not self.rt.main:
            return
        for change in changes:
            log.info(
                "step %d: %s gradient bits %s -> %s (%s; total quantization/sampling "
                "variance %.3g, budget %g)",
                self.step,
                change["layer"],
                change["bits"],
                change["new_bits"],
                change["trigger"],
                change["ratio"],
                ctl.budget,
            )
        if not changes and ctl.last_ratio is not None:
            log.info(
                "step %d: gradient bits kept (total quantization/sampling variance %.3g, "
                "budget %g)",
                self.step,
                ctl.last_ratio,
                ctl.budget,
            )
        elif not changes:
            log.info("step %d: gradient bits kept (no variance measured in this window)", self.step)
        if changes:
            with (self.out / "metrics.jsonl").open("a") as f:
                for change in changes:
                    line = {"event": "precision", "epoch": self.epoch + 1, "step": self.step}
                    f.write(json.dumps({**line, **change}) + "\n")
        if self.tensorboard is not None:  # bits per element: a format's scales count
            per_element = ctl.bits_per_element()
            bits = {f"precision/{n}/grad_bits": b[0] for n, b in per_element.items()}
            bits.update({f"precision/{n}/grad_weight_bits": b[1] for n, b in per_element.items()})
            self.tensorboard.scalars(bits, self.step)
        if low:
            log.warning(
                "step %d: gradient signal-to-quantization-noise ratio below %g while the most "
                "precise gradient quantizers allowed were on, in layers %s (docs/method.md §11): "
                "quantized training may stop helping there",
                self.step,
                ctl.snr_threshold,
                ", ".join(low),
            )

    def _log_step(self, loss: float, ok: bool) -> None:
        if self.tensorboard is None:
            return
        values = {"train/lr": self.step_lr}  # the step's own (the schedule has moved on)
        if ok:
            values["train/loss"] = loss
        self.tensorboard.scalars(values, self.step)

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop (on any rank: all stop at the same step)."""
        if self.rt.world == 1:
            return self.stop.requested
        return bool(_all_reduce([float(self.stop.requested)], self.rt, "max")[0])

    def run_epoch(self) -> dict[str, Any] | None:
        """Train the (rest of the) epoch and evaluate: its metrics; ``None`` when a stop was
        requested, after the step in progress (the epoch is left unfinished, ready to save)."""
        self._epoch_clock = time.perf_counter() - self.epoch_seconds
        self._start_epoch()
        self.ddp.train()
        batches: Iterable = self._batches()
        if self.progress:
            batches = self.progress(
                batches,
                self.steps_per_epoch - self.epoch_step,
                f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            )
        every = self.cfg.checkpoint_every
        for x, y in batches:
            loss, ok = self._train_step(x, y)
            self.step += 1
            self.epoch_step += 1
            if ok:
                self.sums[0] += loss
                self.sums[1] += 1
            else:
                self.sums[2] += 1
            self._variance(x, y)
            self._replan()
            self._log_step(loss, ok)
            # A signal after the step's collective: one process sees it now, several ranks at
            # the next step's collective (all of them at once)
            if self.stop_seen or (self.rt.world == 1 and self.stop.requested):
                return None
            if every and self.step % every == 0 and self.epoch_step < self.steps_per_epoch:
                self.save()  # the end of the epoch has its own checkpoint, after evaluating
        total, count, skipped = _all_reduce(self.sums, self.rt)
        skipped /= self.rt.world  # every rank counts each skipped step (they all skip it)
        val_loss, val_acc = _evaluate(self.model, self.val_loader, self.rt, self.cfg.fsdp)
        self.epoch += 1
        self.epoch_step = 0
        self.sums = [0.0, 0.0, 0.0]
        seconds, self.epoch_seconds = time.perf_counter() - self._epoch_clock, 0.0
        return {
            "epoch": self.epoch,
            "train_loss": total / count if count else float("nan"),  # every step skipped
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,  # training and validation, over every invocation
            "steps": self.step,
            "skipped_steps": int(skipped),
        }

    def _check_weights_finite(self) -> None:
        """Stop before a checkpoint would keep non-finite weights: a finite gradient can still
        step them past float range, after which ``--nonfinite skip`` would skip every step. The
        parameters and BatchNorm's running statistics (other buffers may hold ``-inf`` on
        purpose, as attention masks do)."""
        stats = (
            t
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for t in (m.running_mean, m.running_var)
            if t is not None
        )
        tensors = itertools.chain(self.model.parameters(), stats)
        bad = sum(not bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
        if _all_reduce([float(bad)], self.rt)[0]:  # FSDP: each rank holds a shard
            raise Diverged(
                "the weights or BatchNorm statistics are no longer finite at "
                f"{_where(self.epoch, self.step, self.epoch_step)} (a step too large for them)"
                f"{self._last_saved()}. Lower --lr or raise the bits.",
                every_rank=True,  # the count is all-reduced: every rank raises
            )

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """Log the epoch (metrics.jsonl, TensorBoard, a line) and checkpoint it (and to best.pt
        when it is the best so far by :attr:`best_metric`). A validation loss that is not
        finite stops the run before anything is written: the model's outputs overflow (finite
        weights too large for them, which skipped steps can leave), and its checkpoint would
        not be worth keeping."""
        if not math.isfinite(metrics["val_loss"]):  # reduced over the ranks: all see it
            raise Diverged(
                f"the validation loss is {metrics['val_loss']:g} after epoch {metrics['epoch']}: "
                "the model's outputs are no longer finite (a step too large for them)"
                f"{self._last_saved()}. Lower --lr or raise the bits.",
                every_rank=True,
            )
        value = metrics[self.best_metric]
        best = _is_better(self.best_metric, value, self.best.get("value"))
        if best:
            self.best = {"metric": self.best_metric, "value": value, "epoch": self.epoch}
        if self.rt.main:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.save(best=best)
        if not self.rt.main:
            return
        if self.tensorboard is not None:
            self.tensorboard.scalars(
                {
                    "epoch/train_loss": metrics["train_loss"],
                    "val/loss": metrics["val_loss"],
                    "val/acc": metrics["val_acc"],
                },
                self.step,
            )
            self.tensorboard.flush()
        log.info(
            "epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f (%.1fs)%s",
            metrics["epoch"],
            self.cfg.epochs,
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_acc"],
            metrics["seconds"],
            f"; best {self.best_metric} so far -> best.pt" if best else "",
        )
        if metrics["skipped_steps"]:
            log.warning(
                "epoch %d: skipped %d step(s) with a non-finite loss or gradient "
                "(--nonfinite skip); train_loss counts the others",
                metrics["epoch"],
                metrics["skipped_steps"],
            )


def _run_dir(run: _Run) -> Path:
    """``--out``, or a new directory under runs/ that rank 0 creates and names for all ranks."""
    if run.cfg.out is not None:
        return Path(run.cfg.out)
    name = [str(new_run_dir()) if run.rt.main else None]
    if run.rt.world > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _finished_epochs(out: Path) -> str:
    """What a run in ``out`` finished, if anything: ``final.json``, or ``metrics.jsonl``'s
    epoch lines (its adaptive-precision events come within an epoch); ``""`` for nothing."""
    if (out / "final.json").is_file():
        return "final.json"
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return ""
    epochs = sum('"event"' not in line and '"epoch"' in line for line in lines)
    return f"metrics.jsonl, {epochs} epoch(s)" if epochs else ""


def _check_same_layers(out: Path, cfg: TrainConfig) -> None:
    """The FQT layers' configuration this fqtorch derives from the run's options is the one
    the run was trained with (``config.json``'s ``fqt``), field by field: a version that reads
    the same options differently (``--preset exact`` with gradient flags kept QAT's 8-bit
    forward before ``baba011``) would otherwise go on training another model."""
    before = _read_record(out / "config.json")
    old = before.get("fqt") if before is not None else None
    new = None if cfg.fqt_config() is None else cfg.fqt_config().to_dict()
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    if changed:
        k = changed[0]
        raise CheckpointError(
            f"{out} was trained with {k}={old[k]!r}, and this fqtorch derives {k}={new[k]!r} "
            "from the same options (their meaning changed since the run started): resume it "
            "with the fqtorch version that started it, or start a new run"
        )


# What a run writes as it goes (beside config.json and the checkpoints).
_RECORDS = ("metrics.jsonl", "variance.jsonl", "final.json")


def _prepare_out(run: _Run, cfg: TrainConfig) -> None:
    if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise TrainingError(
            f"--out {cfg.out} is a file; name a directory for the run (or leave --out out: "
            "every run gets a new directory under runs/)"
        )
    run.out = _run_dir(run)
    ckpt = run.out / "checkpoint.pt"
    if cfg.resume and not ckpt.is_file():  # before any directory is made for it
        raise CheckpointError(f"--resume: no checkpoint at {ckpt}")
    # Rank 0 looks, before it writes anything: another rank could see its first files appear
    # (under torchrun, one rank's error stops them all).
    foreign = _foreign_files(run.out) if run.rt.main and not cfg.resume else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise TrainingError(
            f"--out {run.out} holds files that are not an fqtorch run ({shown}); name a new or "
            "empty directory, or leave --out out: every run gets a new directory under runs/"
        )
    if run.rt.main:  # before anything is read or written: one process per run directory
        run.out.mkdir(parents=True, exist_ok=True)
        lock_run(run.out)
    if cfg.resume:
        run.restore(ckpt)
        _check_same_layers(run.out, cfg)
    elif ckpt.exists():
        raise TrainingError(
            f"{run.out} already holds a run (checkpoint.pt); pass --resume to continue it, or "
            "leave --out out: every run gets a new directory under runs/"
        )
    elif records := _finished_epochs(run.out):
        # A run stopped before its first checkpoint (non-finite weights at an epoch's end, say)
        # left only its record: nothing to resume, and a new run here would delete it. (One
        # killed within its first epoch left no epoch's result: it is started again.)
        raise TrainingError(
            f"{run.out} holds a stopped run's record ({records}; no checkpoint to resume "
            "from); move it away or name another --out (a new run would replace it)"
        )
    if cfg.tensorboard and run.rt.main:
        run.tensorboard = _TensorBoard(
            run.out / "tensorboard", run.step + 1 if cfg.resume else None
        )
    if not run.rt.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:  # drop what the checkpoint does not cover
        _keep_lines(
            run.out / "metrics.jsonl",
            lambda m: m["step"] <= run.step if "event" in m else m["epoch"] <= run.epoch,
        )
        _keep_lines(run.out / "variance.jsonl", lambda m: m["step"] <= run.step)
        if run.epoch < cfg.epochs:  # extended: the old finish no longer describes the run
            (run.out / "final.json").unlink(missing_ok=True)
    else:
        for name in _RECORDS:  # a run that finished no epoch (killed within its first)
            (run.out / name).unlink(missing_ok=True)
    started = {
        "versions": {
            "fqtorch": fqtorch.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    record = {
        "config": {**cfg.to_dict(), "out": str(run.out)},
        "fqt": None if cfg.fqt_config() is None else cfg.fqt_config().to_dict(),
        "world_size": run.rt.world,
        "device": str(run.rt.device),
        **started,
    }
    if cfg.resume:  # the run's first start stays on record; each resume is added to it
        before = _read_record(run.out / "config.json")
        if before is None and (run.out / "config.json").is_file():  # kept, not overwritten
            os.replace(run.out / "config.json", run.out / "config.json.unreadable")
        if before is not None:
            first = (*started, "world_size", "device")
            resumed = {**{k: record[k] for k in first}, "step": run.step, "epoch": run.epoch}
            record.update({k: before[k] for k in first if k in before})
            record["resumes"] = [*before.get("resumes", []), resumed]
    _write_json(run.out / "config.json", record)


def _read_record(path: Path) -> dict[str, Any] | None:
    """An fqtorch run's ``config.json`` (``None`` when missing, unreadable or someone else's)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(record, dict) and {"config", "fqt", "argv"} <= set(record)
    return record if ours else None


def _foreign_files(out: Path) -> list[str]:
    """What an existing ``out`` holds that no fqtorch run wrote: nothing for a new or empty
    directory, or one whose ``config.json`` is an fqtorch run's (then the run's own files are
    replaced); else every name in it, sorted."""
    if not out.is_dir():
        return []
    # A run's own files before its config.json: the lock, TensorBoard's folder, a file being
    # written (_write_json's .tmp).
    names = sorted(
        p.name
        for p in out.iterdir()
        if p.name not in ("lock", "tensorboard") and p.suffix != ".tmp"
    )
    if not names or _read_record(out / "config.json") is not None:
        return []
    return names


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final metrics (what ``final.json`` holds).

    Rank 0 writes, in the run directory (``cfg.out``, or a new ``runs/<date>_<time>``):
    ``config.json``, ``metrics.jsonl`` (a line per epoch), ``checkpoint.pt`` (every epoch, and
    every ``checkpoint_every`` steps), ``best.pt`` (the epoch best by validation accuracy, or
    loss for text), ``final.json``, ``variance.jsonl`` (``variance_every``) and ``tensorboard/``
    (``tensorboard``); while it runs, ``lock`` (its process id: a second run in the same
    directory is refused, see :func:`~fqtorch.train.rundir.lock_run`). Ctrl-C or SIGTERM stops
    after the step in progress, saves a checkpoint and raises :class:`TrainingInterrupted` (its
    message says how to resume).

    ``progress(iterable, total, description)`` may wrap the step iterator (a progress bar);
    it is used on rank 0 only.
    """
    run = _Run(cfg, progress)
    try:
        _prepare_out(run, cfg)
        run.announce()
        return _train_until_done(run)
    finally:
        if run.rt.main:
            unlock_run(run.out)


def _train_until_done(run: _Run) -> dict[str, Any]:
    try:
        with run.stop.installed():
            final = _train_epochs(run)
    except TrainingInterrupted as exc:
        if not str(exc):  # a second Ctrl-C, raised wherever the run was: say what is intact
            raise run.stopped_at_once() from None
        if run.rt.world > 1:  # every rank stopped after the same step and saved its part
            _shut_down(run)
        raise
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()
    if run.rt.world > 1:
        _shut_down(run)
    return final


def _shut_down(run: _Run) -> None:
    """Release DDP (and with it its hold on the process group) while Python is fully alive,
    then destroy the process group: a gloo group freed during interpreter shutdown can abort
    the process (``terminate called without an active exception``)."""
    run.ddp = run.model
    gc.collect()  # DDP may sit in a reference cycle
    dist.barrier()
    dist.destroy_process_group()


def _train_epochs(run: _Run) -> dict[str, Any]:
    cfg = run.cfg
    metrics: dict[str, Any] | None = {}
    barrier = dist.barrier if run.rt.world > 1 else (lambda: None)
    while run.epoch < cfg.epochs:
        metrics = run.run_epoch()
        if metrics is None:
            run.save()
            raise run.interrupted()
        run.end_epoch(metrics)
        barrier()
        if run.stop_requested():  # during the evaluation: the epoch's checkpoint is written
            raise run.interrupted()
    if not metrics:  # resumed a finished run: evaluate once more
        val_loss, val_acc = _evaluate(run.model, run.val_loader, run.rt, cfg.fsdp)
        metrics = {"epoch": run.epoch, "val_loss": val_loss, "val_acc": val_acc}
    checksums = _gather_checksums(run)
    final = {
        "val_acc": metrics["val_acc"],
        "val_loss": metrics["val_loss"],
        "epochs": run.epoch,
        "best": run.best,
        "run_dir": str(run.out),
        "world_size": run.rt.world,
        "rank_param_checksums": checksums,
    }
    if run.rt.main:
        _write_json(run.out / "final.json", final)
    return final


def _gather_checksums(run: _Run) -> list[float]:
    """Each rank's parameter checksum: identical across ranks when DDP kept them in sync (under
    FSDP, of the gathered parameters: identical by construction, and a check the gather works)."""
    mine = _param_checksum(run.model)
    if run.rt.world == 1:
        return [mine]
    out = torch.zeros(run.rt.world, dtype=torch.float64, device=run.rt.device)
    out[run.rt.rank] = mine
    dist.all_reduce(out)
    return out.tolist()
