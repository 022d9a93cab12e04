"""``backend="auto"``: the int8 backend where the device has integer units, simulate elsewhere.

The integer GEMMs (``torch._int_mm``) pay only on hardware with int8 dot-product units: on a CPU
with AVX-512 VNNI or AMX they run ≈ 9× faster than fp32 GEMMs. Elsewhere ATen runs them as a
generic loop, 10–80× slower than fp32 on an AVX2-only CPU (docs/performance.md), and so on a
CPU with AVX-VNNI alone too, which ATen's check does not count. CUDA runs them on the int8
tensor cores of compute capability 7.5 (Turing) and later. :func:`decide` is the decision
table, a pure function of what the hardware reports (so it is tested with made-up
capabilities); :func:`resolve` feeds it the real device once per device and quantizer set, and
says the outcome in one log line. On the CPU the flags are not enough: ``torch._int_mm`` must
also pass its exactness probe (:func:`~fqtorch.backends.int8.int_mm_verdict`), since oneDNN
may run below the CPU's ISA.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from ..config import int8_refusal
from .base import FQTPlan
from .int8 import INT8_CPU_FLAGS, cpu_flags, int_mm_verdict
from .notes import say_once

__all__ = ["INT8_CPU_FLAGS", "conv_backend", "cpu_flags", "decide", "resolve"]

# decide()'s int_mm_verdict when nobody ran the probe: the CPU is then not trusted with int8.
NOT_PROBED = "torch._int_mm's exactness was not probed"
_ROLES = {
    "input_quantizer": "input",
    "weight_quantizer": "weight",
    "grad_quantizer": "grad_output",
    "grad_weight_quantizer": "grad_output_weight",
}


def decide(
    device_type: str,
    *,
    cpu_capability: str | None = None,
    cpu_flags: Iterable[str] | None = None,
    cuda_capability: tuple[int, int] | None = None,
    refusal: str | None = None,
    int_mm_verdict: str | None = NOT_PROBED,
) -> tuple[str, str]:
    """``(backend, why)`` for a layer on ``device_type``: ``cpu_flags`` are the CPU's
    /proc/cpuinfo flags (``None``: unknown), ``cuda_capability`` the GPU's (major, minor),
    ``refusal`` why the int8 backend cannot take the quantizers (``None``: it can),
    ``int_mm_verdict`` the CPU's exactness probe of ``torch._int_mm``
    (:func:`~fqtorch.backends.int8.int_mm_verdict`: ``None`` when exact). On the CPU the flags
    alone do not choose int8: oneDNN may run below the CPU's ISA (``ONEDNN_MAX_CPU_ISA``), where
    its int8 kernels saturate, so the probe must have passed too."""
    if refusal is not None:
        return "simulate", f"the quantizers do not fit integer GEMMs ({refusal})"
    if device_type == "cpu":
        where = f"CPU, ATen capability {cpu_capability or 'unknown'}"
        if cpu_flags is None:
            return "simulate", f"{where}: cannot read the CPU flags to find int8 units"
        found = [flag for flag in INT8_CPU_FLAGS if flag in set(cpu_flags)]
        if found and int_mm_verdict is not None:
            return "simulate", f"{where}, int8 units ({', '.join(found)}) but {int_mm_verdict}"
        if found:
            return "int8", f"{where}, int8 dot-product units ({', '.join(found)}), exact"
        return "simulate", (
            f"{where}, no int8 dot-product kernel for torch._int_mm ({'/'.join(INT8_CPU_FLAGS)} "
            "absent): integer GEMMs would run far slower than float ones"
        )
    if device_type == "cuda":
        if cuda_capability is None:
            return "simulate", "CUDA device of unknown compute capability"
        major, minor = cuda_capability
        if (major, minor) >= (7, 5):
            return "int8", f"CUDA compute capability {major}.{minor}: int8 tensor cores"
        return "simulate", f"CUDA compute capability {major}.{minor} < 7.5: no int8 tensor cores"
    return "simulate", f"no int8 backend for device type {device_type!r}"


def _plan_refusal(plan: FQTPlan) -> str | None:
    names = {field: getattr(plan, role).name for field, role in _ROLES.items()}
    return int8_refusal(names)


@functools.cache
def _resolve(device: torch.device, refusal: str | None) -> str:
    """A memo per device and quantizer set: the hardware is asked, and the outcome said, once
    per process (process-wide, read-only after the first call; tests clear it)."""
    if device.type == "cpu":
        facts = dict(
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            cpu_flags=cpu_flags(),
            int_mm_verdict=int_mm_verdict("cpu"),
        )
    elif device.type == "cuda":
        facts = dict(cuda_capability=torch.cuda.get_device_capability(device))
    else:
        facts = {}
    backend, why = decide(device.type, refusal=refusal, **facts)
    say_once(f"fqtorch backend='auto' on {device}: {backend} ({why})")
    return backend


@torch.compiler.disable  # host-side memo: traced, dynamo would skip its cache and ask again
def resolve(plan: FQTPlan, device: torch.device) -> str:
    """The backend ``backend="auto"`` runs ``plan``'s layer calls on, on ``device``."""
    return _resolve(device, _plan_refusal(plan))


def conv_backend(resolved: str, device_type: str) -> str:
    """The backend ``backend="auto"`` runs a convolution on, given what :func:`resolve` chose:
    on CUDA, simulate (cuDNN's float convolutions) rather than int8, whose CUDA Conv2d path
    (im2col + ``torch._int_mm``) took 1.5–1.75× simulate's step time on the one GPU measured
    (an NVIDIA H200, in the same process: docs/performance.md, "On a GPU: NVIDIA H200");
    ``backend="int8"`` opts in. Said once."""
    if resolved == "int8" and device_type == "cuda":
        say_once(
            "fqtorch backend='auto' on cuda: Conv2d layers stay on simulate (cuDNN); the int8 "
            "im2col + torch._int_mm path took 1.5-1.75x its step time on the one GPU measured "
            "(an NVIDIA H200; backend='int8' runs it)"
        )
        return "simulate"
    return resolved
