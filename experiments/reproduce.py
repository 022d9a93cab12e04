"""Regenerate every trained-model table and figure of docs/results.md (the paper's claims).

    python experiments/reproduce.py                 # train what is missing, then report
    python experiments/reproduce.py --list          # the runs and which are done
    python experiments/reproduce.py --report-only   # rebuild tables/figures from the summaries
    python experiments/reproduce.py --tasks digits --seeds 0   # a part of the grid
    python experiments/reproduce.py --jobs 2        # two runs at a time, each on half the cores

Runs are ``fqtorch train`` subprocesses, one per (task, configuration, seed), in
``runs/experiments/<task>/<config>_s<seed>`` (not committed). A finished run leaves a summary,
``experiments/results/<task>/<config>_s<seed>.json`` (committed: the tables rebuild from these
without retraining); a run with a summary is skipped, and one with a checkpoint but no summary is
resumed (``fqtorch train --resume``), so Ctrl-C or the end of a session loses at most the steps
since the last checkpoint. Then the variance of every quantizer and bit width is measured on each
task's trained QAT model (``fqtorch variance``, ``experiments/results/<task>/variance/``), and the
report writes the figures under ``docs/figures/results/`` and the tables between the
``<!-- experiments:begin -->`` and ``<!-- experiments:end -->`` markers of docs/results.md.

The grid also trains the floating-point and block-scaled formats (``FORMATS``), a fixed
per-layer plan (``plan``: ``fqtorch plan`` at budget ``PLAN_BUDGET`` on the task's trained QAT
model of seed 0, via ``fqtorch plan --checkpoint``, saved once as
``experiments/results/<task>/plan/plan.json`` and reused; trained with ``--bits-plan``) and the
same plan re-planned while training (``adaptive``: ``--adaptive-precision``, see
``Task.adaptive_flags``); the report compares them with QAT and the uniform presets
(``MATCH_RULE``, average gradient bits by GEMM size) and says whether the plans match QAT with
fewer bits than the smallest matching uniform preset.

A run that stops on a non-finite loss, gradient, weight or validation loss (``fqtorch train``
exits with ``EXIT_DIVERGED``) is recorded as diverged (not as a number); any other failure stops
the script with the run's own error line.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "experiments"
FIGURES = ROOT / "docs" / "figures" / "results"
RESULTS_MD = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"

QUANTIZERS = ("ptq", "psq", "bhq", "rht")
BITS = (3, 4, 5, 6, 8)
LOW_BITS = (3, 4)  # the uniform rows with weight gradients at these bits too (bhq3_w3, ...)
# floating-point and block-scaled gradient formats (FQTConfig presets, docs/method.md §12)
FORMATS = ("fp8_e4m3", "mxfp4_sr", "mxfp4_rht_sr", "nvfp4_sr", "nvfp4_rht_sr")
PLAN_BUDGET = 0.1  # the fixed plan's budget: quantization variance / sampling variance
BRANCHES = ("grad", "grad_weight")
EXIT_DIVERGED = 3  # fqtorch train's exit status for a diverged run (fqtorch.train.errors)


@dataclass(frozen=True)
class Task:
    """One model on one data set; ``epochs`` and ``steps`` size it for 2 CPU cores.

    ``plan_flags``: ``fqtorch plan``'s flags for the task's fixed plan (measured on its trained
    QAT model, seed 0); ``adaptive_flags``: ``fqtorch train``'s for the adaptive configuration."""

    name: str
    metric: str  # the table's headline: "val_loss" (lower is better) or "val_acc"
    epochs: int
    flags: tuple[str, ...] = ()
    variance_flags: tuple[str, ...] = ()
    plan_flags: tuple[str, ...] = ()
    adaptive_flags: tuple[str, ...] = ()
    plan_note: str = ""  # said under the plan's description in the report
    # non-empty: a superseded task, kept for its committed summaries; the report shows it under
    # this note and the script refuses to train it
    archived: str = ""


def text_task(name: str, epochs: int, **notes: str) -> Task:
    """The char-GPT on CPython's ``pydoc_data/topics.py``, ``epochs`` of 250 steps."""
    return Task(
        name,
        "val_loss",
        epochs=epochs,
        flags=("--dataset", "text", "--max-steps-per-epoch", "250"),
        variance_flags=("--dataset", "text", "--batches", "2", "--samples", "8"),
        # 17 FQT layers probed one at a time, 2 batches x 4 samples, over the candidates digits
        # has (the uniform rows' integer grids at 3-8 bits and the 4-bit formats). Through 247c00d
        # the char-GPT's candidates were BHQ alone; the formats were added after its plan tied
        # mxfp4_sr's bits (docs/results.md gives both plans' results).
        plan_flags=(
            *("--dataset", "text", "--bits", "3,4,5,6,7,8"),
            *("--quantizers", "psq,bhq,mxfp4,nvfp4"),
            *("--weight-quantizers", "per_column,mxfp4,nvfp4"),
            *("--batches", "2", "--samples", "4"),
            # the committed plan's sampling variance is from its planning batches alone (made
            # before --sampling-batches, whose default now takes 16)
            *("--sampling-batches", "2"),
        ),
        # a measurement (4 quantized + 4 micro-batch backward passes) every 25 steps, a re-plan
        # every 100 (4 measurements per window)
        adaptive_flags=("--adaptive-precision", "100", "--variance-every", "25"),
        **notes,
    )


TASKS = {
    # 8 epochs of 250 steps: on 4 (the schedule through commit 726aaeb) QAT's curve had not
    # flattened (+1.9-2.5% in its last epoch) and QAT seed 0 on 8 epochs ended 6.2% lower, its
    # last three epochs within 0.5% of each other (docs/results.md)
    "text": text_task(
        "text",
        8,
        plan_note=(
            "The plan's candidates are those the 4-epoch grid's second plan had (`text_4epochs` "
            "below: its first plan, through commit 247c00d, had BHQ alone, tied mxfp4_sr at "
            "4.25 bits, and the formats were added after that result was seen); they were fixed "
            "before any 8-epoch run."
        ),
    ),
    "text_4epochs": text_task(
        "text_4epochs",
        4,
        archived=(
            "The char-GPT on 4 epochs of 250 steps, the schedule through commit 726aaeb, run as "
            "task `text` (the summaries' commands name that run directory). Superseded by the "
            "8-epoch `text` above: on 4 epochs QAT's curve had not flattened, and QAT seed 0 on "
            "8 epochs ended 6.2% lower. Kept for the record (the plans were first compared "
            "there); its comparisons are of runs stopped while QAT was still improving."
        ),
        plan_note=(
            "This is the char-GPT's second plan: the first (through commit 247c00d) had BHQ "
            "alone as candidates, tied mxfp4_sr at 4.25 bits, and the formats were added after "
            "that result was seen (docs/results.md, above the generated section)."
        ),
    ),
    "digits": Task(
        "digits",
        "val_acc",
        epochs=12,
        flags=("--dataset", "digits"),
        # every candidate the uniform rows have: integer grids at 3-8 bits and the 4-bit formats
        plan_flags=(
            *("--dataset", "digits", "--bits", "3,4,5,6,7,8"),
            *("--quantizers", "psq,bhq,mxfp4,nvfp4"),
            *("--weight-quantizers", "per_column,mxfp4,nvfp4"),
            *("--sampling-batches", "4"),  # as the text plan's: its 4 planning batches alone
        ),
        # 264 steps: a measurement every 5 steps, a re-plan every 20 (4 measurements per window)
        adaptive_flags=("--adaptive-precision", "20", "--variance-every", "5"),
    ),
}


@dataclass(frozen=True)
class Config:
    """A training configuration: a preset and flags that change it."""

    name: str
    preset: str
    flags: tuple[str, ...] = field(default=())
    quantizer: str | None = None  # the gradient quantizer, for grouping (None: exact / QAT)
    bits: int | None = None
    # "reference" (exact, QAT), "uniform" (one quantizer and bits for every layer), "format"
    # (a floating-point or block-scaled preset, also one for every layer), "plan" (the task's
    # fixed plan, --bits-plan) or "adaptive" (that plan re-planned in training)
    kind: str = "uniform"


def configs() -> list[Config]:
    """exact, QAT, each gradient quantizer at each bit width (RHT via --grad-quantizer), the
    formats, the fixed plan and the adaptive one (both over QAT's forward)."""
    grid = [Config("exact", "exact", kind="reference"), Config("qat", "qat", kind="reference")]
    for quantizer in QUANTIZERS:
        for bits in BITS:
            if quantizer == "rht":
                grid.append(
                    Config(f"rht{bits}", f"psq{bits}", ("--grad-quantizer", "rht"), "rht", bits)
                )
            else:
                grid.append(Config(f"{quantizer}{bits}", f"{quantizer}{bits}", (), quantizer, bits))
    # Every layer at the plans' lowest integer candidates on both branches: BHQ at b bits with a
    # b-bit per-column weight gradient (the presets keep weight gradients at 8 bits), so the plan
    # is also compared with uniform low bits it could have chosen everywhere.
    grid += [
        Config(f"bhq{b}_w{b}", f"bhq{b}", ("--grad-weight-bits", str(b)), "bhq", b)
        for b in LOW_BITS
    ]
    grid += [Config(name, name, kind="format") for name in FORMATS]
    grid += [Config("plan", "qat", kind="plan"), Config("adaptive", "qat", kind="adaptive")]
    return grid


QAT = Config("qat", "qat", kind="reference")
# QAT on twice the task's schedule, seed 0 only: how much lower a longer schedule takes the loss
# (the report's check that the task's schedule is long enough; not a row of the tables)
LONG = Config("qat_long", "qat", kind="schedule")
LONG_FACTOR = 2


# ------------------------------------------------------------------------------------ running
def summary_path(task: Task, config: Config, seed: int) -> Path:
    return RESULTS / task.name / f"{config.name}_s{seed}.json"


def run_dir(task: Task, config: Config, seed: int) -> Path:
    return RUNS / task.name / f"{config.name}_s{seed}"


def plan_path(task: Task) -> Path:
    """The task's fixed plan (``fqtorch plan``'s ``plan.json``), made once and reused."""
    return RESULTS / task.name / "plan" / "plan.json"


def plan_command(task: Task, checkpoint: Path) -> list[str]:
    return [
        sys.executable, "-m", "fqtorch", "plan", "--checkpoint", str(checkpoint),
        *task.plan_flags, "--budget", str(PLAN_BUDGET), "--seed", "0",
        "--out", str(plan_path(task).parent),
    ]  # fmt: skip


def make_plan(task: Task) -> Path:
    """The fixed plan at budget ``PLAN_BUDGET``, measured on the task's trained QAT model (seed 0,
    trained first when missing); an existing plan.json is reused."""
    path = plan_path(task)
    if path.exists():
        return path
    checkpoint = run_dir(task, QAT, 0) / "checkpoint.pt"
    if not checkpoint.exists() or not summary_path(task, QAT, 0).exists():
        if summary_path(task, QAT, 0).exists():
            raise SystemExit(
                f"{task.name}'s plan is measured on QAT seed 0's checkpoint, and {checkpoint} is "
                f"gone although its summary exists: remove {summary_path(task, QAT, 0)} to "
                f"retrain it, or put a plan.json at {path}"
            )
        train(task, QAT, 0)
    print(f"planning {task.name}'s gradient bits on its trained QAT model", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(plan_command(task, checkpoint), cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise RuntimeError(f"planning {task.name} failed: {lines[-1] if lines else ''}")
    (path.parent / "plan_table.txt").write_text(done.stdout)
    return path


def epochs(task: Task, config: Config) -> int:
    return task.epochs * (LONG_FACTOR if config.kind == "schedule" else 1)


def command(task: Task, config: Config, seed: int, resume: bool = True) -> list[str]:
    """The run's ``fqtorch train`` command; ``--resume`` while its checkpoint exists (unless
    ``resume`` is false: the full command, for the summary). A run directory whose saved
    configuration has another number of epochs (a run of an older schedule) is refused: a resume
    keeps its own schedule, so it would be summarized under this one."""
    out = run_dir(task, config, seed)
    base = [sys.executable, "-m", "fqtorch", "train"]
    if resume and (out / "checkpoint.pt").exists():
        saved = json.loads((out / "config.json").read_text())["config"]["epochs"]
        if saved != epochs(task, config):
            raise RuntimeError(
                f"{out} holds a run of {saved} epochs, but {task.name} {config.name} trains "
                f"{epochs(task, config)}: move that directory away (an older schedule's run) "
                "and run this again"
            )
        return [*base, "--resume", str(out), "--quiet"]
    return [
        *base,
        *task.flags,
        "--preset",
        config.preset,
        *config.flags,
        *(("--bits-plan", str(plan_path(task))) if config.kind in ("plan", "adaptive") else ()),
        *(task.adaptive_flags if config.kind == "adaptive" else ()),
        "--epochs",
        str(epochs(task, config)),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--quiet",
    ]


def environment(threads: int | None = None) -> dict[str, str]:
    """Versions, CPU and commit; ``threads``: the run's own thread count where it was set for
    it (``--jobs``), else this process's."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": str(threads or torch.get_num_threads()),
        "commit": commit,
    }


def started_with(out: Path, task: Task, config: Config) -> dict[str, Any]:
    """The code a run started with and, where it changed, resumed with (the run's own
    ``config.json``: ``-dirty`` marks uncommitted changes), and the sha256 of the plan file it
    trained with: what reproduces it, where ``environment()``'s ``commit`` is the checkout's at
    the end."""
    record = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    first = record.get("git_commit")
    resumed = [r.get("git_commit") for r in record.get("resumes", [])]
    found: dict[str, Any] = {"started_commit": first[:7] + first[40:] if first else None}
    if any(c != first for c in resumed):
        found["resumed_commits"] = sorted({c[:7] + c[40:] for c in resumed if c and c != first})
    if config.kind in ("plan", "adaptive"):
        found["plan_sha256"] = hashlib.sha256(plan_path(task).read_bytes()).hexdigest()
    return found


def train(task: Task, config: Config, seed: int, threads: int | None = None) -> dict:
    """Run (or resume) one training run to its end and write its summary; ``threads``: the
    run's ``OMP_NUM_THREADS`` (None: inherited)."""
    out = run_dir(task, config, seed)
    full = command(task, config, seed, resume=False)  # before a fresh run writes a checkpoint
    cmd = command(task, config, seed)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - started
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode in (130, 143):
        raise KeyboardInterrupt(error)
    # fqtorch train's own exit status for a stop on a non-finite loss, gradient, weight or
    # validation loss (its message varies; the status does not)
    diverged = done.returncode == EXIT_DIVERGED
    if done.returncode != 0 and not diverged:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {error}")
    # a run that diverged within its first epoch logged none
    logged = out / "metrics.jsonl"
    lines = (
        [json.loads(line) for line in logged.read_text().splitlines()] if logged.exists() else []
    )
    # epoch lines (adaptive precision also logs {"event": "precision", ...} lines, kept apart)
    metrics = [m for m in lines if "event" not in m]
    events = [m for m in lines if m.get("event") == "precision"]
    final = {} if diverged else json.loads((out / "final.json").read_text())
    if not diverged and final.get("epochs") != epochs(task, config):
        raise RuntimeError(
            f"{out} finished after {final.get('epochs')} epochs, not the {epochs(task, config)} "
            f"of {task.name} {config.name}: not summarized"
        )
    summary = {
        "task": task.name,
        "config": config.name,
        "preset": config.preset,
        "flags": list(config.flags),
        "kind": config.kind,
        "quantizer": config.quantizer,
        "bits": config.bits,
        "seed": seed,
        "diverged": diverged,
        "error": error if diverged else "",
        "final": {k: final[k] for k in ("val_loss", "val_acc", "epochs") if k in final},
        "curve": [
            {k: m[k] for k in ("epoch", "steps", "train_loss", "val_loss", "val_acc", "seconds")}
            for m in metrics
        ],
        "precision_events": events,
        "train_seconds": sum(m["seconds"] for m in metrics),
        "wall_seconds_last_invocation": seconds,
        # the full command (not the --resume of a run continued across sessions), with paths
        # relative to the repository: the same command on any checkout
        "command": " ".join(full[1:]).replace(f"{ROOT}/", ""),
        "environment": {**environment(threads), **started_with(out, task, config)},
    }
    path = summary_path(task, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    return summary


# What `fqtorch variance` writes last: its results are complete when this exists (variance.json
# is written before the profile, so an interrupted measurement leaves it alone).
VARIANCE_DONE = "variance_details.json"


def measure_variance(task: Task, force: bool = False) -> Path | None:
    """``fqtorch variance`` on the task's trained QAT model of seed 0 (the plan's model too)."""
    out = RESULTS / task.name / "variance"
    checkpoint = run_dir(task, QAT, 0) / "checkpoint.pt"
    if (out / VARIANCE_DONE).exists() and not force:
        return out
    if not checkpoint.exists():
        return None
    cmd = [
        sys.executable, "-m", "fqtorch", "variance", "--checkpoint", str(checkpoint),
        *task.variance_flags, "--quantizers", ",".join(QUANTIZERS),
        "--bits", ",".join(map(str, BITS)), "--profile", "bhq:4", "--out", str(out),
        "--overwrite",  # an unfinished measurement's files (or, with force, a finished one's)
    ]  # fmt: skip
    print(f"measuring the variance of {task.name}'s trained QAT model", file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


# ------------------------------------------------------------------------------------- report
def load(task: Task) -> dict[str, list[dict]]:
    """Summaries by configuration name."""
    by_config: dict[str, list[dict]] = {}
    for path in sorted((RESULTS / task.name).glob("*_s*.json")):
        summary = json.loads(path.read_text())
        by_config.setdefault(summary["config"], []).append(summary)
    return by_config


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(runs: list[dict], key: str, scale: float = 1.0, digits: int = 3) -> str:
    """mean ± std over the finished runs; diverged runs are counted, not averaged."""
    values = [scale * r["final"][key] for r in runs if not r["diverged"]]
    diverged = sum(r["diverged"] for r in runs)
    if not values:
        return f"diverged ({diverged}/{len(runs)})"
    mean, std = mean_std(values)
    # one finished seed has no spread to report (not a spread of 0)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
    if diverged:
        text += f" ({diverged}/{len(runs)} diverged)"
    return text


# ------------------------------------------------------------- planned precision and formats
MATCH_RULE = (
    "a configuration **matches QAT** when none of its seeds diverged and its mean is no worse "
    "than QAT's by more than the larger of the two standard deviations (over seeds): "
    "worse by ≤ max(std, std_QAT), where worse is mean_QAT − mean for accuracy and "
    "mean − mean_QAT for loss (better than QAT by any margin matches: one rule for every row, "
    "the plan's too)"
)
HIGHER_IS_BETTER = {"val_acc"}
_GRAD_FLAGS = {
    "--grad-quantizer": "grad_quantizer",
    "--grad-bits": "grad_bits",
    "--grad-weight-quantizer": "grad_weight_quantizer",
    "--grad-weight-bits": "grad_weight_bits",
}


def gradient_choices(config: Config) -> dict[str, tuple[str, int]]:
    """The (quantizer, bits) of both backward branches that a preset configuration gives every
    layer: its preset with its flags; an exact branch is ``identity`` (32-bit float)."""
    from fqtorch import FQTConfig

    fields = {}
    for flag, value in itertools.pairwise(config.flags):
        if flag in _GRAD_FLAGS:
            fields[_GRAD_FLAGS[flag]] = int(value) if flag.endswith("bits") else value
    fqt = FQTConfig.preset(config.preset).replace(**fields)
    if fqt.grad_quantizer is None:
        return {"grad": ("identity", 32), "grad_weight": ("identity", 32)}
    weight = fqt.grad_weight_quantizer or "identity"
    return {
        "grad": (fqt.grad_quantizer, fqt.grad_bits),
        "grad_weight": (weight, fqt.grad_weight_bits),
    }


def layer_macs(plan: dict) -> dict[str, dict[str, int]]:
    """Per layer and branch, the backward GEMM's multiply-accumulates that ``fqtorch plan``
    measured (0: the GEMM does not run, the first layer's ``grad_input``)."""
    return {
        layer["name"]: {b: int(layer.get(f"{b}_macs", 0)) for b in BRANCHES}
        for layer in plan["layers"]
    }


def average_bits(macs: dict[str, dict[str, int]], bits: dict[str, dict[str, float]]) -> float:
    """GEMM-size-weighted mean gradient bits over every layer and both backward branches:
    Σ macs × bits per element / Σ macs (plan.py's cost model without the other operand)."""
    num = den = 0.0
    for name, sizes in macs.items():
        for branch in BRANCHES:
            num += sizes[branch] * bits[name][branch]
            den += sizes[branch]
    if den == 0:
        raise ValueError("average_bits: every GEMM size is 0 (expected a plan's layer sizes)")
    return num / den


def uniform_bits(macs: dict[str, dict[str, int]], config: Config) -> float:
    """A preset configuration's average bits: its two branch choices in every layer."""
    from fqtorch.stats.plan import bits_per_element

    choice = gradient_choices(config)
    per_branch = {b: bits_per_element(*choice[b]) for b in BRANCHES}
    return average_bits(macs, {name: per_branch for name in macs})


def plan_bits(plan: dict) -> dict[str, dict[str, float]]:
    """Per layer and branch, the bits per element of the plan's choice."""
    from fqtorch.stats.plan import bits_per_element

    return {
        layer["name"]: {
            "grad": bits_per_element(layer["grad_quantizer"], layer["grad_bits"]),
            "grad_weight": bits_per_element(
                layer["grad_weight_quantizer"], layer["grad_weight_bits"]
            ),
        }
        for layer in plan["layers"]
    }


def bits_timeline(plan: dict, events: list[dict]) -> list[tuple[int, dict[str, list[int]]]]:
    """``(step, {layer: [grad_bits, grad_weight_bits]})`` from the start (step 0, the plan) and
    after each re-plan that changed something (its ``{"event": "precision"}`` lines); an event
    whose ``bits`` are not the layer's bits at that point is an error (events out of order or
    from another plan)."""
    current = {la["name"]: [la["grad_bits"], la["grad_weight_bits"]] for la in plan["layers"]}
    timeline = [(0, {k: list(v) for k, v in current.items()})]
    for step, group in itertools.groupby(
        sorted(events, key=lambda e: e["step"]), key=lambda e: e["step"]
    ):
        for event in group:
            layer = event["layer"]
            if layer not in current or list(event["bits"]) != current[layer]:
                raise ValueError(
                    f"precision event at step {step}: layer {layer!r} bits {event['bits']} "
                    f"expected {current.get(layer)} (events of another plan?)"
                )
            current[layer] = list(event["new_bits"])
        timeline.append((step, {k: list(v) for k, v in current.items()}))
    return timeline


def timeline_bits(plan: dict, events: list[dict]) -> list[tuple[int, float]]:
    """``(step, average bits)`` at the start and after each re-plan (``bits_timeline``), each the
    GEMM-size-weighted mean of ``average_bits``; the quantizers are the plan's (or an event's)."""
    from fqtorch.stats.plan import bits_per_element

    macs = layer_macs(plan)
    quantizers = {
        la["name"]: [la["grad_quantizer"], la["grad_weight_quantizer"]] for la in plan["layers"]
    }
    out = []
    for step, bits in bits_timeline(plan, events):
        for event in events:
            if event["step"] == step and event.get("quantizers"):
                quantizers[event["layer"]] = list(event["quantizers"])
        per_layer = {
            name: {
                b: bits_per_element(q, width)
                for b, q, width in zip(BRANCHES, quantizers[name], bits[name], strict=True)
            }
            for name in bits
        }
        out.append((step, average_bits(macs, per_layer)))
    return out


def adaptive_bits(plan: dict, events: list[dict], steps: int) -> float:
    """The average bits of an adaptive run over its ``steps`` training steps: each step's
    average bits (a re-plan at step s applies from step s + 1), averaged over the steps."""
    timeline = timeline_bits(plan, events)
    if steps <= 0 or timeline[-1][0] > steps:
        raise ValueError(f"adaptive_bits: {steps} steps, but an event at step {timeline[-1][0]}")
    ends = [step for step, _ in timeline[1:]] + [steps]
    pieces = zip(timeline, ends, strict=True)
    return sum((end - start) * bits for (start, bits), end in pieces) / steps


def matches_qat(runs: list[dict], qat: list[dict], key: str) -> bool | None:
    """``MATCH_RULE``; ``None`` when either side has fewer than 2 finished seeds."""
    if any(r["diverged"] for r in runs):
        return False
    values = [r["final"][key] for r in runs]
    reference = [r["final"][key] for r in qat if not r["diverged"]]
    if len(values) < 2 or len(reference) < 2:
        return None
    (mean, std), (mean_qat, std_qat) = mean_std(values), mean_std(reference)
    worse = mean_qat - mean if key in HIGHER_IS_BETTER else mean - mean_qat
    return worse <= max(std, std_qat)


def run_bits(config: Config, runs: list[dict], plan: dict | None) -> float | None:
    """A configuration's average gradient bits (the mean over its runs for adaptive)."""
    if plan is None:
        return None
    if config.kind == "plan":
        return average_bits(layer_macs(plan), plan_bits(plan))
    if config.kind == "adaptive":
        values = [
            adaptive_bits(plan, r.get("precision_events", []), r["curve"][-1]["steps"])
            for r in runs
            if r["curve"]
        ]
        return statistics.mean(values) if values else None
    return uniform_bits(layer_macs(plan), config)


def comparison(task: Task, runs: dict[str, list[dict]], plan: dict | None) -> list[str]:
    """QAT, the uniform presets, the formats, the plan and adaptive: the metric, whether it
    matches QAT, the average gradient bits; then the claim, held or not, with its numbers."""
    scale, digits = (100, 2) if task.metric == "val_acc" else (1, 4)
    label = "val accuracy (%)" if task.metric == "val_acc" else "val loss (nats/char)"
    qat = runs.get("qat", [])
    qat_values = [r["final"][task.metric] for r in qat if not r["diverged"]]
    lines = [
        f"Matching rule: {MATCH_RULE}. Average gradient bits: Σ over layers and both backward "
        "branches of GEMM multiply-accumulates × the gradient's bits per element, over Σ "
        "multiply-accumulates (docs/method.md §11's cost model without the other operand's "
        "bits; 32 for an exact branch; block formats count their scales); the same GEMM sizes "
        f"(the plan's, at the training batch size) for every row; adaptive: averaged over its "
        "training steps from its precision events, then over seeds. The claim is about the "
        "gradients' bits alone: the forwards differ (int8 for QAT, the plans and the integer "
        "presets; the formats' own for the format presets: MXFP8 for mxfp4_sr, NVFP4 for "
        "nvfp4_sr), and with §11's full cost (× the other operand's bits) a format preset with "
        "a 4-bit forward can cost less than a plan over an 8-bit one.",
        "",
        f"| configuration | kind | {label} | Δ vs QAT | matches QAT | avg gradient bits |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows: dict[str, tuple[Config, bool | None, float | None]] = {}
    # uniform and format rows not decided (not run, or fewer than 2 seeds), with their bits
    pending: dict[str, float] = {}
    for config in configs():
        rs = runs.get(config.name)
        undecided = not rs or matches_qat(rs, qat, task.metric) is None
        if plan is not None and config.kind in ("uniform", "format") and undecided:
            pending[config.name] = uniform_bits(layer_macs(plan), config)
        if not rs or config.name == "exact":
            continue
        bits = run_bits(config, rs, plan)
        match = matches_qat(rs, qat, task.metric) if config.name != "qat" else None
        rows[config.name] = (config, match, bits)
        values = [r["final"][task.metric] for r in rs if not r["diverged"]]
        delta = (
            f"{scale * (statistics.mean(values) - statistics.mean(qat_values)):+.{digits}f}"
            if values and qat_values and config.name != "qat"
            else "—"
        )
        said = {True: "yes", False: "no", None: "—"}[match]
        bits_text = "—" if bits is None else f"{bits:.2f}"
        lines.append(
            f"| {config.name} | {config.kind} | {cell(rs, task.metric, scale, digits)} | {delta} "
            f"| {said} | {bits_text} |"
        )
    if plan is None:
        lines += ["", "Claim (plan/adaptive match QAT with fewer average bits than the smallest "
                  "matching uniform preset): not decided — the task's plan (and with it the "
                  "GEMM sizes the average bits weigh by) is not made yet."]  # fmt: skip
    else:
        seeds = {name: sum(not r["diverged"] for r in runs.get(name, [])) for name in rows}
        lines += ["", *claim_lines(rows, pending, measuring_cost(task), seeds)]
    return lines


def measuring_cost(task: Task) -> tuple[int, int, int]:
    """An adaptive run's extra backward passes: every ``--variance-every`` K steps the monitor
    (``fqtorch.stats.VarianceMonitor``, the training loop's defaults) runs one exact backward
    pass of the batch (the QAT gradient the quantized draws are centred on), ``samples``
    quantized passes at the current bits, and ``micro_batches`` exact passes of
    1/``micro_batches`` of the batch: two batches at 32 bits in all. The controller's probes
    (``PrecisionController.probe``) add ``probe_samples`` passes with only the weight-gradient
    GEMMs quantized and ``probe_samples`` with one grad branch quantized (counted at 32 bits).
    Returns ``(K, samples, probe_samples)``."""
    from fqtorch.stats import PrecisionController, VarianceMonitor

    flags = task.adaptive_flags
    every = int(flags[flags.index("--variance-every") + 1])
    samples = inspect.signature(VarianceMonitor).parameters["samples"].default
    probes = inspect.signature(PrecisionController).parameters["probe_samples"].default
    return every, samples, probes


def with_measurements(bits: float, every: int, samples: int, probes: int) -> float:
    """Average bits per backward multiply-accumulate, the measurements counted
    (``measuring_cost``): per K steps, K + ``samples`` batches at ``bits``, two at 32,
    ``probes`` with half the GEMMs at ``bits`` and half at 32, and ``probes`` at 32 (the two
    backward GEMMs of a layer have the same size)."""
    spent = (every + samples) * bits + 2 * 32.0 + probes * (bits + 32.0) / 2 + probes * 32.0
    return spent / (every + samples + 2 + 2 * probes)


def claim_lines(
    rows: dict[str, tuple[Config, bool | None, float | None]],
    pending: dict[str, float] | None = None,
    cost: tuple[int, int, int] | None = None,
    seeds: dict[str, int] | None = None,
) -> list[str]:
    """Whether plan and adaptive match QAT with fewer average bits than the smallest matching
    uniform configuration (the quantizer × bits grid, the low-bit rows and the formats).

    ``pending``: uniform and format rows not decided yet (not run, or fewer than 2 seeds), with
    their bits; one at no more bits than the plan's leaves the claim not decided, since it could
    still match. ``cost``: the adaptive run's measurements (``measuring_cost``), for the same
    comparison with them counted. ``seeds``: runs per row, said where a compared row has
    fewer than 3."""
    pending = pending or {}
    seeds = seeds or {}

    def runs_of(name: str) -> str:
        n = seeds.get(name, 3)
        return f" ({n} seeds)" if n < 3 else ""

    by_name = {c.name: c for c in configs()}
    uniform = {
        name: bits
        for name, (config, match, bits) in rows.items()
        if config.kind in ("uniform", "format") and match and bits is not None
    }
    grid_only = {n: b for n, b in uniform.items() if not rows[n][0].flags}
    best = min(uniform, key=uniform.get) if uniform else None
    smallest = (
        f"the smallest matching is {best} at {uniform[best]:.2f} bits{runs_of(best)}"
        if best
        else "none of those decided matches"
    )
    lines = [
        "Claim: *the plan and the adaptive plan match QAT with fewer average gradient bits than "
        "the smallest uniform configuration that matches it* (uniform: the quantizer × bits "
        f"grid, the low-bit rows and the formats; {smallest}"
        + (
            f"; of the library's presets alone, {min(grid_only, key=grid_only.get)} at "
            f"{min(grid_only.values()):.2f}{runs_of(min(grid_only, key=grid_only.get))}"
            if grid_only
            else ""
        )
        + "):",
        "",
    ]
    for name in ("plan", "adaptive"):
        if name not in rows or rows[name][2] is None:
            lines.append(f"- {name}: not run yet.")
            continue
        _, match, bits = rows[name]
        if match is None:
            lines.append(f"- {name}: not decided — fewer than 2 finished seeds.")
            continue
        if not match:
            lines.append(f"- {name}: **not held** — does not match QAT.")
            continue
        presets = {n: b for n, b in uniform.items() if not rows[n][0].flags}
        waiting = {n: b for n, b in pending.items() if not by_name[n].flags}
        lines.append(
            f"- {name}: {_verdict(bits, uniform, pending)}; against the library's presets "
            f"alone (no flags: the quantizer × bits presets and the formats; not RHT, which "
            f"takes --grad-quantizer), "
            f"{_verdict(bits, presets, waiting)}."
        )
        if name == "adaptive" and cost is not None:
            every, samples, probes = cost
            counted = with_measurements(bits, every, samples, probes)
            lines.append(
                f"  Counting its variance measurements too (every {every} steps, {samples} "
                f"quantized backward passes, two batches of exact ones and {2 * probes} probe "
                f"passes: {counted:.2f} bits per backward multiply-accumulate): "
                f"{_verdict(counted, uniform, pending)}."
            )
    return lines


def _verdict(bits: float, uniform: dict[str, float], pending: dict[str, float]) -> str:
    """held / not held / not decided for a configuration that matches QAT at ``bits``."""
    beaten = {n: b for n, b in uniform.items() if b <= bits}
    if beaten:
        name = min(beaten, key=beaten.get)
        return f"**not held** — {bits:.2f} bits ≥ {beaten[name]:.2f} ({name})"
    undecided = sorted(n for n, b in pending.items() if b <= bits)
    if undecided:
        return (
            f"not decided — {bits:.2f} bits, but {', '.join(undecided)} (no more bits) "
            "could still match: fewer than 2 finished seeds"
        )
    if not uniform:
        return f"**held** — {bits:.2f} bits; no uniform configuration matches QAT"
    best = min(uniform.values())
    return f"**held** — {bits:.2f} bits < {best:.2f}"


def plan_layers_table(plan: dict) -> list[str]:
    """The fixed plan per layer: GEMM sizes, choices, variance shares (predicted, measured)."""
    sampling = plan["sampling_variance"]

    def share(layer: dict, branch: str, what: str) -> str:
        value = layer.get(f"{branch}_{what}_variance")
        return "—" if value is None else f"{value / sampling:.3g}"

    lines = [
        f"Fixed plan (budget {plan['budget']}; quantization variance / sampling variance: "
        f"predicted {plan['predicted_quantization_variance'] / sampling:.3g}, measured with all "
        f"branches on {plan['measured_quantization_variance'] / sampling:.3g}; feasible "
        f"{plan.get('feasible')}):",
        "",
        "| layer | grad_input GEMM MACs | grad_input | share pred. / meas. | weight-grad GEMM MACs "
        "| weight grad | share pred. / meas. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    from fqtorch.stats.plan import choice_label

    for la in plan["layers"]:
        grad = choice_label(la["grad_quantizer"], la["grad_bits"])
        weight = choice_label(la["grad_weight_quantizer"], la["grad_weight_bits"])
        lines.append(
            f"| {la['name']} | {la.get('grad_macs', 0):,} | {grad} | "
            f"{share(la, 'grad', 'predicted')} / "
            f"{share(la, 'grad', 'measured')} | {la.get('grad_weight_macs', 0):,} | {weight} | "
            f"{share(la, 'grad_weight', 'predicted')} / {share(la, 'grad_weight', 'measured')} |"
        )
    return lines


def adaptive_figure(task: Task, runs: list[dict], plan: dict, path: Path) -> None:
    """Per-layer gradient bits of the adaptive runs over training (seed 0: both branches; every
    seed: the average bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["seed"])
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 7.6), sharex=True)
    first = runs[0]
    steps = first["curve"][-1]["steps"]
    timeline = bits_timeline(plan, first.get("precision_events", []))
    names = [la["name"] for la in plan["layers"]]
    for i, name in enumerate(names):
        xs = [s for s, _ in timeline] + [steps]
        for ax, b in zip(axes[:2], (0, 1), strict=True):
            ys = [bits[name][b] for _, bits in timeline]
            offset = 0.06 * (i - (len(names) - 1) / 2)  # overlapping lines stay apart
            ax.step(xs, [y + offset for y in [*ys, ys[-1]]], where="post", label=name,
                    color=f"C{i % 10}", lw=1.4)  # fmt: skip
    from matplotlib.ticker import MaxNLocator

    every = [w for _, bits in timeline for pair in bits.values() for w in pair]
    for ax in axes[:2]:
        ax.set_ylim(min(every) - 0.6, max(every) + 0.6)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("grad_input bits")
    axes[1].set_ylabel("weight-gradient bits")
    axes[0].set_title(
        f"{task.name}: adaptive precision, seed {first['seed']} (per layer; lines offset a little "
        "to stay apart)",
        fontsize=10,
    )
    axes[0].legend(fontsize=7, ncol=2 if len(names) > 6 else 1, loc="upper right")
    for r in runs:
        line = timeline_bits(plan, r.get("precision_events", []))
        xs = [step for step, _ in line] + [r["curve"][-1]["steps"]]
        ys = [bits for _, bits in line]
        axes[2].step(xs, [*ys, ys[-1]], where="post", label=f"seed {r['seed']}")
    axes[2].set_ylabel("average gradient bits")
    axes[2].set_xlabel("training step")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(task: Task, runs: dict[str, list[dict]]) -> str:
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; mean ± std over the seeds each row has (`runs`; "
        "a row with one run shows no spread).",
        provenance(runs),
        flatness(task, runs),
        cost(task, runs),
        "",
    ]
    machines = collections.Counter(  # the same model name covers AVX-512 and AVX2-only hosts
        f"{r.get('environment', {}).get('cpu', 'unknown CPU')} "
        f"({r.get('environment', {}).get('cpu_capability', 'capability unknown')}, "
        f"{r.get('environment', {}).get('threads', '?')} threads)"
        for rs in runs.values()
        for r in rs
    )
    lines[-1:-1] = [
        "Machines (each run's summary, `environment`): "
        + "; ".join(f"{n} run(s) on {cpu}" for cpu, n in sorted(machines.items()))
        + "."
    ]
    if task.metric == "val_loss":
        lines += ["| configuration | val loss (nats/char) | bits per character | runs |"]
        lines += ["| --- | --- | --- | --- |"]
    else:
        lines += [
            "| configuration | val accuracy (%) | val loss | runs |",
            "| --- | --- | --- | --- |",
        ]
    for config in configs():
        rs = runs.get(config.name)
        if not rs:
            continue
        if task.metric == "val_loss":
            row = [cell(rs, "val_loss"), cell(rs, "val_loss", 1 / math.log(2))]
        else:
            row = [cell(rs, "val_acc", 100, 2), cell(rs, "val_loss", digits=4)]
        lines.append(f"| {config.name} | {' | '.join(row)} | {len(rs)} |")
    return "\n".join(lines)


def corpus(runs: dict[str, list[dict]]) -> str:
    """What ``--dataset text`` trains on: this interpreter's copy, said to be the runs' own
    only where their summaries name the same Python version."""
    from fqtorch.data.datasets import default_corpus
    from fqtorch.train.config import TrainConfig

    path = default_corpus()
    text = path.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    versions = {r.get("environment", {}).get("python") for rs in runs.values() for r in rs}
    here = platform.python_version()
    caveat = (
        ""
        if versions == {here}
        else f" (measured here; the runs used Python {', '.join(sorted(map(str, versions)))}, "
        "whose file may differ)"
    )
    return (
        f"Corpus{caveat}: `pydoc_data/topics.py` of Python {here}'s standard "
        f"library (the Python documentation's topics: English prose and code), "
        f"{path.stat().st_size:,} bytes, {len(text):,} characters, {len(set(text))} distinct; "
        f"the first 90% ({cut:,} characters) train, the last 10% ({len(text) - cut:,}) "
        f"validate, in blocks of {TrainConfig.block_size} characters. Another Python version "
        "ships a different file; `--dataset text --data-dir FILE` trains on any UTF-8 text."
    )


def provenance(runs: dict[str, list[dict]]) -> str:
    """Which code and versions the summaries came from (each records its own)."""
    envs = [r.get("environment", {}) for rs in runs.values() for r in rs]

    def counted(key: str, fallback: str | None = None) -> str:
        counts = collections.Counter(
            e.get(key) or (e.get(fallback) if fallback else None) or "unknown" for e in envs
        )
        return ", ".join(f"`{v}` ({n})" for v, n in sorted(counts.items()))

    resumed = sum(bool(e.get("resumed_commits")) for e in envs)
    older = sum("started_commit" not in e for e in envs)
    return (
        f"Code (each summary's `environment.started_commit`: the commit the run started from, "
        f"`-dirty` with uncommitted changes; runs per commit): "
        f"{counted('started_commit', 'commit')}"
        + (f"; {resumed} resumed under other code (`resumed_commits`)" if resumed else "")
        + (
            f"; {older} summaries from before the start was recorded name the checkout's commit "
            "when they were written (`commit`), which can postdate the run's start"
            if older
            else ""
        )
        + f"; torch {counted('torch')}; Python {counted('python')}."
    )


SEEDS = (0, 1, 2)  # the grid's seeds (the tables' target)


def cost(task: Task, runs: dict[str, list[dict]]) -> str:
    """What the grid has cost so far and what is left, in training time (each summary's
    ``train_seconds``, summed over its invocations; machines and load differ)."""
    done = [r for name, rs in runs.items() if name != LONG.name for r in rs]
    hours = sum(r.get("train_seconds", 0.0) for r in done) / 3600
    missing = len(configs()) * len(SEEDS) - sum(
        1 for c in configs() for r in runs.get(c.name, []) if r["seed"] in SEEDS
    )
    line = f"Cost: {len(done)} runs, {hours:.1f} h of training in all"
    check = runs.get(LONG.name, [])
    if check:
        check_hours = sum(r.get("train_seconds", 0.0) for r in check) / 3600
        line += f" (and the schedule check, {check_hours:.1f} h)"
    if task.archived:
        return line + f"; archived: the other {missing} runs will not be trained."
    if missing and done:
        # the runs left are not typical ones (the slow formats tend to be last): each at its
        # own configuration's median time, the overall median only where none has run
        # a diverged run's time says nothing of a finished one's (one that diverged in its
        # first epoch logged none)
        finished = [r.get("train_seconds", 0.0) for r in done if not r.get("diverged")]
        median = statistics.median(finished or [0.0]) / 3600
        hours_left, unknown = 0.0, 0
        for c in configs():
            have = [
                r.get("train_seconds", 0.0) for r in runs.get(c.name, []) if not r.get("diverged")
            ]
            left = sum(1 for seed in SEEDS if seed not in {r["seed"] for r in runs.get(c.name, [])})
            hours_left += left * (statistics.median(have) / 3600 if have else median)
            unknown += 0 if have else left
        line += (
            f"; {missing} of the {len(configs()) * len(SEEDS)} runs (seeds "
            f"{', '.join(map(str, SEEDS))}) still to go, ≈ {hours_left:.1f} h more (each at its "
            "configuration's median time"
            + (
                f"; {unknown} with none yet at the median run's {60 * median:.0f} min"
                if unknown
                else ""
            )
            + ")"
        )
    return line + "."


FLAT = 0.01  # a validation curve is flat when its last epoch changed it by less than this


def flatness(task: Task, runs: dict[str, list[dict]]) -> str:
    """Whether QAT's validation loss has flattened: its relative fall over the last epoch, per
    seed, against ``FLAT``."""
    falls = [
        (r["curve"][-2]["val_loss"] - r["curve"][-1]["val_loss"]) / r["curve"][-2]["val_loss"]
        for r in runs.get("qat", [])
        if not r["diverged"] and len(r["curve"]) >= 2
    ]
    if not falls:
        return "QAT's curve: no finished run with two epochs."
    text = ", ".join(f"{100 * f:+.1f}%" for f in falls)
    flat = all(abs(f) < FLAT for f in falls)
    still = (
        "QAT was still improving when training ended"
        if all(f > 0 for f in falls)
        else "QAT's last epoch moved it by more than that"
    )
    return (
        f"Schedule: {task.epochs} epochs. QAT's validation loss changed over the last epoch by "
        f"{text} (one per seed; + is a fall, − a rise); the rule here calls a curve flat when the "
        f"last epoch moves it by less than {100 * FLAT:.0f}% either way: "
        + ("**flat**." if flat else f"**not flat**: {still}.")
        + f" {schedule_check(task, runs)}"
    )


def schedule_check(task: Task, runs: dict[str, list[dict]]) -> str:
    """QAT seed 0 on the task's schedule against the same seed on ``LONG_FACTOR`` times it: the
    schedule is long enough when the longer run, at its best evaluation, improves on the shorter
    one's final value by less than a threshold: the larger of QAT's spread over its seeds (a gain
    below it cannot be told from seed noise) and ``FLAT`` of the loss, or of the error rate for
    accuracy (1% of an accuracy near 100% is more than any run can gain). Checked in validation
    loss on every task and also in accuracy where that is the headline metric; long enough only
    when it holds in each. At its best: a run that dips lower and overfits back up still says
    the schedule was too short."""
    long_epochs = epochs(task, LONG)
    long = [r for r in runs.get(LONG.name, []) if r["seed"] == 0]
    if not long:
        return (
            f"The schedule check (QAT seed 0 on {long_epochs} epochs: `python experiments/"
            f"reproduce.py --tasks {task.name} --configs {LONG.name} --seeds 0`) has not run yet."
        )
    base = [r for r in runs.get("qat", []) if r["seed"] == 0]
    if not base:
        return f"The schedule check ran, but QAT seed 0 on {task.epochs} epochs has not."
    if long[0]["diverged"] or base[0]["diverged"]:
        return f"The schedule check: QAT seed 0 diverged on {long_epochs} or {task.epochs} epochs."
    keys = ["val_loss"] + (["val_acc"] if task.metric == "val_acc" else [])
    parts, short_enough = [], []
    for key in keys:
        text, still = _schedule_gain(task, runs, base[0], long[0], key)
        parts.append(text)
        short_enough.append(still)
    if any(short_enough):
        verdict = (
            "**not long enough**"
            + (" in validation loss" if short_enough == [True, False] else "")
            + ": a longer schedule improves QAT by more than that, so the rows compare runs "
            "that were still improving"
        )
    else:
        verdict = "**long enough**"
    return (
        f"Schedule check: QAT seed 0 on {long_epochs} epochs (`qat_long`, same steps per epoch "
        f"and learning-rate shape) against {task.epochs}; {'; '.join(parts)}. The "
        f"{task.epochs}-epoch schedule counts as long enough when each gain is below the larger "
        f"of QAT's std and {100 * FLAT:.0f}% of the loss (of the error rate, for accuracy): it is "
        f"{verdict}."
    )


def _schedule_gain(
    task: Task, runs: dict[str, list[dict]], base: dict, long: dict, key: str
) -> tuple[str, bool]:
    """One metric of :func:`schedule_check`: its sentence, and whether the longer schedule
    gains more than the threshold."""
    sign = 1 if key == "val_acc" else -1  # + is better
    accuracy = key == "val_acc"
    name = "validation accuracy" if accuracy else "validation loss"

    def show(value: float, signed: bool = False) -> str:
        plus = "+" if signed else ""
        return f"{100 * value:{plus}.2f} %" if accuracy else f"{value:{plus}.4f}"

    short, final = base["final"][key], long["final"][key]
    best = max(long["curve"], key=lambda c: sign * c[key])
    gain = sign * (best[key] - short)  # + : the longer schedule did better
    seeds = [r["final"][key] for r in runs.get("qat", []) if not r["diverged"]]
    spread = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
    threshold = max(FLAT * ((1 - short) if accuracy else abs(short)), spread)
    overfits = sign * (best[key] - final) >= FLAT * abs(best[key])
    spread_text = f"std {show(spread)} over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
    return (
        f"{name} {show(best[key])} at its best (epoch {best['epoch']}), ending at {show(final)}"
        + (" (it overfits)" if overfits and gain < threshold else "")
        + f", against {show(short)}: {show(gain, signed=True)}, threshold {show(threshold)} "
        f"({spread_text})",
        gain >= threshold,
    )


def curves_figure(task: Task, runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # validation loss on every task (the figure); accuracy beside it where it is the
    # headline metric
    metrics = ["val_loss"] + (["val_acc"] if task.metric == "val_acc" else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.2), squeeze=False)
    names = ["qat", "ptq4", "psq4", "bhq4", "rht4"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        scale = 100 if metric == "val_acc" else 1
        for name in names:
            for i, r in enumerate(sorted(runs.get(name, []), key=lambda r: r["seed"])):
                steps = [c["steps"] for c in r["curve"]]
                values = [c[metric] * scale for c in r["curve"]]
                ax.plot(
                    steps,
                    values,
                    marker=".",
                    label=name if i == 0 else None,
                    alpha=0.8,
                    color=f"C{names.index(name)}",
                )
        for r in runs.get(LONG.name, [])[:1]:  # the schedule check, where it has run
            ax.plot(
                [c["steps"] for c in r["curve"]],
                [c[metric] * scale for c in r["curve"]],
                "k--",
                marker=".",
                lw=1,
                label=f"qat, {epochs(task, LONG)} epochs (seed 0)",
            )
        ax.set_xlabel("training step")
        ax.set_ylabel("validation loss" if metric == "val_loss" else "validation accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{task.name}: QAT and the 4-bit gradient quantizers\n(one line per seed, a point per "
        "evaluation)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bound_figure(variance: dict, path: Path) -> None:
    """Measured grad_output quantization error against its bound, per layer (4-bit quantizers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, quantizer in enumerate(QUANTIZERS):
        for r in variance["results"]:
            if r["quantizer"] == quantizer and r["bits"] == 4:
                layers = [la for la in r["layers"] if la["grad_output_error_bound"] > 0]
                ax.scatter(
                    [la["grad_output_error_bound"] for la in layers],
                    [la["grad_output_error"] for la in layers],
                    label=quantizer,
                    color=f"C{i + 1}",
                    s=16,
                )
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="error = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bound on E‖Q(∇) − ∇‖² (per layer)")
    ax.set_ylabel("measured")
    ax.set_title(f"{variance['model']}: measured error against bound, 4 bits")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def claims(task: Task, runs: dict[str, list[dict]], variance: dict | None) -> list[str]:
    """The paper's claims, checked on this task's numbers (what held and the number)."""
    rows = []

    def mean_of(name: str, key: str) -> float | None:
        values = [r["final"][key] for r in runs.get(name, []) if not r["diverged"]]
        return statistics.mean(values) if values else None

    def n(name: str) -> str:  # how many runs a mean is over (one run has no spread)
        return f"(n={sum(not r['diverged'] for r in runs.get(name, []))})"

    def diverged(name: str) -> int:
        return sum(r["diverged"] for r in runs.get(name, []))

    qat, bhq5 = mean_of("qat", task.metric), mean_of("bhq5", task.metric)
    if diverged("bhq5"):  # a diverged seed is no "within": said, not averaged away
        rows.append(
            f"| 5-bit BHQ within 0.5% of QAT | no | {diverged('bhq5')} of "
            f"{len(runs['bhq5'])} BHQ 5-bit runs diverged |"
        )
    elif qat is not None and bhq5 is not None:
        gap = (bhq5 - qat) / abs(qat) * (1 if task.metric == "val_loss" else -1)
        seeds = min(len(runs["bhq5"]), sum(not r["diverged"] for r in runs["qat"]))
        verdict = ("yes" if gap <= 0.005 else "no") if seeds >= 2 else "not decided (1 seed)"
        rows.append(
            f"| 5-bit BHQ within 0.5% of QAT | {verdict} | "
            f"{task.metric} {bhq5:.4f} {n('bhq5')} vs {qat:.4f} {n('qat')}: {100 * gap:+.2f}% "
            "(positive = worse) |"
        )
    low = min(BITS)
    names = {q: f"{q}{low}" for q in QUANTIZERS}
    if all(runs.get(name) for name in names.values()):
        sign = 1 if task.metric == "val_loss" else -1
        # worst first by the share of seeds diverged, then by the mean of the others; a tie
        # with PTQ (all diverged alike) or a single seed decides nothing
        share = {q: diverged(name) / len(runs[name]) for q, name in names.items()}
        mean = {q: mean_of(name, task.metric) for q, name in names.items()}
        worst = {
            q: (share[q], -math.inf if mean[q] is None else sign * mean[q]) for q in QUANTIZERS
        }
        first = max(QUANTIZERS, key=worst.get)
        tied = sum(worst[q] == worst[first] for q in QUANTIZERS) > 1
        values = ", ".join(
            f"{q} " + ("all diverged" if mean[q] is None else f"{mean[q]:.4f} {n(names[q])}")
            for q in QUANTIZERS
        )
        counts = {q: diverged(name) for q, name in names.items()}
        few = min(len(runs[name]) for name in names.values()) < 2
        verdict = (
            "not decided (1 seed)"
            if few
            else "not decided (tie)"
            if tied
            else ("yes" if first == "ptq" else "no")
        )
        rows.append(
            f"| low-bit PTQ fails first | {verdict} | "
            f"{low} bits, {task.metric}: {values}; diverged runs {counts} |"
        )
    if variance is not None:
        at = {(r["quantizer"], r["bits"]): r for r in variance["results"]}
        v4 = {q: at[(q, 4)]["quantization_variance"] for q in ("ptq", "psq", "bhq") if (q, 4) in at}
        if len(v4) == 3:
            held = v4["bhq"] <= v4["psq"] <= v4["ptq"]
            rows.append(
                f"| BHQ ≤ PSQ ≤ PTQ in variance | {'yes' if held else 'no'} | 4 bits, trained "
                f"QAT model: BHQ {v4['bhq']:.3g}, PSQ {v4['psq']:.3g}, PTQ {v4['ptq']:.3g} |"
            )
        # every layer's RMS z within its limit (max |z| is informational: heavy tails)
        passed = [
            r.get("bias_passed", r["bias_z_rms"] <= r["bias_z_limit"]) for r in variance["results"]
        ]
        zs = [r["bias_z_rms"] for r in variance["results"]]
        rows.append(
            f"| the FQT gradient is unbiased | {'yes' if all(passed) else 'no'} | "
            f"{sum(passed)}/{len(passed)} configurations pass the bias test; RMS z "
            f"{min(zs):.2f}–{max(zs):.2f} (≈ 1 when unbiased) |"
        )
        psq = sorted((b, r["quantization_variance"]) for (q, b), r in at.items() if q == "psq")
        pairs = [(b0, v0, b1, v1) for (b0, v0), (b1, v1) in itertools.pairwise(psq) if b1 <= 6]
        if pairs:
            factors = [(v0 / v1) ** (1 / (b1 - b0)) for b0, v0, b1, v1 in pairs]
            text = ", ".join(
                f"{b0}→{b1}: {f:.1f}×" for (b0, _, b1, _), f in zip(pairs, factors, strict=True)
            )
            held = all(2.5 <= f <= 6 for f in factors)
            rows.append(
                f"| variance falls ≈ 4× per bit | {'yes' if held else 'no'} | PSQ, per bit: "
                f"{text} (held: each within 2.5–6×) |"
            )
    return rows


def report(tasks: list[Task]) -> str:
    """Figures under docs/figures/results/ and the markdown of the tables and claims."""
    parts = []
    for task in tasks:
        runs = load(task)
        if not runs:
            continue
        variance_json = RESULTS / task.name / "variance" / "variance.json"
        done = (variance_json.parent / VARIANCE_DONE).exists()
        variance = json.loads(variance_json.read_text()) if done else None
        curves = FIGURES / f"{task.name}_curves.png"
        curves_figure(task, runs, curves)
        parts += [f"### {task.name}", ""]
        if task.archived:
            parts += [f"**Archived.** {task.archived}", ""]
        if "text" in task.flags:
            parts += [corpus(runs), ""]
        parts += [table(task, runs), ""]
        parts += [f"![{task.name} curves](figures/results/{curves.name})", ""]
        if variance is not None:
            bounds = FIGURES / f"{task.name}_error_vs_bound.png"
            bound_figure(variance, bounds)
            for png in ("variance_vs_bits.png", "variance_profile.png"):
                source = variance_json.parent / png
                if source.exists():
                    (FIGURES / f"{task.name}_{png}").write_bytes(source.read_bytes())
            parts += [
                f"![{task.name} variance against bits](figures/results/{task.name}_"
                "variance_vs_bits.png)",
                f"![{task.name} error against bound](figures/results/{bounds.name})",
                f"![{task.name} BHQ 4-bit variance profile](figures/results/{task.name}_"
                "variance_profile.png)",
                "",
            ]
        rows = claims(task, runs, variance)
        if rows:
            parts += ["| claim | held here | the number |", "| --- | --- | --- |", *rows, ""]
        parts += planned(task, runs)
    return "\n".join(parts)


def planned(task: Task, runs: dict[str, list[dict]]) -> list[str]:
    """The section on planned precision and the formats: the comparison with QAT and the claim,
    the fixed plan per layer, the adaptive plan's bits over training (a figure)."""
    path = plan_path(task)
    plan = json.loads(path.read_text()) if path.exists() else None
    parts = [f"#### {task.name}: planned precision and the formats", ""]
    if plan is not None:
        parts += [
            f"The fixed plan (`plan`) is `fqtorch plan` at budget {PLAN_BUDGET} measured on the "
            "trained QAT model of seed 0 (`fqtorch plan --checkpoint`; flags "
            f"`{' '.join(task.plan_flags)}`), saved as "
            f"`experiments/results/{task.name}/plan/plan.json` and trained with `--preset qat "
            f"--bits-plan` for every seed; `adaptive` starts from it and re-plans while training "
            f"(`{' '.join(task.adaptive_flags)}`)."
            + (f" {task.plan_note}" if task.plan_note else ""),
            "",
        ]
    parts += [*comparison(task, runs, plan), ""]
    if plan is not None:
        parts += [*plan_layers_table(plan), ""]
        adaptive = [r for r in runs.get("adaptive", []) if r["curve"]]
        if adaptive:
            figure = FIGURES / f"{task.name}_adaptive_bits.png"
            adaptive_figure(task, adaptive, plan, figure)
            parts += [
                f"![{task.name} adaptive bits](figures/results/{figure.name})",
                "",
                "The per-layer panels plot each branch's `bits` (a 4-bit format at 4), offset a "
                "little per layer; seeds whose bits move at the same steps draw over each other.",
                "",
            ]
    return parts


def write_report(markdown: str) -> None:
    text = RESULTS_MD.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{RESULTS_MD} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    RESULTS_MD.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


# --------------------------------------------------------------------------------------- main
def job_threads(jobs: int) -> int | None:
    """Each run's threads with ``jobs`` runs at a time: the cores this process may use (or a
    set ``OMP_NUM_THREADS``) split evenly, at least one; None (inherit) for one job at a
    time."""
    if jobs == 1:
        return None
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise SystemExit(f"OMP_NUM_THREADS={omp!r}: expected a positive whole number")
        total = int(omp)
    elif hasattr(os, "sched_getaffinity"):
        total = len(os.sched_getaffinity(0))
    else:
        total = os.cpu_count() or 1
    return max(1, total // jobs)


def run_all(pending: list[tuple[Task, Config, int]], jobs: int) -> None:
    """Train ``pending``, ``jobs`` runs at a time, a line per finished run. The plans the plan
    and adaptive runs take are made first. On a failure or Ctrl-C no new run starts; the
    running ones stop (Ctrl-C reaches them too) or finish, and the error is raised."""
    for t in {t.name: t for t, c, _ in pending if c.kind in ("plan", "adaptive")}.values():
        make_plan(t)  # trains QAT seed 0 first where it has to
    pending = [(t, c, s) for t, c, s in pending if not summary_path(t, c, s).exists()]
    threads = job_threads(jobs)
    if jobs > 1:
        print(f"{jobs} runs at a time, {threads} thread(s) each", file=sys.stderr)
    started, finished = time.perf_counter(), 0
    queue, running = list(pending), {}
    with ThreadPoolExecutor(jobs) as pool:  # leaving it waits for the running runs
        try:
            while queue or running:
                while queue and len(running) < jobs:  # a new run starts only after a success
                    t, c, s = queue.pop(0)
                    running[pool.submit(train, t, c, s, threads)] = (t, c, s)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                failed = None
                for future in done:
                    t, c, s = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        failed = failed or error
                        how = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
                        print(f"{t.name} {c.name} seed {s} {how}: {error}", file=sys.stderr)
                        continue
                    summary = future.result()
                    finished += 1
                    result = "diverged" if summary["diverged"] else (
                        f"{t.metric} {summary['final'][t.metric]:.4f}"
                    )  # fmt: skip
                    elapsed = time.perf_counter() - started
                    print(f"[{finished}/{len(pending)}] {t.name} {c.name} seed {s}: {result} "
                          f"({summary['train_seconds']:.0f} s; {elapsed / 60:.1f} min in all)",
                          file=sys.stderr)  # fmt: skip
                if failed is not None:
                    raise failed
        except BaseException:
            if running:
                names = ", ".join(f"{t.name} {c.name} seed {s}" for t, c, s in running.values())
                print(f"stopping: no new run starts; the running ones ({names}) finish, or on "
                      "Ctrl-C stop and resume from their checkpoints later",
                      file=sys.stderr)  # fmt: skip
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=list(TASKS),
        default=[name for name, task in TASKS.items() if not task.archived],
        help="the tasks to train (an archived task: --report-only or --list)",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--configs", nargs="+", help="only these configurations (names)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="runs at a time, each on the CPU count / JOBS threads (OMP_NUM_THREADS, if set, "
        "is split the same way); on 2 cores 2 one-thread char-GPT runs do ≈ 1.3× the work of one "
        "two-thread run (docs/results.md)",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="no training or measuring")
    parser.add_argument(
        "--no-variance", action="store_true",
        help="train only; leave the variance measurement (on QAT seed 0) to a later run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    tasks = [TASKS[t] for t in args.tasks]
    archived = [t.name for t in tasks if t.archived]
    check_only = args.configs == [LONG.name]  # an archived task's schedule check may still run
    if archived and not (args.report_only or args.list or check_only):
        parser.error(
            f"{', '.join(archived)} is archived (superseded, kept for its summaries): it is "
            f"reported, not trained (but for its schedule check, --configs {LONG.name}); use "
            "--report-only or --list, or a current task"
        )
    grid = [c for c in [*configs(), LONG] if not args.configs or c.name in args.configs]
    if args.configs and len(grid) != len(args.configs):
        known = ", ".join(c.name for c in [*configs(), LONG])
        parser.error(f"unknown configuration in {args.configs}; known: {known}")
    todo = [
        (t, c, s) for t in tasks for c in grid for s in args.seeds if c != LONG or s == 0
    ]  # fmt: skip
    if LONG in grid and 0 not in args.seeds:
        print(f"{LONG.name} (the schedule check) runs seed 0 only", file=sys.stderr)
    if args.list:
        for t, c, s in todo:
            state = "done" if summary_path(t, c, s).exists() else (
                "partial" if (run_dir(t, c, s) / "checkpoint.pt").exists() else "to run"
            )  # fmt: skip
            print(f"{t.name:<8}{c.name:<14}seed {s}  {state}")
        return 0
    if args.jobs < 1:
        parser.error(f"--jobs takes a positive number of runs at a time, not {args.jobs}")
    if not args.report_only:
        pending = [(t, c, s) for t, c, s in todo if not summary_path(t, c, s).exists()]
        print(f"{len(todo) - len(pending)} of {len(todo)} runs done; {len(pending)} to run",
              file=sys.stderr)  # fmt: skip
        try:
            run_all(pending, args.jobs)
            for t in tasks if not args.no_variance else ():
                measure_variance(t)
        except KeyboardInterrupt:
            print("interrupted: finished runs are summarized, the current ones resume from their "
                  "last checkpoints when this command runs again", file=sys.stderr)  # fmt: skip
            return 130
    write_report(report(list(TASKS.values())))  # every task: the report replaces the whole section
    print(f"wrote {RESULTS_MD} and {FIGURES}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
