"""Exact sums of int8 codes, as the int8 backend's zero-point terms need them: ``sum`` with an
int32 accumulator (which first copies the codes to int32) against ``int8._code_sum`` (on the
CPU, a product with ones on ``torch._int_mm``), and ``int8_qconv.fits_float32``'s Σ|w| against
the int32-copy route it replaced, one process.

    python benchmarks/code_sums.py [--repeats 20]

The shapes: ResNet-18's stem gradient codes at batch 8 summed both ways ((100352, 64) over rows,
its transpose over columns), a bordered 512-channel 3×3 weight, and a 512 × 512 × 3 × 3 kernel.
Both sides give the same integers (checked here, and in tests/backends/test_int8_exactness.py).
Median [min–max] ms and the ratio.
"""

from __future__ import annotations

import argparse
import functools

import torch

from common import environment, median_seconds, ms_cell, print_header
from fqtorch.backends.int8 import _code_sum
from fqtorch.backends.int8_qconv import fits_float32

SUMS = {  # name: (shape, dim)
    "(100352, 64) over rows": ((100352, 64), 0),
    "(64, 100352) over columns": ((64, 100352), 1),
    "(513, 4608) over rows": ((513, 4608), 0),
}
BITS = 5


def old_fit(w: torch.Tensor, a_bits: int) -> bool:
    """``fits_float32`` before: Σ|w| through an int32 copy."""
    sums = w.reshape(w.shape[0], -1).to(torch.int32).abs().sum(1)
    return 2 ** (a_bits - 1) * int(sums.max()) <= 2**24


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    print_header(environment())
    print("\nsum | sum(dtype=int32) ms | _code_sum ms | sum / _code_sum")
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (shape, dim) in SUMS.items():
        low = -(2 ** (BITS - 1))
        codes = torch.randint(low, -low, shape, generator=g, dtype=torch.int8)
        before = functools.partial(codes.sum, dim, dtype=torch.int32)
        after = functools.partial(_code_sum, codes, dim, BITS)
        assert torch.equal(before(), after())
        rows.append((name, before, after))
    w = torch.randint(-128, 128, (512, 512, 3, 3), generator=g, dtype=torch.int8)
    assert old_fit(w, 8) == fits_float32(w, 8)
    rows.append(
        ("fits_float32 (512, 512, 3, 3)", functools.partial(old_fit, w, 8),
         functools.partial(fits_float32, w, 8))
    )  # fmt: skip
    for name, before, after in rows:
        old, new = median_seconds(before, args.repeats), median_seconds(after, args.repeats)
        print(f"{name} | {ms_cell(old)} | {ms_cell(new)} | {old['median'] / new['median']:.1f}x")


if __name__ == "__main__":
    main()
