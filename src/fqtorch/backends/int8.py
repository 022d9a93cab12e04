"""The ``int8`` backend: the three GEMMs of a Linear layer as integer products (``torch._int_mm``).

Every operand is an int8 code matrix ``C`` with a scale ``s`` and a bias (zero point) ``b``
(value ``s C + b``) that are constant along the axis the GEMM sums over (docs/method.md §2), so they
come out of the product as rank-one corrections made of row and column sums of the codes:

    output      = X_q W_qᵀ,   X_q = s_x C_x + b_x,  W_q = s_w C_w + b_w   (both per tensor)
       [m, o]   = s_x s_w (C_x C_wᵀ) + s_x b_w rowsum(C_x)[m] + b_x s_w rowsum(C_w)[o] + K b_x b_w
    grad_input  = T⁻¹[(s_g C_g + b_g) W_q]    s_g, b_g per tensor or per row; T a row transform
       [m, k]   = T⁻¹[s_g s_w (C_g C_w) + s_g b_w rowsum(C_g) + b_g s_w colsum(C_w) + O b_g b_w]
    grad_weight = (s_h C_h + b_h)ᵀ X_q        s_h, b_h per tensor or per column (output feature o)
       [o, k]   = s_o s_x (C_hᵀ C_x) + s_o b_x colsum(C_h)[o] + b_o s_x colsum(C_x)[k] + M b_o b_x

Every row and column sum is over the GEMM's own reduction axis, so the integer product yields
them: its operands are bordered with ones (:func:`_int_mm`), about one more output column.

A ``bits``-bit code has |C| ≤ 2^(bits−1), so a reduction of ``n`` products of two codes stays
inside int32 while n · 2^(bits_a−1) · 2^(bits_b−1) < 2^31 (:func:`chunk_length`: 131,064 for two
8-bit operands). A GEMM that short is one ``_int_mm``; a longer one (the weight gradient over
N·H·W or batch × tokens rows) runs in chunks of at most that length, summed exactly in int64.
The chunk length comes from the bit widths, not from the codes: no device sync.

The epilogue's terms cancel strongly where the codes sit at one end of their grid (one-signed
operands: post-ReLU inputs, all-positive weights; the zero-point term then nearly cancels the
product), so float32 would lose the difference: rounding the product to float32 first put the
output off by a share of its largest magnitude that grows with K (2.8e-3 at K = 65,536;
``python experiments/method_checks.py epilogue``, docs/method.md §8). The compiled epilogues
compute in float64 (in registers: no float64 buffer) and return float32; the eager ones run in
float32 up to a reduction of :data:`FLOAT32_EPILOGUE_MAX_K` (256: within about 2e-5 of the
output) and in float64 beyond it. The weight gradient's epilogue, (O, K) next to its
(O, M) × (M, K) GEMM, is float64 at any length.

The forward saves the int8 codes, not the float operands, for the backward (4× less memory).
A gradient quantizer set to ``identity`` runs its GEMM in float on the dequantized operand.

Two paths run these formulas. With fused quantizers (``fused=True``, the default of
``backend="int8"``) the *compiled path*: ``grad_output`` is quantized both ways in one compiled
pass (:func:`~fqtorch.quantizers.twoway.encode_two_way`), each epilogue is one compiled kernel,
the float32 ones written over their own int32 product, and the weight-gradient product takes
``grad_output``'s codes without copying them (:func:`_grad_weight_fast`); a reduction that would
need padding or chunks takes the eager functions. With ``fused=False`` the *eager path*
(:func:`_forward`, :func:`_grad_input`, :func:`_grad_weight`), for debugging. Both give
simulate's values to float32 rounding on the same codes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..quantizers.base import QuantizedTensor
from ..quantizers.fused import LazyCompiled
from ..quantizers.twoway import encode_two_way
from ..quantizers.uniform import Identity
from .base import PlanSource, Unsupported, check_finite, refuse_second_derivative
from .notes import compile_disabled, say_once

__all__ = [
    "CUDA_SPEED_NOTE",
    "INT8_CPU_FLAGS",
    "chunk_length",
    "cpu_flags",
    "cpu_speed_note",
    "int_mm",
    "int_mm_supported",
    "int_mm_verdict",
    "linear",
]

# /proc/cpuinfo flags with which ATen runs torch._int_mm on oneDNN's int8 kernels: it checks for
# AVX-512 VNNI (every AMX CPU has it; AVX-VNNI alone does not count). Elsewhere it runs a generic
# loop, exact but far slower than an fp32 matmul.
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni")


@torch.compiler.disable  # host-side memo: traced, dynamo would skip the cache and rerun the probe
def int_mm_verdict(device_type: str = "cpu") -> str | None:
    """``None`` where ``torch._int_mm`` sums exactly on this machine's ``device_type`` devices,
    else why not: every int8 GEMM of this backend (Linear, and Conv2d on either path) would be
    wrong, not slow, so the backend refuses to run (:func:`linear`, ``int8_conv.conv``).

    oneDNN's kernels for CPUs without VNNI or AMX multiply u8 × s8 pairs summed in int16, which
    saturates: 127 · 127 · 2 codes already give 255 for 32,258. ATen hands ``_int_mm`` to oneDNN
    on CPUs with AVX-512 VNNI, so a process there with oneDNN capped below it
    (``ONEDNN_MAX_CPU_ISA=AVX2``) gets the saturating kernel; on an AVX2-only CPU ATen runs its
    own kernel, which is exact (and slow). The probe multiplies the codes that break it (rows
    and columns of 127, of −128 and of both alternating; a reduction of 32 codes) against an
    exact int64 product. A memo per device type (the ISA oneDNN picks is fixed for the
    process), read-only after the first call: a few microseconds, once per process
    (``int_mm_verdict()`` and ``int_mm_verdict("cpu")`` are one entry).
    """
    return _int_mm_probe(device_type)


@functools.cache  # keyed by the device type alone: see int_mm_verdict
def _int_mm_probe(device_type: str) -> str | None:
    device = torch.device(device_type)
    k = 32
    rows = torch.tensor([[127] * k, [-128] * k, [127, -128] * (k // 2)], dtype=torch.int8)
    a = torch.zeros(32, k, dtype=torch.int8)  # m > 16 and k, n multiples of 8 (CUDA kernels)
    a[:3] = rows
    a = a.to(device)
    b = a[:8].T  # (k, 8) column-major: every pair of the three rows
    try:
        got = torch._int_mm(a, b).cpu()
    except RuntimeError as error:
        return f"torch._int_mm failed on {device_type} ({str(error).splitlines()[0]})"
    exact = a.cpu().to(torch.int64) @ b.cpu().to(torch.int64)
    if not torch.equal(got.to(torch.int64), exact):
        return (
            f"torch._int_mm does not sum exactly on this {device_type} (a saturating int8 kernel, "
            "e.g. oneDNN capped below AVX-512 VNNI): integer GEMMs would give wrong results"
        )
    return None


@functools.cache
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags from ``path`` (Linux), ``None`` where it cannot be read; a
    process-wide memo per path (the CPU does not change under a process), read-only."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return None


@functools.cache
def cpu_speed_note(flags: frozenset[str] | None) -> str | None:
    """What to tell a user who runs this backend on a CPU with ``flags``: ``None`` where ATen
    runs ``torch._int_mm`` on oneDNN's int8 kernels (:data:`INT8_CPU_FLAGS`) or the flags are
    unknown, else that it runs a generic loop there, exact but far slower than a float GEMM (on
    an AVX2-only AMD EPYC, 10-80x slower than fp32: docs/performance.md), which is why
    ``backend="auto"`` takes simulate. A memo per set of flags (every int8 layer call asks)."""
    if flags is None or any(flag in flags for flag in INT8_CPU_FLAGS):
        return None
    return (
        "fqtorch int8 backend on cpu: torch._int_mm has no int8 dot-product kernel for this CPU "
        f"(ATen gives it one with AVX-512 VNNI: {'/'.join(INT8_CPU_FLAGS)} absent), so it runs a "
        "generic loop: exact, but far slower than float GEMMs (backend='auto' takes simulate here)"
    )


# What the one GPU measured says (docs/performance.md, "On a GPU: NVIDIA H200").
CUDA_SPEED_NOTE = (
    "fqtorch int8 backend on cuda: exact, but slower than float on the one GPU measured (an "
    "NVIDIA H200: whole-model int8 training steps 0.05-0.14x fp32, int8 Conv2d steps "
    "0.07-0.12x, the GPU idle most of each step); against simulate (unfused) in the same "
    "process it took 0.63-1.27x simulate's step time on Linear layers and 1.5-1.75x on Conv2d; "
    "docs/performance.md, 'On a GPU: NVIDIA H200'"
)


@torch.compiler.disable  # host-side: read /proc/cpuinfo, log; nothing for a traced graph
def say_speed(device: torch.device) -> None:
    """Say once per process, for a layer call on ``device``, what this backend costs there where
    it is slow: :func:`cpu_speed_note` on a CPU without int8 units, :data:`CUDA_SPEED_NOTE` on
    CUDA."""
    if device.type == "cpu":
        note = cpu_speed_note(cpu_flags())
        if note is not None:
            say_once(note)
    elif device.type == "cuda":
        say_once(CUDA_SPEED_NOTE)


def int_mm_supported(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs an (m, k) × (k, n) product on ``device``."""
    if device.type == "cpu":
        return True
    # CUDA kernels need m > 16 and k, n multiples of 8.
    return m > 16 and k % 8 == 0 and n % 8 == 0


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """int8 (m, k) × int8 (k, n) → int32 (m, n), in the layout integer GEMM kernels prefer:
    ``a`` row-major and ``b`` column-major ("TN"), copying an operand that is not. Exact while
    the reduction stays inside int32 (:func:`chunk_length`).

    The copies are of int8 codes, cheap next to the product: on this project's AVX2 CPU the
    int8 Linear step ran 2.5× faster with them than with the backward GEMMs' transposed views
    (``benchmarks/linear_step.py``, before/after in docs/performance.md); TN is also the
    layout cuBLASLt's int8 kernels use. The layouts are judged by the strides, not by
    ``is_contiguous()``, which accepts a (1, k) view of a column (strides (1, 1)) that the CPU
    kernel misreads (torch 2.13).

    On the CPU a row-major ``b`` (n > 1) is taken as it is too: the int8 backend runs only where
    the kernel has VNNI or AMX (:func:`int_mm_verdict`), and there it multiplies a row-major
    right operand as fast as a column-major one, while transposing a large one costs more than
    the product (:func:`_int_mm`).
    """
    return torch._int_mm(*_tn(a, b))


def _row_major(t: Tensor) -> bool:
    """Whether the 2-D ``t`` is laid out row by row with unit column stride."""
    return t.stride() == (t.shape[1], 1)


def chunk_length(a_bits: int, b_bits: int) -> int:
    """The longest reduction of products of an ``a_bits``- and a ``b_bits``-bit code that int32
    holds whatever the codes: (2^31 − 1) // (2^(a_bits−1) · 2^(b_bits−1)), rounded down to a
    multiple of 8 (so that every chunk of a k % 8 == 0 reduction runs on CUDA)."""
    return (2**31 - 1) // 2 ** (a_bits + b_bits - 2) // 8 * 8


def _border(b: Tensor) -> int:
    """How many columns of ones border the right operand ``b`` (k, n): 8 on the CPU; on CUDA as
    many (8 or 16) as make the width a multiple of 16. On an NVIDIA H200 (torch 2.11.0+cu130,
    ``benchmarks/gpu_probe.py``) cuBLASLt refused widths of 8 mod 16 at k = 64 (584 from 32,768
    rows, 72 from 65,528; CUBLAS_STATUS_NOT_SUPPORTED: ResNet's 64-channel ``grad_input``) and
    ran every multiple of 16 tried, exactly."""
    return 16 - b.shape[1] % 16 if b.is_cuda else 8


def _int_mm(a: Tensor, a_bits: int, b: Tensor, b_bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``a @ b`` of ``a_bits``- and ``b_bits``-bit codes, with the sums over the reduction axis
    that the zero points need, ``a 1`` (rows of ``a``) and ``1ᵀ b`` (columns of ``b``), exact:
    one product of ``a`` bordered below by a row of ones and ``b`` on the right by columns of
    ones, ``[a; 1ᵀ] [b, 1] = [[a b, a 1], [1ᵀ b, k]]``. int32 from one :func:`int_mm` when the
    reduction fits :func:`chunk_length`, else int64 from chunks of at most that length.

    The reduction is zero-padded to a multiple of 8 (zero codes add nothing): CUDA kernels need
    k % 8 == 0, and the CPU kernel returns garbage for k = 1 (torch 2.13, AVX-512). When no padding
    or chunking is needed and ``a`` is already row-major (the forward and ``grad_input``, where
    ``a`` is the large activation or gradient), ``a`` is used as it is, not copied: only ``b`` (the
    weight) is bordered, and its column sums are summed directly.

    On the CPU, a row-major ``b`` (the unfolded input codes of a convolution's weight gradient,
    the larger operand there) is taken as it is, not transposed: the kernel runs that layout as
    fast, and a transposing copy of a matrix with a few hundred columns is slow (ResNet-18's stem
    columns, (100352, 147): 25.9 ms for the product with the copy, 12.5 ms without it;
    ``benchmarks/im2col.py``). ``a`` is bordered below by a row of ones for ``1ᵀ b``, and its row
    sums are summed from the bordered copy; past :func:`chunk_length`, ``b``'s rows run in chunks
    as they are (:func:`_int_mm_row_major_chunks`).
    """
    (m, k), n = a.shape, b.shape[1]
    padded = -(-k // 8) * 8
    step = chunk_length(a_bits, b_bits)
    if padded == k <= step and _row_major(a):
        bordered_bt = b.new_empty(n + _border(b), k)  # its transpose is column-major
        bordered_bt[:n] = b.T
        bordered_bt[n:] = 1
        acc = int_mm(a, bordered_bt.T)
        return acc[:, :n], acc[:, n], _code_sum(b, 0, b_bits)
    cpu_row_major = b.device.type == "cpu" and n > 1 and b.stride() == (n, 1)
    if cpu_row_major and k > step:
        return _int_mm_row_major_chunks(a, a_bits, b, step)
    if cpu_row_major:
        # the CPU kernel needs no multiple of 8, only k > 1 (zero rows: copied row by row)
        kept = k if k > 1 else 8
        bordered_a = a.new_zeros(m + 1, kept)  # row-major
        bordered_a[:m, :k] = a
        bordered_a[m, :k] = 1
        if kept != k:
            b = torch.cat([b, b.new_zeros(kept - k, n)])
        acc = int_mm(bordered_a, b)  # (m + 1, n)
        return acc[:m], _code_sum(bordered_a[:m], 1, a_bits), acc[m]
    bordered_a = a.new_zeros(m + 1, padded)  # row-major
    bordered_a[:m, :k] = a
    bordered_a[m, :k] = 1
    bordered_bt = b.new_zeros(n + _border(b), padded)  # its transpose is column-major
    bordered_bt[:n, :k] = b.T
    bordered_bt[n:, :k] = 1
    a, b = bordered_a, bordered_bt.T
    if padded <= step:
        acc = int_mm(a, b)
    else:
        acc = torch.zeros((m + 1, b.shape[1]), dtype=torch.int64, device=a.device)
        for start in range(0, padded, step):
            acc += int_mm(a[:, start : start + step], b[start : start + step])
    return acc[:m, :n], acc[:m, n], acc[m, :n]


def _int_mm_row_major_chunks(
    a: Tensor, a_bits: int, b: Tensor, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_int_mm` on the CPU of a row-major ``b`` whose reduction ``k`` is longer than one
    int32 product holds (``step``): ``b``'s rows taken in even chunks as they are (a chunk of
    rows of a row-major matrix is one), ``a``'s columns copied chunk by chunk with the row of
    ones below. int64, summed over the chunks; transposing ``b`` whole (the bordered path) costs
    more than the products (ResNet-18's stem weight gradient, ``(401408, 147)`` columns at batch
    32: 2.7× faster this way; docs/performance.md, "Long weight-gradient reductions without the
    transposing copy")."""
    (m, k), n = a.shape, b.shape[1]
    parts = -(-k // step)
    # even chunks of at most step rows, at least k / parts − parts: far from the one-row
    # reduction the CPU kernel misreads (k = 1, above)
    length = -(-k // parts)
    acc = torch.zeros((m + 1, n), dtype=torch.int64, device=a.device)
    row_sums = torch.zeros(m, dtype=torch.int64, device=a.device)
    for start in range(0, k, length):
        stop = min(start + length, k)
        bordered = a.new_empty(m + 1, stop - start)  # row-major
        bordered[:m] = a[:, start:stop]
        bordered[m] = 1
        acc += int_mm(bordered, b[start:stop])
        row_sums += _code_sum(bordered[:m], 1, a_bits)
    return acc[:m], row_sums, acc[m]


# The longest reduction whose eager epilogue runs in float32 (module docstring).
FLOAT32_EPILOGUE_MAX_K = 256


def _epilogue_dtype(acc: Tensor, k: int) -> torch.dtype:
    """The eager epilogue's dtype for a product ``acc`` over a reduction of length ``k``:
    float32 up to :data:`FLOAT32_EPILOGUE_MAX_K`, float64 beyond and for a chunked (int64)
    product, whose zero-point terms can cancel strongly (module docstring)."""
    short = acc.dtype == torch.int32 and k <= FLOAT32_EPILOGUE_MAX_K
    return torch.float32 if short else torch.float64


def _code_sum(codes: Tensor, dim: int, bits: int) -> Tensor:
    """Exact sum of ``bits``-bit codes along ``dim`` (0 or 1) outside a GEMM: int32 while it
    cannot overflow (the :func:`chunk_length` bound against a 1-bit operand of ones), else
    int64. On the CPU, long sums of int8 codes in int32 are a product with ones (``_int_mm``),
    several times faster than ``sum(dtype=torch.int32)``, which first copies the codes to int32
    (docs/performance.md)."""
    dim %= codes.dim()
    exact = codes.shape[dim] <= chunk_length(bits, 1)
    cpu_int8 = exact and codes.device.type == "cpu" and codes.dtype == torch.int8
    if cpu_int8 and codes.dim() >= 2 and (dim == 0 or codes.dim() == 2):
        rows = codes.reshape(codes.shape[0], -1) if dim == 0 else codes.T  # sum its columns
        long = rows.shape[0] >= 64 and rows.shape[1] > 1  # a short sum is faster as a sum
        if long and (_row_major(rows) or _row_major(rows.T)):
            # a sum, not one of the layer's GEMMs (int_mm): the layouts are checked here
            sums = torch._int_mm(codes.new_ones(8, rows.shape[0]), rows)[0]
            return sums.reshape(codes.shape[1:] if dim == 0 else codes.shape[:1])
    return codes.sum(dim, dtype=torch.int32 if exact else torch.int64)


def _affine(q: QuantizedTensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``q``'s scale and bias in the epilogue's dtype."""
    return q.scale.to(dtype), q.bias.to(dtype)


def _per_tensor(q: QuantizedTensor, role: str) -> None:
    if q.scale.numel() != 1 or q.transform is not None:
        raise ValueError(
            f"the int8 backend needs a per-tensor {role} quantizer (a scale per tensor factors "
            f"out of every GEMM), got scale shape {tuple(q.scale.shape)}"
        )


def _per_row(g: QuantizedTensor) -> None:
    """``grad_input`` sums over the columns of ``grad_output``: its scale may vary by row only."""
    if g.scale.shape[1] != 1:
        raise ValueError(
            "the int8 backend needs a grad_output quantizer with one scale per tensor or per row "
            "(the grad_input GEMM sums over columns), got scale shape "
            f"{tuple(g.scale.shape)} for codes {tuple(g.codes.shape)}"
        )


def _per_column(h: QuantizedTensor) -> None:
    """``grad_weight`` sums over the rows of ``grad_output``: neither its scale nor a transform
    may vary or mix by row."""
    if h.scale.shape[0] != 1 or h.transform is not None:
        raise ValueError(
            "the int8 backend needs a weight-gradient quantizer with one scale per tensor or per "
            "column and no row transform (its GEMM sums over rows), got scale shape "
            f"{tuple(h.scale.shape)} for codes {tuple(h.codes.shape)}"
        )


def _forward(x: QuantizedTensor, w: QuantizedTensor, bias: Tensor | None) -> Tensor:
    prod, x_rows, w_rows = _int_mm(x.codes, x.bits, w.codes.T, w.bits)  # (M, K) × (K, O)
    dtype = _epilogue_dtype(prod, x.codes.shape[1])
    (s_x, b_x), (s_w, b_w) = _affine(x, dtype), _affine(w, dtype)
    out = prod.to(dtype).mul_(s_x * s_w)
    out.add_(s_x * b_w * x_rows.to(dtype)[:, None])
    out.add_(b_x * s_w * w_rows.to(dtype)[None, :] + x.codes.shape[1] * b_x * b_w)
    if bias is not None:
        out.add_(bias.to(dtype))
    return out


def _grad_input(g: QuantizedTensor, w: QuantizedTensor) -> Tensor:
    prod, g_rows, w_cols = _int_mm(g.codes, g.bits, w.codes, w.bits)  # (M', O) × (O, K)
    dtype = _epilogue_dtype(prod, g.codes.shape[1])
    (s_g, b_g), (s_w, b_w) = _affine(g, dtype), _affine(w, dtype)  # s_g, b_g: (M', 1) or (1, 1)
    out = prod.to(dtype).mul_(s_g * s_w)
    out.add_(s_g * b_w * g_rows.to(dtype)[:, None] + g.codes.shape[1] * b_g * b_w)
    out.addcmul_(b_g * s_w, w_cols.to(dtype)[None, :])
    out = out.to(g.scale.dtype)
    return out if g.transform is None else g.transform.inverse(out)


def _grad_weight(h: QuantizedTensor, x: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """``grad_weight`` (O, K), and the column sums of ``h``'s codes that its product yields (the
    bias gradient needs them too: :func:`_grad_bias`)."""
    f64, rows = torch.float64, h.codes.shape[0]
    prod, h_cols, x_cols = _int_mm(h.codes.T, h.bits, x.codes, x.bits)  # (O, M) × (M, K)
    (s_h, b_h), (s_x, b_x) = _affine(h, f64), _affine(x, f64)
    s_o, b_o = s_h.reshape(-1, 1), b_h.reshape(-1, 1)  # (O, 1) or (1, 1)
    out = prod.to(f64).mul_(s_o * s_x)
    out.add_(s_o * b_x * h_cols.to(f64)[:, None] + rows * b_o * b_x)
    out.addcmul_(b_o * s_x, x_cols.to(f64)[None, :])
    return out, h_cols


def _grad_bias(h: QuantizedTensor, h_cols: Tensor | None = None) -> Tensor:
    """``Σ_r (s_o C_ro + b_o)``; ``h_cols``, the column sums of the codes, when a weight-gradient
    product already gave them (else summed here)."""
    f64, rows = torch.float64, h.codes.shape[0]
    s_h, b_h = _affine(h, f64)
    if h_cols is None:
        h_cols = _code_sum(h.codes, 0, h.bits)
    return h_cols.to(f64) * s_h.reshape(-1) + rows * b_h.reshape(-1)


# The compiled path (``fused=True``, the default of ``backend="int8"``). Each epilogue is one
# compiled pass over the int32 product, the rank-one terms, the bias and the exact code sums of the
# small operand (the weight, or the input for the weight gradient) included, instead of several
# eager passes and a float copy of the product. Same formulas, in the same order of operations, as
# the eager functions above, which stay the debugging path (``fused=False``).
def _forward_terms(
    prod: Tensor,
    x_rows: Tensor,
    w_codes: Tensor,
    s_x: Tensor,
    b_x: Tensor,
    s_w: Tensor,
    b_w: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    f64 = torch.float64  # in registers: no float64 buffer (module docstring)
    s_x, b_x, s_w, b_w = s_x.to(f64), b_x.to(f64), s_w.to(f64), b_w.to(f64)
    w_rows = w_codes.sum(1, dtype=torch.int32)
    out = prod.to(f64) * (s_x * s_w)
    out = out + s_x * b_w * x_rows.to(f64)[:, None]
    out = out + (b_x * s_w * w_rows.to(f64)[None, :] + w_codes.shape[1] * b_x * b_w)
    if bias is not None:
        out = out + bias.to(f64)
    return out.to(out_dtype)


def _grad_input_terms(
    prod: Tensor,
    g_rows: Tensor,
    w_codes: Tensor,
    s_g: Tensor,
    b_g: Tensor,
    s_w: Tensor,
    b_w: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    f64 = torch.float64  # in registers: no float64 buffer (module docstring)
    s_g, b_g, s_w, b_w = s_g.to(f64), b_g.to(f64), s_w.to(f64), b_w.to(f64)
    w_cols = w_codes.sum(0, dtype=torch.int32)
    out = prod.to(f64) * (s_g * s_w)
    out = out + (s_g * b_w * g_rows.to(f64)[:, None] + w_codes.shape[0] * b_g * b_w)
    out = out + (b_g * s_w) * w_cols.to(f64)[None, :]
    return out.to(out_dtype)


def _grad_weight_terms(
    prod: Tensor,
    h_cols: Tensor,
    x_codes: Tensor,
    s_o: Tensor,
    b_o: Tensor,
    s_x: Tensor,
    b_x: Tensor,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The weight gradient (float64 epilogue, see the module docstring) and the bias gradient
    from the same column sums of ``h``'s codes."""
    f64, rows = torch.float64, x_codes.shape[0]
    x_cols = x_codes.sum(0, dtype=torch.int32)
    s_o, b_o, s_x, b_x = s_o.to(f64), b_o.to(f64), s_x.to(f64), b_x.to(f64)
    h_cols = h_cols.to(f64)
    out = prod.to(f64) * (s_o * s_x)
    out = out + (s_o * b_x * h_cols[:, None] + rows * b_o * b_x)
    out = out + (b_o * s_x) * x_cols.to(f64)[None, :]
    grad_bias = h_cols * s_o.reshape(-1) + rows * b_o.reshape(-1)
    return out.to(out_dtype), grad_bias.to(out_dtype)


def _forward_in_place(
    acc: Tensor,
    x_codes: Tensor,
    w_codes: Tensor,
    s_x: Tensor,
    b_x: Tensor,
    s_w: Tensor,
    b_w: Tensor,
    bias: Tensor | None,
) -> None:
    """:func:`_forward_terms` for a float32 output written over its own int32 product ``acc``
    (M, O): the step's largest buffer is allocated once, not twice (a fresh 100 MB buffer costs
    tens of milliseconds of page faults on the CPU). The code sums of both operands are computed
    here (``acc`` has no bordering column)."""
    x_rows = x_codes.sum(1, dtype=torch.int32)
    out = acc.view(torch.float32)
    out.copy_(_forward_terms(acc, x_rows, w_codes, s_x, b_x, s_w, b_w, bias, out.dtype))


def _grad_input_in_place(
    acc: Tensor,
    g_codes: Tensor,
    w_codes: Tensor,
    s_g: Tensor,
    b_g: Tensor,
    s_w: Tensor,
    b_w: Tensor,
) -> None:
    """:func:`_grad_input_terms` over its own int32 product, as :func:`_forward_in_place`.
    Nothing is returned: a returned view of ``acc`` makes Inductor write a second buffer."""
    g_rows = g_codes.sum(1, dtype=torch.int32)
    out = acc.view(torch.float32)
    out.copy_(_grad_input_terms(acc, g_rows, w_codes, s_g, b_g, s_w, b_w, out.dtype))


_compiled_forward_in_place = LazyCompiled(_forward_in_place)
_compiled_grad_input_in_place = LazyCompiled(_grad_input_in_place)
_compiled_forward = LazyCompiled(_forward_terms)
_compiled_grad_input = LazyCompiled(_grad_input_terms)
_compiled_grad_weight = LazyCompiled(_grad_weight_terms)


def _one_product(a: Tensor, a_bits: int, b_bits: int) -> bool:
    """Whether ``a`` (m, k) can be the left operand of one int32 ``_int_mm`` as it is: row-major,
    k a multiple of 8 and within :func:`chunk_length`. Otherwise the eager functions run it
    (padding, chunks, float64 epilogue)."""
    k = a.shape[1]
    return _row_major(a) and k % 8 == 0 and k <= chunk_length(a_bits, b_bits)


def _tn(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` row-major and ``b`` column-major, copying where they are not; on the CPU a
    row-major ``b`` (n > 1) as it is (:func:`int_mm`)."""
    if not _row_major(a):
        a = a.new_empty(a.shape).copy_(a)
    cpu_row_major = b.device.type == "cpu" and b.shape[1] > 1 and _row_major(b)
    if not (_row_major(b.T) or cpu_row_major):
        b = b.new_empty(b.T.shape).copy_(b.T).T
    return a, b


def _mm_row_sums(a: Tensor, bt: Tensor) -> tuple[Tensor, Tensor]:
    """``a @ btᵀ`` and the row sums of ``a`` (int32), from one product with ``btᵀ`` bordered by
    columns of ones (:func:`_int_mm` without the column sums of ``b``, which the compiled
    epilogues compute)."""
    n, k = bt.shape
    bordered = bt.new_empty(n + _border(bt.T), k)  # its transpose is column-major
    bordered[:n] = bt
    bordered[n:] = 1
    acc = int_mm(a, bordered.T)
    return acc[:, :n], acc[:, n]


def _in_place_width(codes: Tensor, n: int) -> bool:
    """Whether a product of width ``n`` may run unbordered into the epilogue's own buffer: on
    CUDA only at a multiple of 16, the widths cuBLASLt ran at every size tried (:func:`_border`);
    any other width there goes through :func:`_mm_row_sums`, whose border makes it a multiple
    of 16."""
    return not codes.is_cuda or n % 16 == 0


def _forward_fast(
    x: QuantizedTensor, w: QuantizedTensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    if not _one_product(x.codes, x.bits, w.bits):
        return _forward(x, w, bias).to(out_dtype)
    f32 = torch.float32
    affine = (x.scale.to(f32), x.bias.to(f32), w.scale.to(f32), w.bias.to(f32))
    if out_dtype == f32 and _in_place_width(x.codes, w.codes.shape[0]):
        acc = x.codes.new_empty((x.codes.shape[0], w.codes.shape[0]), dtype=torch.int32)
        torch._int_mm(*_tn(x.codes, w.codes.T), out=acc)
        _compiled_forward_in_place(acc, x.codes, w.codes, *affine, bias)
        return acc.view(f32)
    prod, x_rows = _mm_row_sums(x.codes, w.codes)  # (M, K) × (K, O)
    return _compiled_forward(
        prod, x_rows, w.codes, x.scale.to(f32), x.bias.to(f32), w.scale.to(f32), w.bias.to(f32),
        bias, out_dtype,
    )  # fmt: skip


def _grad_input_fast(g: QuantizedTensor, w: QuantizedTensor, out_dtype: torch.dtype) -> Tensor:
    if not _one_product(g.codes, g.bits, w.bits):
        return _grad_input(g, w).to(out_dtype)
    f32 = torch.float32
    dtype = out_dtype if g.transform is None else g.scale.dtype
    if dtype == f32 and _in_place_width(g.codes, w.codes.shape[1]):
        acc = g.codes.new_empty((g.codes.shape[0], w.codes.shape[1]), dtype=torch.int32)
        torch._int_mm(*_tn(g.codes, w.codes), out=acc)
        _compiled_grad_input_in_place(
            acc, g.codes, w.codes, g.scale.to(f32), g.bias.to(f32), w.scale.to(f32),
            w.bias.to(f32),
        )  # fmt: skip
        out = acc.view(f32)
        return out if g.transform is None else _inverse_in_place(g.transform, out).to(out_dtype)
    prod, g_rows = _mm_row_sums(g.codes, w.codes.T)  # (M', O) × (O, K)
    out = _compiled_grad_input(
        prod, g_rows, w.codes, g.scale.to(f32), g.bias.to(f32), w.scale.to(f32), w.bias.to(f32),
        dtype,
    )  # fmt: skip
    return out if g.transform is None else g.transform.inverse(out).to(out_dtype)


def _inverse_in_place(transform: Any, out: Tensor) -> Tensor:
    """``transform.inverse(out)``, written over ``out`` (our own buffer) where the transform can
    (BHQ's ``inverse_``): no second buffer of the product's size."""
    in_place = getattr(transform, "inverse_", None)
    return transform.inverse(out) if in_place is None else in_place(out)


def _grad_weight_fast(
    h: QuantizedTensor, x: QuantizedTensor, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients. On the CPU the product is ``C_hᵀ C_x`` ((O, M) × (M, K)) on
    the codes as they are, both row-major: the kernel reads ``C_hᵀ`` column-major without a
    copy, and the (O, K) product is the weight's own layout, so no operand and no result is
    transposed (the bordered ``[C_xᵀ; 1ᵀ] C_h`` it replaced copied the input codes transposed,
    and autograd then copied the transposed gradient: docs/performance.md). ``h``'s column
    sums: :func:`_code_sum`. Elsewhere (:func:`_int_mm`) ``h`` is copied into the TN layout and
    bordered."""
    rows, k = x.codes.shape
    if not (rows % 8 == 0 and rows <= chunk_length(h.bits, x.bits)):
        grad_weight, h_cols = _grad_weight(h, x)
        return grad_weight.to(out_dtype), _grad_bias(h, h_cols).to(out_dtype)
    affine = (h.scale.reshape(-1, 1), h.bias.reshape(-1, 1), x.scale, x.bias)
    cpu = h.codes.device.type == "cpu"
    # A (1, ·) or (·, 1) operand's strides are ambiguous to the CPU kernel (:func:`int_mm`).
    if cpu and _row_major(h.codes) and _row_major(x.codes) and min(h.codes.shape[1], k) > 1:
        prod = torch._int_mm(h.codes.T, x.codes)  # (O, K)
        h_cols = _code_sum(h.codes, 0, h.bits)
        return _compiled_grad_weight(prod, h_cols, x.codes, *affine, out_dtype)
    prod, h_cols, _ = _int_mm(h.codes.T, h.bits, x.codes, x.bits)  # (O, M) × (M, K)
    return _compiled_grad_weight(prod, h_cols, x.codes, *affine, out_dtype)


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, input: Tensor, weight: Tensor, bias: Tensor | None, source: Any, name: str
    ) -> Tensor:
        plan = source.plan
        x = plan.input.encode(input)
        w = plan.weight.encode(weight)
        _per_tensor(x, "input")
        _per_tensor(w, "weight")
        ctx.save_for_backward(x.codes, x.scale, x.bias, w.codes, w.scale, w.bias)
        ctx.meta = (x.shape, x.dtype, w.shape, w.dtype, input.dtype, bias is not None)
        ctx.bits = (x.bits, w.bits)
        ctx.source, ctx.name = source, name
        ctx.compiled = _compiled_path(plan)
        if ctx.compiled:
            return _forward_fast(x, w, bias, input.dtype)
        return _forward(x, w, bias).to(input.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        xc, xs, xb, wc, ws, wb = ctx.saved_tensors
        x_shape, x_dtype, w_shape, w_dtype, in_dtype, has_bias = ctx.meta
        x_bits, w_bits = ctx.bits
        x = QuantizedTensor(xc, xs, xb, x_bits, x_shape, x_dtype)
        w = QuantizedTensor(wc, ws, wb, w_bits, w_shape, w_dtype)
        plan = ctx.source.plan
        refuse_second_derivative(False, ctx.name)  # codes saved
        generator = ctx.source.generator(grad_output.device)
        if plan.check_finite:
            check_finite(grad_output, ctx.name)
        ctx.source.on_grad_output(grad_output)
        grad = grad_output.float()
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.compiled and need_input and (need_weight or need_bias):
            fast = _backward_fast(plan, grad, x, w, generator, in_dtype, w_dtype)
            if fast is not None:
                grad_input, grad_weight, grad_bias = fast
                return grad_input, grad_weight, grad_bias if has_bias else None, None, None
        grad_input = grad_weight = grad_bias = None
        if need_input:
            if isinstance(plan.grad_output, Identity):
                grad_input = grad @ w.dequantize()
            else:
                g = plan.grad_output.encode(grad, generator)
                _per_row(g)
                grad_input = _grad_input(g, w)
            grad_input = grad_input.to(in_dtype)
        if need_weight or need_bias:
            if isinstance(plan.grad_output_weight, Identity):
                grad_weight = grad.T @ x.dequantize() if need_weight else None
                grad_bias = grad.sum(0)
            else:
                h = plan.grad_output_weight.encode(grad, generator)
                _per_column(h)
                h_cols = None
                if need_weight:
                    grad_weight, h_cols = _grad_weight(h, x)
                    grad_weight = grad_weight.to(w_dtype)
                grad_bias = _grad_bias(h, h_cols).to(w_dtype) if need_bias else None
        if not (need_bias and has_bias):
            grad_bias = None
        return grad_input, grad_weight, grad_bias, None, None


@torch.compiler.disable  # host-side (the log line); called once per layer call
def _compiled_path(plan: Any) -> bool:
    """Whether this layer call takes the compiled path: its quantizers are fused (``fused=True``,
    the default of ``backend="int8"``); said once per process, with why."""
    if not plan.input.fused:
        say_once("fqtorch int8 backend: eager kernels (fused=False; the debugging path)")
        return False
    if compile_disabled():
        say_once("fqtorch int8 backend: eager kernels (torch.compile is disabled here)")
    else:
        say_once(
            "fqtorch int8 backend: compiled kernels (torch.compile; each compiles on first use)"
        )
    return True


def _backward_fast(
    plan: Any,
    grad: Tensor,
    x: QuantizedTensor,
    w: QuantizedTensor,
    generator: torch.Generator | None,
    in_dtype: torch.dtype,
    w_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Both backward GEMMs on the compiled path, ``grad_output`` quantized both ways in one pass
    (same codes as two ``encode`` calls); ``None`` where a branch is exact (identity)."""
    if isinstance(plan.grad_output, Identity) or isinstance(plan.grad_output_weight, Identity):
        return None
    g, h = encode_two_way(grad, plan.grad_output, plan.grad_output_weight, generator)
    _per_row(g)
    _per_column(h)
    grad_input = _grad_input_fast(g, w, in_dtype)
    grad_weight, grad_bias = _grad_weight_fast(h, x, w_dtype)
    return grad_input, grad_weight, grad_bias


def refuse_float64(input: Tensor, weight: Tensor) -> None:
    """float64 operands run on simulate: the integer path quantizes the gradient and applies
    scales and zero points in float32, which would draw other codes than simulate's float64
    quantizers and lose what float64 holds beyond float32's range (zeros or NaN)."""
    if torch.float64 in (input.dtype, weight.dtype):
        raise Unsupported("the integer GEMMs' scales and gradients are float32, not float64")


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, source: PlanSource, name: str
) -> Tensor:
    """Run the Linear plan (``input`` (M, in)) on integer GEMMs; :class:`Unsupported` when a
    shape cannot run, or when ``torch._int_mm`` is not exact here (:func:`int_mm_verdict`)."""
    m, k = input.shape
    n = weight.shape[0]
    refuse_float64(input, weight)
    verdict = int_mm_verdict(input.device.type)
    if verdict is not None:
        raise Unsupported(verdict)
    if not (
        int_mm_supported(m, k, n, input.device)
        and int_mm_supported(n, m, k, input.device)
        and int_mm_supported(m, n, k, input.device)
    ):
        raise Unsupported(
            f"torch._int_mm cannot run shape {tuple(input.shape)} x {tuple(weight.shape)} "
            f"on {input.device}"
        )
    say_speed(input.device)
    return _Int8Linear.apply(input, weight, bias, source, name)
