"""oneDNN's int8 convolution: the weight packing (``onednn::qconv_prepack``, a reorder of the s8
kernel with zero-point compensation) against the convolution itself (``qconv2d_pointwise``),
at ResNet's 3×3 stride-1 shapes, one process.

    python benchmarks/qconv_packing.py [--batch 8] [--layers 16x32,64x56,...] [--repeats 7]

The int8 backend packs on every call (the forward's kernel is the freshly quantized weight; the
``grad_input`` one its flipped codes), so where the activations are small (late stages, small
batches) the packing, which does not depend on the batch, costs more than the convolution.
Median [min–max] ms and the ratio packing / convolution.

Then the channel of sums (``int8_qconv.sums_channel``): the same kernel with one more output
channel (C → C + 1 outputs, as the backend's kernels take it for the receptive-field sums),
packing and convolution measured in turn with the plain kernel's (``common.interleaved``), and
the cost of the extra channel, (packing + convolution) with it over without. ``--layers`` takes
``CxS`` items: C channels in and out on S × S inputs (default ResNet-18/50's and PreAct
ResNet-20's stages).
"""

from __future__ import annotations

import argparse
import functools
import re

import torch

from common import environment, interleaved, median_seconds, ms_cell, print_header

# channels x spatial size: ResNet-18/50 at 224 × 224, then PreAct ResNet-20 at 32 × 32
LAYERS = "64x56,128x28,256x14,512x7,16x32,32x16,64x8"


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
    parser.add_argument("--layers", default=LAYERS, help="CxS items, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error(
            f"--batch, --repeats: expected positive integers, got {args.batch}, {args.repeats}"
        )
    layers = parse_layers(parser, args.layers)
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this PyTorch build has no oneDNN: nothing to measure")
    print_header(environment())
    print(f"\nbatch {args.batch} | packing ms | convolution ms | packing / convolution")
    g = torch.Generator().manual_seed(0)
    cases = []
    for c, side in layers:
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
        cases.append((layer, w, u8))
    print(
        f"\nbatch {args.batch}, the channel of sums | without: packing, convolution ms | with "
        "(C + 1 outputs): packing, convolution ms | with / without | positions per channel"
    )
    for layer, w, u8 in cases:
        u8 = u8.contiguous(memory_format=torch.channels_last)  # as the backend's activations
        bordered = torch.cat([w, torch.ones_like(w[:1])])  # one more output channel, of ones
        fns = {}
        for name, kernel in (("without", w), ("with", bordered)):
            packed = pack(kernel, list(u8.shape))
            fns[name + " packing"] = functools.partial(pack, kernel, list(u8.shape))
            fns[name + " convolution"] = functools.partial(convolve, u8, packed)
        t = interleaved(fns, args.repeats)
        total = {
            k: t[k + " packing"]["median"] + t[k + " convolution"]["median"]
            for k in ("without", "with")
        }
        cells = [ms_cell(t[name]) for name in fns]
        per_channel = u8.shape[0] * u8.shape[2] * u8.shape[3] / w.shape[0]
        print(
            f"{layer} | {cells[0]}, {cells[1]} | {cells[2]}, {cells[3]} | "
            f"{total['with'] / total['without']:.2f} | {per_channel:.3g}"
        )


def parse_layers(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    """``--layers``' ``CxS`` items as (channels, side) pairs, or a parser error naming the item."""
    layers = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", item.strip(), re.ASCII)
        if match is None or min(int(match[1]), int(match[2])) < 1:
            parser.error(f"--layers: expected CxS items of positive integers, got {item!r}")
        layers.append((int(match[1]), int(match[2])))
    return layers


if __name__ == "__main__":
    main()
