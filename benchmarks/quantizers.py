"""Cost of the gradient quantizers and of one FQT layer step (simulate backend).

    python benchmarks/quantizers.py [--rows 8192 --cols 4096] [--json out.json]

Prints (1) quantize-and-dequantize with PTQ, PSQ, BHQ and RHT at 5 bits on a gradient of shape
(rows, cols), eager and fused (one ``torch.compile``'d kernel with in-kernel hash noise), as
ratios to eager PSQ, and (2) one training step (forward + backward) of a Linear layer: fp32, bf16
autocast, QAT and FQT-simulate (PTQ/PSQ/BHQ at 5 bits, eager and fused), as ratios to QAT and to
fp32. Medians of --repeats runs after 2 warm-up runs (which also compile), all in this process.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fqtorch
from common import (
    environment,
    layer_step,
    median_seconds,
    print_header,
    select,
    step_variants,
    write_json,
)


def quantizer_times(rows: int, cols: int, repeats: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    scales = torch.exp(2 * torch.randn(rows, 1, generator=gen))
    grad = torch.randn(rows, cols, generator=gen) * scales  # (rows, cols), few rows dominate
    results = {}
    for fused in (False, True):
        for name in ("ptq", "psq", "bhq", "rht"):
            q = fqtorch.get_quantizer(name, 5, fused=fused)
            key = f"{name}_fused" if fused else name
            results[key] = median_seconds(lambda q=q: q(grad, gen), repeats)
            print(f"  {key:<24}{results[key]['median'] * 1e3:>10.1f} ms", flush=True)
    return results


def layer_step_times(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict[str, dict]:
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out)
    x = torch.randn(rows, fan_in, requires_grad=True)
    grad_out = torch.randn(rows, fan_out)

    def step(layer: nn.Module, autocast: bool = False) -> None:
        layer_step(layer, x, grad_out, autocast, "cpu")

    variants = step_variants(base, select("fp32,bf16_autocast,qat,fqt_simulate_*"))
    results = {}
    for name, (layer, autocast) in variants.items():
        results[name] = median_seconds(lambda m=layer, a=autocast: step(m, a), repeats)
        print(f"  {name:<24}{results[name]['median'] * 1e3:>10.1f} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument(
        "--layer",
        type=int,
        nargs=3,
        default=[4096, 1024, 1024],
        metavar=("ROWS", "IN", "OUT"),
        help="Linear layer step shape",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    env = environment()
    print_header(env)

    quant = quantizer_times(args.rows, args.cols, args.repeats)
    psq = quant["psq"]["median"]
    print(f"\nquantize a ({args.rows}, {args.cols}) gradient at 5 bits, median of {args.repeats}")
    print(f"{'quantizer':<16}{'ms':>10}{'[min-max]':>20}{'/ PSQ':>10}")
    for name, t in quant.items():
        spread = f"[{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}]"
        print(f"{name:<16}{t['median'] * 1e3:>10.1f}{spread:>20}{t['median'] / psq:>10.2f}")

    steps = layer_step_times(*args.layer, args.repeats)
    qat, fp32 = steps["qat"]["median"], steps["fp32"]["median"]
    print(f"\nLinear step {tuple(args.layer)} (forward + backward), median of {args.repeats}")
    print(f"{'variant':<26}{'ms':>10}{'[min-max]':>20}{'/ QAT':>10}{'/ fp32':>10}")
    for name, t in steps.items():
        m = t["median"]
        spread = f"[{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}]"
        print(f"{name:<26}{m * 1e3:>10.1f}{spread:>20}{m / qat:>10.2f}{m / fp32:>10.2f}")
    write_json(
        args.json, {"environment": env, "args": vars(args), "quantize": quant, "layer_step": steps}
    )


if __name__ == "__main__":
    main()
