"""Train the default digits job under several presets and seeds; print a markdown table.

    python experiments/digits_table.py --seeds 0 1 2 --out runs/digits_table
    python experiments/digits_table.py --json experiments/results/digits_table.json  # keep runs

Each run is ``fqtorch train --preset P --seed S`` (the README's main job with other presets);
the table reports the final validation accuracy and loss as mean ± std over the seeds. A run
with a ``final.json`` is not trained again. ``--json`` also writes every run's numbers, with the
machine, versions and commit, so the table can be checked without the run directories.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PRESETS = ["exact", "qat", "ptq4", "psq4", "bhq4", "ptq3", "psq3", "bhq3", "bhq5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/digits_table")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    rows, runs = [], []
    for preset in args.presets:
        accs, losses, secs = [], [], []
        for seed in args.seeds:
            out = Path(args.out) / f"{preset}_seed{seed}"
            if not (out / "final.json").exists():
                cmd = [sys.executable, "-m", "fqtorch", "train", "--preset", preset, "--seed",
                       str(seed), "--out", str(out), "--quiet"]  # fmt: skip
                subprocess.run(cmd, check=True)
            final = json.loads((out / "final.json").read_text())
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            accs.append(100 * final["val_acc"])
            losses.append(final["val_loss"])
            secs.append(sum(m["seconds"] for m in metrics if "seconds" in m))  # not events
            runs.append({"preset": preset, "seed": seed, "val_acc": accs[-1],
                         "val_loss": losses[-1], "train_seconds": secs[-1]})  # fmt: skip
        rows.append((preset, accs, losses, secs))
        print(f"{preset}: {accs}", file=sys.stderr)

    def fmt(values: list[float], digits: int) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

    print("| preset | val acc (%) | val loss | train time (s) |")
    print("| --- | --- | --- | --- |")
    for preset, accs, losses, secs in rows:
        print(f"| {preset} | {fmt(accs, 2)} | {fmt(losses, 4)} | {fmt(secs, 1)} |")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1))


def environment() -> dict[str, str]:
    """Where the table was made: reproduce.py's record (versions, CPU, threads, commit)."""
    import sklearn

    sys.path.insert(0, str(Path(__file__).parent))
    from reproduce import environment as run_environment

    return {**run_environment(), "scikit-learn": sklearn.__version__}


if __name__ == "__main__":
    main()
