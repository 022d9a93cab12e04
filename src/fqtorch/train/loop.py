"""The training loop behind ``fqtorch train``: one process or many (``torchrun``, DDP).

Reproducibility: at the start of every epoch the quantizers' noise, the augmentation and the
global RNG are reseeded from ``(seed, rank, epoch)``, so a run resumed from an epoch checkpoint
replays exactly what the uninterrupted run would have done; the checkpoint also stores the RNG
states themselves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

import fqtorch

from ..data import DataSpec, build_datasets
from ..models import build_model, get_model_info
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import CheckpointError, TrainingError

__all__ = ["TrainingError", "train"]

log = logging.getLogger(__name__)
Progress = Callable[[Iterable, int, str], Iterable]


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_runtime(device: str) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use cpu or auto)")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return Runtime(dist.get_rank(), dist.get_world_size(), torch.device(device))
    return Runtime(0, 1, torch.device(device))


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + epoch * 104_729) % (2**62)


def _all_reduce(values: list[float], rt: Runtime, op: str = "sum") -> list[float]:
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _build_model(cfg: TrainConfig, spec: DataSpec, rt: Runtime) -> nn.Module:
    info = get_model_info(cfg.model)
    if info.task != spec.task:
        raise ValueError(
            f"--model {cfg.model} is a {info.task} model; --dataset {cfg.dataset} "
            f"needs a {spec.task} model"
        )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if spec.task == "text":
        model = build_model(cfg.model, num_classes=spec.num_classes, block_size=spec.block_size)
    else:
        model = build_model(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels)
    fqt_config = cfg.fqt_config()
    if fqt_config is not None:
        model = fqtorch.quantize_model(model, fqt_config)
    return model.to(rt.device)


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


def _schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), label_smoothing=smoothing
    )


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    generator = getattr(info.dataset, "generator", None)
    if generator is not None:
        generator.manual_seed(generator.initial_seed() + 7_919 * (worker_id + 1))


def _loaders(cfg: TrainConfig, spec: DataSpec, rt: Runtime) -> tuple[DataLoader, DataLoader, Any]:
    if rt.world > 1:
        sampler: Any = DistributedSampler(
            spec.train, rt.world, rt.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
    else:
        sampler = RandomSampler(spec.train, generator=torch.Generator())
    pin = rt.device.type == "cuda"
    train = DataLoader(
        spec.train,
        cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        worker_init_fn=_worker_init,
        pin_memory=pin,
    )
    shard = Subset(spec.val, range(rt.rank, len(spec.val), rt.world))  # exact, unpadded shards
    val = DataLoader(shard, cfg.batch_size, num_workers=cfg.workers, pin_memory=pin)
    if len(train) == 0:
        raise ValueError(
            f"batch size {cfg.batch_size} × {rt.world} processes exceeds the "
            f"{len(spec.train)} training samples"
        )
    return train, val, sampler


def _evaluate(model: nn.Module, loader: DataLoader, rt: Runtime) -> tuple[float, float]:
    model.eval()
    total, correct, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            logits = model(x)
            total += float(_loss(logits, y, 0.0)) * y.numel()
            correct += float((logits.argmax(-1) == y).sum())
            count += y.numel()
    total, correct, count = _all_reduce([total, correct, count], rt)
    return total / max(count, 1), correct / max(count, 1)


def _param_checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() + p.double().square().sum() for p in model.parameters()))


class _Run:
    """State of one training run; ``train()`` drives it."""

    def __init__(self, cfg: TrainConfig, progress: Progress | None) -> None:
        self.cfg = cfg
        self.rt = _setup_runtime(cfg.device)
        self.out = Path(cfg.out)
        self.progress = progress if (progress and self.rt.main and not cfg.quiet) else None
        self.spec = build_datasets(
            cfg.dataset,
            cfg.data_dir,
            seed=cfg.seed,
            block_size=cfg.block_size,
            image_size=cfg.image_size,
        )
        self.model = _build_model(cfg, self.spec, self.rt)
        self.train_loader, self.val_loader, self.sampler = _loaders(cfg, self.spec, self.rt)
        steps = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.optimizer = _optimizer(cfg, self.model)
        self.scheduler = _schedule(cfg, self.optimizer, steps)
        self.ddp = self.model
        if self.rt.world > 1:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch, self.step = 0, 0
        self.monitor = None
        if cfg.variance_every and cfg.quantized:
            from ..stats import VarianceMonitor

            self.monitor = VarianceMonitor(self.model, self._loss_fn)

    def _loss_fn(self, logits: Tensor, target: Tensor) -> Tensor:
        return _loss(logits, target, self.cfg.label_smoothing)

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "fqt": fqtorch.generator_states(self.model)}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng,
            "config": json.dumps(self.cfg.to_dict()),
        }

    def restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved = json.loads(state.get("config", "{}"))
        for key in ("dataset", "model", "preset", "fqt", "batch_size", "epochs"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise CheckpointError(
                    f"{path} was written with {key}={saved[key]!r}; this run has "
                    f"{key}={getattr(self.cfg, key)!r}"
                )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit model {self.cfg.model}: {exc}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    # ---------------------------------------------------------------------------------- training
    def _start_epoch(self, epoch: int) -> None:
        seed = _epoch_seed(self.cfg.seed, self.rt.rank, epoch)
        torch.manual_seed(seed)
        fqtorch.reseed(self.model, seed)  # different noise on every rank and every epoch
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.sampler.generator.manual_seed(_epoch_seed(self.cfg.seed, 0, epoch))
        if hasattr(self.spec.train, "set_epoch"):
            self.spec.train.set_epoch(epoch, self.rt.rank)

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i, (x, y) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                return
            yield x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)

    def _train_step(self, x: Tensor, y: Tensor) -> tuple[float, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss_fn(self.ddp(x), y)
        loss.backward()
        loss = loss.detach()
        # After DDP's all-reduce every rank sees the same norm, so all take the same branch.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        if not (torch.isfinite(norm) and torch.isfinite(loss)):
            if self.cfg.nonfinite == "stop":
                raise TrainingError(
                    f"non-finite loss or gradient at epoch {self.epoch + 1}, step {self.step} "
                    f"(loss {float(loss):.4g}, grad norm {float(norm):.4g}); the weights were not "
                    f"updated and the last good checkpoint is {self.out / 'checkpoint.pt'}. "
                    "Lower --lr or raise the bits, or pass --nonfinite skip."
                )
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), False
        self.optimizer.step()
        self.scheduler.step()
        return float(loss), True

    def _variance(self, x: Tensor, y: Tensor) -> None:
        if self.monitor is None or self.step % self.cfg.variance_every:
            return
        report = self.monitor.measure((x, y))
        if self.rt.main:
            line = {"epoch": self.epoch, "step": self.step, **report.to_dict()}
            with (self.out / "variance.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")

    def run_epoch(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._start_epoch(self.epoch)
        self.ddp.train()
        total, count, skipped = 0.0, 0, 0
        batches: Iterable = self._batches()
        if self.progress:
            batches = self.progress(
                batches, self.steps_per_epoch, f"epoch {self.epoch + 1}/{self.cfg.epochs}"
            )
        for x, y in batches:
            loss, ok = self._train_step(x, y)
            self.step += 1
            if ok:
                total, count = total + loss, count + 1
            else:
                skipped += 1
            self._variance(x, y)
        total, count, skipped = _all_reduce([total, count, skipped], self.rt)
        val_loss, val_acc = _evaluate(self.model, self.val_loader, self.rt)
        self.epoch += 1
        return {
            "epoch": self.epoch,
            "train_loss": total / max(count, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
            "steps": self.step,
            "skipped_steps": int(skipped),
        }


def _prepare_out(run: _Run, cfg: TrainConfig) -> None:
    ckpt = run.out / "checkpoint.pt"
    if cfg.resume:
        if not ckpt.exists():
            raise CheckpointError(f"--resume: no checkpoint at {ckpt}")
        run.restore(ckpt)
    elif ckpt.exists():
        raise TrainingError(
            f"{run.out} already holds a run (checkpoint.pt); pass --resume to "
            "continue it or choose another --out"
        )
    if not run.rt.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    metrics = run.out / "metrics.jsonl"
    if cfg.resume and metrics.exists():  # drop epochs the checkpoint does not cover
        kept = [
            ln
            for ln in metrics.read_text().splitlines()
            if ln.strip() and json.loads(ln)["epoch"] <= run.epoch
        ]
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, metrics)
    elif metrics.exists():
        metrics.unlink()
    _write_json(
        run.out / "config.json",
        {
            "config": cfg.to_dict(),
            "fqt": None if cfg.fqt_config() is None else cfg.fqt_config().to_dict(),
            "world_size": run.rt.world,
            "device": str(run.rt.device),
            "versions": {
                "fqtorch": fqtorch.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "git_commit": _git_commit(),
            "argv": sys.argv,
        },
    )


def train(cfg: TrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the final metrics (what ``final.json`` holds).

    ``progress(iterable, total, description)`` may wrap the step iterator (a progress bar);
    it is used on rank 0 only.
    """
    run = _Run(cfg, progress)
    _prepare_out(run, cfg)
    metrics: dict[str, Any] = {}
    barrier = dist.barrier if run.rt.world > 1 else (lambda: None)
    while run.epoch < cfg.epochs:
        metrics = run.run_epoch()
        if run.rt.main:
            with (run.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            save_checkpoint(run.checkpoint_state(), run.out / "checkpoint.pt")
            log.info(
                "epoch %d/%d: train_loss %.4f val_loss %.4f val_acc %.4f (%.1fs)",
                metrics["epoch"],
                cfg.epochs,
                metrics["train_loss"],
                metrics["val_loss"],
                metrics["val_acc"],
                metrics["seconds"],
            )
        barrier()
    if not metrics:  # resumed a finished run: evaluate once more
        val_loss, val_acc = _evaluate(run.model, run.val_loader, run.rt)
        metrics = {"epoch": run.epoch, "val_loss": val_loss, "val_acc": val_acc}
    checksums = _gather_checksums(run)
    final = {
        "val_acc": metrics["val_acc"],
        "val_loss": metrics["val_loss"],
        "epochs": run.epoch,
        "world_size": run.rt.world,
        "rank_param_checksums": checksums,
    }
    if run.rt.main:
        _write_json(run.out / "final.json", final)
    if run.rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _gather_checksums(run: _Run) -> list[float]:
    """Each rank's parameter checksum: identical across ranks when DDP kept them in sync."""
    mine = _param_checksum(run.model)
    if run.rt.world == 1:
        return [mine]
    out = torch.zeros(run.rt.world, dtype=torch.float64, device=run.rt.device)
    out[run.rt.rank] = mine
    dist.all_reduce(out)
    return out.tolist()
