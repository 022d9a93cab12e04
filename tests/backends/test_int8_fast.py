"""The int8 backend's compiled path (``fused=True``, its default): ``grad_output`` quantized both
ways in one graph with the codes of two separate ``encode`` calls, compiled epilogues with the
eager path's values, the fallbacks of shapes it does not take, and its one log line.

Compiling is slow, so the compiled kernels are exercised at few static configurations (the 5-bit
PSQ preset and the 4-bit PTQ one) and reused across tests (dynamic shapes)."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import int8, notes
from fqtorch.quantizers import twoway
from fqtorch.quantizers.base import get_quantizer


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encode_both(x, qg, qh, seed):
    """Two encodes, one after the other, from one generator (rows first)."""
    g = gen(seed)
    return qg.encode(x, g), qh.encode(x, g)


def assert_same_codes(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.bias, b.bias)
        assert a.bits == b.bits and a.shape == b.shape


PAIRS = [
    ("psq", 5, "per_column", 8),
    ("ptq", 4, "ptq", 8),
    ("symmetric_per_row", 3, "per_column", 5),
    ("symmetric", 6, "symmetric", 4),
]


class TestTwoWay:
    @pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}{p[1]}-{p[2]}{p[3]}")
    @pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
    @torch._dynamo.config.patch(disable=True)  # eager throughout: no compile per combination
    def test_eager_graph_gives_the_codes_of_two_encodes(self, pair, rounding):
        qg = get_quantizer(pair[0], pair[1], rounding=rounding, fused=True)
        qh = get_quantizer(pair[2], pair[3], rounding=rounding, fused=True)
        x = torch.randn(37, 21, generator=gen(0)) * torch.rand(37, 1, generator=gen(1)) * 5
        separate = encode_both(x, qg, qh, 7)
        g7 = gen(7)
        fused = twoway.encode_two_way(x, qg, qh, g7, compiled=False)
        assert_same_codes(fused, separate)
        # The generator moved on as two encodes would move it.
        g = gen(7)
        qg.encode(x, g), qh.encode(x, g)
        assert torch.equal(
            torch.randint(0, 2**30, (4,), generator=g7), torch.randint(0, 2**30, (4,), generator=g)
        )

    @pytest.mark.parametrize("shape", [(64, 48), (37, 21)])
    def test_compiled_graph_gives_the_same_codes(self, shape):
        qg = get_quantizer("psq", 5, fused=True)
        qh = get_quantizer("per_column", 8, fused=True)
        x = torch.randn(shape, generator=gen(2))
        compiled = twoway.encode_two_way(x, qg, qh, gen(3))
        for kernel in (twoway.fused_two_way_stats, twoway.fused_two_way_round):
            assert kernel._compiled is not None and not kernel._broken
        assert_same_codes(compiled, twoway.encode_two_way(x, qg, qh, gen(3), compiled=False))
        assert_same_codes(compiled, encode_both(x, qg, qh, 3))

    def test_unfused_or_transformed_quantizers_run_one_after_the_other(self):
        x = torch.randn(40, 16, generator=gen(4))
        for qg, qh in [
            (get_quantizer("psq", 4), get_quantizer("per_column", 8)),  # torch.rand noise
            (get_quantizer("bhq", 4, fused=True), get_quantizer("per_column", 8, fused=True)),
        ]:
            separate = encode_both(x, qg, qh, 5)
            assert_same_codes(twoway.encode_two_way(x, qg, qh, gen(5)), separate)


def run(layer, x, g):
    xi = x.clone().requires_grad_(True)
    out = layer(xi)
    out.backward(g)
    return (out.detach(), xi.grad, *[p.grad for p in layer.parameters()])


SHAPES = {
    "fast": ((64, 32), 24),  # every GEMM on the compiled path
    "odd rows": ((37, 32), 24),  # the weight-gradient GEMM pads its reduction: eager
    "odd features": ((64, 30), 24),  # the forward GEMM pads its reduction: eager
    "one output": ((64, 32), 1),  # (·, 1) codes: the weight gradient takes the bordered product
    "one feature": ((64, 1), 24),  # (·, 1) input codes: the same, and the forward pads
    "narrow": ((16, 3), 5),  # few, odd features both ways: the unbordered weight gradient
}


class TestCompiledPath:
    @pytest.mark.parametrize("shape", sorted(SHAPES))
    @pytest.mark.parametrize(
        "preset",  # PSQ5 compiles the default graphs; the others compile more (slow)
        ["psq5", pytest.param("ptq4", marks=pytest.mark.slow), "bhq5"],
    )
    @pytest.mark.parametrize("bias", [True, False])
    def test_matches_simulate_and_the_eager_path(self, shape, preset, bias):
        """Same codes on all three (same seed): the compiled int8 path's values are the eager
        int8 path's and simulate's to float32 rounding."""
        (rows, k), n = SHAPES[shape]
        base = nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            base.weight.add_(0.3 * base.weight.abs().max())  # a zero point far from 0
        x = torch.randn(rows, k, generator=gen(8)) + 0.5
        g = torch.randn(rows, n, generator=gen(9))
        cfg = FQTConfig.preset(  # asymmetric weight grid: every zero-point term is live
            preset, backend="int8", input_bits=7, weight_bits=6, weight_quantizer="ptq"
        )
        assert cfg.fused  # the default
        results = {}
        for name, c in [
            ("compiled", cfg),
            ("simulate", cfg.replace(backend="simulate", fused=True)),  # the same noise
        ]:
            results[name] = run(quantize_model(copy.deepcopy(base), c), x, g)
        for a, b in zip(results["compiled"], results["simulate"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

    def test_epilogues_compiled_equal_eager(self):
        """Each compiled epilogue against its own function run eagerly, and against the eager
        path's functions (the debugging path) on the same codes."""
        x = get_quantizer("ptq", 7, rounding="nearest").encode(
            torch.randn(48, 40, generator=gen(1)) + 1
        )
        w = get_quantizer("symmetric", 6, rounding="nearest").encode(
            torch.randn(24, 40, generator=gen(2))
        )
        g = get_quantizer("psq", 5).encode(torch.randn(48, 24, generator=gen(3)), gen(4))
        h = get_quantizer("per_column", 8).encode(torch.randn(48, 24, generator=gen(3)), gen(5))
        bias = torch.randn(24, generator=gen(6))
        f32 = torch.float32
        pairs = [
            (int8._forward_fast(x, w, bias, f32), int8._forward(x, w, bias).to(f32)),
            (int8._grad_input_fast(g, w, f32), int8._grad_input(g, w).to(f32)),
        ]
        eager_weight, h_cols = int8._grad_weight(h, x)
        # h's codes row-major (the CPU's unbordered product, the weight's layout out) and
        # column-major (the bordered product that other devices take)
        column_major = dataclasses.replace(h, codes=h.codes.T.contiguous().T)
        for codes in (h, column_major):
            grad_weight, grad_bias = int8._grad_weight_fast(codes, x, f32)
            assert grad_weight.is_contiguous()  # else autograd copies it into the weight's layout
            pairs += [
                (grad_weight, eager_weight.to(f32)),
                (grad_bias, int8._grad_bias(h, h_cols).to(f32)),
            ]
        for got, expected in pairs:
            torch.testing.assert_close(
                got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())
            )
        for kernel in (
            int8._compiled_forward_in_place,
            int8._compiled_grad_input_in_place,
            int8._compiled_grad_weight,
        ):
            assert kernel._compiled is not None and not kernel._broken

    def test_bordered_product_where_cuda_refuses_the_width(self, monkeypatch):
        """On CUDA a width of 8 mod 16 is refused unbordered at large sizes (an NVIDIA H200), so
        the forward and ``grad_input`` take the bordered product there
        (``_in_place_width``). That rule is read from the device and width; the bordered
        branch's values are checked here by forcing it on the CPU."""
        from types import SimpleNamespace

        for width in (16, 24, 584, 592):
            cuda = SimpleNamespace(is_cuda=True)
            assert int8._in_place_width(cuda, width) == (width % 16 == 0)
            assert int8._in_place_width(torch.empty(1), width)
        x = get_quantizer("ptq", 7, rounding="nearest").encode(
            torch.randn(48, 40, generator=gen(1))
        )
        # an asymmetric weight grid: the row sums of x and g enter through its zero point
        w = get_quantizer("ptq", 6, rounding="nearest").encode(
            torch.randn(24, 40, generator=gen(2)) + 0.7
        )
        assert float(w.bias.abs()) > 0
        bias = torch.randn(24, generator=gen(6))
        f32 = torch.float32
        seen = []
        real = int8._in_place_width

        def recording(codes, n):
            seen.append(n)
            return real(codes, n)

        monkeypatch.setattr(int8, "_in_place_width", recording)
        for name in ("psq", "bhq"):  # BHQ: its inverse transform after the bordered product
            g = get_quantizer(name, 5).encode(torch.randn(48, 24, generator=gen(3)), gen(4))
            assert (g.transform is not None) == (name == "bhq")
            seen.clear()
            in_place = (int8._forward_fast(x, w, bias, f32), int8._grad_input_fast(g, w, f32))
            assert seen == [24, 40]  # the forward's width is O, grad_input's is K
            with monkeypatch.context() as forced:
                forced.setattr(int8, "_in_place_width", lambda codes, n: False)
                bordered = (
                    int8._forward_fast(x, w, bias, f32),
                    int8._grad_input_fast(g, w, f32),
                )
            for got, expected in zip(bordered, in_place, strict=True):
                torch.testing.assert_close(
                    got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())
                )

    def test_says_which_path_once(self, caplog):
        notes.say_once.cache_clear()
        base = nn.Linear(16, 8)
        x, g = torch.randn(16, 16), torch.randn(16, 8)
        with caplog.at_level(logging.INFO, logger="fqtorch.backends"):
            for fused in (True, True, False, False):
                cfg = FQTConfig.preset("psq5", backend="int8", fused=fused)
                run(quantize_model(copy.deepcopy(base), cfg), x, g)
        lines = [r.getMessage() for r in caplog.records if "int8 backend:" in r.getMessage()]
        assert len(lines) == 2, lines
        assert "compiled" in lines[0] and "eager" in lines[1] and "fused=False" in lines[1]
        notes.say_once.cache_clear()
