"""First-use compile time: the first training steps of one int8 FQT layer in a fresh process.

    python benchmarks/first_step.py [--layer linear|conv] [--preset psq5] [--steps 3]
                                    [--rows 2048] [--features 1024]
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/first_step.py   # an empty cache

``backend="int8"`` runs compiled kernels by default (quantizers, the two-way rounding, the GEMM
epilogues); the first step compiles them, or loads them from Inductor's on-disk cache when an
earlier process compiled them. This prints the wall time of each of the first ``--steps``
forward + backward steps of a Linear layer (``--rows`` 2048, ``--features`` 1024 → 1024) or a
Conv2d (batch 8, 64 → 64, 3×3, 56×56), and of the same steps with ``fused=False`` (eager:
nothing to compile).
Run it once with an empty cache (above) for the cold time, then again for the warm one.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import fqtorch
from common import environment, print_header


def steps(
    fused: bool, layer: str, preset: str, count: int, rows: int = 2048, features: int = 1024
) -> list[float]:
    torch.manual_seed(0)
    if layer == "linear":
        base: nn.Module = nn.Linear(features, features)
        x = torch.randn(rows, features, requires_grad=True)
    else:
        base = nn.Conv2d(64, 64, 3, padding=1)
        x = torch.randn(8, 64, 56, 56, requires_grad=True)
    # The input needs its gradient, as a layer inside a model does: all three GEMMs run.
    cfg = fqtorch.FQTConfig.preset(preset, backend="int8", fused=fused)
    model = fqtorch.quantize_model(nn.Sequential(base), cfg)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        model(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--layer", choices=("linear", "conv"), default="linear")
    parser.add_argument("--preset", default="psq5", help="an integer preset, e.g. psq5, bhq5")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2048, help="the Linear layer's input rows")
    parser.add_argument("--features", type=int, default=1024, help="the Linear layer's width")
    args = parser.parse_args()
    for name in ("steps", "rows", "features"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: expected at least 1, got {getattr(args, name)}")
    print_header(environment())
    for fused in (True, False):
        label = "compiled (the default)" if fused else "eager (fused=False)"
        times = steps(fused, args.layer, args.preset, args.steps, args.rows, args.features)
        cells = ", ".join(f"{t:.2f}" for t in times)
        print(f"{args.layer} int8 {args.preset}, {label}: steps {cells} s")


if __name__ == "__main__":
    main()
