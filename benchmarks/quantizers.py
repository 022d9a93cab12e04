"""Cost of the gradient quantizers and of one FQT layer step (simulate backend).

    python benchmarks/quantizers.py [--rows 8192 --cols 4096] [--json out.json]

Prints (1) PTQ, PSQ and BHQ on a gradient of shape (rows, cols), as ratios to PSQ, and (2) one
training step (forward + backward) of a Linear layer, fp32, bf16 autocast, QAT and FQT-simulate
(PTQ/PSQ/BHQ at 5 bits), as ratios to QAT and to fp32. Medians of --repeats runs after warm-up
(bf16: max(3, repeats/2) runs after one warm-up, as it is slow on CPUs without bf16 units), all
measured in this process.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import fqtorch
from common import environment, median_seconds, write_json


def quantizer_times(rows: int, cols: int, repeats: int) -> dict[str, dict[str, float]]:
    gen = torch.Generator().manual_seed(0)
    scales = torch.exp(2 * torch.randn(rows, 1, generator=gen))
    grad = torch.randn(rows, cols, generator=gen) * scales  # (rows, cols), few rows dominate
    results = {}
    for name in ("ptq", "psq", "bhq"):
        q = fqtorch.get_quantizer(name, 5)
        results[name] = median_seconds(lambda q=q: q(grad, gen), repeats)
    return results


def layer_step_times(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict[str, dict]:
    torch.manual_seed(0)
    base = nn.Linear(fan_in, fan_out)
    x = torch.randn(rows, fan_in, requires_grad=True)
    grad_out = torch.randn(rows, fan_out)

    def step(layer: nn.Module, autocast: bool = False) -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.backward(grad_out.to(out.dtype))

    variants = {
        "fp32": (base, False),
        "bf16_autocast": (base, True),
        "qat": (
            fqtorch.quantize_model(copy.deepcopy(base), fqtorch.FQTConfig.preset("qat")),
            False,
        ),
    }
    for name in ("ptq5", "psq5", "bhq5"):
        layer = fqtorch.quantize_model(copy.deepcopy(base), fqtorch.FQTConfig.preset(name))
        variants[f"fqt_simulate_{name}"] = (layer, False)
    results = {}
    for name, (layer, autocast) in variants.items():
        # bf16 has no fast kernels on AVX2-only CPUs (about 40x fp32 there): time it fewer times.
        runs, warmup = (max(3, repeats // 2), 1) if autocast else (repeats, 2)
        results[name] = median_seconds(lambda m=layer, a=autocast: step(m, a), runs, warmup)
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
    print(
        f"# {env['cpu']} ({env['cpu_capability']}), {env['threads']} threads, torch {env['torch']}"
    )

    quant = quantizer_times(args.rows, args.cols, args.repeats)
    psq = quant["psq"]["median"]
    print(f"\nquantize a ({args.rows}, {args.cols}) gradient at 5 bits, median of {args.repeats}")
    print(f"{'quantizer':<12}{'ms':>10}{'/ PSQ':>10}")
    for name, t in quant.items():
        print(f"{name:<12}{t['median'] * 1e3:>10.1f}{t['median'] / psq:>10.2f}")

    steps = layer_step_times(*args.layer, args.repeats)
    qat, fp32 = steps["qat"]["median"], steps["fp32"]["median"]
    print(f"\nLinear step {tuple(args.layer)} (forward + backward), median of {args.repeats}")
    print(f"{'variant':<24}{'ms':>10}{'/ QAT':>10}{'/ fp32':>10}")
    for name, t in steps.items():
        m = t["median"]
        print(f"{name:<24}{m * 1e3:>10.1f}{m / qat:>10.2f}{m / fp32:>10.2f}")
    write_json(
        args.json, {"environment": env, "args": vars(args), "quantize": quant, "layer_step": steps}
    )


if __name__ == "__main__":
    main()
