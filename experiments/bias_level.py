"""The bias test's false-alarm rate where its Gaussian assumption is weakest (docs/method.md §7).

A confident classifier's ``grad_output`` spans about twelve decades; under a float format without a
transform most of its entries round up rarely and by a large jump, so the last layer's projections
are heavy-tailed and S draws tend to underestimate their spread. This script trains the digits CNN
as the README's main job does (exact arithmetic, 12 epochs, seed 0; cached under
``runs/bias_level``), then runs the bias test on unbiased formats over many independent sets
(set i: FQT seed ``1000 + i`` and 4 batches of 64 training images drawn with seed i) and counts,
per format, the sets whose first test fails and the sets that are still reported biased after the
retest on fresh draws (``BiasReport``). Every format here is unbiased, so every reported failure is
a false alarm; the family-wise level is ``--alpha``.

    python experiments/bias_level.py --formats nvfp4,mxfp4,fp8_e5m2 --sets 200

Writes ``experiments/results/bias_level/<format>_b<batches>[_a<alpha>].json`` (the per-set
verdicts and the per-layer mean z² of the first test, saved every 25 sets) and prints the table
docs/method.md §7 quotes. A file measured with the same parameters is extended to ``--sets``, not
measured again.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fqtorch import FQTConfig, __version__, quantize_model
from fqtorch.models import build_model
from fqtorch.stats import measure_quantization

ROOT = Path(__file__).resolve().parent.parent


def confident_model(cache: Path) -> torch.nn.Module:
    """The digits CNN trained as the README's main job (exact, 12 epochs, seed 0), cached."""
    from fqtorch.cli import main
    from fqtorch.train.checkpoint import load_checkpoint

    checkpoint = cache / "checkpoint.pt"
    if not checkpoint.exists():
        args = ["train", "--dataset", "digits", "--preset", "exact", "--epochs", "12"]
        if main([*args, "--seed", "0", "--out", str(cache), "--quiet"]) != 0:
            raise SystemExit("training the confident digits CNN failed; see the lines above")
    model = build_model("digits_cnn")
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model


def batches_for(train, index: int, count: int, size: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` disjoint batches of ``size`` training examples, drawn with seed ``index``."""
    gen = torch.Generator().manual_seed(index)
    order = torch.randperm(len(train), generator=gen)[: count * size].tolist()
    xs, ys = zip(*(train[i] for i in order), strict=True)
    x, y = torch.stack(xs), torch.stack(ys)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, count * size, size)]


def measure_format(model, train, fmt: str, args: argparse.Namespace, path: Path) -> dict:
    """Sets ``len(done) .. --sets - 1`` (``done``: the sets already in ``path`` under the same
    parameters), saving ``path`` every 25 sets and at the end."""
    result = {
        "format": fmt,
        "sets": [],
        "samples": args.samples,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "alpha": args.alpha,
        "null_mean_z2": (args.samples - 1) / (args.samples - 3),
    }
    if path.exists():
        done = json.loads(path.read_text())
        if all(done.get(k) == v for k, v in result.items() if k != "sets"):
            result["sets"] = done["sets"]
    sets = result["sets"]
    start = time.perf_counter()
    for i in range(len(sets), args.sets):
        fqt = quantize_model(copy.deepcopy(model), FQTConfig(grad_quantizer=fmt, seed=1000 + i))
        fqt.train()
        batches = batches_for(train, i, args.batches, args.batch_size)
        report = measure_quantization(
            fqt, F.cross_entropy, batches, args.samples, alpha=args.alpha
        ).bias
        sets.append(
            {
                "set": i,
                "first_failed": [r.name for r in report.layers if r.z_rms > r.limit],
                "failed": report.failing(),
                "mean_z2": {r.name: r.z_rms**2 for r in report.layers},
                "retest_mean_z2": {
                    r.name: r.retest.z_rms**2 for r in report.layers if r.retest is not None
                },
            }
        )
        first = sum(bool(s["first_failed"]) for s in sets)
        final = sum(bool(s["failed"]) for s in sets)
        print(
            f"{fmt} set {i + 1}/{args.sets}: first test failed {first}, reported biased {final} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        result["limit_z_rms"] = report.layers[0].limit
        if (i + 1) % 25 == 0 or i + 1 == args.sets:
            _save(path, result)
    return result


def _save(path: Path, result: dict) -> None:
    result.update(
        command="python " + " ".join(sys.argv),
        versions={"torch": torch.__version__, "fqtorch": __version__},
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def table(results: list[dict]) -> str:
    """The markdown table docs/method.md §7 quotes: per file, the sets, the first test's failures,
    the sets reported biased after the retest, and the last layer's mean z² (its null value)."""
    rows = [
        "| format | batches B | α | sets | first test failed | reported biased "
        "| last layer: mean z² (null) | largest layer mean z² / limit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        sets = r["sets"]
        last = list(sets[0]["mean_z2"])[-1]
        z2 = sum(s["mean_z2"][last] for s in sets) / len(sets)
        worst = max(max(s["mean_z2"].values()) for s in sets)
        first = sum(bool(s["first_failed"]) for s in sets)
        final = sum(bool(s["failed"]) for s in sets)
        rows.append(
            f"| {r['format']} | {r['batches']} | {r['alpha']:g} | {len(sets)} | {first} | {final} "
            f"| {z2:.2f} ({r['null_mean_z2']:.2f}) | {worst:.1f} / {r['limit_z_rms'] ** 2:.1f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="nvfp4,mxfp4,fp8_e5m2")
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/bias_level")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs/bias_level/confident")
    parser.add_argument(
        "--table", action="store_true", help="print the table of every file in --out and stop"
    )
    args = parser.parse_args(argv)
    if args.table:
        files = sorted(args.out.glob("*.json"), key=lambda p: (p.stem.count("_a"), p.stem))
        print(table([json.loads(p.read_text()) for p in files]))
        return 0
    if args.sets < 1 or not 0 < args.alpha < 1:
        parser.error("--sets must be >= 1 and --alpha in (0, 1)")
    from fqtorch.data import build_datasets

    logging.getLogger("fqtorch").setLevel(logging.WARNING)  # one conversion line per set, else
    model = confident_model(args.cache)
    train = build_datasets("digits").train
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for fmt in args.formats.split(","):
        level = "" if args.alpha == 1e-3 else f"_a{args.alpha:g}"
        path = args.out / f"{fmt}_b{args.batches}{level}.json"
        results.append(measure_format(model, train, fmt, args, path))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
