"""``fqtorch plan`` (alias ``fqtorch autobits``): choose each layer's gradient quantizer and bits
within a variance budget (:func:`fqtorch.stats.plan_precision`), print the table and write
``DIR/plan.json``, which ``fqtorch train --bits-plan DIR/plan.json`` trains with."""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler

from ..cli import _tqdm_progress
from ..config import FQTConfig
from ..convert import quantize_model
from ..quantizers.base import is_registered, list_quantizers
from .cli import (
    BLOCK_SIZE_HELP,
    _conversion_summary_said,
    _loss,
    _model_and_data,
    _parse_list,
    add_model_and_data,
    check_overwrite,
)
from .plan import plan_precision

log = logging.getLogger(__name__)

__all__ = ["add_plan_parser", "run_plan"]


def add_plan_parser(sub: Any) -> None:

    for name in ("plan", "autobits"):
        p = sub.add_parser(
            name,
            help="choose per-layer gradient bits within a variance budget"
            + (" (same as plan)" if name == "autobits" else ""),
            description="Measure each layer's contribution to the gradient's quantization "
            "variance (both backward branches) and the sampling variance, choose (greedily, at low "
            "GEMM cost) per-layer gradient quantizers whose total quantization variance is at most "
            "--budget x the sampling variance (docs/method.md §11), measure the plan again, "
            "print the table and write DIR/plan.json. Defaults: digits_cnn on digits.",
        )
        add_model_and_data(p)
        p.add_argument(
            "--preset",
            default="qat",
            help="the forward quantization the plan is measured under (an FQTConfig preset; "
            "default: %(default)s)",
        )
        p.add_argument(
            "--budget",
            type=float,
            default=0.1,
            help="fraction of sampling variance (default: %(default)s)",
        )
        p.add_argument(
            "--quantizers",
            default="psq,bhq",
            help="candidate quantizers of the grad_input branch (grad_quantizer; default: "
            "%(default)s)",
        )
        p.add_argument(
            "--weight-quantizers",
            default="per_column",
            help="candidate quantizers of the weight-gradient branch (grad_weight_quantizer; "
            "default: %(default)s)",
        )
        p.add_argument(
            "--bits", default="4,5,6,7,8", help="candidate bit widths (default: %(default)s)"
        )
        p.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="the training batch size the plan is for (default: the dataset's training "
            "default)",
        )
        p.add_argument(
            "--batches",
            type=int,
            default=4,
            help="minibatches measured (>= 2; default: %(default)s)",
        )
        p.add_argument(
            "--sampling-batches",
            type=int,
            default=None,
            help="minibatches the sampling variance (the budget's unit) is estimated from: the "
            "--batches planned on and more (one exact backward each; default: 16, or as many "
            "as the training set holds beside the verification batches)",
        )
        p.add_argument(
            "--samples",
            type=int,
            default=8,
            help="backward passes per measurement (default: %(default)s)",
        )
        p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
        p.add_argument("--block-size", type=int, default=None, help=BLOCK_SIZE_HELP)
        p.add_argument("--out", default="runs/plan", metavar="DIR", help="(default: %(default)s)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a plan.json already in --out (without it, it is kept: a new --out)",
        )
        p.add_argument(
            "--checkpoint",
            help="a checkpoint.pt of fqtorch train: plan for that trained model (default: a "
            "freshly initialized one)",
        )


def run_plan(args: argparse.Namespace) -> int:
    bits = _parse_list(args.bits, int, "bits")
    grad = [(q, b) for q in _parse_list(args.quantizers, str, "quantizers") for b in bits]
    weight_names = _parse_list(args.weight_quantizers, str, "weight-quantizers")
    weight = [(q, b) for q in weight_names for b in bits]
    for flag, names in (("quantizers", grad), ("weight-quantizers", weight)):
        for name, _ in names:
            if "+" in name:  # variance's NAME+TRANSFORM form, which a plan cannot choose
                raise ValueError(
                    f"--{flag}: {name!r}: a plan's candidates are quantizer names without "
                    f"+TRANSFORM; give some of: {', '.join(list_quantizers())}"
                )
            if not is_registered(name):
                raise ValueError(
                    f"--{flag}: {name!r} is not a registered quantizer; known: "
                    f"{', '.join(list_quantizers())}"
                )
    try:
        base = FQTConfig.preset(args.preset, seed=args.seed)
    except ValueError as exc:
        raise ValueError(f"--preset: {exc}") from None
    if args.batches < 2:
        raise ValueError(f"--batches must be >= 2 (the sampling variance), got {args.batches}")
    if not 0 < args.budget < math.inf:
        raise ValueError(f"--budget must be a finite number > 0, got {args.budget}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a directory for plan.json")
    check_overwrite(out, ("plan.json",), args.overwrite)
    model, spec, model_name = _model_and_data(args)  # --dataset filled in (the checkpoint's)
    if args.batch_size is None:
        from ..train.config import DATASET_DEFAULTS

        args.batch_size = DATASET_DEFAULTS[args.dataset]["batch_size"]
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        spec.train,
        args.batch_size,
        drop_last=True,
        sampler=RandomSampler(spec.train, generator=gen),
    )
    if args.sampling_batches is None:  # 16, or what the data hold beside the verification
        args.sampling_batches = max(min(16, len(loader) - args.batches), args.batches)
        if args.sampling_batches < 16:
            log.info(
                "sampling variance from %d minibatches (what the training set holds beside the "
                "verification batches; --sampling-batches sets it)",
                args.sampling_batches,
            )
    sampled = max(args.sampling_batches, args.batches)  # the planning batches count
    wanted = 2 * args.batches + sampled - args.batches  # planning, verifying, sampling
    if len(loader) < wanted:
        raise ValueError(
            f"--batches {args.batches} twice (planning, then verifying on fresh batches) and "
            f"--sampling-batches {args.sampling_batches} (the planning ones and more) x "
            f"--batch-size {args.batch_size} need {wanted} batches; the {len(spec.train)} "
            "training samples make "
            f"{len(loader)}: lower them"
        )
    out.mkdir(parents=True, exist_ok=True)  # before measuring: an --out that cannot be, now
    device = torch.device(args.device)
    batches = []
    for x, y in loader:
        batches.append((x.to(device), y.to(device)))
        if len(batches) == wanted:
            break
    if base.grad_transform:
        log.info(
            "--preset %s's grad_transform %s is left out: a plan's candidates are bare "
            "quantizers (train with --grad-transform none to match what is measured)",
            args.preset,
            base.grad_transform,
        )
    with _conversion_summary_said():
        # measured without gradient quantizers (the plan sets them) nor a transform in front
        # of them (a plan's candidates are bare quantizers)
        model = quantize_model(model, base.replace(grad_quantizer=None, grad_transform=None))
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        plan = plan_precision(
            model,
            _loss,
            batches[: args.batches],
            budget=args.budget,
            candidates={"grad": grad, "grad_weight": weight},
            samples=args.samples,
            verify_batches=batches[args.batches : 2 * args.batches],
            sampling_batches=batches[: args.batches] + batches[2 * args.batches :],
            progress=_tqdm_progress,
        )
    for warning in caught:  # after the planner's progress bar, in the command's format
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    path = plan.save(out / "plan.json")
    print(
        f"{model_name} on {args.dataset}, batch {args.batch_size}; variance as a fraction of "
        "the sampling variance (each branch alone):"
    )
    print(plan.table())
    log.info(
        "wrote %s (%.1fs); train with: fqtorch train --preset %s --bits-plan %s%s",
        path,
        time.perf_counter() - start,
        args.preset,
        path,
        " --grad-transform none" if base.grad_transform else "",
    )
    return 0
