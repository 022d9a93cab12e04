"""Per-group ranges of a row-major tensor, the ways the library could reduce them, one process.

    python benchmarks/column_ranges.py [--shapes 8192x4096,100352x64,25088x128,1568x512,2048x512]
                                       [--repeats 9]

Per column: one-stage ``aminmax`` down the columns against the library's two-stage reduction
(blocks of rows, then the blocks), compiled and eager, and eager ``amin`` and ``amax`` apiece
(what the library runs eagerly on the CPU). Per row, eager: ``aminmax`` against ``amin`` and
``amax`` apiece. Also the whole two-way statistics of a Linear step's ``grad_output`` (PSQ rows
and per-column ranges in one compiled graph), with either column reduction. All give the same
values (tests/quantizers/test_ranges.py); only the time differs. Median [min–max] ms.
"""

from __future__ import annotations

import argparse

import torch

import fqtorch
from common import environment, matrix_shapes, median_seconds, ms_cell, print_header
from fqtorch.quantizers import twoway, uniform
from fqtorch.quantizers.fused import LazyCompiled
from fqtorch.quantizers.uniform import uniform_spec


def one_stage(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.aminmax(x2d, dim=0, keepdim=True)


def apiece(dim: int):
    def reduce(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x2d.amin(dim, keepdim=True), x2d.amax(dim, keepdim=True)

    return reduce


def row_aminmax(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.aminmax(x2d, dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="8192x4096,100352x64,25088x128,1568x512,2048x512")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    shapes = matrix_shapes(args.shapes)
    print_header(environment())
    two_stage = uniform._column_minmax
    compiled = {
        "one stage": torch.compile(one_stage, dynamic=True),
        "two stages": torch.compile(two_stage, dynamic=True),
    }
    columns = (compiled["one stage"], compiled["two stages"], one_stage, two_stage, apiece(0))
    rows_ = (row_aminmax, apiece(1))
    print(
        "\nmin/max, ms: shape | per column: one stage, two stages (compiled); one stage, two "
        "stages, amin + amax (eager) | per row (eager): aminmax, amin + amax"
    )
    for rows, cols in shapes:
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        row = [f"{rows}x{cols}"]
        for fn in (*columns, *rows_):
            row.append(ms_cell(median_seconds(lambda fn=fn, x=x: fn(x), args.repeats)))
        print(" | ".join(row))
    # the Linear step's two-way statistics (PSQ5 rows, per-column 8-bit), largest shape
    rows, cols = max(shapes, key=lambda s: s[0] * s[1])
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    spec_g = uniform_spec(fqtorch.get_quantizer("psq", 5, fused=True))
    spec_h = uniform_spec(fqtorch.get_quantizer("per_column", 8, fused=True))
    print(f"\ntwo-way statistics of a {rows}x{cols} grad_output (compiled), ms")
    for name, column in (("one stage", one_stage), ("two stages", two_stage)):
        uniform._column_minmax = column  # the graph below traces this one
        try:
            stats = LazyCompiled(twoway._two_way_stats)
            t = median_seconds(lambda stats=stats: stats(x, spec_g, spec_h), args.repeats)
        finally:
            uniform._column_minmax = two_stage
        print(f"{name}: {ms_cell(t)}")


if __name__ == "__main__":
    main()
