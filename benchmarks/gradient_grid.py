"""The stride-1 int8 Conv2d weight gradient lays ``grad_output``'s codes, (positions, O), on a
padded (O, N, Hp, Wp) grid (``int8_qconv._grad_weight_taps``): ATen's one permuting copy against
the compiled transpose then a plain copy, on the same codes, interleaved in one process.

    python benchmarks/gradient_grid.py [--repeats 11]

The layers: ResNet-50's (batch 32) and ResNet-18's (batch 8) 3×3 stages, and PreAct
ResNet-20's (batch 128). Both give the same grid (checked here, and in
tests/backends/test_int8_qconv.py). Median [min–max] ms, the ratio, and whether the library takes
the compiled transpose there (``int8_qconv.compiled_transpose_pays``).
"""

from __future__ import annotations

import argparse

import torch

from common import environment, interleaved, ms_cell, print_header
from fqtorch.backends import int8_qconv

# name: (batch, output channels, output plane side); 3×3 kernels, padding 1
LAYERS = {
    "ResNet-50 conv2 (64, 56²)": (32, 64, 56),
    "ResNet-50 stage3 (128, 28²)": (32, 128, 28),
    "ResNet-18 layer1 (64, 56², batch 8)": (8, 64, 56),
    "PreAct ResNet-20 stage1 (16, 32²)": (128, 16, 32),
    "PreAct ResNet-20 stage2 (32, 16²)": (128, 32, 16),
    "PreAct ResNet-20 stage3 (64, 8²)": (128, 64, 8),
}


def grids(n: int, o: int, side: int):
    """(ATen's copy, the compiled transpose's) builds of the grid, on the same codes."""
    codes = torch.randint(-16, 16, (n * side * side, o), dtype=torch.int8).view(torch.uint8)
    padded = side + 2

    def grid() -> torch.Tensor:
        return torch.zeros(o + 1, n, padded, padded, dtype=torch.uint8)

    def aten() -> torch.Tensor:
        g = grid()
        g[:o, :, :side, :side] = codes.reshape(n, side, side, o).permute(3, 0, 1, 2)
        return g

    def compiled() -> torch.Tensor:
        g = grid()
        g[:o, :, :side, :side] = int8_qconv._compiled_transpose(codes).view(o, n, side, side)
        return g

    return aten, compiled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    print_header(environment())
    print("\nlayer | ATen permuting copy ms | compiled transpose + copy ms | ratio | taken")
    for name, (n, o, side) in LAYERS.items():
        aten, compiled = grids(n, o, side)
        assert torch.equal(aten(), compiled())
        t = interleaved({"aten": aten, "compiled": compiled}, args.repeats)
        ratio = t["aten"]["median"] / t["compiled"]["median"]
        taken = int8_qconv.compiled_transpose_pays(o, side * side)
        print(f"{name} | {ms_cell(t['aten'])} | {ms_cell(t['compiled'])} | {ratio:.2f}x | {taken}")


if __name__ == "__main__":
    main()
