"""Probe what CUDA's low-precision GEMMs accept and how they round, and where an int8 step's GPU
time goes, on the GPU it runs on.

Questions the first GPU runs (NVIDIA H200, torch 2.11.0+cu130; docs/performance.md, "On a GPU")
raised or left open:

1. Which shapes does ``torch._int_mm`` refuse? Each (rows, k, width) runs ``a`` row-major
   (rows, k) times ``b`` column-major (k, width), the layout ``int_mm`` gives it, and is checked
   exact against a float64 product. The first run found widths of 8 mod 16 refused at k = 64
   (584 from 32,768 rows, 72 from 65,528); k of 8 mod 16 and widths of 16 mod 32 other than 592
   were not tried.
2. How far is ``torch._scaled_mm`` (FP8, float32 output) from the exact product of its codes?
   Per pair of element types: max |C − ref| / (|a| |b|), the error per unit of absolute sum,
   against float32's K·2⁻²⁴, for ``use_fast_accum`` off and on; and the signed mean
   mean((C − ref) · sign(ref)) / (|a| |b|), which is near 0 unless the sums lose magnitude
   (truncated partial sums, say), and the plain mean, which a rounding of one sign would move.
   Runs 5 and 6 (2026-12-04) found the signed mean negative at every K, for both pairs and both
   accumulations, with standard errors over the 65,536 entries of one product, which share rows
   and columns and so understate them; the standard errors now come from independent products.
3. Where does an int8 Conv2d step's GPU time go? One r50_conv2 step (batch 32, PSQ5 fused, as
   ``benchmarks/conv_step.py`` runs ``fqt_int8_psq5_fused``) profiled: the kernels' time (CUDA
   rows less the user annotations, which span kernels again), the annotations' own,
   ``_int_mm``'s device time, and the step's wall time.

Usage (on a machine with a CUDA GPU): ``python benchmarks/gpu_probe.py``
"""

from __future__ import annotations

import time

import torch
from torch import nn


def int_mm_shapes() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("torch._int_mm: rows x k x width -> ok / exact, or the error", flush=True)
    for rows in (16384, 65536, 100352):
        for k in (64, 72, 200, 576):
            for width in (72, 80, 584, 592):
                a = torch.randint(-8, 8, (rows, k), generator=gen, device="cuda", dtype=torch.int8)
                b = torch.randint(-8, 8, (width, k), generator=gen, device="cuda",
                                  dtype=torch.int8).T  # fmt: skip
                try:
                    c = torch._int_mm(a, b)
                    torch.cuda.synchronize()
                    exact = bool((c.double() == a.double() @ b.double()).all())
                    verdict = f"ok, exact={exact}"
                except RuntimeError as error:
                    verdict = str(error).splitlines()[0][:60]
                print(f"  {rows:>6} x {k:>3} x {width:>3}: {verdict}", flush=True)


def scaled_mm_rounding(device: str = "cuda", replicates: int = 32) -> None:
    """Question 2, on ``device`` (the CPU, which accumulates in float32, is the null case: its
    signed means should sit within a few standard errors of 0). Each K draws ``replicates``
    independent 64 × K × 64 products; the entries of one product share rows and columns, so the
    standard errors are taken over the replicates' means, which are independent."""
    gen = torch.Generator(device=device).manual_seed(1)
    one = torch.ones((), device=device)
    pairs = [(torch.float8_e4m3fn, torch.float8_e5m2), (torch.float8_e4m3fn, torch.float8_e4m3fn)]

    def summary(means: torch.Tensor) -> str:
        se = float(means.std()) / len(means) ** 0.5
        return f"{float(means.mean()):+.1e} ± {se:.0e}"

    for left, right in pairs:
        print(f"torch._scaled_mm {left} x {right} -> float32 on {device}, per unit of |a||b|, "
              f"{replicates} products of 64 x K x 64: max error; signed mean (towards zero < 0) "
              "and mean, each ± its standard error over the products", flush=True)  # fmt: skip
        for k in (48, 64, 256, 4096, 16384):
            row = []
            for fast in (False, True):
                worst, signed, plain = 0.0, [], []
                for _ in range(replicates):
                    a = (torch.randn(64, k, generator=gen, device=device) * 3).to(left)
                    b = torch.randn(64, k, generator=gen, device=device).to(right).T
                    ref = a.double() @ b.double()
                    c = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32,
                                         use_fast_accum=fast).double()  # fmt: skip
                    err = (c - ref) / (a.double().abs() @ b.double().abs())
                    worst = max(worst, float(err.abs().max()))
                    signed.append(float((err * ref.sign()).mean()))
                    plain.append(float(err.mean()))
                row.append(f"{worst:.2e}; {summary(torch.tensor(signed))}; "
                           f"{summary(torch.tensor(plain))}")  # fmt: skip
            print(f"  k={k:>5}: fast_accum off {row[0]} | on {row[1]}", flush=True)


def conv_step_profile() -> None:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fqtorch import FQTConfig, quantize_model

    base = nn.Conv2d(64, 64, 3, padding=1, bias=False).cuda()
    layer = quantize_model(base, FQTConfig.preset("psq5", backend="int8"))
    x = torch.randn(32, 64, 56, 56, device="cuda").relu().requires_grad_(True)
    grad = torch.randn(32, 64, 56, 56, device="cuda")

    def step() -> None:
        layer(x).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()

    def ms(keep) -> float:
        return sum(e.self_device_time_total for e in events if keep(e)) / 2e3

    def cuda(e) -> bool:
        return e.device_type == DeviceType.CUDA

    def annotation(e) -> bool:
        return getattr(e, "is_user_annotation", False)

    kernels = ms(lambda e: cuda(e) and not annotation(e))
    spans = ms(lambda e: cuda(e) and annotation(e))
    operators = ms(lambda e: not cuda(e))
    int_mm = sum(e.device_time_total for e in events
                 if e.device_type == DeviceType.CPU and e.key == "aten::_int_mm") / 2e3  # fmt: skip
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 5e-3
    print(f"int8 PSQ5 r50_conv2 step, ms: wall {wall:.2f}; kernels {kernels:.2f} (of which "
          f"_int_mm {int_mm:.2f}); annotations {spans:.2f}; operator rows {operators:.2f}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    scaled_mm_rounding()
    int_mm_shapes()
    conv_step_profile()
