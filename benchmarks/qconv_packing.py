"""oneDNN's int8 convolution: the weight packing (``onednn::qconv_prepack``, a reorder of the s8
kernel with zero-point compensation) against the convolution itself (``qconv2d_pointwise``),
at ResNet's 3×3 stride-1 shapes, one process.

    python benchmarks/qconv_packing.py [--batch 8] [--repeats 7]

The int8 backend packs on every call (the forward's kernel is the freshly quantized weight; the
``grad_input`` one its flipped codes), so where the activations are small (late stages, small
batches) the packing, which does not depend on the batch, costs more than the convolution.
Median [min–max] ms and the ratio packing / convolution.
"""

from __future__ import annotations

import argparse
import functools

import torch

from common import environment, median_seconds, ms_cell, print_header

LAYERS = {  # channels: spatial size (ResNet-18/50 at 224 × 224)
    64: 56,
    128: 28,
    256: 14,
    512: 7,
}


def pack(w: torch.Tensor, shape: list[int]) -> torch.Tensor:
    one = torch.ones(1)
    return torch.ops.onednn.qconv_prepack(w, one, 1.0, 128, [1, 1], [1, 1], [1, 1], 1, shape)


def convolve(u8: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones(1), torch.zeros(1, dtype=torch.int64)
    return torch.ops.onednn.qconv2d_pointwise(
        u8, 1.0, 128, packed, one, zero, None, [1, 1], [1, 1], [1, 1], 1,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error(
            f"--batch, --repeats: expected positive integers, got {args.batch}, {args.repeats}"
        )
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this PyTorch build has no oneDNN: nothing to measure")
    print_header(environment())
    print(f"\nbatch {args.batch} | packing ms | convolution ms | packing / convolution")
    g = torch.Generator().manual_seed(0)
    for c, side in LAYERS.items():
        w = torch.randint(-128, 128, (c, c, 3, 3), generator=g, dtype=torch.int8)
        u8 = torch.randint(0, 256, (args.batch, c, side, side), generator=g, dtype=torch.uint8)
        packed = pack(w, list(u8.shape))
        reference = torch.nn.functional.conv2d(u8.double() - 128, w.double(), padding=1)
        assert torch.equal(convolve(u8, packed).double(), reference), "not exact here"
        packing = median_seconds(functools.partial(pack, w, list(u8.shape)), args.repeats)
        conv = median_seconds(functools.partial(convolve, u8, packed), args.repeats)
        ratio = packing["median"] / conv["median"]
        layer = f"({c}, {c}, 3, 3) on {side}×{side}"
        print(f"{layer} | {ms_cell(packing)} | {ms_cell(conv)} | {ratio:.2f}")


if __name__ == "__main__":
    main()
