"""One training step (forward + both backward GEMMs) of a Linear layer, all variants in one process.

    python benchmarks/linear_step.py [--shapes 4096x1024x1024,8192x1024x4096,8192x4096x1024]
                                     [--variants PATTERNS] [--repeats 5] [--device cpu|cuda]
                                     [--top-ops N] [--json out.json]

A shape ``MxKxN`` is M rows, K → N features. Variants (``--variants`` picks some; fp32 and bf16
autocast always run, as every ratio is against them): fp32, bf16 autocast, QAT, FQT-simulate and
FQT-int8 with PTQ/PSQ/BHQ at 5 bits, eager or ``_fused`` (``torch.compile``'d quantizers), and
``int_mm_only`` (the three ``torch._int_mm`` calls of the step on random codes, in the backend's
operand layouts: the limit of the int8 backend). Reported: median ms [min–max], ratios to fp32
and bf16, the int8 step's breakdown (GEMM / quantize / BHQ transform / other, from separately
timed parts, and the share of one step's time inside ``_int_mm`` from ``torch.profiler``), the
overhead measure ``outside _int_mm / fp32``: the int8 step's op time outside its ``_int_mm``
calls (``torch.profiler``, this process) over the fp32 step's median, the bytes saved for
backward (activation memory) and, on CUDA, the step's peak memory.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fqtorch
from common import (
    add_variant_flag,
    check_args,
    environment,
    fallback_note,
    fallbacks,
    integer_breakdown,
    layer_step,
    matrix_shapes,
    median_seconds,
    outside_int_mm,
    peak_memory,
    print_header,
    print_table,
    print_top_ops,
    reset_peak_memory,
    saved_bytes,
    select,
    step_variants,
    with_baselines,
    write_json,
)
from fqtorch.backends.int8 import int_mm
from fqtorch.quantizers.householder import build_block_householder
from fqtorch.quantizers.twoway import encode_two_way


def breakdown(m: int, k: int, n: int, device: str, repeats: int) -> dict[str, float]:
    """Median times of the parts of an int8 PSQ/BHQ step, measured separately: the three integer
    GEMMs, the four quantizations of the step (input, weight, grad_output per row, grad_output
    per column) eager and fused (the fused path quantizes grad_output both ways in shared
    passes, as the int8 backend does), BHQ's eager transform (forward and inverse, the
    ``fused=False`` path) and fused BHQ's quantization (its transform computed inside the
    passes) with its inverse on the step's ``grad_input``."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    g = torch.randn(m, n, device=device)
    ci = torch.randint(-128, 127, (m, k), dtype=torch.int8, device=device)
    cw = torch.randint(-128, 127, (n, k), dtype=torch.int8, device=device)
    cg = torch.randint(-128, 127, (m, n), dtype=torch.int8, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def gemms() -> None:  # the backend's three products, with its operand layouts
        int_mm(ci, cw.T)
        int_mm(cg, cw)
        int_mm(cg.T, ci)
        sync()

    def quantize_with(fused: bool):
        qi = fqtorch.get_quantizer("ptq", 8, rounding="nearest", fused=fused)
        qw = fqtorch.get_quantizer("symmetric", 8, rounding="nearest", fused=fused)
        qg = fqtorch.get_quantizer("psq", 5, fused=fused)
        qh = fqtorch.get_quantizer("per_column", 8, fused=fused)

        def quantize() -> None:
            qi.encode(x), qw.encode(w)
            if fused:
                encode_two_way(g, qg, qh, gen)
            else:
                qg.encode(g, gen), qh.encode(g, gen)
            sync()

        return quantize

    def transform() -> None:  # the eager path's (fused=False)
        t = build_block_householder(g)
        t.inverse(t.forward(g))
        sync()

    product = torch.randn(m, k, device=device)  # stands for the grad_input GEMM's output
    grad_input = torch.empty_like(product)
    qi = fqtorch.get_quantizer("ptq", 8, rounding="nearest", fused=True)
    qw = fqtorch.get_quantizer("symmetric", 8, rounding="nearest", fused=True)
    qb = fqtorch.get_quantizer("bhq", 5, fused=True)
    qh = fqtorch.get_quantizer("per_column", 8, fused=True)

    def quantize_bhq_fused() -> None:  # fused BHQ: transform inside the passes, and its inverse
        qi.encode(x), qw.encode(w)
        g_codes, _ = encode_two_way(g, qb, qh, gen)
        # On a fresh copy of the product each run (inverse_ overwrites its argument; repeated
        # on one buffer its values would drift): the copy, one pass over (M, K), is counted.
        grad_input.copy_(product)
        g_codes.transform.inverse_(grad_input)  # on the step's (M, K) grad_input
        sync()

    buffer = torch.empty_like(g)

    def stream() -> None:  # read and write grad_output's bytes once, into a reused buffer
        torch.mul(g, 2, out=buffer)
        sync()

    stream_time = median_seconds(stream, repeats)["median"]

    return {
        "int_mm_only": median_seconds(gemms, repeats)["median"],
        "quantize": median_seconds(quantize_with(False), repeats)["median"],
        "quantize_fused": median_seconds(quantize_with(True), repeats)["median"],
        "bhq_transform": median_seconds(transform, repeats)["median"],
        "quantize_fused_bhq": median_seconds(quantize_bhq_fused, repeats)["median"],
        "bandwidth_bytes_per_s": 2 * g.numel() * g.element_size() / stream_time,
    }


def int_mm_share(step: Callable[[], None], device: str) -> float:
    """Fraction of one step's op time spent in ``aten::_int_mm``, from ``torch.profiler``:
    the GEMM-only limit measured inside the step itself, free of run-to-run drift. On CUDA the
    fraction of the GPU's kernel time, which leaves out the host."""
    if device == "cuda":  # the GPU's kernel time (outside_int_mm says how it is counted)
        parts = outside_int_mm(step, device, steps=1)
        total = parts["int_mm"] + parts["outside_int_mm"]
        return parts["int_mm"] / total if total else float("nan")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key == "aten::_int_mm")
    return gemm / total if total else float("nan")


def run_shape(
    m: int,
    k: int,
    n: int,
    device: str,
    repeats: int,
    names: list[str],
    top_ops: int = 0,
    with_parts: bool = True,
) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(k, n).to(device)
    x = torch.randn(m, k, device=device, requires_grad=True)
    grad_out = torch.randn(m, n, device=device)

    def step(layer: nn.Module, autocast: bool) -> None:
        layer_step(layer, x, grad_out, autocast, device)

    results = {}
    for name, (layer, autocast) in step_variants(base, names).items():
        # a layer that fell back to simulate measures something else: said in the row
        fell_back = fallbacks(lambda layer=layer, a=autocast: step(layer, a))
        t = median_seconds(lambda layer=layer, a=autocast: step(layer, a), repeats)
        t["fell_back_to_simulate"] = fell_back
        t["saved_bytes"] = saved_bytes(layer, x, autocast, device)
        if name.startswith(("fqt_int8", "fqt_auto")):
            if with_parts:  # printed with the parts only
                t["int_mm_share"] = int_mm_share(lambda layer=layer: step(layer, False), device)
            t.update(outside_int_mm(lambda layer=layer: step(layer, False), device))
            if top_ops and device == "cpu":
                parts = integer_breakdown(lambda layer=layer: step(layer, False), top=top_ops)
                t.update(top_ops=parts["top_ops"], fqtorch_kernels=parts["fqtorch_kernels"])
        reset_peak_memory(device)
        step(layer, autocast)
        t["peak_bytes"] = peak_memory(device)
        results[name] = t
        print(f"  {name:<26}{t['median'] * 1e3:>10.1f} ms{fallback_note(fell_back)}", flush=True)
    if not with_parts:
        return {"variants": results, "breakdown_int8": None}
    split = breakdown(m, k, n, device, repeats)
    results["int_mm_only"] = {"median": split["int_mm_only"], "saved_bytes": 0}
    return {"variants": results, "breakdown_int8": split}


def print_overhead(variants: dict) -> None:
    """The overhead measure of every integer step: time outside ``_int_mm`` / fp32 step (and,
    with ``--top-ops``, where the step's time goes)."""
    fp32 = variants["fp32"]["median"]
    for name, t in variants.items():
        if "outside_int_mm" in t and not t["int_mm"]:
            print(f"{name}: no _int_mm ran (simulate): no overhead measure")
        elif "outside_int_mm" in t:
            print(
                f"{name}: outside _int_mm {t['outside_int_mm'] * 1e3:.1f} ms, inside "
                f"{t['int_mm'] * 1e3:.1f} ms (profiler); outside _int_mm / fp32 step = "
                f"{t['outside_int_mm'] / fp32:.3f}"
            )
            print_top_ops(t)


def print_breakdown(variants: dict, parts: dict) -> None:
    gemm, transform = parts["int_mm_only"], parts["bhq_transform"]
    print(
        f"memory bandwidth (read + write of a reused buffer): "
        f"{parts['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s"
    )
    print(
        f"parts: three _int_mm {gemm * 1e3:.1f} ms; quantize eager {parts['quantize'] * 1e3:.1f}"
        f" ms, fused {parts['quantize_fused'] * 1e3:.1f} ms; BHQ transform {transform * 1e3:.1f}"
        " ms"
    )
    print(f"BHQ fused quantization with its inverse {parts['quantize_fused_bhq'] * 1e3:.1f} ms")
    for suffix, key in (("", "quantize"), ("_fused", "quantize_fused")):
        for q in ("psq5", "bhq5"):
            name = f"fqt_int8_{q}{suffix}"
            if name not in variants:
                continue
            total = variants[name]["median"]
            # Fused BHQ: its transform is inside the quantization passes.
            part = "quantize_fused_bhq" if q == "bhq5" and suffix else key
            extra = transform if q == "bhq5" and not suffix else 0.0
            other = total - gemm - parts[part] - extra
            print(
                f"{name}: {total * 1e3:.1f} ms = GEMM {gemm * 1e3:.1f} + quantize "
                f"{parts[part] * 1e3:.1f} + transform {extra * 1e3:.1f} + other "
                f"{other * 1e3:.1f}; GEMM-only limit / step = {gemm / total:.2f} (separate "
                f"runs), _int_mm share of the step = {variants[name]['int_mm_share']:.3f} "
                "(profiler, same run; on CUDA of the GPU's kernel time)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="4096x1024x1024,8192x1024x4096,8192x4096x1024")
    add_variant_flag(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--top-ops", type=int, default=0, help="print the N ops with the most time (int8, CPU)"
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip the int8 step's parts (GEMM alone, quantizers, BHQ transform): they compile "
        "kernels of their own, slow on a first run",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    check_args(args)
    shapes = matrix_shapes(args.shapes, "MxKxN")
    env = environment()
    print_header(env)
    names = with_baselines(select(args.variants))
    report = {"environment": env, "args": vars(args), "shapes": {}}
    for m, k, n in shapes:
        print(f"\nLinear step M={m}, {k} -> {n}, median of {args.repeats}", flush=True)
        res = run_shape(
            m, k, n, args.device, args.repeats, names, args.top_ops, not args.no_breakdown
        )
        report["shapes"][f"{m}x{k}x{n}"] = res
        print_table(res["variants"], memory_key="saved_bytes")
        if res["breakdown_int8"] is not None:
            print_breakdown(res["variants"], res["breakdown_int8"])
        print_overhead(res["variants"])
        write_json(args.json, report)  # after every shape: a long run keeps what it measured


if __name__ == "__main__":
    main()
