"""One training step (forward + both backward GEMMs) of a Linear layer, all variants in one process.

    python benchmarks/linear_step.py [--shapes 4096x1024x1024,8192x1024x4096,8192x4096x1024]
                                     [--repeats 5] [--device cpu|cuda] [--json out.json]

A shape ``MxKxN`` is M rows, K → N features. Variants: fp32, bf16 autocast, QAT, FQT-simulate and
FQT-int8 with PTQ/PSQ/BHQ at 5 bits, and ``int_mm_only`` (the three ``torch._int_mm`` calls of
the step on random codes: the limit of the int8 backend). Reported: median ms, ratios to fp32 and
bf16, the int8 step's breakdown (GEMM / quantize / transform / other) and the bytes saved for
backward (activation memory).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fqtorch
from common import environment, median_seconds, step_variants, write_json
from fqtorch.quantizers.householder import build_block_householder


def saved_bytes(layer: nn.Module, x: torch.Tensor, autocast: bool, device: str) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast(device, dtype=torch.bfloat16, enabled=autocast),
    ):
        layer(x)
    return total


def breakdown(m: int, k: int, n: int, device: str, repeats: int) -> dict[str, float]:
    """Median times of the parts of an int8 PSQ/BHQ step, measured separately."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    g = torch.randn(m, n, device=device)
    ci = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=device)
    cw = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
    cg = torch.randint(-128, 127, (m, n), dtype=torch.int8, device=device)

    def gemms() -> None:
        torch._int_mm(ci, cw.T)
        torch._int_mm(cg, cw)
        torch._int_mm(cg.T, ci)

    q = {name: fqtorch.get_quantizer(name, 5) for name in ("psq", "per_column")}
    qi = fqtorch.get_quantizer("ptq", 8, rounding="nearest")
    qw = fqtorch.get_quantizer("symmetric", 8, rounding="nearest")

    def quantize() -> None:
        qi.encode(x), qw.encode(w), q["psq"].encode(g, gen), q["per_column"].encode(g, gen)

    def transform() -> None:
        t = build_block_householder(g)
        t.inverse(t.forward(g))

    return {
        "int_mm_only": median_seconds(gemms, repeats)["median"],
        "quantize": median_seconds(quantize, repeats)["median"],
        "bhq_transform": median_seconds(transform, repeats)["median"],
    }


def run_shape(m: int, k: int, n: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(k, n).to(device)
    x = torch.randn(m, k, device=device, requires_grad=True)
    grad_out = torch.randn(m, n, device=device)

    def step(layer: nn.Module, autocast: bool) -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.backward(grad_out.to(out.dtype))
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, (layer, autocast) in step_variants(base).items():
        t = median_seconds(lambda layer=layer, a=autocast: step(layer, a), repeats)
        t["saved_bytes"] = saved_bytes(layer, x, autocast, device)
        results[name] = t
        print(f"  {name:<24}{t['median'] * 1e3:>10.1f} ms", flush=True)
    parts = breakdown(m, k, n, device, repeats)
    results["int_mm_only"] = {"median": parts["int_mm_only"], "saved_bytes": 0}
    return {"variants": results, "breakdown_int8": parts}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="4096x1024x1024,8192x1024x4096,8192x4096x1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = environment()
    print(
        f"# {env['cpu']} ({env['cpu_capability']}), {env['threads']} threads, "
        f"torch {env['torch']}, cuda {env['cuda']}"
    )
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    report = {"environment": env, "args": vars(args), "shapes": {}}
    for m, k, n in shapes:
        print(f"\nLinear step M={m}, {k} -> {n}, median of {args.repeats}", flush=True)
        res = run_shape(m, k, n, args.device, args.repeats)
        report["shapes"][f"{m}x{k}x{n}"] = res
        v = res["variants"]
        fp32, bf16 = v["fp32"]["median"], v["bf16_autocast"]["median"]
        print(f"{'variant':<24}{'ms':>10}{'fp32/x':>9}{'bf16/x':>9}{'saved MiB':>11}")
        for name, t in v.items():
            ms = t["median"]
            print(
                f"{name:<24}{ms * 1e3:>10.1f}{fp32 / ms:>9.2f}{bf16 / ms:>9.2f}"
                f"{t['saved_bytes'] / 2**20:>11.1f}"
            )
        b = res["breakdown_int8"]
        total = v["fqt_int8_psq5"]["median"]
        other = total - b["int_mm_only"] - b["quantize"]
        print(
            f"int8 PSQ step breakdown: GEMM {b['int_mm_only'] * 1e3:.1f} ms, quantize "
            f"{b['quantize'] * 1e3:.1f} ms, other {other * 1e3:.1f} ms; BHQ transform "
            f"{b['bhq_transform'] * 1e3:.1f} ms"
        )
    write_json(args.json, report)


if __name__ == "__main__":
    main()
