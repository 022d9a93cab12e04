"""``backend="auto"``: its decision table on made-up hardware, the one log line, and that it runs
the backend it names."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import FQTPlan, auto, int8, notes

AVX2_FLAGS = ["fpu", "sse2", "ssse3", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"]


@pytest.mark.parametrize(
    "device,facts,expected",
    [
        ("cpu", dict(cpu_capability="AVX2", cpu_flags=AVX2_FLAGS), "simulate"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "avx512f"]), "simulate"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "avx512_vnni"]), "int8"),
        # AVX-VNNI alone: ATen runs torch._int_mm as a generic loop there
        ("cpu", dict(cpu_capability="AVX2", cpu_flags=[*AVX2_FLAGS, "avx_vnni"]), "simulate"),
        ("cpu", dict(cpu_capability="AVX512", cpu_flags=[*AVX2_FLAGS, "amx_int8"]), "int8"),
        # VNNI in the flags but oneDNN capped below it (ONEDNN_MAX_CPU_ISA=AVX2): the probe decides.
        (
            "cpu",
            dict(cpu_flags=[*AVX2_FLAGS, "avx512_vnni"], int_mm_verdict="saturates (test)"),
            "simulate",
        ),
        ("cpu", dict(cpu_capability="DEFAULT", cpu_flags=None), "simulate"),
        ("cuda", dict(cuda_capability=(7, 0)), "simulate"),
        ("cuda", dict(cuda_capability=(7, 5)), "int8"),
        ("cuda", dict(cuda_capability=(9, 0)), "int8"),
        ("cuda", dict(cuda_capability=None), "simulate"),
        ("mps", {}, "simulate"),
    ],
)
def test_decision_table(device, facts, expected):
    if device == "cpu" and "int_mm_verdict" not in facts:
        facts = {**facts, "int_mm_verdict": None}  # the probe passed
    backend, why = auto.decide(device, **facts)
    assert backend == expected, why
    assert why


def test_cpu_flags_alone_do_not_choose_int8():
    """Without the exactness probe's verdict, VNNI in the flags is not enough; a failed probe
    is said in the reason."""
    flags = [*AVX2_FLAGS, "avx512_vnni"]
    assert auto.decide("cpu", cpu_flags=flags)[0] == "simulate"
    backend, why = auto.decide("cpu", cpu_flags=flags, int_mm_verdict="saturates (test)")
    assert backend == "simulate" and "saturates (test)" in why


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
    # Derived again for a new backend unless given: int8 without flags is its fast path.
    assert FQTConfig.preset("psq5").replace(backend="int8").fused is True
    assert FQTConfig(backend="int8").replace(backend="simulate").fused is False
    assert FQTConfig(backend="int8").replace(seed=1).replace(backend="simulate").fused is False
    assert FQTConfig(backend="int8", fused=True).replace(backend="simulate").fused is True
    assert FQTConfig.preset("psq5", fused=False).replace(backend="int8").fused is False


@pytest.fixture
def fresh_memo():
    """The log-once memo and the per-device decision cleared, before and after."""
    auto._resolve.cache_clear()
    notes.say_once.cache_clear()
    yield
    auto._resolve.cache_clear()
    notes.say_once.cache_clear()


def auto_lines(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records]
    return [m for m in messages if m.startswith("fqtorch backend='auto'")]


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
    exact = int8.int_mm_verdict("cpu") is None
    if not fields and exact and any(flag in flags for flag in auto.INT8_CPU_FLAGS):
        assert chosen == "int8"
    if not exact:
        assert chosen == "simulate"
    for a, b in zip(results["auto"], results[chosen], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "preset,backend",
    [("psq4", "int8"), ("psq4", "auto"), ("fp8_e5m2", "fp8"), ("psq4", "simulate")],
)
def test_attention_products_say_they_run_simulate(preset, backend, fresh_memo):
    """The attention score and value products run on simulate whatever the backend: every
    backend that runs the projections elsewhere warns at construction, ``auto`` where it
    resolves to int8 here."""
    import warnings

    cfg = FQTConfig.preset(preset, backend=backend, attention_products=True)
    elsewhere = backend != "simulate"
    if backend == "auto":
        elsewhere = auto.resolve(FQTPlan.from_config(cfg), torch.device("cpu")) != "simulate"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(nn.MultiheadAttention(8, 2), cfg)
    ours = [w for w in caught if "score and value products" in str(w.message)]
    said = [str(w.message) for w in ours]
    assert len(said) == int(elsewhere), said
    assert all(w.filename == __file__ for w in ours)  # quantize_model's caller, this file
    if elsewhere:
        assert f"backend={backend!r} covers the projections only" in said[0]


def test_cpu_speed_note_names_the_missing_units():
    """An explicit ``backend="int8"`` on a CPU without int8 dot-product units is said to run a
    slow generic kernel; with any of the units, or with unreadable flags, nothing is said."""
    note = int8.cpu_speed_note(frozenset(AVX2_FLAGS))
    assert note is not None
    assert all(flag in note for flag in int8.INT8_CPU_FLAGS)
    assert "far slower than float GEMMs" in note and "backend='auto' takes simulate" in note
    assert int8.cpu_speed_note(frozenset([*AVX2_FLAGS, "avx_vnni"])) is not None
    for unit in int8.INT8_CPU_FLAGS:
        assert int8.cpu_speed_note(frozenset([*AVX2_FLAGS, unit])) is None
    assert int8.cpu_speed_note(None) is None


@pytest.mark.parametrize("units", [False, True])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_int8_layers_say_the_slow_cpu_once(layer, units, fresh_memo, caplog, monkeypatch):
    """Linear and Conv2d layer calls on the int8 backend say the note once per process where
    the CPU (made up here) lacks int8 units, and never where it has them."""
    if int8.int_mm_verdict("cpu") is not None:
        pytest.skip(f"the int8 backend refuses to run here: {int8.int_mm_verdict('cpu')}")
    flags = frozenset([*AVX2_FLAGS, *(["avx512_vnni"] if units else [])])
    monkeypatch.setattr(int8, "cpu_flags", lambda: flags)
    cfg = FQTConfig.preset("psq5", backend="int8", fused=False)
    base, x = (nn.Linear(6, 8), torch.randn(4, 6))
    if layer == "conv":
        base, x = nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)
    model = quantize_model(nn.Sequential(base, nn.Tanh(), base.__class__(*_widths(base))), cfg)
    with caplog.at_level(logging.INFO, logger="fqtorch.backends"):
        for _ in range(2):
            model(x).sum().backward()
    said = [r.getMessage() for r in caplog.records if "torch._int_mm has no int8" in r.getMessage()]
    assert said == ([] if units else [int8.cpu_speed_note(flags)])


def _widths(layer: nn.Module) -> tuple:
    """Constructor arguments of a second layer that takes ``layer``'s output."""
    if isinstance(layer, nn.Conv2d):
        return (layer.out_channels, 2, 3)
    return (layer.out_features, 3)


def test_int8_on_cuda_says_its_measured_speed_once(fresh_memo, caplog, monkeypatch):
    """On CUDA the int8 backend is exact but was slower than float on the one GPU measured: a
    layer call there says so once per process. Read from the device, so no GPU is needed to
    check the saying; a CPU with int8 units, and any other device, say nothing."""
    monkeypatch.setattr(int8, "cpu_flags", lambda: frozenset([*AVX2_FLAGS, "avx512_vnni"]))
    with caplog.at_level(logging.INFO, logger="fqtorch.backends"):
        int8.say_speed(torch.device("cpu"))
        int8.say_speed(torch.device("meta"))
        assert not caplog.records  # before the CUDA note is in the memo
        for _ in range(3):
            int8.say_speed(torch.device("cuda"))
    said = [r.getMessage() for r in caplog.records]
    assert said == [int8.CUDA_SPEED_NOTE]
    assert "0.05-0.14x fp32" in said[0] and "docs/performance.md" in said[0]
    assert "0.63-1.27x simulate's step time on Linear layers" in said[0]
