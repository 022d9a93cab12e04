"""``backend="auto"``: its decision table on made-up hardware, the one log line, and that it runs
the backend it names."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import auto, notes

AVX2_FLAGS = ["fpu", "sse2", "ssse3", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]


@pytest.mark.parametrize(
    "device,facts,expected",
    [
        ("cpu", dict(cpu_capability="AVX2", cpu_flags=AVX2_FLAGS), "simulate"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "avx512f"]), "simulate"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "avx512_vnni"]), "int8"),
        ("cpu", dict(cpu_capability="AVX2", cpu_flags=[*AVX2_FLAGS, "avx_vnni"]), "int8"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "amx_int8"]), "int8"),
        ("cpu", dict(cpu_capability="DEFAULT", cpu_flags=None), "simulate"),
        ("cuda", dict(cuda_capability=(7, 0)), "simulate"),
        ("cuda", dict(cuda_capability=(7, 5)), "int8"),
        ("cuda", dict(cuda_capability=(9, 0)), "int8"),
        ("cuda", dict(cuda_capability=None), "simulate"),
        ("mps", {}, "simulate"),
    ],
)
def test_decision_table(device, facts, expected):
    backend, why = auto.decide(device, **facts)
    assert backend == expected, why
    assert why


def test_refused_quantizers_choose_simulate_and_say_why():
    flags = [*AVX2_FLAGS, "avx512_vnni"]
    backend, why = auto.decide("cpu", cpu_flags=flags, refusal="needs a per-tensor input")
    assert backend == "simulate" and "needs a per-tensor input" in why


def test_cpu_flags_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert auto.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_vnni"}
    assert auto.cpu_flags(str(tmp_path / "missing")) is None


def test_config_accepts_auto_whatever_the_quantizers():
    cfg = FQTConfig(backend="auto", input_quantizer="psq")  # int8 would refuse it
    assert cfg.backend == "auto" and cfg.fused  # fast by default, like int8
    assert FQTConfig(backend="simulate").fused is False
    assert FQTConfig(backend="int8").fused is True
    assert FQTConfig(backend="int8", fused=False).fused is False
    assert FQTConfig(backend="int8").replace(backend="simulate").fused is True  # kept


@pytest.fixture
def fresh_memo():
    """The log-once memo and the per-device decision cleared, before and after."""
    auto._resolve.cache_clear()
    notes.say_once.cache_clear()
    yield
    auto._resolve.cache_clear()
    notes.say_once.cache_clear()


def auto_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]


@pytest.mark.parametrize("fields", [{}, {"input_quantizer": "psq"}])
def test_runs_what_it_says_and_says_it_once(fields, fresh_memo, caplog):
    """Two steps of a two-layer model: one log line, and the same values as the backend it
    named (same seed, so the same codes)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    x = torch.randn(32, 16)
    results = {}
    for backend in ("auto", "int8", "simulate"):
        try:
            cfg = FQTConfig.preset("psq5", backend=backend, fused=False, **fields)
        except ValueError:
            continue  # int8 refuses the psq input quantizer
        model = quantize_model(copy.deepcopy(base), cfg)
        with caplog.at_level(logging.INFO, logger="fqtorch.backends"):
            for _ in range(2):
                xi = x.clone().requires_grad_(True)
                out = model(xi)
                out.square().sum().backward()
        results[backend] = (out.detach(), xi.grad, model[0].weight.grad)
    lines = auto_lines(caplog)
    assert len(lines) == 1, lines
    chosen = "int8" if lines[0].split(": ")[1].startswith("int8") else "simulate"
    if fields:
        assert chosen == "simulate" and "do not fit" in lines[0]
    flags = auto.cpu_flags() or frozenset()
    if not fields and any(flag in flags for flag in auto.INT8_CPU_FLAGS):
        assert chosen == "int8"
    for a, b in zip(results["auto"], results[chosen], strict=True):
        assert torch.equal(a, b)
