"""Conv2d on oneDNN's integer convolutions (:mod:`fqtorch.backends.int8_qconv`): the same codes
as simulate give simulate's values on every convolution the int8 backend accepts, exactness is
probed on the machine and refused where it fails (with a warning, im2col instead), and reductions
past one exact float32 or int32 run in chunks."""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import int8, int8_conv, int8_qconv
from fqtorch.backends.base import ConvOps
from fqtorch.backends.notes import warn_once

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
    # wider strided layers (their weight gradient unfolds taps first, as every kernel > 1x1)
    "3x3-pad1-stride2-8ch": (lambda: nn.Conv2d(8, 4, 3, stride=2, padding=1), (8, 9, 8)),
    "3x2-dilated-strided-9ch": (
        lambda: nn.Conv2d(9, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        (9, 10, 9),
    ),
    "3x3-reflect-stride2-8ch": (
        lambda: nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="reflect"),
        (8, 9, 8),
    ),
    # strided grad_input by phase: a stride past the kernel (positions no tap reaches), phases
    # of 3 and 2 taps, a stride and dilation with no common factor, unequal strides
    "2x2-stride3": (lambda: nn.Conv2d(3, 4, 2, stride=3), (3, 10, 9)),
    "5x5-pad2-stride2": (lambda: nn.Conv2d(3, 4, 5, stride=2, padding=2), (3, 9, 8)),
    "3x3-stride3-dilated2": (
        lambda: nn.Conv2d(3, 4, 3, stride=3, padding=2, dilation=2),
        (3, 11, 10),
    ),
    "3x4-stride2x3-pad1x2": (
        lambda: nn.Conv2d(3, 4, (3, 4), stride=(2, 3), padding=(1, 2)),
        (3, 9, 11),
    ),
    # a phase of two taps at dilation 2 (taps 0 and 3 of 4, stride 3, dilation 2)
    "4x4-stride3-dilated2": (
        lambda: nn.Conv2d(3, 4, 4, stride=3, padding=1, dilation=2),
        (3, 13, 12),
    ),
    # outputs whose windows lie in the padding along the width (dilation 2 straddles the one
    # real column): oneDNN's kernel returned garbage there
    "window-in-padding": (
        lambda: nn.Conv2d(4, 4, (4, 2), padding=(2, 1), dilation=2),
        (4, 11, 1),
    ),
}
# A strided layer's grad_input runs one integer convolution per phase of the input positions
# (int8_qconv.axis_phases), counted here by hand: along an axis of kernel k, stride s and
# dilation d, the phases r = i·d mod s of the taps i (3x3 stride 2: {0, 2} and {1}; dilation 2
# with stride 2: all taps in phase 0; 1×1 stride 2: phase 0 only; 4 taps at stride 3: three).
GRAD_INPUT_PHASES = {
    "3x3-valid-stride2": 4,
    "3x3-pad1-stride2": 4,
    "3x3-pad1-stride2-8ch": 4,
    "3x3-reflect-stride2-8ch": 4,
    "2x2-stride3": 4,
    "5x5-pad2-stride2": 4,
    "3x3-stride3-dilated2": 9,
    "3x4-stride2x3-pad1x2": 6,
    "4x4-stride3-dilated2": 9,
}
# Presets, one with an asymmetric weight grid (a zero point on the weight: the b_w terms).
PRESETS = {
    "psq5": {},
    "psq5-ptq-weight": {"weight_quantizer": "ptq"},
    "bhq4": {},
    "ptq8-ptq-weight": {"weight_quantizer": "ptq"},
    "qat": {},
}


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor | None, grad_format=None):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)) if g is None else g
    if grad_format is not None:
        g = g.contiguous(memory_format=grad_format)
    out.backward(g)
    return (out.detach(), x.grad, *[p.grad for p in layer.parameters()]), g


def against_simulate(make, x, cfg: FQTConfig, memory_format=None, grad_format=None):
    """int8 and simulate results of ``make()`` under ``cfg`` from the same weights and seed, and
    the same ``grad_output`` (laid out as ``grad_format``)."""
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
        results[backend], g = run(layer, x, g, grad_format)
    return results


def assert_same(results) -> None:
    for a, b in zip(results["simulate"], results["int8"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def spy_compiled_epilogue(monkeypatch, name: str = "_compiled_taps_terms") -> list:
    """The first-argument shapes the compiled epilogue ``name`` (by default the weight
    gradient's) is called with."""
    calls, compiled = [], getattr(int8_qconv, name)

    def spy(*args):
        calls.append(args[0].shape)
        return compiled(*args)

    monkeypatch.setattr(int8_qconv, name, spy)
    return calls


def record_products(monkeypatch, measure=lambda a, b: a.shape[1]) -> list:
    """``measure(a, b)`` (by default the reduction length) of each ``torch._int_mm`` product made
    from now on, less the code sums (:func:`~fqtorch.backends.int8._code_sum`: a product of 8
    rows of ones), which are sums, not the layer's GEMMs."""
    lengths, int_mm = [], torch._int_mm

    def recording(a, b):
        if not (a.shape[0] == 8 and bool((a == 1).all())):
            lengths.append(measure(a, b))
        return int_mm(a, b)

    monkeypatch.setattr(torch, "_int_mm", recording)
    return lengths


def count_qconv_calls(monkeypatch) -> list:
    calls = []
    raw = int8_qconv._qconv_raw

    def counting(*args):
        calls.append(args[1].shape)
        return raw(*args)

    monkeypatch.setattr(int8_qconv, "_qconv_raw", counting)
    return calls


@pytest.fixture(autouse=True)
def garbage_in_new_grids(monkeypatch):
    """The weight gradient's grids start uninitialized (every entry of their planes is written,
    zeros only off the real positions; the tail past the planes meets only zero codes of h):
    fresh memory is often zero, which would hide an entry left unwritten, so in these tests
    every new grid starts as noise."""
    grid = int8_qconv._positions_grid
    gen = torch.Generator().manual_seed(99)

    def noisy(*args):
        out = grid(*args)
        out.copy_(torch.randint(0, 256, out.shape, generator=gen, dtype=torch.uint8))
        return out

    monkeypatch.setattr(int8_qconv, "_positions_grid", noisy)


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
        grad_input, or one per phase of a strided layer's input positions; ``qat`` has no
        integer grad_input), with a channel of ones for the receptive-field sums only where the
        weight has a zero point (``ptq`` weights; symmetric ones go without: these layers' widths
        are not multiples of 16, :func:`int8_qconv.sums_channel`)."""
        calls = count_qconv_calls(monkeypatch)
        epilogues = spy_compiled_epilogue(monkeypatch)
        outputs = spy_compiled_epilogue(monkeypatch, "_compiled_output_terms")
        grad_inputs = spy_compiled_epilogue(monkeypatch, "_compiled_grad_input_terms")
        phases = spy_compiled_epilogue(monkeypatch, "_compiled_phase_terms")
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
        x = x.relu() if inputs == "relu" else x + 0.37
        name = preset.split("-")[0]
        cfg = FQTConfig.preset(name, fused=False, **PRESETS[preset])
        assert_same(against_simulate(make, x, cfg))
        assert len(calls) == (1 if name == "qat" else 1 + GRAD_INPUT_PHASES.get(conv, 1))
        (o, c), border = make().weight.shape[:2], int("ptq-weight" in preset)
        assert calls[0][0] == o + border  # the output's kernel (O', C, kh, kw)
        assert all(kernel[0] == c + border for kernel in calls[1:])  # grad_input's (C', O, ..)
        # fused=False: the eager epilogues
        assert not (epilogues or outputs or grad_inputs or phases)

    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x3-pad1-stride2"])
    def test_float64_model_keeps_float64_gradients(self, conv, monkeypatch):
        """A float64 layer under the int8 backend runs on simulate (float64 operands do, under
        any backend, with a warning: no integer kernel runs), so its weight and bias gradients
        are float64 values, not float32 ones cast back."""
        calls = count_qconv_calls(monkeypatch)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        cfg = FQTConfig.preset("psq5", fused=True)  # hash noise: the same draws in both backends
        results = against_simulate(lambda: make().double(), x + 0.3, cfg)
        assert_same(results)
        for grad in results["int8"][2:]:  # weight, bias
            assert grad.dtype == torch.float64
            assert not torch.equal(grad, grad.float().double())
        assert not calls

    @pytest.mark.parametrize("weights", ["ptq", "symmetric"])
    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x2-dilated-strided", "3x3-pad1-stride2"])
    def test_fused_quantizers(self, conv, weights, monkeypatch):
        """``fused=True`` (the int8 default: compiled quantizers, another noise stream) on both
        backends gives the same codes, so the integer kernels still give simulate's values, with
        the compiled epilogues with and without the receptive-field sums (a weight with and
        without a zero point)."""
        calls = count_qconv_calls(monkeypatch)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7)) + 0.2
        epilogues = spy_compiled_epilogue(monkeypatch)
        outputs = spy_compiled_epilogue(monkeypatch, "_compiled_output_terms")
        grad_inputs = spy_compiled_epilogue(monkeypatch, "_compiled_grad_input_terms")
        phases = spy_compiled_epilogue(monkeypatch, "_compiled_phase_terms")
        cfg = FQTConfig.preset("psq5", fused=True, weight_quantizer=weights)
        assert_same(against_simulate(make, x, cfg))
        strided = conv != "3x3-pad1"
        assert len(calls) == 1 + GRAD_INPUT_PHASES.get(conv, 1)
        (o, c), border = make().weight.shape[:2], int(weights == "ptq")
        assert [kernel[0] for kernel in calls] == [o + border] + [c + border] * (len(calls) - 1)
        assert len(outputs) == 1  # compiled output and grad_input epilogues, the latter by phase
        assert (len(grad_inputs), len(phases)) == ((0, len(calls) - 1) if strided else (1, 0))
        # the stride-1 weight gradient's epilogue is the compiled one; strided layers with more
        # than one tap unfold (int8_qconv.phases_pay)
        assert len(epilogues) == (0 if strided else 1)

    @pytest.mark.parametrize("preset", ["psq5", "ptq8-ptq-weight"])
    @pytest.mark.parametrize("conv", [*sorted(GRAD_INPUT_PHASES), "1x1-stride2"])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_strided_weight_gradient_by_phase(self, conv, preset, channels_last, monkeypatch):
        """A strided layer's weight gradient by phase (taken by 1 × 1 kernels on up to 64
        input channels, forced here) gives simulate's values, from NCHW and channels-last
        inputs: one ``_int_mm`` per kernel tap and its compiled epilogue, no unfold."""
        monkeypatch.setattr(int8_qconv, "phases_pay", lambda channels, taps: True)
        epilogues = spy_compiled_epilogue(monkeypatch)
        int8.int_mm_verdict("cpu")  # its probe at first use is not the layer's product
        products = record_products(monkeypatch)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(12)) + 0.3
        name = preset.split("-")[0]
        cfg = FQTConfig.preset(name, fused=True, **PRESETS[preset])
        memory_format = torch.channels_last if channels_last else None
        assert_same(against_simulate(make, x, cfg, memory_format=memory_format))
        assert len(products) == math.prod(make().kernel_size) and len(epilogues) == 1

    @pytest.mark.parametrize("kernel, channels", [(1, 64), (1, 65), (3, 64)])
    def test_strided_paths_unforced(self, kernel, channels, monkeypatch):
        """Unforced, a strided 1 × 1 layer of 64 input channels runs its weight gradient by
        phase (one product, its one tap); one of 65 channels and a strided 3 × 3 layer unfold
        (a few products, not one per tap); all give simulate's values and say their path once
        (the path that ran is spied on: a 1 × 1 kernel makes one product either way)."""
        int8.int_mm_verdict("cpu"), int8_qconv.qconv_verdict()  # first-use probes: not counted
        products = record_products(monkeypatch)
        said, ran = [], []
        monkeypatch.setattr(int8_qconv, "say_once", said.append)
        for name in ("_grad_weight_taps", "_im2col_grad_weight"):
            path_fn = getattr(int8_qconv, name)
            spy = lambda *args, _name=name, _fn=path_fn: ran.append(_name) or _fn(*args)  # noqa: E731
            monkeypatch.setattr(int8_qconv, name, spy)
        make = lambda: nn.Conv2d(channels, 5, kernel, stride=2, padding=kernel // 2)  # noqa: E731
        x = torch.randn(2, channels, 7, 6, generator=torch.Generator().manual_seed(13)).relu()
        assert_same(against_simulate(make, x, FQTConfig.preset("psq5", fused=False)))
        by_phase = kernel == 1 and channels <= 64
        assert ran == ["_grad_weight_taps" if by_phase else "_im2col_grad_weight"]
        if by_phase:
            path = "torch._int_mm per tap on the stride's phases"
            assert len(products) == 1
        else:
            why = "more than one tap" if kernel > 1 else "over 64 input channels"
            path = f"im2col + torch._int_mm (strided, {why})"
            assert len(products) < 9 if kernel > 1 else len(products) <= 2
        assert said == [
            "FQT layer '': Conv2d output and grad_input on oneDNN int8 convolutions, "
            f"grad_weight on {path}"
        ]

    @pytest.mark.parametrize(
        "conv", [c for c in CONVS if all(s == 1 for s in CONVS[c][0]().stride)]
    )
    def test_stride1_weight_gradient_per_tap(self, conv, monkeypatch):
        """Every stride-1 configuration's weight gradient per tap (taken unless a layer has
        under 24 input channels and more than 9 taps; forced here) gives simulate's values: one
        ``_int_mm`` per kernel tap, no unfold (the 4 × 4 "same" layer, asymmetric padding,
        would unfold unforced)."""
        monkeypatch.setattr(int8_qconv, "stride1_taps_pay", lambda *rule: True)
        int8.int_mm_verdict("cpu"), int8_qconv.qconv_verdict()  # first-use probes: not counted
        products = record_products(monkeypatch)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(14)) + 0.3
        assert_same(against_simulate(make, x, FQTConfig.preset("psq5", fused=True)))
        assert len(products) == math.prod(make().kernel_size)

    @pytest.mark.parametrize("batch", [1, 16])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_a_narrow_large_kernel_unfolds(self, channels_last, batch, monkeypatch):
        """A stride-1 layer under 24 input channels with more than 9 taps (a 5 × 5 kernel, 3
        channels into 16) unfolds its weight gradient unforced (a few products, not one per
        tap) at any batch, gives simulate's values from NCHW and channels-last inputs, and the
        layer says so once."""
        int8.int_mm_verdict("cpu"), int8_qconv.qconv_verdict()  # first-use probes: not counted
        products = record_products(monkeypatch)
        said = []
        monkeypatch.setattr(int8_qconv, "say_once", said.append)
        make = lambda: nn.Conv2d(3, 16, 5, padding=2)  # noqa: E731
        x = torch.randn(batch, 3, 9, 8, generator=torch.Generator().manual_seed(15)) + 0.3
        memory_format = torch.channels_last if channels_last else None
        cfg = FQTConfig.preset("psq5", fused=False)
        assert_same(against_simulate(make, x, cfg, memory_format=memory_format))
        assert len(products) < 25
        assert said == [
            "FQT layer '': Conv2d output and grad_input on oneDNN int8 convolutions, "
            "grad_weight on im2col + torch._int_mm (more than 9 taps, under 24 input channels)"
        ]

    def test_stride1_taps_rule(self):
        """3 × 3 layers and every layer from 24 input channels take the taps; larger kernels on 3
        to 23 channels unfold, except from 8 channels into at most three times as many outputs where
        the unfolded codes would pass 32 MiB (glibc maps such a buffer afresh on every
        allocation)."""
        pays, mib = int8_qconv.stride1_taps_pay, 2**20
        assert pays(3, 9, 0, 16) and pays(3, 1, 0, 16) and pays(24, 49, 0, 512)
        assert pays(64, 25, 0, 64) and pays(23, 9, 0, 23) and pays(3, 9, 10**9, 3)
        assert not pays(3, 25, 0, 3) and not pays(3, 49, 0, 3) and not pays(16, 25, 0, 16)
        assert not pays(23, 10, 0, 23) and not pays(16, 25, 32 * mib, 16)
        assert not pays(8, 49, 32 * mib, 8)
        assert pays(16, 25, 32 * mib + 1, 16) and pays(8, 49, 32 * mib + 1, 8)
        assert pays(23, 10, 40 * mib, 69) and pays(16, 49, 10**9, 48)
        assert not pays(16, 49, 10**9, 49) and not pays(8, 49, 10**9, 64)
        assert not pays(7, 25, 10**9, 7) and not pays(3, 49, 10**9, 3)

    def test_unfolded_bytes(self):
        """N·Ho·Wo·C·kh·kw, with the layer's padding (and its extra asymmetric pad), stride,
        dilation and a rectangular kernel, as im2col unfolds it."""
        size = int8_qconv.unfolded_bytes
        assert size((32, 16, 56, 56), (16, 16, 5, 5), ConvOps((1, 1), (2, 2), (1, 1), 1)) == (
            32 * 56 * 56 * 16 * 25
        )
        ops = ConvOps((2, 1), (0, 1), (1, 2), 1)  # Ho = (9 − 3)//2 + 1 = 4, Wo = 10 + 2 − 4 = 8
        assert size((2, 3, 9, 10), (4, 3, 3, 3), ops) == 2 * 4 * 8 * 3 * 9
        # a 2 × 4 kernel, "same" by an extra pad of (1, 2) columns and (0, 1) rows: 9 × 10 out
        same = ConvOps((1, 1), (0, 0), (1, 1), 1, pad=(1, 2, 0, 1))
        assert size((2, 3, 9, 10), (4, 3, 2, 4), same) == 2 * 9 * 10 * 3 * 8
        x = torch.zeros(2, 3, 9, 10, dtype=torch.int8)
        cols = int8_conv._cols(x, int8_conv._pads(same), (2, 4), same)
        assert cols.numel() == 2 * 9 * 10 * 3 * 8  # what im2col holds

    def test_weight_by_taps_reads_the_shapes(self):
        """The stride-1 rule gets the weight's input and output channels, its taps and the
        unfolding of the input the layer sees."""
        seen = []
        by_taps = int8_qconv.weight_by_taps
        with pytest.MonkeyPatch.context() as m:
            m.setattr(int8_qconv, "stride1_taps_pay", lambda *rule: seen.append(rule) or True)
            ops = ConvOps((1, 1), (3, 1), (1, 1), 1)
            assert by_taps(ops, (4, 8, 20, 30), (12, 8, 7, 3))
        assert seen == [(8, 21, 4 * 20 * 30 * 8 * 21, 12)]

    @pytest.mark.parametrize("channels,outputs", [(7, 4), (8, 4), (8, 24), (8, 25)])
    def test_large_unfolding_takes_the_taps(self, channels, outputs, monkeypatch):
        """Unforced, a stride-1 5 × 5 layer of 8 channels into at most 24 outputs whose unfolded
        codes would pass the threshold (here lowered to just under them) takes one product per
        tap, and unfolds at the threshold; 7 channels, or 25 outputs, unfold either way.
        simulate's values in every case, and the line names the path."""
        int8.int_mm_verdict("cpu"), int8_qconv.qconv_verdict()  # first-use probes: not counted
        make = lambda: nn.Conv2d(channels, outputs, 5, padding=2)  # noqa: E731
        x = torch.randn(2, channels, 9, 8, generator=torch.Generator().manual_seed(17)) + 0.3
        unfolded = 2 * 9 * 8 * channels * 25
        for threshold in (unfolded - 1, unfolded):
            monkeypatch.setattr(int8_qconv, "_UNFOLDED_FAULTS", threshold)
            said = []
            monkeypatch.setattr(int8_qconv, "say_once", said.append)
            products = record_products(monkeypatch)
            assert_same(against_simulate(make, x, FQTConfig.preset("psq5", fused=False)))
            by_taps = channels == 8 and outputs <= 24 and threshold < unfolded
            assert (len(products) == 25) if by_taps else (len(products) < 25), products
            assert said and ("per tap" in said[0]) == by_taps, said
            if not by_taps and channels == 8:  # the condition that failed
                reason = "at most 32 MiB unfolded" if outputs <= 24 else "3x as many outputs"
                assert reason in said[0], said

    def test_phases_rule(self):
        """Strided 1 × 1 kernels on up to 64 input channels (the CIFAR ResNets' and ResNet-18's
        first downsampling shortcuts) take the phases; wider ones and every larger strided
        kernel unfold."""
        pays = int8_qconv.phases_pay
        assert pays(3, 1) and pays(64, 1)
        assert not pays(65, 1) and not pays(512, 1)
        assert not pays(3, 4) and not pays(64, 9) and not pays(512, 9) and not pays(3, 49)
        by_taps, big = int8_qconv.weight_by_taps, (64, 16, 224, 224)  # 1.2 GB unfolded at 5 × 5

        def ops(*stride):
            return ConvOps(stride, (0, 0), (1, 1), 1)

        assert by_taps(ops(2, 2), (2, 16, 8, 8), (32, 16, 1, 1))
        assert by_taps(ops(2, 1), (2, 64, 8, 8), (32, 64, 1, 1))
        assert by_taps(ops(1, 1), (2, 512, 8, 8), (32, 512, 3, 3))
        assert by_taps(ops(1, 1), big, (16, 16, 5, 5))
        assert not by_taps(ops(2, 2), (2, 128, 8, 8), (32, 128, 1, 1))
        assert not by_taps(ops(2, 2), (2, 512, 8, 8), (32, 512, 3, 3))
        assert not by_taps(ops(2, 2), big, (16, 16, 5, 5))  # unfolding's size: a stride-1 matter

    def test_sums_channel_rule(self):
        """A weight with a zero point always takes the channel of sums; without one, a kernel
        keeps it only where it is a multiple of 16 output channels of more than one tap with
        under 48 output positions per channel (the measured points of docs/performance.md:
        PreAct ResNet-20's 16-channel layers and ResNet-50's 64-channel ones drop it, 256
        channels at 14² and 512 at 7² keep it, 1 × 1 kernels and other widths never do)."""
        rule = int8_qconv.sums_channel
        assert rule(True, 16, 32 * 32 * 32, 9) and rule(True, 512, 10**9, 1) and rule(True, 5, 1, 1)
        assert not rule(False, 16, 32 * 32 * 32, 9) and not rule(False, 64, 32 * 56 * 56, 9)
        assert not rule(False, 256, 32 * 28 * 28, 9) and not rule(False, 128, 32 * 14 * 14, 9)
        assert rule(False, 256, 32 * 14 * 14, 9) and rule(False, 512, 32 * 7 * 7, 9)
        assert rule(False, 16, 767, 4) and not rule(False, 16, 768, 4)
        assert not rule(False, 512, 32 * 7 * 7, 1)  # 1 × 1: packing costs the same
        assert not rule(False, 63, 10, 9) and not rule(False, 24, 10, 9)  # no block saved

    def test_mask_columns_rule(self):
        """The weight gradient's input grid keeps the mask's two columns unless they take the
        product into one more block of 16 (channels ≡ 0 or 15 mod 16) over 32,768 positions or more,
        on a kernel of more than one tap (the measured points of docs/performance.md: PreAct
        ResNet-20's 16-channel layers at batch 32 and ResNet-50's 64 channels at 56² drop them, 64
        channels at 8² and 128 at 28² keep them, and so do 1 × 1 kernels and any count the columns
        add no block to)."""
        rule = int8_qconv.mask_columns
        assert not rule(16, 32 * 34 * 34, 9) and not rule(64, 32 * 58 * 58, 9)
        assert not rule(32, 128 * 18 * 18, 9) and not rule(15, 32_768, 4) and not rule(31, 10**6, 2)
        assert rule(64, 32 * 10 * 10, 9) and rule(128, 32 * 30 * 30, 9) and rule(16, 32_767, 9)
        assert (
            rule(3, 10**6, 9) and rule(14, 10**6, 9) and rule(17, 10**6, 9) and rule(30, 10**6, 9)
        )
        assert rule(16, 10**6, 1) and rule(64, 10**6, 1)  # 1 × 1: the block saved once

    @pytest.mark.parametrize("fused", [False, True])
    @pytest.mark.parametrize("stride", [1, 2])
    def test_mask_columns_unforced(self, fused, stride, monkeypatch):
        """Unforced, a 16-channel 3 × 3 layer over 32,768 grid positions a phase (two samples
        of 126² at stride 1, 254² at stride 2, both padded by 1) drops the mask's columns (each
        product has 16 columns), a 3-channel one and a 16-channel 1 × 1 one keep them (5, 18);
        all give simulate's values with a bias (its gradient summed apart where the columns are
        dropped)."""
        monkeypatch.setattr(int8_qconv, "phases_pay", lambda channels, taps: True)
        monkeypatch.setattr(int8_qconv, "stride1_taps_pay", lambda *rule: True)
        int8.int_mm_verdict("cpu"), int8_qconv.qconv_verdict()  # first-use probes: not counted
        widths = record_products(monkeypatch, lambda a, b: b.shape[1])
        side = 126 if stride == 1 else 254  # padded 128² (stride 1), 256² → 128² phases
        for channels, kernel, width in ((16, 3, 16), (3, 3, 5), (16, 1, 18)):
            widths.clear()
            make = lambda c=channels, k=kernel: nn.Conv2d(c, 4, k, stride=stride, padding=1)  # noqa: E731
            gen = torch.Generator().manual_seed(16)
            x = torch.randn(2, channels, side, side, generator=gen) + 0.3
            cfg = FQTConfig.preset("psq5", fused=fused)
            assert_same(against_simulate(make, x, cfg, memory_format=torch.channels_last))
            assert widths and set(widths) == {width}, (channels, kernel, widths)

    @pytest.mark.parametrize("weights", ["symmetric", "ptq"])
    @pytest.mark.parametrize("fused", [False, True])
    def test_sums_channel_unforced(self, weights, fused, monkeypatch):
        """Unforced, a symmetric weight's kernels keep the channel of sums only as the rule says:
        by the forward's output channels (32) and positions, ``grad_input``'s input channels
        (16) and positions, each strided phase's taps, and never for a 1 × 1 kernel; a weight
        with a zero point keeps it on every kernel. All give simulate's values."""
        calls = count_qconv_calls(monkeypatch)
        cfg = FQTConfig.preset("psq5", fused=fused, weight_quantizer=weights)
        ptq = weights == "ptq"
        cases = [
            # 16 -> 32, 3x3: 36 positions keep both; 800 drop grad_input's (≥ 48·16) only;
            # 40 × 10 keeps both (400; its height squared, 1600, would drop both)
            (lambda: nn.Conv2d(16, 32, 3, padding=1), (1, 6, 6), [33, 17]),
            (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 20, 20), [33, 16]),
            (lambda: nn.Conv2d(16, 32, 3, padding=1), (1, 40, 10), [33, 17]),
            # 16 -> 16, 3x3 stride 2: phases of 4, 2, 2 and 1 taps over N·Ho·Wo output
            # positions: 16 and 192 keep (192 = 3·16·4, where N·H·W = 768 or N·Ho² = 768 would
            # drop), 768 drops
            (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1), (1, 8, 8), [17, 17, 17, 17, 16]),
            (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1), (3, 32, 8), [17, 17, 17, 17, 16]),
            (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1), (3, 32, 32), [16] * 5),
            # 32 -> 16 stride 2 on 20²: 1000 output positions drop the forward's 16 (≥ 768) and
            # keep grad_input's 32 (< 1536)
            (lambda: nn.Conv2d(32, 16, 3, stride=2, padding=1), (10, 20, 20), [16, 33, 33, 33, 32]),
            (lambda: nn.Conv2d(16, 16, 1), (1, 3, 3), [16, 16]),  # 1 × 1: never
        ]
        for make, (batch, *size), keeps in cases:
            calls.clear()
            c_in = make().weight.shape[1]
            x = torch.randn(batch, c_in, *size, generator=torch.Generator().manual_seed(14)) + 0.3
            assert_same(against_simulate(make, x, cfg))
            out, c = make().weight.shape[:2]
            expected = [out + 1] + [c + 1] * (len(keeps) - 1) if ptq else keeps
            assert [kernel[0] for kernel in calls] == expected, (batch, size, calls)

    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x3-dilated2-pad2", "1x1"])
    @pytest.mark.parametrize("grad_format", [None, torch.channels_last])
    def test_gradient_grid_by_compiled_transpose(self, conv, grad_format, monkeypatch):
        """The stride-1 weight gradient's grid of ``h`` codes built by the compiled transpose
        (taken from 64 channels on 28² planes; forced here on small layers) gives simulate's
        values, whatever ``grad_output``'s layout."""
        monkeypatch.setattr(int8_qconv, "compiled_transpose_pays", lambda channels, plane: True)
        transposes = spy_compiled_epilogue(monkeypatch, "_compiled_transpose")
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(8)) + 0.2
        cfg = FQTConfig.preset("psq5", fused=True, weight_quantizer="ptq")
        assert_same(against_simulate(make, x, cfg, grad_format=grad_format))
        assert len(transposes) == 1

    def test_compiled_transpose_rule(self):
        """ResNet-50's planes take it, PreAct ResNet-20's do not."""
        assert int8_qconv.compiled_transpose_pays(64, 56 * 56)
        assert int8_qconv.compiled_transpose_pays(128, 28 * 28)
        assert not int8_qconv.compiled_transpose_pays(16, 32 * 32)
        assert not int8_qconv.compiled_transpose_pays(64, 8 * 8)

    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x2-dilated-strided"])
    def test_channels_last(self, conv):
        make, shape = CONVS[conv]
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2)) + 0.2
        cfg = FQTConfig.preset("bhq5", fused=False)
        assert_same(against_simulate(make, x, cfg, memory_format=torch.channels_last))

    @pytest.mark.parametrize("preset", ["psq5", "bhq4", "ptq8", "rht5"])
    @pytest.mark.parametrize("conv", ["3x3-pad1", "3x3-pad1-stride2", "3x2-dilated-strided", "1x1"])
    def test_channels_last_gradient(self, conv, preset, monkeypatch):
        """A channels-last ``grad_output`` (what a model hands back to this layer's channels-last
        output) gives simulate's values, and its codes reach the ``grad_input`` kernel
        channels-last, not copied into it. (rht: 3 samples padded to 4 rows.)"""
        layouts = []
        raw = int8_qconv._qconv_raw

        def spy(u8, *args):
            layouts.append(u8.is_contiguous(memory_format=torch.channels_last))
            return raw(u8, *args)

        monkeypatch.setattr(int8_qconv, "_qconv_raw", spy)
        make, shape = CONVS[conv]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4)) + 0.2
        if preset == "rht5":
            cfg = FQTConfig.preset("psq5", fused=False, grad_quantizer="rht")
        else:
            cfg = FQTConfig.preset(preset, fused=False)
        assert_same(against_simulate(make, x, cfg, grad_format=torch.channels_last))
        assert layouts[-1], "grad_input's codes were handed over in NCHW order"

    @pytest.mark.parametrize("preset", ["psq5", "bhq4", "psq5-fused"])
    def test_a_model_matches_simulate_whatever_its_gradients_layout(self, preset):
        """In a model the int8 convolutions hand channels-last gradients back, simulate's come
        back NCHW; both read each sample as (H, W, C), so the same seed draws the same noise and
        int8 gives simulate's gradients. The layers' float sums differ in rounding, which may
        flip a rare code upstream: almost every entry must agree (a different noise order moves
        nearly all of them by 5-50%)."""
        name, *fused = preset.split("-")
        cfg = FQTConfig.preset(name, fused=bool(fused))
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1),
            nn.ReLU(), nn.Conv2d(5, 4, 3, padding=1),
        )  # fmt: skip
        x = torch.randn(4, 3, 9, 8, generator=torch.Generator().manual_seed(3)) + 0.2
        grads = {}
        for backend in ("simulate", "int8"):
            torch.manual_seed(0)
            layer = quantize_model(copy.deepcopy(model), cfg.replace(backend=backend))
            xi = x.clone().requires_grad_(True)
            layer(xi).square().sum().backward()
            grads[backend] = [xi.grad, *(p.grad for p in layer.parameters())]
        for a, b in zip(grads["simulate"], grads["int8"], strict=True):
            off = (b - a).abs() > 1e-4 * float(a.abs().max())
            assert float(off.float().mean()) < 0.02, f"{int(off.sum())} of {off.numel()} differ"

    @pytest.mark.parametrize("channels_last", [False, True])
    @pytest.mark.parametrize("side", [1, 2])
    def test_one_position_strided_weight_gradient(self, side, channels_last, monkeypatch):
        """A strided 1×1 layer on one sample with one output position (a 1×1 or 2×2 image at
        stride 2), by phase: from NCHW codes the phase grid holds one position, channel-major,
        whose (1, K) operand with unit strides the CPU kernel misreads unless padded (the 2×2
        NCHW case; a 1×1 image's codes count as channels-last, whose grid it reads right)."""
        monkeypatch.setattr(int8_qconv, "phases_pay", lambda channels, taps: True)
        make = lambda: nn.Conv2d(6, 4, 1, stride=2)  # noqa: E731
        x = torch.randn(1, 6, side, side, generator=torch.Generator().manual_seed(1)) + 0.3
        memory_format = torch.channels_last if channels_last else None
        cfg = FQTConfig.preset("psq5", fused=False)
        assert_same(against_simulate(make, x, cfg, memory_format=memory_format))

    @pytest.mark.parametrize("batch", [1, 3])
    def test_one_position_weight_gradient(self, batch):
        """A 1×1 convolution of 1×1 images (a head after global pooling; an unbatched input):
        with one sample the weight gradient's reduction is one position, whose (·, 1) operands
        the CPU kernel misreads unless padded."""
        make = lambda: nn.Conv2d(24, 10, 1)  # noqa: E731
        x = torch.randn(batch, 24, 1, 1, generator=torch.Generator().manual_seed(6)).relu()
        assert_same(against_simulate(make, x + 0.1, FQTConfig.preset("psq5", fused=False)))

    def test_channels_last_gradient_on_im2col(self, monkeypatch):
        """The im2col fallback takes the (H, W, C)-order codes as its GEMM rows: simulate's
        values."""
        monkeypatch.setattr(int8_qconv, "qconv_verdict", lambda: "the probe failed (test)")
        make, shape = CONVS["3x3-pad1-stride2"]
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5)) + 0.2
        cfg = FQTConfig.preset("bhq4", fused=False)
        with pytest.warns(RuntimeWarning, match="im2col"):
            results = against_simulate(make, x, cfg, grad_format=torch.channels_last)
        assert_same(results)

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
        # one call per input channel of each convolution: the forward's 4, and grad_input's 3
        # in each of its 4 phases
        assert len(calls) == 4 + 4 * 3

    def test_position_chunks_of_the_weight_gradient(self, monkeypatch):
        """The stride-1 weight gradient sums over N·Hp·Wp positions in chunks of at most
        ``chunk_length`` positions, across sample boundaries (here forced down to 40, shorter
        than one padded 12 × 13 plane): every per-tap product is that short, and the values
        stay simulate's."""
        monkeypatch.setattr(int8_qconv, "chunk_length", lambda a_bits, b_bits: 40)
        lengths = record_products(monkeypatch)
        make, shape = CONVS["3x3-dilated2-pad2"]
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5)) + 0.3
        assert_same(against_simulate(make, x, FQTConfig.preset("psq5", fused=False)))
        taps, positions = 9, 4 * 12 * 13
        assert len(lengths) == taps * -(-positions // 40) and max(lengths) <= 40


@pytest.mark.parametrize("mask_columns", [False, True])
def test_weight_gradient_over_a_plane_longer_than_one_chunk(mask_columns, monkeypatch):
    """One padded plane (365 × 365 = 133,225 positions) is longer than the int32 chunk of two
    8-bit codes (131,064): extreme codes (−128 everywhere) sum to 128² · 363² = 2,158,903,296,
    past int32, and must not wrap. Unit scales and zero points of 1 bring in every zero-point term
    (the mask's sums over the whole plane too): the values are −127 everywhere. Called on the
    weight-gradient function itself (the layer path costs seconds)."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8 import chunk_length
    from fqtorch.quantizers.base import QuantizedTensor

    side = 363
    assert (side + 2) ** 2 > chunk_length(8, 8)
    monkeypatch.setattr(int8_qconv, "mask_columns", lambda *shape: mask_columns)
    ops = ConvOps((1, 1), (1, 1), (1, 1), 1)
    x_codes = torch.full((1, 1, side, side), -128, dtype=torch.int8)
    h_codes = torch.full((side * side, 1), -128, dtype=torch.int8)
    unit = torch.ones(1, 1)
    h = QuantizedTensor(h_codes, unit, unit, 8, h_codes.shape, torch.float32)
    grad_weight, h_cols = int8_qconv._grad_weight_taps(
        h, x_codes, torch.ones(()), torch.ones(()), 8, (1, 1, 3, 3), ops
    )
    # Tap (i, j) of a 3 × 3 kernel with padding 1 sees (side − |i − 1|)(side − |j − 1|) inputs.
    reach = torch.tensor([side - 1, side, side - 1], dtype=torch.float64)
    expected = 127 * 127 * torch.outer(reach, reach)
    assert torch.equal(grad_weight.reshape(3, 3), expected)
    assert int(h_cols) == -128 * side * side  # from the mask's columns or from its factors


@pytest.mark.parametrize("mask_columns", [False, True])
def test_strided_weight_gradient_over_chunks_of_positions(mask_columns, monkeypatch):
    """A strided layer's weight gradient by phase, 8 samples of a 363 × 363 plane at stride 2
    (8 phase planes of 183² = 267,912 positions, three int32 chunks at 8 × 8 bits): extreme
    codes sum past int32 in every tap and must not wrap across the chunks; zero points of 1, as
    above, bring in every term."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8 import chunk_length
    from fqtorch.quantizers.base import QuantizedTensor

    n, side, out = 8, 363, 182  # padded 365: (365 − 3) // 2 + 1 outputs along each axis
    assert n * 183 * 183 > 2 * chunk_length(8, 8)
    monkeypatch.setattr(int8_qconv, "mask_columns", lambda *shape: mask_columns)
    ops = ConvOps((2, 2), (1, 1), (1, 1), 1)
    x_codes = torch.full((n, 1, side, side), -128, dtype=torch.int8)
    h_codes = torch.full((n * out * out, 1), -128, dtype=torch.int8)
    unit = torch.ones(1, 1)
    h = QuantizedTensor(h_codes, unit, unit, 8, h_codes.shape, torch.float32)
    grad_weight, h_cols = int8_qconv._grad_weight_taps(
        h, x_codes, torch.ones(()), torch.ones(()), 8, (1, 1, 3, 3), ops
    )
    # Tap i reads input row 2y + i − 1 of outputs y < 182: 181, 182 and 181 of them are real.
    reach = torch.tensor([out - 1, out, out - 1], dtype=torch.float64)
    assert torch.equal(grad_weight.reshape(3, 3), n * 127 * 127 * torch.outer(reach, reach))
    assert int(h_cols) == -128 * n * out * out


# (input (N, C, H, W), kernel, stride, padding, dilation, extra pad (left, right, top, bottom))
STRIDED_WEIGHT_GRADIENTS = {
    "3x3-stride2-pad1": ((3, 5, 9, 8), (3, 3), (2, 2), (1, 1), (1, 1), None),
    "1x1-stride2": ((3, 5, 7, 6), (1, 1), (2, 2), (0, 0), (1, 1), None),
    "2x2-stride3": ((2, 3, 10, 11), (2, 2), (3, 3), (0, 0), (1, 1), None),
    "3x3-stride3-dilated2": ((2, 3, 11, 10), (3, 3), (3, 3), (2, 2), (2, 2), None),
    "4x4-stride2-dilated2": ((2, 3, 13, 12), (4, 4), (2, 2), (1, 1), (2, 2), None),
    "3x4-stride2x3": ((2, 4, 9, 11), (3, 4), (2, 3), (1, 2), (1, 1), None),
    "5x5-stride2-pad2": ((2, 3, 9, 8), (5, 5), (2, 2), (2, 2), (1, 1), None),
    "4x4-stride2-asymmetric-pad": ((2, 3, 9, 8), (4, 4), (2, 2), (1, 1), (1, 1), (0, 1, 1, 0)),
    "3x3-stride2-input-smaller-than-window": ((2, 3, 2, 3), (3, 3), (2, 2), (1, 1), (1, 1), None),
}


# the same at stride 1 (one phase)
STRIDE1_WEIGHT_GRADIENTS = {
    "3x3-pad1": ((3, 5, 9, 8), (3, 3), (1, 1), (1, 1), (1, 1), None),
    "3x3-dilated2-pad2": ((2, 3, 11, 10), (3, 3), (1, 1), (2, 2), (2, 2), None),
    "2x3-dilated1x3": ((2, 4, 9, 11), (2, 3), (1, 1), (0, 1), (1, 3), None),
    "4x4-asymmetric-pad": ((2, 3, 9, 8), (4, 4), (1, 1), (1, 1), (1, 1), (0, 1, 1, 0)),
    "3x3-extra-pad-only": ((2, 3, 7, 6), (3, 3), (1, 1), (0, 0), (1, 1), (1, 1, 1, 1)),
    "1x1": ((3, 5, 7, 6), (1, 1), (1, 1), (0, 0), (1, 1), None),
    "3x3-input-smaller-than-window": ((2, 3, 2, 3), (3, 3), (1, 1), (1, 1), (1, 1), None),
}
TAPS_WEIGHT_GRADIENTS = {**STRIDED_WEIGHT_GRADIENTS, **STRIDE1_WEIGHT_GRADIENTS}


@pytest.mark.parametrize("case", sorted(TAPS_WEIGHT_GRADIENTS))
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("mask_columns", [False, True])
@pytest.mark.parametrize("chunk", [None, 40])
def test_weight_gradient_by_taps_is_exact(
    case, compiled, channels_last, mask_columns, chunk, monkeypatch
):
    """The weight gradient per tap (strided layers by phase) against float64's
    ``conv2d_weight`` on the same values, with integer scales and zero points, so both are exact
    and must be equal: one ``_int_mm`` per tap (no unfold) and every zero-point term, from the
    mask's columns or from its factors; the column sums of ``h`` where the products give them;
    from NCHW and channels-last codes (channel- and position-major grids); in one product per
    tap, or over chunks of 40 positions (int64 sums, and the compiled epilogue on them)."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.quantizers.base import QuantizedTensor

    shape, kernel, stride, padding, dilation, pad = TAPS_WEIGHT_GRADIENTS[case]
    (n, c, *_), o, f64 = shape, 4, torch.float64
    ops = ConvOps(stride, padding, dilation, 1, pad)
    gen = torch.Generator().manual_seed(11)
    x_codes = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    x_values = 3 * x_codes.to(f64) - 5
    if channels_last:
        x_codes = x_codes.contiguous(memory_format=torch.channels_last)
    extra = pad or (0, 0, 0, 0)  # F.pad's (left, right, top, bottom), padding real zeros
    ph, pw = padding
    padded = F.pad(x_values, [pw + extra[0], pw + extra[1], ph + extra[2], ph + extra[3]])
    ho = (padded.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (padded.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    h_codes = torch.randint(-128, 128, (n * ho * wo, o), generator=gen, dtype=torch.int8)
    h_scale = torch.randint(1, 4, (1, o), generator=gen).float()
    h_bias = torch.randint(-3, 4, (1, o), generator=gen).float()
    h = QuantizedTensor(h_codes, h_scale, h_bias, 8, h_codes.shape, torch.float32)
    h_values = (h_codes.to(f64) * h_scale.to(f64) + h_bias.to(f64)).reshape(n, ho, wo, o)
    expected = torch.nn.grad.conv2d_weight(
        padded, (o, c, *kernel), h_values.permute(0, 3, 1, 2), stride, 0, dilation
    )
    monkeypatch.setattr(int8_qconv, "mask_columns", lambda *shape: mask_columns)
    if chunk:
        monkeypatch.setattr(int8_qconv, "chunk_length", lambda a_bits, b_bits: chunk)
    products = record_products(monkeypatch)
    grad_weight, h_cols = int8_qconv._grad_weight_taps(
        h, x_codes, torch.tensor(3.0), torch.tensor(-5.0), 8, (o, c, *kernel), ops, f64, compiled
    )
    assert torch.equal(grad_weight, expected)
    assert h_cols.tolist() == h_codes.long().sum(0).tolist()  # from the columns or the factors
    assert len(products) % (kernel[0] * kernel[1]) == 0 and max(products) <= (chunk or 10**9)
    if not chunk:
        assert len(products) == kernel[0] * kernel[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_output_and_grad_input_epilogues_compiled_and_eager(dtype):
    """The forward's and ``grad_input``'s epilogues against the terms written out in float64:
    eager and compiled each within a few float32 roundings of them (compiled may contract a
    multiply and add), on the kernel's channels-last accumulator (float32, or int32 from channel
    chunks), and the result stays channels-last (no copy for the next layer or the inverse)."""
    gen = torch.Generator().manual_seed(4)
    last = torch.channels_last
    acc = (torch.randn(4, 9, 6, 5, generator=gen) * 2**20).round().to(dtype)
    acc = acc.contiguous(memory_format=last)
    const = torch.randn(1, 8, 6, 5, generator=gen).contiguous(memory_format=last)
    a, b = torch.tensor(3e-6), torch.tensor(-5e-6)
    rows = [torch.rand(4, 1, 1, 1, generator=gen) + 0.1 for _ in range(3)]
    main, sums, f64 = acc[:, :8], acc[:, 8:], torch.float64
    output = const.to(f64) + a.to(f64) * main.to(f64) + b.to(f64) * sums.to(f64)
    r = [t.to(f64) for t in rows]
    grad_input = r[0] * main.to(f64) + r[1] * sums.to(f64) + r[2] * const.to(f64)
    # without a weight zero point (b = 0) the sums are not computed: None
    no_sums_output = const.to(f64) + a.to(f64) * main.to(f64)
    no_sums_grad_input = r[0] * main.to(f64) + r[2] * const.to(f64)
    for name, expected, args in (
        ("_output_terms", output, (main, sums, const, a, b)),
        ("_grad_input_terms", grad_input, (main, sums, const, *rows)),
        ("_output_terms", no_sums_output, (main, None, const, a, b)),
        ("_grad_input_terms", no_sums_grad_input, (main, None, const, *rows)),
    ):
        scale = float(expected.abs().max())
        for fn in (getattr(int8_qconv, name), getattr(int8_qconv, "_compiled" + name)):
            got = fn(*args)
            assert got.dtype == torch.float32 and got.is_contiguous(memory_format=last), fn
            assert float((got.to(f64) - expected).abs().max()) <= 4 * 2**-24 * scale, fn


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_weight_gradient_epilogue_compiled_and_eager(dtype):
    """The weight gradient's epilogue (:func:`int8_qconv.taps_terms`) against the four terms
    written out in float64 and rounded once to float32: eager bit for bit, compiled within one
    float32 rounding of it (Inductor may order the float64 sums otherwise). Products past 2^24
    (int32) and past 2^31 (int64, from chunks); the mask's sums past 2^24 too; scales that give
    the four terms comparable sizes, so that rounding any of them (or a scale product) to float32
    first changes the result."""
    gen = torch.Generator().manual_seed(3)
    taps, o, c = 9, 6, 5
    high = 2**30 if dtype == torch.int32 else 2**40
    prod = torch.randint(-high, high, (taps, o + 1, c), generator=gen, dtype=torch.int64)
    prod = prod.to(dtype)
    on_real = torch.randint(-high, high, (taps, o), generator=gen).double()
    real = torch.randint(1, 2**30, (taps,), generator=gen).double()
    s_h = torch.rand(o, 1, generator=gen) * 1e-3 + 1e-5
    b_h = s_h.squeeze(1) * (torch.rand(o, generator=gen) - 0.5)
    s_x, b_x = torch.tensor([[0.0213]]), torch.tensor([[-0.0171]])
    p = prod.double()
    sh, bh = s_h.double().reshape(o, 1, 1), b_h.double().reshape(o, 1, 1)
    sx, bx = float(s_x), float(b_x)  # float32 scales, exact in float64
    expected = torch.empty(o, c, taps, dtype=torch.float64)
    for t in range(taps):
        expected[:, :, t] = (
            sh[:, :, 0] * sx * p[t, :o]
            + sh[:, :, 0] * bx * on_real[t, :, None]
            + bh[:, :, 0] * sx * p[t, o : o + 1]
            + bh[:, :, 0] * bx * real[t]
        )
    args = (prod, on_real, real, s_h, b_h, s_x, b_x)
    eager = int8_qconv.taps_terms(*args, torch.float32, False)
    assert eager.dtype == torch.float32 and eager.is_contiguous() and eager.shape == (o, c, taps)
    assert torch.equal(eager, expected.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure falls back: not here
        compiled = int8_qconv.taps_terms(*args, torch.float32, True)
    assert not int8_qconv._compiled_taps_terms._broken  # nor an earlier fallback in this process
    assert compiled.is_contiguous() and compiled.shape == (o, c, taps)
    torch.testing.assert_close(compiled, eager, rtol=1.2e-7, atol=0)
    # float64 out: the terms, not rounded to float32
    wide = int8_qconv.taps_terms(*args, torch.float64, False)
    torch.testing.assert_close(wide, expected, rtol=1e-15, atol=0)


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


def test_saturating_kernels_refuse_the_int8_backend():
    """oneDNN's AVX2 int8 kernels (``ONEDNN_MAX_CPU_ISA=AVX2``, in a fresh process) sum u8 × s8
    pairs in int16, which saturates: the convolution probe refuses them on every machine. Whether
    ``torch._int_mm`` goes through them depends on the CPU (on one with AVX-512 VNNI, ATen routes it
    to oneDNN, which the cap then makes saturate; on an AVX2-only CPU it takes ATen's own exact
    kernel), so its probe may refuse or accept. Either way, Linear and Conv2d layers on inputs and
    weights whose codes sit at the ends of the 8-bit grid (±1: codes −128 and 127, the worst
    case) give simulate's values (exactly where ``_int_mm`` is refused and they run simulate;
    else up to float rounding, on im2col + ``torch._int_mm`` for the Conv2d and ``_int_mm`` for
    the Linear) and say what they run on: one warning for each layer that falls back, none
    for a Linear on ``_int_mm``."""
    script = textwrap.dedent(
        """
        import copy
        import warnings
        from collections import OrderedDict
        import torch
        from torch import nn
        from fqtorch import FQTConfig, quantize_model
        from fqtorch.backends import int8, int8_qconv
        assert int8_qconv.qconv_verdict() is not None
        int_mm_refused = int8.int_mm_verdict() is not None
        gen = torch.Generator().manual_seed(6)
        sign = lambda *shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
        # layers of distinct names: a warning is said once per process for each message
        cases = [
            (nn.Sequential(OrderedDict(fc=nn.Linear(256, 64))), sign(64, 256), "Linear"),
            (nn.Sequential(OrderedDict(conv=nn.Conv2d(64, 8, 3, padding=1))), sign(2, 64, 6, 5),
             "Conv2d"),
        ]
        for base, x, kind in cases:
            with torch.no_grad():
                base[0].weight.copy_(sign(*base[0].weight.shape))
            results = []
            for backend in ("simulate", "int8"):
                torch.manual_seed(0)
                cfg = FQTConfig.preset("ptq8", backend=backend, fused=False)
                layer = quantize_model(copy.deepcopy(base), cfg)
                xi = x.clone().requires_grad_(True)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = layer(xi)
                    g = torch.Generator().manual_seed(7)
                    out.backward(torch.randn(out.shape, generator=g))
                results.append((out, xi.grad, layer[0].weight.grad))
            for a, b in zip(*results):
                if int_mm_refused:  # the fallback is simulate itself
                    assert torch.equal(a, b), (kind, (a - b).abs().max())
                else:  # integer products, scaled after: float rounding apart (a saturated
                    # sum is off by hundreds of codes)
                    tol = 1e-5 * float(a.detach().abs().max())
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=tol)
            said = [str(w.message) for w in caught if "FQT layer" in str(w.message)]
            if int_mm_refused:
                expected = ["torch._int_mm does not sum exactly", "simulate"]
            elif kind == "Conv2d":
                expected = ["does not sum exactly on this CPU", "im2col + torch._int_mm"]
            else:
                expected = None
            if expected is None:
                assert not said, said
            else:
                assert len(said) == 1 and all(e in said[0] for e in expected), said
        print("refused", "both" if int_mm_refused else "convolutions")
        """
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "refused" in done.stdout, done.stderr[-2000:]


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` as oneDNN's kernels below AVX-512 VNNI compute it: ``a`` shifted to
    u8 (+128), adjacent u8 × s8 products summed in pairs in saturating int16, the pairs summed
    in int32, the shift taken off again with ``b``'s column sums."""
    ua, sb = a.to(torch.int32) + 128, b.to(torch.int32)
    if ua.shape[1] % 2:
        ua, sb = F.pad(ua, (0, 1)), F.pad(sb, (0, 0, 0, 1))  # a zero pair partner
    pairs = ua[:, 0::2, None] * sb[None, 0::2, :] + ua[:, 1::2, None] * sb[None, 1::2, :]
    return pairs.clamp(-(2**15), 2**15 - 1).sum(1) - 128 * sb.sum(0, keepdim=True)


def test_int_mm_probe_is_one_memo_for_the_default_and_named_cpu(monkeypatch):
    """``int_mm_verdict()`` and ``int_mm_verdict("cpu")`` share one memo: the probe's product
    runs once, so a count of ``_int_mm`` calls made after either is never the probe's (they
    were two ``functools.cache`` keys, and a test that counted after the other one miscounted)."""
    calls, int_mm = [], torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or int_mm(a, b))
    int8._int_mm_probe.cache_clear()
    try:
        assert int8.int_mm_verdict() == int8.int_mm_verdict("cpu")
        assert len(calls) == 1
    finally:
        int8._int_mm_probe.cache_clear()  # the next test probes the real kernel afresh


def test_a_saturating_int_mm_sends_every_layer_to_simulate(monkeypatch):
    """With a saturating ``torch._int_mm`` (faked in process, so on every machine) its probe
    refuses it, and Linear and Conv2d layers on worst-case codes (inputs and weights of ±1: codes
    −128 and 127) each warn that they run simulate, and give exactly simulate's values."""
    gen = torch.Generator().manual_seed(6)
    small = torch.randint(-8, 8, (24, 33), generator=gen, dtype=torch.int8)
    wide = torch.full((24, 33), 127, dtype=torch.int8)
    exact = small.long() @ small.T.long()
    assert torch.equal(_saturating_int_mm(small, small.T).long(), exact)  # faithful below
    assert not torch.equal(_saturating_int_mm(wide, wide.T).long(), wide.long() @ wide.T.long())
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    int8._int_mm_probe.cache_clear()
    try:
        assert "does not sum exactly" in (int8.int_mm_verdict("cpu") or "")
        sign = lambda *shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1  # noqa: E731
        cases = [
            (nn.Sequential(nn.Linear(64, 16)), sign(24, 64)),
            (nn.Sequential(nn.Conv2d(16, 8, 3, padding=1)), sign(2, 16, 6, 5)),
        ]
        for base, x in cases:
            with torch.no_grad():
                base[0].weight.copy_(sign(*base[0].weight.shape))
            results = []
            warn_once.cache_clear()  # each case's model has its own layer '0' to warn about
            for backend in ("simulate", "int8"):
                torch.manual_seed(0)
                cfg = FQTConfig.preset("ptq8", backend=backend, fused=False)
                layer = quantize_model(copy.deepcopy(base), cfg)
                xi = x.clone().requires_grad_(True)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = layer(xi)
                    out.backward(torch.ones_like(out))
                results.append((out, xi.grad, layer[0].weight.grad))
            for a, b in zip(*results, strict=True):
                assert torch.equal(a, b), (type(base[0]).__name__, (a - b).abs().max())
            said = [str(w.message) for w in caught if "FQT layer" in str(w.message)]
            assert len(said) == 1 and "torch._int_mm does not sum exactly" in said[0], said
            assert "simulate" in said[0]
    finally:
        int8._int_mm_probe.cache_clear()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((2, 5, 11, 9), (3, 3), (2, 2), (1, 1), (1, 1)),
        ((2, 5, 11, 9), (1, 1), (2, 2), (0, 0), (1, 1)),
        ((2, 5, 11, 9), (1, 1), (1, 1), (0, 0), (1, 1)),  # channels-last: a view, no copy
        ((1, 5, 11, 9), (1, 1), (1, 1), (0, 0), (1, 1)),  # a column-major view of the codes
        ((1, 3, 17, 16), (7, 7), (2, 2), (3, 3), (1, 1)),
        ((3, 4, 12, 13), (3, 2), (2, 3), (2, 1), (2, 1)),
    ],
)
def test_int8_im2col_is_the_unfold_of_the_codes(shape, kernel, stride, padding, dilation,
                                                channels_last):  # fmt: skip
    """The int8 im2col (a strided view copied once) is ``F.unfold`` of the codes (row-major
    where it copies), for strides, paddings, dilations, rectangular kernels and channels-last
    codes, with the codes' extremes."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8_conv import _cols, _cols_taps_first, _pads

    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    codes.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)
    if channels_last:
        codes = codes.contiguous(memory_format=torch.channels_last)
    ops = ConvOps(stride, padding, dilation, 1)
    pads = _pads(ops)
    reference = F.unfold(F.pad(codes.double(), pads), kernel, dilation=dilation, stride=stride)
    expect = reference.transpose(1, 2).reshape(-1, reference.shape[1]).to(torch.int8)
    got = _cols(codes, pads, kernel, ops)
    assert got.dtype == torch.int8 and torch.equal(got, expect)
    if kernel != (1, 1) or stride != (1, 1):  # a copy, in the GEMM's row-major layout
        assert got.stride() == (got.shape[1], 1)
    # taps first: the same columns in (kh, kw, C) order, always a row-major copy
    taps_first = _cols_taps_first(codes, pads, kernel, ops)
    columns = expect.view(-1, shape[1], *kernel).permute(0, 2, 3, 1).reshape(expect.shape)
    assert torch.equal(taps_first, columns)
    assert taps_first.stride() == (taps_first.shape[1], 1)


MASKED_SUMS = [
    ((11, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((11, 9), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1)),
    ((12, 13), (3, 2), (2, 3), (1, 1, 2, 2), (2, 1)),
    ((8, 8), (4, 4), (1, 1), (1, 2, 1, 2), (1, 1)),  # "same" for an even kernel: unequal sides
    ((9, 7), (5, 5), (1, 1), (0, 0, 2, 2), (1, 1)),  # padded along the height only
    ((9, 7), (5, 5), (1, 1), (2, 2, 0, 0), (1, 1)),  # along the width only
    ((3, 2), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1)),  # every row by the padding
    ((1, 4), (4, 2), (1, 1), (1, 1, 3, 3), (2, 1)),  # windows wholly in the padding
    ((10, 9), (3, 3), (4, 1), (1, 1, 1, 0), (1, 1)),  # a stride past the kernel
    ((11, 6), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),  # trailing input rows no window reaches
    ((40, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # N·Ho ≥ 64: column sums as a product
]


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("size, kernel, stride, pad, dilation", MASKED_SUMS)
def test_masked_code_sums_are_the_full_masks(size, kernel, stride, pad, dilation, column_major):
    """The weight gradient's zero-point sums ``S_hᵀ M`` and ``colsum(M)`` from the mask's two
    factors and the border rows (:func:`~fqtorch.backends.int8_conv._sums_on_real_taps`) equal
    the products with the full mask of real taps (``F.unfold`` of an image of ones), exactly, on
    codes at both ends of the 8-bit grid and in both layouts of the gradient's codes; the border
    rows, found from the geometry, are the rows where the mask has a padded tap."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8_conv import (
        _axis_masks,
        _border_rows,
        _out_size,
        _pads,
        _sums_on_real_taps,
        _tap_mask,
    )

    ops = ConvOps(stride, (0, 0), dilation, 1, pad=pad)
    pads = _pads(ops)
    ho, wo = _out_size(size, pads, kernel, ops)
    full = F.unfold(F.pad(torch.ones(1, 1, *size, dtype=torch.float64), pads), kernel,
                    dilation=dilation, stride=stride)[0].T  # (L, kh·kw)  # fmt: skip
    cpu = torch.device("cpu")
    assert torch.equal(_tap_mask(size, pads, kernel, ops, cpu).double(), full)
    height = _axis_masks(size, pads, kernel, ops, cpu)[0]
    top, start = _border_rows(size[0], pads[2], kernel[0], stride[0], dilation[0], ho)
    border = [y for y in range(ho) if bool((height[y] == 0).any())]
    assert [*range(top), *range(start, ho)] == border
    g = torch.Generator().manual_seed(2)
    batch, channels = 3, 5
    codes = torch.randint(-128, 128, (batch * ho * wo, channels), generator=g, dtype=torch.int8)
    codes[:, 0], codes[::2, 1] = 127, -128
    if column_major:
        codes = codes.T.contiguous().T
    sums, real_taps, totals = _sums_on_real_taps(codes, 8, size, pads, kernel, ops)
    per_position = codes.double().reshape(batch, ho * wo, channels).sum(0)  # (L, O)
    assert torch.equal(sums, per_position.T @ full)
    assert torch.equal(real_taps, full.sum(0))
    assert totals.dtype == torch.int64 and torch.equal(totals, codes.long().sum(0))


@pytest.mark.slow
def test_masked_code_sums_past_int32():
    """Over more than 2^24 rows of 8-bit codes (N·Ho = 4130 · 4096), the column sums leave int32
    (:func:`~fqtorch.backends.int8._code_sum` sums in int64): codes at both ends of the grid, so
    each tap's exact sum is the code times its count of real positions."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8_conv import _sums_on_real_taps

    ops = ConvOps((1, 1), (1, 0), (1, 1), 1)  # 3 × 1 kernel, one row of padding each side
    batch, height = 4130, 4096
    codes = torch.empty(batch * height, 2, dtype=torch.int8)
    codes[:, 0], codes[:, 1] = 127, -128
    sums, real_taps, totals = _sums_on_real_taps(codes, 8, (height, 1), [0, 0, 1, 1], (3, 1), ops)
    counts = torch.tensor([height - 1, height, height - 1], dtype=torch.float64)  # per tap
    assert torch.equal(real_taps, counts)
    assert torch.equal(sums, torch.stack([127 * batch * counts, -128 * batch * counts]))
    assert totals.tolist() == [127 * batch * height, -128 * batch * height]  # past int32
    assert 127 * batch * height > 2**31 - 1 and batch * height > int8.chunk_length(8, 1)


@pytest.mark.usefixtures("exact_here")
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, size",
    [
        ((3, 3), (2, 2), (1, 1), (1, 1), (9, 8)),
        ((3, 3), (2, 2), (0, 0), (1, 1), (10, 9)),  # trailing rows no output reaches
        ((1, 1), (2, 2), (0, 0), (1, 1), (7, 6)),  # 3 of 4 phases without taps: zeros
        ((2, 2), (3, 3), (0, 0), (1, 1), (10, 9)),  # a stride past the kernel
        ((5, 5), (2, 2), (2, 2), (1, 1), (9, 12)),
        ((3, 3), (3, 3), (2, 2), (2, 2), (11, 10)),  # gcd(d, s) = 1: three phases of one tap
        ((3, 2), (2, 2), (1, 0), (2, 1), (9, 8)),  # gcd(d, s) = 2: one phase of three taps
        ((4, 3), (3, 2), (2, 1), (1, 1), (13, 7)),
        ((7, 7), (2, 2), (3, 3), (1, 1), (17, 16)),
        ((4, 5), (3, 2), (1, 2), (2, 3), (14, 13)),  # phases of several taps at dilation 2, 3
    ],
)
@pytest.mark.parametrize("chunks", [False, True])
@pytest.mark.parametrize("zero_point", [True, False])
def test_strided_grad_input_by_phase_is_the_transposed_convolution(
    kernel, stride, padding, dilation, size, chunks, zero_point, monkeypatch
):
    """A strided layer's grad_input code convolution, one integer convolution per phase of the
    input positions, laid on its positions, is the transposed convolution of the codes exactly
    (float64 reference), its extra channel (with ``zero_point``; 5 channels: never without) the
    sum of the codes each input position receives, with the codes' extremes; each position is
    laid once, and those left out are those no tap reaches. ``chunks`` makes the phases of more
    than two taps sum over channel chunks (int32) and the others not (float32)."""
    from fqtorch.backends.base import ConvOps
    from fqtorch.backends.int8_conv import _out_size, _pads

    if chunks:
        monkeypatch.setattr(int8_qconv, "fits_float32", lambda w, a_bits: False)
        monkeypatch.setattr(int8_qconv, "channel_chunk", lambda taps, a, b: 2 if taps > 2 else 1000)
    gen = torch.Generator().manual_seed(5)
    ops = ConvOps(stride, padding, dilation, 1)
    pads = _pads(ops)
    o, c = 6, 5
    ho, wo = _out_size(size, pads, kernel, ops)
    codes = torch.randint(-128, 128, (3, o, ho, wo), generator=gen, dtype=torch.int8)
    codes.view(-1)[:4] = torch.tensor([-128, 127, -128, 127], dtype=torch.int8)
    w = torch.randint(-128, 128, (o, c, *kernel), generator=gen, dtype=torch.int8)
    w[0] = 127
    u8 = int8_qconv._to_u8(codes.contiguous(memory_format=torch.channels_last))
    parts, covered = int8_qconv.strided_phases(u8, w, (8, 8), ops, pads, size, zero_point)
    fields = c + int(zero_point)  # with the receptive-field sums or without
    got = torch.full((3, fields, *size), 0.5, dtype=torch.float64)  # 0.5: a position left out
    dtypes = set()
    for part, y0, x0 in parts:  # each phase convolved as it is asked for
        dtypes.add(part.dtype)
        assert part.stride(1) == 1  # channels-last, as the kernel returns it
        view = got[:, :, y0 :: stride[0], x0 :: stride[1]]
        assert view[:, :, : part.shape[2], : part.shape[3]].eq(0.5).all()  # laid once
        view[:, :, : part.shape[2], : part.shape[3]] = part.double()
    assert covered == (not got.eq(0.5).any())
    got[got == 0.5] = 0  # positions no tap reaches
    with_sums = torch.cat([w, torch.ones_like(w[:, :1])], 1).double()  # (O, C + 1, kh, kw)
    expect = torch.nn.grad.conv2d_input(
        (3, fields, *size), with_sums[:, :fields], codes.double(), stride, padding, dilation
    )
    assert torch.equal(got, expect)
    # the most taps of a phase: every (s / gcd(d, s))-th tap along each axis
    most = math.prod(
        -(-k // (s // math.gcd(d, s))) for k, s, d in zip(kernel, stride, dilation, strict=True)
    )
    assert max(dtypes, key=str) == (torch.int32 if chunks and most > 2 else torch.float32)


@pytest.mark.usefixtures("exact_here")
def test_strided_grad_input_holds_one_phase_at_a_time(monkeypatch):
    """Each phase's product is freed (its epilogue done) before the next phase's convolution
    runs: at most one phase's product, not all of them (together the size of grad_input), is
    alive at a time."""
    import weakref

    alive, qconv = [], int8_qconv._qconv

    def tracking(*args):
        assert all(ref() is None for ref in alive), "an earlier phase's product is still held"
        out = qconv(*args)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(int8_qconv, "_qconv", tracking)
    make, shape = CONVS["3x3-pad1-stride2-8ch"]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(14)) + 0.3
    layer = quantize_model(make(), FQTConfig.preset("psq5", fused=False, backend="int8"))
    layer(x.requires_grad_()).sum().backward()
    assert len(alive) == 1 + GRAD_INPUT_PHASES["3x3-pad1-stride2-8ch"]  # forward, then phases


@pytest.mark.usefixtures("exact_here")
def test_windows_in_the_padding_are_exact():
    """Outputs whose every tap along an axis lies in the padding (padding past the kernel's
    reach, a dilation straddling a narrow input) are the exact code convolution: oneDNN's kernel
    returned garbage for some of them (along the width), so :func:`int8_qconv._qconv` pads such
    inputs itself. Every configuration of a small grid, against the float64 convolution."""
    gen = torch.Generator().manual_seed(8)
    flagged = 0
    for h, w, kh, kw, ph, pw, dh, dw in itertools.product(
        [1, 5], [1, 3], [1, 4], [2, 3], [0, 4], [1, 3], [1, 2], [2]
    ):
        if h + 2 * ph <= (kh - 1) * dh or w + 2 * pw <= (kw - 1) * dw:
            continue  # a kernel longer than the padded input: no output
        u8 = torch.randint(0, 256, (2, 8, h, w), generator=gen, dtype=torch.uint8)
        wt = torch.randint(-128, 128, (5, 8, kh, kw), generator=gen, dtype=torch.int8)
        reference = F.conv2d(u8.double() - 128, wt.double(), None, 1, (ph, pw), (dh, dw))
        got = int8_qconv._qconv(u8, wt, (8, 8), [1, 1], [ph, pw], [dh, dw])
        assert torch.equal(got.double(), reference), (h, w, kh, kw, ph, pw, dh, dw)
        flagged += int8_qconv.window_in_padding(w, kw, 1, dw, pw)
    assert flagged > 10  # the grid does hold such windows


def test_window_in_padding_rule():
    """:func:`int8_qconv.window_in_padding` against the cases worked by hand."""
    rule = int8_qconv.window_in_padding
    assert not rule(56, 3, 1, 1, 1)  # 3×3 padding 1: every window holds a real position
    assert rule(1, 2, 1, 2, 1)  # taps at −1 and +1 around the one real column
    assert not rule(3, 2, 1, 2, 1)  # taps 0 and 2 of a padded 5: output 0 reaches column 0
    assert rule(6, 2, 1, 1, 2)  # padding 2 past a reach of 1: the first output sees padding
    assert not rule(9, 3, 2, 1, 1)  # strided, padding 1
    assert rule(9, 1, 2, 1, 1)  # 1×1 stride 2 over padding 1: output 0 is the padding


@pytest.mark.usefixtures("exact_here")
def test_a_strided_layer_s_grad_input_is_float32_whatever_the_default_dtype():
    """A float32 layer's grad_input stays float32 with ``torch.set_default_dtype(float64)`` (the
    phases' result buffer once followed the default; BHQ's inverse transform then refused the
    float64 rows), and equals simulate's."""
    base = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    x = torch.randn(3, 4, 9, 8, generator=torch.Generator().manual_seed(2))
    g = torch.randn(3, 4, 5, 4, generator=torch.Generator().manual_seed(3))
    results = {}
    for backend in ("simulate", "int8"):
        torch.manual_seed(0)
        cfg = FQTConfig.preset("bhq4", fused=False, backend=backend)
        layer, xi = quantize_model(copy.deepcopy(base), cfg), x.clone().requires_grad_(True)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            layer(xi).backward(g)
        finally:
            torch.set_default_dtype(default)
        results[backend] = (xi.grad, layer.weight.grad)
    assert results["int8"][0].dtype == torch.float32
    assert_same(results)


def test_a_channels_last_input_is_encoded_in_its_own_layout():
    """A channels-last input's codes are those of the same input in NCHW order, element for
    element, and come back channels-last (no copy to NCHW); NCHW inputs are unchanged; a whole
    layer gives bit-identical outputs and gradients either way."""
    from fqtorch.backends.int8_conv import _encode_input

    config = FQTConfig.preset("psq5", backend="int8", seed=1, fused=False)  # eager: fast
    quantizer = config.build_quantizers()["input"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 6, generator=g) * torch.logspace(-3, 3, 5).reshape(1, 5, 1, 1)
    last = x.contiguous(memory_format=torch.channels_last)
    a, b = _encode_input(quantizer, x), _encode_input(quantizer, last)
    assert torch.equal(a.codes.reshape(x.shape), b.codes.reshape(x.shape))
    assert torch.equal(a.scale, b.scale) and torch.equal(a.bias, b.bias)
    assert b.codes.is_contiguous(memory_format=torch.channels_last) and b.shape == x.shape
    assert a.codes.dim() == 2  # NCHW: the quantizer's own rows
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
    results = []
    for inp in (x, last):
        model = quantize_model(copy.deepcopy(layer), config)
        out = model(inp.clone().requires_grad_())
        out.square().sum().backward()
        results.append([out.detach().contiguous(), *(p.grad for p in model.parameters())])
    assert all(torch.equal(u, v) for u, v in zip(*results, strict=True))


def test_a_refused_layer_is_warned_once_however_often_it_runs(monkeypatch):
    """The fallback's warning is said once per layer and reason, also through the compiled
    quantizers and across steps (Python's per-location filter alone warned on every pass)."""
    monkeypatch.setattr(int8_qconv, "qconv_verdict", lambda: "the probe failed (test)")
    layer = quantize_model(
        nn.Sequential(nn.Conv2d(3, 4, 3)), FQTConfig.preset("psq5", backend="int8")
    )
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer(x).sum().backward()
    said = [w for w in caught if "im2col" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in said]
