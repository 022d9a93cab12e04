"""Whole training steps (forward, backward, SGD step) of char_gpt, PreAct ResNet-20, ResNet-18.

    python benchmarks/train_step.py [--models char_gpt,preact_resnet20,resnet18] [--batch 32]
                                    [--image-size N] [--variants PATTERNS] [--repeats 5]
                                    [--device cpu|cuda] [--json out.json]

Images are 32×32 for PreAct ResNet-20 (CIFAR) and 224×224 for ResNet-18 (ImageNet, 1000
classes) unless ``--image-size`` says otherwise.

Variants (``--variants`` picks some; fp32 and bf16 autocast always run): fp32, bf16 autocast,
QAT, FQT-simulate and FQT-int8 with PTQ/PSQ/BHQ at 5 bits, eager or ``_fused``; median ms
[min–max] of ``--repeats`` runs after 2 warm-up runs, and ratios to fp32 and bf16 measured in
this process; on CUDA, the step's peak memory; for integer steps, the overhead measure: op time
outside the integer kernels (``_int_mm``, and on the CPU oneDNN's integer convolution with its
weight packing, which is reported apart too; ``torch.profiler``, this process) over the fp32
step's median (JSON: ``integer_kernels``, ``outside_integer_kernels``); and, on the CPU, an
estimate of the integer step's ceiling: the fp32 step's op time over the integer kernels plus
the fp32 step's op time outside its convolutions and matrix products (normalization,
activations, the loss, SGD), which the integer step keeps: about the most it could gain over
fp32 with these integer kernels (``common.integer_ceiling``: five pairs of steps, each profiled
on its own, fp32 and integer in turn; JSON: ``ceiling``, ``integer_kernels_median``,
``float_products``, ``outside_float_products``). The int8 backend runs every Linear
layer on ``torch._int_mm`` and every Conv2d on the integer convolution or ``_int_mm``; a layer
that cannot (on CUDA, the image models' stems: 3 input channels make too short a reduction for
``_int_mm``) falls back to simulate, and the row says how many did (JSON:
``fell_back_to_simulate``, their messages).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    add_variant_flag,
    check_args,
    environment,
    fallback_note,
    fallbacks,
    integer_breakdown,
    integer_ceiling,
    median_seconds,
    outside_int_mm,
    peak_memory,
    print_header,
    print_table,
    print_top_ops,
    reset_peak_memory,
    select,
    step_variants,
    with_baselines,
    write_json,
)
from fqtorch.models import build_model

# image models: (classes, default image size)
IMAGES = {"preact_resnet20": (10, 32), "resnet18": (1000, 224)}


def make(
    name: str, batch: int, device: str, image_size: int | None = None
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "char_gpt":
        model = build_model(name, num_classes=96, block_size=128, dim=256, layers=4, heads=4)
        x = torch.randint(0, 96, (batch, 128))
        y = torch.randint(0, 96, (batch, 128))
    elif name in IMAGES:
        classes, size = IMAGES[name]
        size = image_size or size
        model = build_model(name, num_classes=classes)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
    else:
        known = ", ".join(("char_gpt", *IMAGES))
        raise SystemExit(f"--models: unknown model {name!r}; expected one of {known}")
    return model.to(device), x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default="char_gpt,preact_resnet20,resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="image models' input size")
    parser.add_argument(
        "--top-ops", type=int, default=0, help="print the N ops with the most time (int8, CPU)"
    )
    add_variant_flag(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    check_args(args)
    models = args.models.split(",")
    known = ("char_gpt", *IMAGES)
    unknown = [m for m in models if m not in known]
    if unknown:  # before the first model is measured
        raise SystemExit(
            f"--models: unknown model {unknown[0]!r}; expected one of {', '.join(known)}"
        )
    env = environment()
    print_header(env)
    names = with_baselines(select(args.variants))
    report = {"environment": env, "args": vars(args), "models": {}}
    for name in models:
        model, x, y = make(name, args.batch, args.device, args.image_size)
        results = {}
        print(f"\n{name}, batch {args.batch}, median of {args.repeats}", flush=True)
        steps = {}  # each variant's step, for the integer steps' ceiling against fp32
        for variant, (m, autocast) in step_variants(model, names).items():
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)

            def step(
                m: nn.Module = m,
                opt: torch.optim.Optimizer = opt,
                autocast: bool = autocast,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
            ) -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
                    logits = m(x)
                F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)
                ).backward()
                opt.step()
                if args.device == "cuda":
                    torch.cuda.synchronize()

            fell_back = fallbacks(step)  # said in the row: a layer on simulate, not int8
            results[variant] = median_seconds(step, args.repeats)
            results[variant]["fell_back_to_simulate"] = fell_back
            reset_peak_memory(args.device)
            step()
            results[variant]["peak_bytes"] = peak_memory(args.device)
            steps[variant] = step
            if variant.startswith(("fqt_int8", "fqt_auto")):
                if args.device == "cpu":  # _int_mm and oneDNN's integer convolutions
                    results[variant].update(integer_breakdown(step, top=args.top_ops))
                    results[variant].update(integer_ceiling(steps["fp32"], step))
                else:
                    parts = outside_int_mm(step, args.device)
                    results[variant].update(
                        integer_kernels=parts["int_mm"],
                        outside_integer_kernels=parts["outside_int_mm"],
                    )
            print(
                f"  {variant:<26}{results[variant]['median'] * 1e3:>10.1f} ms"
                f"{fallback_note(fell_back)}",
                flush=True,
            )
        print_table(results)
        fp32 = results["fp32"]["median"]
        for variant, t in results.items():
            if "outside_integer_kernels" in t:
                packing = t.get("onednn::qconv_prepack", 0.0)
                how = (
                    f"of which oneDNN's weight packing {packing * 1e3:.1f} ms; profiler"
                    if args.device == "cpu"
                    else "GPU kernel time, profiler"
                )
                print(
                    f"{variant}: outside the integer kernels "
                    f"{t['outside_integer_kernels'] * 1e3:.1f} ms, inside "
                    f"{t['integer_kernels'] * 1e3:.1f} ms ({how}); outside / fp32 step = "
                    f"{t['outside_integer_kernels'] / fp32:.3f}"
                )
                if "ceiling" in t:
                    print(
                        f"{variant}: ceiling {t['ceiling']:.2f}x fp32 with these integer kernels "
                        f"({t['integer_kernels_median'] * 1e3:.1f} ms): the fp32 step spends "
                        f"{t['float_products'] * 1e3:.1f} ms in its products and "
                        f"{t['outside_float_products'] * 1e3:.1f} ms outside them, which the "
                        "integer step keeps (profiler; medians of 5 pairs of steps)"
                    )
                print_top_ops(t)
        report["models"][name] = results
        write_json(args.json, report)


if __name__ == "__main__":
    main()
