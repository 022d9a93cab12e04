"""Bare matrix products on this machine: fp32, bf16 and ``torch._int_mm`` (int8 → int32), the
limits every FQT step sits on. CPUs differ: whether the integer or the bf16 units are the fast
ones decides what ``backend="auto"`` can gain (docs/performance.md).

    python benchmarks/gemm.py [--shapes 1024x1024x1024,8192x1024x4096] [--repeats 5]
                              [--json out.json]

A shape ``MxKxN`` is (M, K) @ (K, N). Variants: ``fp32``, ``bf16_autocast`` (bf16 operands),
``int_mm`` (row-major int8 operands) and ``int_mm_bt`` (the second operand column-major, the
layout the int8 backend passes for ``x @ wᵀ``). Medians [min–max] of --repeats runs after 2
warm-up runs, all in this process, with ratios to fp32 and bf16.
"""

from __future__ import annotations

import argparse

import torch

from common import environment, median_seconds, print_header, print_table, write_json

DEFAULT_SHAPES = "1024x1024x1024,2048x2048x2048,8192x1024x4096,8192x4096x1024"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            m, k, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"--shapes: expected MxKxN items like 1024x1024x1024, got {item!r}"
            ) from None
        shapes.append((m, k, n))
    return shapes


def gemm_times(m: int, k: int, n: int, repeats: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    ai = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    bi = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    bt = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).t()
    return {
        "fp32": median_seconds(lambda: a @ b, repeats),
        "bf16_autocast": median_seconds(lambda: a16 @ b16, repeats),
        "int_mm": median_seconds(lambda: torch._int_mm(ai, bi), repeats),
        "int_mm_bt": median_seconds(lambda: torch._int_mm(ai, bt), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    env = environment()
    print_header(env)
    results = {}
    for m, k, n in parse_shapes(args.shapes):
        print(f"\n({m}, {k}) @ ({k}, {n}), median of {args.repeats}")
        times = gemm_times(m, k, n, args.repeats)
        print_table(times)
        results[f"{m}x{k}x{n}"] = times
    write_json(args.json, {"environment": env, "results": results})


if __name__ == "__main__":
    main()
