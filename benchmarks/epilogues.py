"""The stride-1 Conv2d weight gradient's epilogue on the int8 backend (``int8_qconv.taps_terms``:
four zero-point terms in float64 over the per-tap int32 products and the mask's sums, rounded to
float32), eager (``fused=False``, the debugging path) against compiled (``fused=True``, the
default), one process.

    python benchmarks/epilogues.py [--repeats 20]

Shapes: the 3×3 stride-1 convolutions of ResNet-18's four stages (64 to 512 channels). Both give
the same values (checked here and in tests/backends/test_int8_qconv.py). Median [min–max] ms and
the ratio; the first compiled call (compilation) is timed once, apart.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from common import environment, median_seconds, ms_cell, print_header
from fqtorch.backends.int8_qconv import taps_terms

CHANNELS = (64, 128, 256, 512)
TAPS = 9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    print_header(environment())
    g = torch.Generator().manual_seed(0)
    cases = []
    for c in CHANNELS:
        prod = torch.randint(-(2**24), 2**24, (TAPS, c + 1, c), generator=g, dtype=torch.int32)
        on_real = torch.randint(-(2**24), 2**24, (TAPS, c), generator=g).double()
        real = torch.randint(1, 2**20, (TAPS,), generator=g).double()
        s_h, b_h = torch.rand(c, 1, generator=g) + 1e-3, torch.randn(c, 1, generator=g)
        s_x, b_x = torch.rand(1, 1, generator=g) + 1e-3, torch.randn(1, 1, generator=g)
        terms = (prod, on_real, real, s_h, b_h, s_x, b_x, torch.float32)
        cases.append(
            (
                c,
                functools.partial(taps_terms, *terms, False),
                functools.partial(taps_terms, *terms, True),
            )
        )
    started = time.perf_counter()
    cases[0][2]()  # compiles (dynamic shapes: the other shapes do not recompile)
    print(f"\nfirst compiled call (compiles): {time.perf_counter() - started:.1f} s")
    print("\nweight (O, C, 3, 3) | eager ms | compiled ms | eager / compiled")
    for c, eager, compiled in cases:
        torch.testing.assert_close(compiled(), eager(), rtol=1.2e-7, atol=0)
        old, new = median_seconds(eager, args.repeats), median_seconds(compiled, args.repeats)
        ratio = old["median"] / new["median"]
        print(f"({c}, {c}, 3, 3) | {ms_cell(old)} | {ms_cell(new)} | {ratio:.1f}x")


if __name__ == "__main__":
    main()
