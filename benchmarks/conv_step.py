"""One training step (forward + both backward GEMMs) of a Conv2d layer, all variants in one process.

    python benchmarks/conv_step.py [--layers NAMES] [--batch B] [--variants PATTERNS]
                                   [--channels-last] [--repeats 5] [--device cpu|cuda]
                                   [--json out.json]

Layers (``--layers`` picks some by name; ``--batch`` overrides their batch size):

    r56_stage1   ResNet-56 (CIFAR-10, batch 128): 16 → 16, 3×3, 32×32
    r56_stage2   ResNet-56: 32 → 32, 3×3, 16×16
    r56_stage3   ResNet-56: 64 → 64, 3×3, 8×8
    r56_down     ResNet-56: 16 → 32, 3×3, stride 2, 32×32
    r50_conv2    ResNet-50 (ImageNet, batch 32): 64 → 64, 3×3, 56×56
    r50_reduce   ResNet-50: 256 → 64, 1×1, 56×56
    r50_stage3   ResNet-50: 128 → 128, 3×3, 28×28
    r50_stage5   ResNet-50: 512 → 512, 3×3, 7×7
    r50_down     ResNet-50: 128 → 128, 3×3, stride 2, 56×56 (stage 3's first block)

Inputs are post-ReLU, as inside a residual block. Variants and output as in
``linear_step.py``: fp32, bf16 autocast, QAT, FQT-simulate / FQT-int8 with PTQ, PSQ and BHQ at
5 bits, eager or ``_fused``; median ms [min–max], ratios to fp32 and bf16, bytes saved for
backward and, on CUDA, peak memory.

For every int8 variant, a breakdown from ``torch.profiler`` over 2 steps: the time in the
integer kernels (oneDNN's ``qconv2d_pointwise`` with its weight packing, and ``_int_mm``) and the
time outside them (quantizers, layouts, zero-point terms, epilogues), as a fraction of the fp32
step of the same process (issue target: ≤ 0.15), and the part of it in compiled kernels
(``_fused`` variants: the quantizers and the integer products' epilogues).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from common import (
    add_variant_flag,
    check_args,
    environment,
    fallback_note,
    fallbacks,
    integer_breakdown,
    layer_step,
    median_seconds,
    outside_int_mm,
    peak_memory,
    print_header,
    print_table,
    reset_peak_memory,
    saved_bytes,
    select,
    step_variants,
    with_baselines,
    write_json,
)

# name: (batch, in_channels, out_channels, kernel, stride, height = width)
LAYERS = {
    "r56_stage1": (128, 16, 16, 3, 1, 32),
    "r56_stage2": (128, 32, 32, 3, 1, 16),
    "r56_stage3": (128, 64, 64, 3, 1, 8),
    "r56_down": (128, 16, 32, 3, 2, 32),
    "r50_conv2": (32, 64, 64, 3, 1, 56),
    "r50_reduce": (32, 256, 64, 1, 1, 56),
    "r50_stage3": (32, 128, 128, 3, 1, 28),
    "r50_stage5": (32, 512, 512, 3, 1, 7),
    "r50_down": (32, 128, 128, 3, 2, 56),
}


def run_layer(
    spec: tuple[int, ...],
    batch: int | None,
    device: str,
    repeats: int,
    names: list[str],
    channels_last: bool = False,
) -> dict:
    default_batch, cin, cout, kernel, stride, size = spec
    torch.manual_seed(0)
    base = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False).to(device)
    batch = default_batch if batch is None else batch
    x = torch.randn(batch, cin, size, size, device=device).relu()
    grad_out = torch.randn_like(base(x)).detach()
    if channels_last:  # as inside a model whose convolutions hand on channels-last tensors
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def step(layer: nn.Module, autocast: bool) -> None:
        layer_step(layer, x, grad_out, autocast, device)

    results = {}
    for name, (layer, autocast) in step_variants(base, names).items():
        # An int8 layer that fell back to simulate measures something else: said in the row.
        fell_back = fallbacks(lambda layer=layer, a=autocast: step(layer, a))
        t = median_seconds(lambda layer=layer, a=autocast: step(layer, a), repeats)
        t["fell_back_to_simulate"] = fell_back
        t["saved_bytes"] = saved_bytes(layer, x, autocast, device)
        reset_peak_memory(device)
        step(layer, autocast)
        t["peak_bytes"] = peak_memory(device)
        results[name] = t
        note = fallback_note(fell_back)
        if "_int8_" in name or "_auto_" in name:

            def measure(layer: nn.Module = layer) -> None:
                step(layer, False)

            if device == "cuda":  # the GPU's kernel time; integer_breakdown's is the host's
                parts = outside_int_mm(measure, device)
                t.update(
                    integer_kernels=parts["int_mm"], outside_integer_kernels=parts["outside_int_mm"]
                )
            else:
                t.update(integer_breakdown(measure))
            fp32 = results["fp32"]["median"]
            if not t["integer_kernels"]:  # the overhead measure means nothing then
                note += "  no integer kernel ran"
            else:
                note += (
                    f"  integer kernels {t['integer_kernels'] * 1e3:.1f} ms, outside "
                    f"{t['outside_integer_kernels'] * 1e3:.1f} ms "
                    f"= {t['outside_integer_kernels'] / fp32:.2f}× fp32 step"
                )
                if device == "cuda":
                    note += " (GPU kernel time)"
                else:
                    note += (
                        f" (of which compiled kernels {t['compiled_quantizers'] * 1e3:.1f} ms: "
                        "quantizers and epilogues)"
                    )
        print(f"  {name:<26}{t['median'] * 1e3:>10.1f} ms{note}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated names")
    parser.add_argument("--batch", type=int, help="override every layer's batch size")
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="input and grad_output channels-last, as inside a model (the int8 convolution's "
        "output is channels-last, so the layers after it get such tensors back)",
    )
    add_variant_flag(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    check_args(args)
    unknown = [name for name in args.layers.split(",") if name not in LAYERS]
    if unknown:
        parser.error(f"unknown layers {unknown}; known: {', '.join(LAYERS)}")
    env = environment()
    print_header(env)
    names = with_baselines(select(args.variants))
    report = {"environment": env, "args": vars(args), "layers": {}}
    for layer in args.layers.split(","):
        spec = LAYERS[layer]
        batch = spec[0] if args.batch is None else args.batch
        print(f"\n{layer}: batch {batch}, {spec[1:]}, median of {args.repeats}", flush=True)
        results = run_layer(spec, args.batch, args.device, args.repeats, names, args.channels_last)
        report["layers"][layer] = {"batch": batch, "spec": spec, "variants": results}
        print_table(results, memory_key="saved_bytes")
        write_json(args.json, report)


if __name__ == "__main__":
    main()
