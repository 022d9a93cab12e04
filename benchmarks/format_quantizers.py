"""Cost of the floating-point and block-scaled gradient formats, both block orientations.

    python benchmarks/format_quantizers.py [--rows 2048 --cols 768] [--formats mxfp4,nvfp4]
                                           [--repeats 5] [--json out.json]

Encode and dequantize a gradient of shape (rows, cols) with each format, stochastic rounding,
its blocks along the rows' width (``block_dim=1``: the ``grad_input`` GEMM's reduction) and down
the columns (``block_dim=0``: the weight-gradient GEMM's), eager and fused (one
``torch.compile``'d kernel), as ratios to eager PSQ at 5 bits on the same tensor. Medians of
``--repeats`` runs after 2 warm-up runs (which also compile), all in this process. The default
shape is the char-GPT's ``qkv`` gradient in docs/results.md's grid (2048 tokens, 768 outputs).
"""

from __future__ import annotations

import argparse

import torch

import fqtorch
from common import environment, median_seconds, print_header, write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--formats", default="mxfp4,nvfp4,mxfp8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    env = environment()
    print_header(env)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(args.rows, args.cols, generator=gen)
    print(f"\nencode + dequantize of a ({args.rows}, {args.cols}) gradient, median ms")
    psq = fqtorch.get_quantizer("psq", 5)
    results = {"psq5": median_seconds(lambda: psq.encode(grad, gen).dequantize(), args.repeats)}
    base = results["psq5"]["median"]
    print(f"  {'psq5 (eager)':<28}{base * 1e3:>9.1f} ms   1.00")
    for name in args.formats.split(","):
        for block_dim in (1, 0):
            for fused in (False, True):
                q = fqtorch.get_quantizer(
                    name, 4, rounding="stochastic", block_dim=block_dim, fused=fused
                )
                key = f"{name}_dim{block_dim}" + ("_fused" if fused else "")
                results[key] = median_seconds(
                    lambda q=q: q.encode(grad, gen).dequantize(), args.repeats
                )
                t = results[key]["median"]
                print(f"  {key:<28}{t * 1e3:>9.1f} ms {t / base:>6.2f}", flush=True)
    write_json(args.json, {"environment": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
