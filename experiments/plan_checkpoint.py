"""``fqtorch plan`` on a trained checkpoint: the same flags and output (``DIR/plan.json``), with
``--checkpoint PATH`` added (``fqtorch plan`` itself measures a freshly initialized model).

    python experiments/plan_checkpoint.py \\
        --checkpoint runs/experiments/digits/qat_s0/checkpoint.pt --dataset digits \\
        --budget 0.1 --out experiments/results/digits/plan

experiments/reproduce.py uses it to measure the grid's fixed plan on each task's trained QAT
model (seed 0): the point of training where the quantization noise is largest next to the
gradient, which is what the plan must keep within budget (docs/method.md §11).
"""

from __future__ import annotations

import argparse
import logging
import sys

from fqtorch.stats.plan_cli import add_plan_parser, run_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--checkpoint" not in argv:
        parser.error("--checkpoint PATH is required (a checkpoint.pt of fqtorch train)")
    at = argv.index("--checkpoint")
    if at + 1 >= len(argv):
        parser.error("--checkpoint needs a path")
    checkpoint = argv[at + 1]
    args = parser.parse_args(["plan", *argv[:at], *argv[at + 2 :]])
    args.checkpoint = checkpoint
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
