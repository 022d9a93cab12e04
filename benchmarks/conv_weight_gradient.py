"""The int8 Conv2d weight gradient alone on the CPU: by kernel tap (strided layers by phase of the
stride, ``int8_qconv._grad_weight_taps``) against im2col (``int8_qconv._im2col_grad_weight``, the
path of strided kernels larger than 1 × 1 or on more than 64 channels and of stride-1 layers with
few input channels and large kernels), from NCHW and channels-last input codes, beside the fp32 and
bf16 weight gradients (``aten.convolution_backward``) of the same layer, interleaved in one process.

    python benchmarks/conv_weight_gradient.py [--layers NxCxOxSxKxSTRIDE,...] [--repeats 9]

A layer ``NxCxOxSxKxSTRIDE`` is a batch of N inputs of C channels, S × S, into O channels with a K ×
K kernel at that stride, padding K // 2. The defaults are ResNet-50's r50_down (128 → 128, stride 2,
56²), ResNet-18's stem (3 → 64, 7 × 7, stride 2, 224²) and a CIFAR ResNet's strided layer (16 → 32,
stride 2, 32², batch 128); which path the backend takes is
:func:`~fqtorch.backends.int8_qconv.weight_by_taps`'s choice, named per layer. Both integer paths
give the same values (checked here). Median [min–max] ms, and the ratios fp32 / path and bf16 /
path.
"""

from __future__ import annotations

import argparse

import torch

from common import environment, interleaved, ms_cell, print_header
from fqtorch.backends import int8_qconv
from fqtorch.backends.base import ConvOps
from fqtorch.quantizers import get_quantizer

DEFAULT = "32x128x128x56x3x2,32x3x64x224x7x2,128x16x32x32x3x2"


def paths(n: int, c: int, o: int, side: int, k: int, stride: int) -> dict:
    """``name -> fn`` for one layer: the float baselines and the integer paths."""
    g = torch.Generator().manual_seed(0)
    ops = ConvOps((stride, stride), (k // 2, k // 2), (1, 1), 1)
    x = torch.randn(n, c, side, side, generator=g).relu()
    out = (side + 2 * (k // 2) - k) // stride + 1
    grad = torch.randn(n, o, out, out, generator=g)
    weight = torch.randn(o, c, k, k, generator=g)
    xq = get_quantizer("ptq", 8).encode(x.reshape(n, -1), g)
    codes = xq.codes.reshape(x.shape)
    # the gradient's rows are positions (N·Ho·Wo, O), per-column scales, row-major codes, as the
    # backend encodes them (at batch 1 the reshape alone would be a column-major view)
    columns = grad.permute(0, 2, 3, 1).reshape(-1, o).contiguous()
    h = get_quantizer("per_column", 5).encode(columns, g)
    last = codes.contiguous(memory_format=torch.channels_last)
    shape = (o, c, k, k)

    def fp(dtype: torch.dtype):
        args = (grad.to(dtype), x.to(dtype), weight.to(dtype))
        return lambda: torch.ops.aten.convolution_backward(
            *args, None, ops.stride, ops.padding, ops.dilation, False, [0, 0], 1,
            [False, True, False],
        )[1]  # fmt: skip

    def taps(c_: torch.Tensor):
        return lambda: int8_qconv._grad_weight_taps(
            h, c_, xq.scale, xq.bias, 8, shape, ops, torch.float32, True
        )[0]

    def im2col(c_: torch.Tensor):
        return lambda: int8_qconv._im2col_grad_weight(h, c_, xq.scale, xq.bias, 8, shape, ops)[0]

    return {
        "fp32": fp(torch.float32),
        "bf16": fp(torch.bfloat16),
        "int8 taps, NCHW codes": taps(codes),
        "int8 taps, channels-last codes": taps(last),
        "int8 im2col, NCHW codes": im2col(codes),
        "int8 im2col, channels-last codes": im2col(last),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--layers", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    try:
        layers = [tuple(int(v) for v in s.split("x")) for s in args.layers.split(",")]
        if any(len(s) != 6 or min(s) < 1 or s[4] > s[3] for s in layers):
            raise ValueError
    except ValueError:
        parser.error(
            "--layers: expected NxCxOxSxKxSTRIDE (positive integers, K at most S), "
            f"got {args.layers!r}"
        )
    print_header(environment())
    for layer in layers:
        fns = paths(*layer)
        n, c, o, side, k, stride = layer
        taps = fns["int8 taps, NCHW codes"]().double()
        for name in ("int8 taps, channels-last codes", "int8 im2col, NCHW codes"):
            got = fns[name]().double().reshape(taps.shape)  # im2col's terms come back float64
            torch.testing.assert_close(got, taps, rtol=1e-6, atol=1e-6 * float(taps.abs().max()))
        t = interleaved(fns, args.repeats)
        ops = ConvOps((stride, stride), (k // 2, k // 2), (1, 1), 1)
        by_taps = int8_qconv.weight_by_taps(ops, (n, c, side, side), (o, c, k, k))
        chosen = "taps" if by_taps else "im2col"
        print(f"\n{n}x{c}x{o}x{side}x{k}x{stride}: {c} → {o}, {k}×{k}, stride {stride}, "
              f"{side}², batch {n} (the backend takes {chosen})")  # fmt: skip
        print("path | ms | fp32 / path | bf16 / path")
        for name, r in t.items():
            fp32, bf16 = t["fp32"]["median"] / r["median"], t["bf16"]["median"] / r["median"]
            print(f"{name} | {ms_cell(r)} | {fp32:.2f} | {bf16:.2f}")


if __name__ == "__main__":
    main()
