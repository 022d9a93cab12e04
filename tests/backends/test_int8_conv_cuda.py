"""The int8 Conv2d on CUDA: im2col + ``torch._int_mm`` (no integer convolution kernels there),
for the shapes CUDA's ``_int_mm`` runs; other shapes fall back to simulate with the reason. The
shape rule is checked here on any machine; the CUDA runs (int8 == simulate from the same codes)
need a GPU (``-m cuda``, ``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends.base import ConvOps
from fqtorch.backends.int8_conv import _cuda_shapes


def ops(stride=(1, 1), padding=(0, 0), dilation=(1, 1), pad=None) -> ConvOps:
    return ConvOps(stride, padding, dilation, 1, pad)


@pytest.mark.parametrize(
    "input_shape, weight_shape, conv_ops, reason",
    [
        ((8, 64, 56, 56), (64, 64, 3, 3), ops(padding=(1, 1)), None),  # ResNet's 3x3 blocks
        ((2, 16, 9, 8), (32, 16, 1, 1), ops(stride=(2, 2)), None),  # N·L = 2·5·4 = 40
        ((8, 3, 224, 224), (64, 3, 7, 7), ops((2, 2), (3, 3)), "C·kh·kw = 147"),  # the stem
        ((2, 16, 9, 8), (20, 16, 3, 3), ops(padding=(1, 1)), "O = 20"),
        ((2, 16, 9, 8), (16, 16, 3, 3), ops(padding=(1, 1)), None),  # grad_weight's m: O + 1
        ((2, 16, 9, 8), (8, 16, 3, 3), ops(padding=(1, 1)), "O = 8"),
        ((1, 16, 4, 4), (32, 16, 3, 3), ops(), "N·L = 4"),  # 2×2 output positions
        ((1, 16, 4, 4), (32, 16, 3, 3), ops(pad=(1, 1, 1, 1)), "N·L = 16"),  # "same" padding
        ((1, 16, 5, 5), (32, 16, 3, 3), ops(dilation=(2, 2)), "N·L = 1"),
    ],
)
def test_cuda_shape_rule(input_shape, weight_shape, conv_ops, reason):
    """O and C·kh·kw multiples of 8, N·L and O above 16, with the output size from stride,
    padding (integer and the extra ``"same"`` pad) and dilation."""
    got = _cuda_shapes(torch.empty(input_shape, device="meta"),
                       torch.empty(weight_shape, device="meta"), conv_ops)  # fmt: skip
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got and "multiples of 8" in got


# Shapes CUDA's _int_mm runs: channels multiples of 8, O above 16; every padding mode, strides
# and dilation of the CPU tests.
CUDA_CONVS = {
    "3x3-pad1": (lambda: nn.Conv2d(16, 24, 3, padding=1), (16, 9, 8)),
    "3x3-pad1-stride2": (lambda: nn.Conv2d(8, 24, 3, stride=2, padding=1), (8, 9, 8)),
    "3x3-dilated2-pad2": (lambda: nn.Conv2d(8, 32, 3, padding=2, dilation=2), (8, 8, 9)),
    "4x4-same-nobias": (lambda: nn.Conv2d(8, 24, 4, padding="same", bias=False), (8, 9, 8)),
    "1x1-stride2": (lambda: nn.Conv2d(16, 32, 1, stride=2), (16, 9, 7)),
}


def _in_float64(gemm, calls):
    """A :class:`ConvOps` product run in float64 and rounded once to the operands' dtype (each
    call appended to ``calls``): on simulate's dequantized operands, exact in float32, it is their
    exact product, rounded once."""

    def run(self, *tensors, **options):
        calls.append(gemm.__name__)
        wide = [t if t is None else t.double() for t in tensors]
        result = gemm(self, *wide, **options)
        if isinstance(result, tuple):
            return tuple(r.to(tensors[0].dtype) for r in result)
        return result.to(tensors[0].dtype)

    return run


FLOAT64_GEMMS = ("output", "grad_input", "grad_weight", "grad_bias", "grad_weight_and_bias")


def _results(make, x, cfg, exact_simulate=False):
    """Each backend's output and gradients from the same layer, input and codes. With
    ``exact_simulate`` simulate's products run in float64: the reference for long reductions,
    where its float32 sums drift further from the exact product than int8's one rounding."""
    torch.manual_seed(0)
    base = make().to(x.device)
    with torch.no_grad():  # off-centre weights: a zero point on the weight's grid
        base.weight.add_(0.5 * base.weight.abs().max())
    out = {}
    for backend in ("simulate", "int8"):
        torch.manual_seed(0)
        layer = quantize_model(copy.deepcopy(base), cfg.replace(backend=backend))
        xi = x.clone().requires_grad_(True)
        calls = []
        with pytest.MonkeyPatch.context() as patch:
            if exact_simulate and backend == "simulate":
                for gemm in FLOAT64_GEMMS:
                    patch.setattr(ConvOps, gemm, _in_float64(getattr(ConvOps, gemm), calls))
            y = layer(xi)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(x.device)
            y.backward(g)
        if exact_simulate and backend == "simulate":  # every product, none left in float32
            assert sorted(calls) == ["grad_bias", "grad_input", "grad_weight", "output"], calls
        out[backend] = (y.detach(), xi.grad, *[p.grad for p in layer.parameters()])
    return out


@pytest.fixture
def no_tf32(monkeypatch):
    """simulate's float convolutions and products in full float32 (cuDNN and cuBLAS default to
    TF32, 10-bit mantissas), so they reproduce the exact integer products."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.cuda
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("preset", ["psq5", "bhq4", "ptq8"])
@pytest.mark.parametrize("name", list(CUDA_CONVS))
def test_cuda_int8_conv_matches_simulate(name, preset):
    make, chw = CUDA_CONVS[name]
    x = torch.randn(4, *chw, generator=torch.Generator().manual_seed(3)).cuda() + 0.3
    # fused stated: left unset, each backend resolves its own default (int8 compiles, with hash
    # noise; simulate draws torch.rand), and the two would round to different codes
    cfg = FQTConfig.preset(preset, weight_quantizer="ptq", fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _results(make, x, cfg)
    assert not [w for w in caught if "using the simulate backend" in str(w.message)]
    for a, b in zip(results["simulate"], results["int8"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.cuda
def test_cuda_stem_falls_back_to_simulate_with_the_reason():
    x = torch.randn(2, 3, 32, 32).cuda()
    cfg = FQTConfig.preset("psq5", fused=False)
    with pytest.warns(RuntimeWarning, match=r"C·kh·kw = 147.*using the simulate backend"):
        _results(lambda: nn.Conv2d(3, 64, 7, stride=2, padding=3), x, cfg)


def test_auto_keeps_cuda_convolutions_on_simulate(caplog):
    """``backend="auto"`` picks int8 for CUDA GEMMs but keeps convolutions on simulate there
    (the int8 path took 1.5–1.75× its step time on an H200), saying so once; the CPU keeps
    its choice."""
    from fqtorch.backends import auto
    from fqtorch.backends.notes import say_once

    say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="fqtorch.backends"):
        assert auto.conv_backend("int8", "cuda") == "simulate"
        assert auto.conv_backend("int8", "cuda") == "simulate"
    said = [
        r.getMessage() for r in caplog.records if "Conv2d layers stay on simulate" in r.getMessage()
    ]
    assert len(said) == 1
    assert auto.conv_backend("int8", "cpu") == "int8"
    assert auto.conv_backend("simulate", "cuda") == "simulate"


@pytest.mark.parametrize(
    "path", ["cpu-qconv", "cpu-im2col", pytest.param("cuda", marks=pytest.mark.cuda)]
)
def test_int8_conv_at_resnet_width(path, monkeypatch):
    """A 64-channel 3×3 layer over 37,632 positions: its ``grad_input`` multiplies that many rows
    of k = 64 by the bordered weight, a shape cuBLASLt refused with a width of 8 mod 16 (576 + 8;
    NVIDIA H200, ``benchmarks/gpu_probe.py``). The border now makes it 592. The reference is
    simulate with float64 products: its float32 weight gradient, summed over the 37,632
    positions, was off int8's by up to 2.3e-5 of its largest entry (H200, 2026-12-04; 6-9e-6 on
    a Zen 4 CPU, by thread count). The CPU runs it on oneDNN's integer convolutions and, with
    those refused, on CUDA's im2col + ``_int_mm`` path (its border 8 wide: 584)."""
    from fqtorch.backends import int8_qconv

    device, ran, offer = path.split("-")[0], [], int8_qconv.conv
    if path == "cpu-qconv" and int8_qconv.qconv_verdict() is not None:
        pytest.skip(f"integer convolutions refused here: {int8_qconv.qconv_verdict()}")

    def offered(*args):  # the CPU offers each layer to oneDNN first: record whether it took it
        out = None if path == "cpu-im2col" else offer(*args)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(int8_qconv, "conv", offered)
    x = torch.randn(12, 64, 56, 56, generator=torch.Generator().manual_seed(4)).to(device) + 0.3
    cfg = FQTConfig.preset("psq5", weight_quantizer="ptq", fused=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _results(lambda: nn.Conv2d(64, 64, 3, padding=1), x, cfg, exact_simulate=True)
    assert not [w for w in caught if "using the simulate backend" in str(w.message)]
    assert ran == {"cpu-qconv": [True], "cpu-im2col": [False], "cuda": []}[path]
    for a, b in zip(results["simulate"], results["int8"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))


def test_cuda_border_makes_the_width_a_multiple_of_16():
    """On CUDA the columns of ones take any width that is a multiple of 8 to a multiple of 16
    (8 or 16 of them); the CPU keeps 8. Read from the shape and device alone, so checked here
    without a GPU."""
    from types import SimpleNamespace

    from fqtorch.backends.int8 import _border

    for width in range(8, 1025, 8):
        border = _border(SimpleNamespace(shape=(64, width), is_cuda=True))
        assert border in (8, 16) and (width + border) % 16 == 0, width
        assert _border(SimpleNamespace(shape=(64, width), is_cuda=False)) == 8
    assert _border(torch.empty(64, 584, dtype=torch.int8)) == 8
