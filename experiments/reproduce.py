"""Regenerate every trained-model table and figure of docs/results.md (the paper's claims).

    python experiments/reproduce.py                 # train what is missing, then report
    python experiments/reproduce.py --list          # the runs and which are done
    python experiments/reproduce.py --report-only   # rebuild tables/figures from the summaries
    python experiments/reproduce.py --tasks digits --seeds 0   # a part of the grid

Runs are ``fqtorch train`` subprocesses, one per (task, configuration, seed), in
``runs/experiments/<task>/<config>_s<seed>`` (not committed). A finished run leaves a summary,
``experiments/results/<task>/<config>_s<seed>.json`` (committed: the tables rebuild from these
without retraining); a run with a summary is skipped, and one with a checkpoint but no summary is
resumed (``fqtorch train --resume``), so Ctrl-C or the end of a session loses at most the steps
since the last checkpoint. Then the variance of every quantizer and bit width is measured on each
task's trained QAT model (``fqtorch variance``, ``experiments/results/<task>/variance/``), and the
report writes the figures under ``docs/figures/results/`` and the tables between the
``<!-- experiments:begin -->`` and ``<!-- experiments:end -->`` markers of docs/results.md.

A run that stops on a non-finite loss is recorded as diverged (not as a number); any other
failure stops the script with the run's own error line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = ROOT / "runs" / "experiments"
FIGURES = ROOT / "docs" / "figures" / "results"
RESULTS_MD = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"

QUANTIZERS = ("ptq", "psq", "bhq", "rht")
BITS = (3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Task:
    """One model on one data set; ``epochs`` and ``steps`` size it for 2 CPU cores."""

    name: str
    metric: str  # the table's headline: "val_loss" (lower is better) or "val_acc"
    epochs: int
    flags: tuple[str, ...] = ()
    variance_flags: tuple[str, ...] = ()


TASKS = {
    "text": Task(
        "text",
        "val_loss",
        epochs=4,
        flags=("--dataset", "text", "--max-steps-per-epoch", "250"),
        variance_flags=("--dataset", "text", "--batches", "2", "--samples", "8"),
    ),
    "digits": Task("digits", "val_acc", epochs=12, flags=("--dataset", "digits")),
}


@dataclass(frozen=True)
class Config:
    """A training configuration: a preset and flags that change it."""

    name: str
    preset: str
    flags: tuple[str, ...] = field(default=())
    quantizer: str | None = None  # the gradient quantizer, for grouping (None: exact / QAT)
    bits: int | None = None


def configs() -> list[Config]:
    """exact, QAT, and each gradient quantizer at each bit width (RHT via --grad-quantizer)."""
    grid = [Config("exact", "exact"), Config("qat", "qat")]
    for quantizer in QUANTIZERS:
        for bits in BITS:
            if quantizer == "rht":
                grid.append(
                    Config(f"rht{bits}", f"psq{bits}", ("--grad-quantizer", "rht"), "rht", bits)
                )
            else:
                grid.append(Config(f"{quantizer}{bits}", f"{quantizer}{bits}", (), quantizer, bits))
    return grid


# ------------------------------------------------------------------------------------ running
def summary_path(task: Task, config: Config, seed: int) -> Path:
    return RESULTS / task.name / f"{config.name}_s{seed}.json"


def run_dir(task: Task, config: Config, seed: int) -> Path:
    return RUNS / task.name / f"{config.name}_s{seed}"


def command(task: Task, config: Config, seed: int) -> list[str]:
    out = run_dir(task, config, seed)
    base = [sys.executable, "-m", "fqtorch", "train"]
    if (out / "checkpoint.pt").exists():
        return [*base, "--resume", str(out), "--quiet"]
    return [
        *base,
        *task.flags,
        "--preset",
        config.preset,
        *config.flags,
        "--epochs",
        str(task.epochs),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--quiet",
    ]


def environment() -> dict[str, str]:
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
        "threads": str(torch.get_num_threads()),
        "commit": commit,
    }


def train(task: Task, config: Config, seed: int) -> dict:
    """Run (or resume) one training run to its end and write its summary."""
    out = run_dir(task, config, seed)
    cmd = command(task, config, seed)
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode in (130, 143):
        raise KeyboardInterrupt(error)
    diverged = done.returncode != 0 and "non-finite" in error
    if done.returncode != 0 and not diverged:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {error}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # epoch lines only (adaptive precision also logs {"event": "precision", ...} lines)
    metrics = [m for m in map(json.loads, lines) if "event" not in m]
    final = {} if diverged else json.loads((out / "final.json").read_text())
    summary = {
        "task": task.name,
        "config": config.name,
        "preset": config.preset,
        "flags": list(config.flags),
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
        "train_seconds": sum(m["seconds"] for m in metrics),
        "wall_seconds_last_invocation": seconds,
        "command": " ".join(cmd[1:]),
        "environment": environment(),
    }
    path = summary_path(task, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    return summary


def measure_variance(task: Task, seed: int, force: bool = False) -> Path | None:
    """``fqtorch variance`` on the task's trained QAT model (seed ``seed``)."""
    out = RESULTS / task.name / "variance"
    checkpoint = run_dir(task, Config("qat", "qat"), seed) / "checkpoint.pt"
    if (out / "variance.json").exists() and not force:
        return out
    if not checkpoint.exists():
        return None
    cmd = [
        sys.executable, "-m", "fqtorch", "variance", "--checkpoint", str(checkpoint),
        *task.variance_flags, "--quantizers", ",".join(QUANTIZERS),
        "--bits", ",".join(map(str, BITS)), "--profile", "bhq:4", "--out", str(out),
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
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    if diverged:
        text += f" ({diverged}/{len(runs)} diverged)"
    return text


def table(task: Task, runs: dict[str, list[dict]]) -> str:
    seeds = sorted({r["seed"] for rs in runs.values() for r in rs})
    lines = [f"Seeds: {', '.join(map(str, seeds))}; mean ± std over the seeds.", ""]
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


def curves_figure(task: Task, runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in ("qat", "ptq4", "psq4", "bhq4", "rht4"):
        for i, r in enumerate(sorted(runs.get(name, []), key=lambda r: r["seed"])):
            steps = [c["steps"] for c in r["curve"]]
            values = [c[task.metric] * (100 if task.metric == "val_acc" else 1) for c in r["curve"]]
            style = {"color": f"C{['qat', 'ptq4', 'psq4', 'bhq4', 'rht4'].index(name)}"}
            ax.plot(steps, values, label=name if i == 0 else None, alpha=0.8, **style)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss" if task.metric == "val_loss" else "validation accuracy (%)")
    ax.set_title(f"{task.name}: QAT and the 4-bit gradient quantizers (one line per seed)")
    ax.legend()
    ax.grid(alpha=0.3)
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

    qat, bhq5 = mean_of("qat", task.metric), mean_of("bhq5", task.metric)
    if qat is not None and bhq5 is not None:
        gap = (bhq5 - qat) / abs(qat) * (1 if task.metric == "val_loss" else -1)
        rows.append(
            f"| 5-bit BHQ within 0.5% of QAT | {'yes' if gap <= 0.005 else 'no'} | "
            f"{task.metric} {bhq5:.4f} vs {qat:.4f}: {100 * gap:+.2f}% (positive = worse) |"
        )
    low = min(BITS)
    worst = {q: mean_of(f"{q}{low}", task.metric) for q in QUANTIZERS}
    if all(v is not None for v in worst.values()):
        sign = 1 if task.metric == "val_loss" else -1
        first = max(worst, key=lambda q: sign * worst[q])
        diverged = {q: sum(r["diverged"] for r in runs.get(f"{q}{low}", [])) for q in QUANTIZERS}
        values = ", ".join(f"{q} {v:.4f}" for q, v in worst.items())
        rows.append(
            f"| low-bit PTQ fails first | {'yes' if first == 'ptq' else 'no'} | "
            f"{low} bits, {task.metric}: {values}; diverged runs {diverged} |"
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
                f"{text} |"
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
        variance = json.loads(variance_json.read_text()) if variance_json.exists() else None
        curves = FIGURES / f"{task.name}_curves.png"
        curves_figure(task, runs, curves)
        parts += [f"### {task.name}", "", table(task, runs), ""]
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
    return "\n".join(parts)


def write_report(markdown: str) -> None:
    text = RESULTS_MD.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{RESULTS_MD} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    RESULTS_MD.write_text(f"{head}{BEGIN}\n{markdown}\n{END}{tail}")


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", help="only these configurations (names)")
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument("--report-only", action="store_true", help="no training or measuring")
    args = parser.parse_args(argv)
    tasks = [TASKS[t] for t in args.tasks]
    grid = [c for c in configs() if not args.configs or c.name in args.configs]
    if args.configs and len(grid) != len(args.configs):
        known = ", ".join(c.name for c in configs())
        parser.error(f"unknown configuration in {args.configs}; known: {known}")
    todo = [(t, c, s) for t in tasks for c in grid for s in args.seeds]
    if args.list:
        for t, c, s in todo:
            state = "done" if summary_path(t, c, s).exists() else (
                "partial" if (run_dir(t, c, s) / "checkpoint.pt").exists() else "to run"
            )  # fmt: skip
            print(f"{t.name:<8}{c.name:<8}seed {s}  {state}")
        return 0
    if not args.report_only:
        pending = [(t, c, s) for t, c, s in todo if not summary_path(t, c, s).exists()]
        print(f"{len(todo) - len(pending)} of {len(todo)} runs done; {len(pending)} to run",
              file=sys.stderr)  # fmt: skip
        started = time.perf_counter()
        try:
            for i, (t, c, s) in enumerate(pending, 1):
                summary = train(t, c, s)
                result = "diverged" if summary["diverged"] else (
                    f"{t.metric} {summary['final'][t.metric]:.4f}"
                )  # fmt: skip
                elapsed = time.perf_counter() - started
                print(f"[{i}/{len(pending)}] {t.name} {c.name} seed {s}: {result} "
                      f"({summary['train_seconds']:.0f} s; {elapsed / 60:.1f} min in all)",
                      file=sys.stderr)  # fmt: skip
            for t in tasks:
                measure_variance(t, min(args.seeds))
        except KeyboardInterrupt:
            print("interrupted: finished runs are summarized, the current one resumes from its "
                  "last checkpoint when this command runs again", file=sys.stderr)  # fmt: skip
            return 130
    write_report(report(tasks))
    print(f"wrote {RESULTS_MD} and {FIGURES}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
