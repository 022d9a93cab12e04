"""im2col of int8 codes: the library's one strided copy (``int8_conv._cols``) against the
float32 route it replaced (cast, ``F.unfold``, transpose copy, cast back), one process; then
the weight-gradient product of those columns, ``[C_hᵀ; 1ᵀ] · cols`` (``int8._int_mm``, the
columns taken row-major as they are) against the "TN" route it replaced (the columns copied
transposed, a border of ones on each operand); last, the columns in (C, kh, kw) order
(``_cols``) against (kh, kw, C) order from a channels-last copy of the codes
(``_cols_taps_first``, which the strided weight gradient takes where
``int8_conv.taps_first_pays``).

    python benchmarks/im2col.py [--repeats 5] [--batch 8]

The layers: ResNet-18's strided convolutions (224² images) and PreAct ResNet-20's (32²), at
batch 8 (``--batch`` changes it).
Both give the same codes (tests/backends/test_int8_qconv.py); only the time differs. Median
[min–max] ms and the ratio.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from common import environment, median_seconds, ms_cell, print_header
from fqtorch.backends.base import ConvOps
from fqtorch.backends.int8 import _int_mm
from fqtorch.backends.int8_conv import _cols, _cols_taps_first, _pads, taps_first_pays

# name: (input shape, kernel, stride, padding, output channels)
LAYERS = {
    "stem 7x7 s2": ((8, 3, 224, 224), (7, 7), (2, 2), (3, 3), 64),
    "layer2 3x3 s2": ((8, 64, 56, 56), (3, 3), (2, 2), (1, 1), 128),
    "layer2 shortcut 1x1 s2": ((8, 64, 56, 56), (1, 1), (2, 2), (0, 0), 128),
    "layer3 3x3 s2": ((8, 128, 28, 28), (3, 3), (2, 2), (1, 1), 256),
    "PreAct ResNet-20 stage2 3x3 s2": ((8, 16, 32, 32), (3, 3), (2, 2), (1, 1), 32),
    "PreAct ResNet-20 stage3 3x3 s2": ((8, 32, 16, 16), (3, 3), (2, 2), (1, 1), 64),
}
GRAD_BITS = 5  # the gradient codes' width (PSQ5)


def float_route(codes: torch.Tensor, pads: list[int], kernel: tuple, ops: ConvOps) -> torch.Tensor:
    padded = F.pad(codes.to(torch.float32), pads)
    cols = F.unfold(padded, kernel, dilation=ops.dilation, stride=ops.stride).transpose(1, 2)
    return cols.reshape(-1, cols.shape[2]).to(torch.int8)


def tn_route(h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The product as before: both operands bordered, the columns copied transposed."""
    (rows, o), k = h.shape, cols.shape[1]
    a = h.new_empty(o + 1, rows)
    a[:o], a[o] = h.T, 1
    bt = cols.new_empty(k + 8, rows)
    bt[:k], bt[k:] = cols.T, 1
    return torch._int_mm(a, bt.T)[:o, :k]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.repeats < 1 or args.batch < 1:
        parser.error(
            f"--repeats and --batch: expected positive integers, got {args.repeats} "
            f"and {args.batch}"
        )
    print_header(environment())
    print("\nlayer | float32 route ms | int8 strided copy ms | float / int8")
    columns = {}
    for name, (shape, kernel, stride, padding, _) in LAYERS.items():
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, *shape[1:])
        codes = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        ops = ConvOps(stride, padding, (1, 1), 1)
        pads = _pads(ops)
        before = functools.partial(float_route, codes, pads, kernel, ops)
        after = functools.partial(_cols, codes, pads, kernel, ops)
        assert torch.equal(before(), after())
        old, new = median_seconds(before, args.repeats), median_seconds(after, args.repeats)
        print(
            f"{name} | {ms_cell(old, 1)} | {ms_cell(new, 1)} | {old['median'] / new['median']:.1f}x"
        )
        columns[name] = after()
    print("\nlayer | (C, kh, kw) ms | (kh, kw, C) ms | ratio | taps first taken")
    for name, (shape, kernel, stride, padding, _) in LAYERS.items():
        codes = torch.randint(-128, 128, (args.batch, *shape[1:]), dtype=torch.int8)
        ops = ConvOps(stride, padding, (1, 1), 1)
        pads = _pads(ops)
        channels_first = functools.partial(_cols, codes, pads, kernel, ops)
        taps_first = functools.partial(_cols_taps_first, codes, pads, kernel, ops)
        reordered = channels_first().view(-1, shape[1], *kernel).permute(0, 2, 3, 1)
        assert torch.equal(taps_first(), reordered.reshape(reordered.shape[0], -1))
        old = median_seconds(channels_first, args.repeats)
        new = median_seconds(taps_first, args.repeats)
        print(
            f"{name} | {ms_cell(old, 1)} | {ms_cell(new, 1)} | "
            f"{old['median'] / new['median']:.1f}x | {taps_first_pays(kernel)}"
        )
    print("\nweight-gradient product | TN route ms | columns as they are ms | TN / as they are")
    for name, cols in columns.items():
        g = torch.Generator().manual_seed(1)
        limit = 2 ** (GRAD_BITS - 1)
        h = torch.randint(-limit, limit, (cols.shape[0], LAYERS[name][4]), generator=g)
        h = h.to(torch.int8)
        before = functools.partial(tn_route, h, cols)
        after = functools.partial(_int_mm, h.T, GRAD_BITS, cols, 8)
        assert torch.equal(before(), after()[0])
        old, new = median_seconds(before, args.repeats), median_seconds(after, args.repeats)
        print(
            f"{name} | {ms_cell(old, 1)} | {ms_cell(new, 1)} | {old['median'] / new['median']:.1f}x"
        )


if __name__ == "__main__":
    main()
