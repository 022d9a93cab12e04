"""Probe what CUDA's low-precision GEMMs accept and how they round, on the GPU it runs on.

Two questions the first GPU run of ``benchmarks/gpu_check.sh`` raised (NVIDIA H200, torch
2.11.0+cu130):

1. Which shapes does ``torch._int_mm`` refuse? (The int8 Conv2d's ``grad_input`` of r50_conv2,
   m 584 n 100352 k 64 in cuBLASLt's terms, raised CUBLAS_STATUS_NOT_SUPPORTED.) Each (rows, k,
   cols) runs ``a`` row-major (rows, k) times ``b`` column-major (k, cols), the layout ``int_mm``
   gives it, and is checked exact against a float64 product.
2. How far is ``torch._scaled_mm`` (FP8, float32 output) from the exact product of its codes?
   Printed as max |C − ref| / (|a| |b|), the error per unit of absolute sum, against float32's
   K·2⁻²⁴, for ``use_fast_accum`` off and on.

Usage (on a machine with a CUDA GPU): ``python benchmarks/gpu_probe.py``
"""

from __future__ import annotations

import torch


def int_mm_shapes() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    print("torch._int_mm: rows x k x cols -> ok / exact, or the error", flush=True)
    for rows in (4096, 32768, 65528, 65536, 100352):
        for k in (64, 576):
            for cols in (72, 576, 584, 592, 640):
                a = torch.randint(-8, 8, (rows, k), generator=gen, device="cuda", dtype=torch.int8)
                b = torch.randint(-8, 8, (cols, k), generator=gen, device="cuda",
                                  dtype=torch.int8).T  # fmt: skip
                try:
                    c = torch._int_mm(a, b)
                    torch.cuda.synchronize()
                    exact = bool((c.double() == a.double() @ b.double()).all())
                    verdict = f"ok, exact={exact}"
                except RuntimeError as error:
                    verdict = str(error).splitlines()[0][:60]
                print(f"  {rows:>6} x {k:>3} x {cols:>3}: {verdict}", flush=True)


def scaled_mm_rounding() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    print("torch._scaled_mm e4m3 x e5m2 -> float32: max |C - ref| / (|a||b|)", flush=True)
    one = torch.ones((), device="cuda")
    for k in (48, 64, 256, 4096, 16384):
        a = (torch.randn(256, k, generator=gen, device="cuda") * 3).to(torch.float8_e4m3fn)
        b = (torch.randn(256, k, generator=gen, device="cuda")).to(torch.float8_e5m2).T
        ref = a.double() @ b.double()
        scale = a.double().abs() @ b.double().abs()
        row = []
        for fast in (False, True):
            c = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32,
                                 use_fast_accum=fast)  # fmt: skip
            row.append(float(((c.double() - ref).abs() / scale).max()))
        f32 = a.float() @ b.float()
        row.append(float(((f32.double() - ref).abs() / scale).max()))
        print(f"  k={k:>5}: fast_accum off {row[0]:.2e}, on {row[1]:.2e}, float32 matmul "
              f"{row[2]:.2e}; float32 bound K·2^-24 = {k * 2**-24:.2e}, 2^-14 = {2**-14:.2e}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    scaled_mm_rounding()
    int_mm_shapes()
