"""The int8 Linear backward's two products on the CPU, as the backend runs them against the
layouts they replaced (session 14), on the same codes, interleaved in one process.

    python benchmarks/weight_gradient.py [--shapes 8192x1024x4096,1024x256x768] [--repeats 11]

A shape ``MxKxO`` is M rows, K → O features. Weight gradient: the backend's ``C_hᵀ C_x`` on the
codes as they are, with ``h``'s column sums from ``_code_sum`` (``int8._grad_weight_fast``),
against the bordered ``[C_xᵀ; 1ᵀ] C_h`` it replaced (the input codes copied transposed, the
(K, O) result transposed by the epilogue, then copied into the weight's (O, K) layout as
autograd does). ``grad_input``: ``C_g`` times the row-major weight codes as they are, against a
column-major copy of them first. Both sides give the same values (checked here). Median
[min–max] ms and the ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from common import environment, interleaved, ms_cell, print_header
from fqtorch.backends import int8
from fqtorch.quantizers import get_quantizer


def bordered_weight_gradient(h, x) -> torch.Tensor:
    """The replaced formulation: ``[C_xᵀ; 1ᵀ] C_h``, its epilogue, and autograd's copy."""
    rows, k = x.codes.shape
    bordered = x.codes.new_empty(k + 1, rows)
    bordered[:k] = x.codes.T
    bordered[k] = 1
    acc = torch._int_mm(bordered, h.codes)  # (K + 1, O)
    grad_weight, _ = int8._compiled_grad_weight(
        acc[:k].T, acc[k], x.codes, h.scale.reshape(-1, 1), h.bias.reshape(-1, 1), x.scale,
        x.bias, torch.float32,
    )  # fmt: skip
    return grad_weight.contiguous()


def products(m: int, k: int, o: int) -> dict[str, tuple[Callable, Callable]]:
    """``name -> (before, now)`` on the codes of one step of shape ``MxKxO``."""
    g = torch.Generator().manual_seed(0)
    x = get_quantizer("ptq", 8).encode(torch.randn(m, k, generator=g) + 1, g)
    w = get_quantizer("symmetric", 8).encode(torch.randn(o, k, generator=g), g)
    h = get_quantizer("per_column", 8).encode(torch.randn(m, o, generator=g), g)
    gq = get_quantizer("psq", 5).encode(torch.randn(m, o, generator=g), g)
    return {
        "weight gradient": (
            lambda: bordered_weight_gradient(h, x),
            lambda: int8._grad_weight_fast(h, x, torch.float32)[0],
        ),
        "grad_input": (
            lambda: torch._int_mm(gq.codes, w.codes.T.contiguous().T),
            lambda: torch._int_mm(gq.codes, w.codes),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="8192x1024x4096,2048x512x2048,1024x256x768")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive integer, got {args.repeats}")
    longest = int8.chunk_length(8, 8)  # one int32 product (the "before" has no chunks)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 3 or min(s) < 2 or s[0] % 8 or s[0] > longest for s in shapes):
            raise ValueError
    except ValueError:
        parser.error(
            f"--shapes: expected MxKxO with M a multiple of 8 up to {longest}, got {args.shapes!r}"
        )
    print_header(environment())
    print("\nshape | product | before ms | now ms | before / now")
    for m, k, o in shapes:
        for name, (before, now) in products(m, k, o).items():
            torch.testing.assert_close(before(), now(), rtol=1e-6, atol=0)
            t = interleaved({"before": before, "now": now}, args.repeats)
            ratio = t["before"]["median"] / t["now"]["median"]
            print(f"{m}x{k}x{o} | {name} | {ms_cell(t['before'])} | {ms_cell(t['now'])} | "
                  f"{ratio:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
