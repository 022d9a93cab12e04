"""Conv2d on oneDNN's integer convolutions (:mod:`fqtorch.backends.int8_qconv`): the same codes
as simulate give simulate's values on every convolution the int8 backend accepts, exactness is
probed on the machine and refused where it fails (with a warning, im2col instead), and reductions
past one exact float32 or int32 run in chunks."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import int8_qconv

# (name, layer factory, input (C, H, W)); every stride, padding mode and dilation the backend
# takes. Rectangular kernels and inputs catch a swapped axis.
CONVS = {
    "3x3-pad1": (lambda: nn.Conv2d(3, 5, 3, padding=1), (3, 9, 8)),
    "3x3-valid-stride2": (lambda: nn.Conv2d(3, 4, 3, stride=2), (3, 9, 8)),
    "3x3-pad1-stride2": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 8)),
    "3x2-dilated-strided": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        (4, 9, 8),
    ),
    "3x3-dilated2-pad2": (lambda: nn.Conv2d(3, 4, 3, padding=2, dilation=2), (3, 8, 9)),
    "pad-exceeds-reach": (lambda: nn.Conv2d(2, 3, 2, padding=2), (2, 6, 5)),
    "4x4-same-nobias": (lambda: nn.Conv2d(3, 4, 4, padding="same", bias=False), (3, 9, 8)),
    "1x1": (lambda: nn.Conv2d(6, 4, 1), (6, 5, 7)),
    "1x1-stride2": (lambda: nn.Conv2d(6, 4, 1, stride=2), (6, 5, 7)),
}
# Presets, one with an asymmetric weight grid (a zero point on the weight: the b_w terms).
PRESETS = {
    "psq5": {},
    "psq5-ptq-weight": {"weight_quantizer": "ptq"},
    "bhq4": {},
    "ptq8-ptq-weight": {"weight_quantizer": "ptq"},
    "qat": {},
}


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor | None):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)) if g is None else g
    out.backward(g)
    return (out.detach(), x.grad, *[p.grad for p in layer.parameters()]), g


def against_simulate(make, x, cfg: FQTConfig, memory_format=None):
    """int8 and simulate results of ``make()`` under ``cfg`` from the same weights and seed."""
    gen = torch.Generator().manual_seed(0)
    base = make()
    weight = base[0].weight if isinstance(base, nn.Sequential) else base.weight
    with torch.no_grad():  # off-centre weights: their grid's zero point far from 0
        weight.add_(0.5 * weight.abs().max())
        weight.add_(0.01 * torch.randn(weight.shape, generator=gen))
    if memory_format is not None:
        base, x = base.to(memory_format=memory_format), x.to(memory_format=memory_format)
    results, g = {}, None
    for backend in ("simulate", "int8"):
        torch.manual_seed(0)
        layer = quantize_model(copy.deepcopy(base), cfg.replace(backend=backend))
        results[backend], g = run(layer, x, g)
    return results


def assert_same(results) -> None:
    for a, b in zip(results["simulate"], results["int8"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def count_qconv_calls(monkeypatch) -> list:
    calls = []
    raw = int8_qconv._qconv_raw

    def counting(*args):
        calls.append(args[1].shape)
        return raw(*args)

    monkeypatch.setattr(int8_qconv, "_qconv_raw", counting)
    return calls


@pytest.fixture
def exact_here():
    """These tests check the integer convolution path: it runs where the probe passes (CPUs with
    VNNI or AMX). Elsewhere the fallback tests below still run."""
    verdict = int8_qconv.qconv_verdict()
    if verdict is not None:
        pytest.skip(f"integer convolutions refused on this machine: {verdict}")


@pytest.mark.usefixtures("exact_here")
class TestAgainstSimulate:
    @pytest.mark.parametrize("preset", sorted(PRESETS))
    @pytest.mark.parametrize("inputs", ["signed", "relu"])
    @pytest.mark.parametrize("conv", sorted(CONVS))
    def test_same_values(self, conv, inputs, preset, monkeypatch):
        """Signed inputs put real zero (the padding) between grid points; post-ReLU inputs put
        most codes at one end of the grid. Both run on the integer kernels (2 calls: output,
        grad_input; ``qat`` has no integer grad_input)."""
        calls = count_qconv_calls(monkeypatch)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
        x = x.relu() if inputs == "relu" else x + 0.37
        name = preset.split("-")[0]
        cfg = FQTConfig.preset(name, fused=False, **PRESETS[preset])
        assert_same(against_simulate(make, x, cfg))
        assert len(calls) == (1 if name == "qat" else 2)

    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x2-dilated-strided"])
    def test_channels_last(self, conv):
        make, shape = CONVS[conv]
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2)) + 0.2
        cfg = FQTConfig.preset("bhq5", fused=False)
        assert_same(against_simulate(make, x, cfg, memory_format=torch.channels_last))

    @pytest.mark.parametrize("preset", ["psq8", "ptq8"])
    def test_channel_chunks(self, preset, monkeypatch):
        """A reduction whose weight codes do not bound it inside float32's exact integers runs in
        chunks of input channels summed in int32 (130 channels at 8 × 8 bits: 2 chunks), here
        forced by refusing every weight bound, and then forced down to 1 channel."""
        monkeypatch.setattr(int8_qconv, "fits_float32", lambda w, a_bits: False)
        x = torch.randn(2, 130, 5, 4, generator=torch.Generator().manual_seed(3)).relu()
        make = lambda: nn.Conv2d(130, 3, 3, padding=1)  # noqa: E731
        cfg = FQTConfig.preset(preset, fused=False)
        calls = count_qconv_calls(monkeypatch)
        assert_same(against_simulate(make, x, cfg))
        assert len(calls) == 2 + 1  # forward in 2 chunks (130 > 113 channels), grad_input in 1
        monkeypatch.setattr(int8_qconv, "channel_chunk", lambda taps, a_bits, b_bits: 1)
        calls.clear()
        make = lambda: nn.Conv2d(4, 3, 3, stride=2, padding=1)  # noqa: E731
        x = torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(4)) + 0.3
        assert_same(against_simulate(make, x, cfg))
        assert len(calls) == 4 + 3  # one call per input channel of each convolution

    def test_batch_chunks_of_the_weight_gradient(self, monkeypatch):
        """The stride-1 weight gradient sums over N·Hp·Wp positions in chunks of whole samples
        (here forced to one sample per chunk)."""
        monkeypatch.setattr(int8_qconv, "chunk_length", lambda a_bits, b_bits: 8)
        make, shape = CONVS["3x3-dilated2-pad2"]
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5)) + 0.3
        assert_same(against_simulate(make, x, FQTConfig.preset("psq5", fused=False)))


def test_chunk_bound_is_float32_exact():
    """The channel chunk is the longest reduction whose worst case float32 holds."""
    for taps, a_bits, b_bits in [(9, 8, 8), (9, 5, 8), (1, 8, 8), (49, 4, 4)]:
        chunk = int8_qconv.channel_chunk(taps, a_bits, b_bits)
        worst = taps * 2 ** (a_bits - 1) * 2 ** (b_bits - 1)
        assert chunk * worst <= 2**24 < (chunk + 1) * worst


@pytest.mark.usefixtures("exact_here")
def test_weight_bound_is_float32_exact():
    """At the weight bound (2^7 · Σ|w| = 2^24 − 1024) the extreme 8-bit codes give an exact
    float32 output; one more extreme tap passes 2^24, and the bound refuses it."""
    taps = 1032  # 129 channels × 8 taps (8 × 1 kernel) of 127: Σ|w| = 131,064
    w = torch.full((2, 129, 8, 1), 127, dtype=torch.int8)
    w[1] = -128  # Σ|w| = 132,096: past the bound
    assert not int8_qconv.fits_float32(w, 8)
    assert int8_qconv.fits_float32(w[:1], 8)
    u8 = torch.zeros(1, 129, 8, 1, dtype=torch.uint8)  # codes −128
    got = int8_qconv._qconv_raw(u8, w[:1].contiguous(), [1, 1], [0, 0], [1, 1])
    assert got.item() == -128 * 127 * taps


def test_refused_probe_warns_and_runs_im2col(monkeypatch):
    """A failed probe sends the layer to im2col + ``_int_mm`` with a warning naming the layer and
    the reason, and the values stay simulate's."""
    monkeypatch.setattr(int8_qconv, "qconv_verdict", lambda: "the probe failed (test)")
    calls = count_qconv_calls(monkeypatch)
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))  # noqa: E731
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(6)) + 0.3
    with pytest.warns(RuntimeWarning, match=r"FQT layer '0': the probe failed .*im2col"):
        results = against_simulate(make, x, FQTConfig.preset("psq5", fused=False))
    assert_same(results)
    assert not calls


def test_probe_refuses_a_saturating_kernel():
    """oneDNN's AVX2 int8 kernels (``ONEDNN_MAX_CPU_ISA=AVX2``, in a fresh process) sum u8 × s8
    pairs in int16, which saturates: the probe refuses them, and the layer warns and still gives
    simulate's values."""
    script = textwrap.dedent(
        """
        import copy
        import warnings
        import torch
        from torch import nn
        from fqtorch import FQTConfig, quantize_model
        from fqtorch.backends import int8_qconv
        assert int8_qconv.qconv_verdict() is not None
        x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(6)) + 0.3
        base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        grads = []
        for backend in ("simulate", "int8"):
            torch.manual_seed(0)
            cfg = FQTConfig.preset("psq5", backend=backend, fused=False)
            layer = quantize_model(copy.deepcopy(base), cfg)
            xi = x.clone().requires_grad_(True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                layer(xi).sum().backward()
            grads.append(xi.grad)
        assert any("im2col" in str(w.message) for w in caught), caught
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
        print("refused")
        """
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-2000:]
