"""The int8 backend's integer GEMMs stay exact however long the reduction: ``torch._int_mm``
accumulates in int32, so a reduction past :func:`chunk_length` runs in chunks summed in int64,
with its epilogue in float64. Checked against a float64 product of the same codes on shapes
whose code products pass 2^31 (codes near one end of their grid), and on short shapes with the
chunk length forced down."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import int8, int8_conv, int8_qconv
from fqtorch.backends.int8 import _int_mm, chunk_length
from fqtorch.nn.functional import ConvOps, FQTPlan, fqt_conv, fqt_linear
from fqtorch.quantizers import get_quantizer
from fqtorch.quantizers.base import QuantizedTensor

LONG = 2**18  # past chunk_length(8, 8) = 131,064


def values64(q: QuantizedTensor) -> torch.Tensor:
    """The quantized values in float64 (the exact reference of every integer product)."""
    values = q.codes.double() * q.scale.double() + q.bias.double()
    return values if q.transform is None else q.transform.inverse(values)


def int32_overflows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the code product ``a @ b`` (exact in float64 here) leaves int32."""
    return bool((a.double() @ b.double()).abs().max() > 2**31 - 1)


def spiked(shape: tuple[int, ...], gen: torch.Generator, base: float, spike: float) -> torch.Tensor:
    """``base`` ± 1 % noise with a few entries at ``spike``: the grid spans the spike, so the
    codes of all the other entries sit together near one end (large codes of one sign)."""
    x = base * (1 + 0.01 * torch.randn(shape, generator=gen))
    x.view(-1)[torch.randperm(x.numel(), generator=gen)[:20]] = spike
    return x


def assert_exact(result: torch.Tensor, reference: torch.Tensor) -> None:
    """int8 equals the float64 reference up to the final rounding to float32."""
    scale = float(reference.detach().abs().max())
    torch.testing.assert_close(result.double(), reference, rtol=1e-6, atol=1e-6 * scale)


def assert_float32_close(result: torch.Tensor, reference: torch.Tensor) -> None:
    """simulate's float32 GEMM over a long reduction is only close to the reference (0.2 %
    off on the 2^18-feature grad_input): a check that the reference is the right quantity."""
    scale = float(reference.detach().abs().max())
    torch.testing.assert_close(result.double(), reference, rtol=1e-2, atol=1e-3 * scale)


@pytest.mark.parametrize("a_bits,b_bits", list(itertools.product(range(2, 9), repeat=2)))
def test_chunk_length_is_the_int32_bound(a_bits, b_bits):
    chunk, worst = chunk_length(a_bits, b_bits), 2 ** (a_bits - 1) * 2 ** (b_bits - 1)
    assert chunk % 8 == 0
    assert chunk * worst <= 2**31 - 1 < (chunk + 8) * worst


@pytest.mark.parametrize("b_layout", ["row-major", "column-major"])
@pytest.mark.parametrize("layout", ["a row-major", "a transposed view"])
def test_worst_case_codes_over_several_chunks(layout, b_layout):
    """All codes at -128: the product and the border sums over 2 chunks and a remainder, on
    both chunked paths (a row-major ``b``'s rows as they are, else the bordered transpose)."""
    k = 2 * chunk_length(8, 8) + 24
    a = torch.full((3, k), -128, dtype=torch.int8)
    b = torch.full((k, 2), -128, dtype=torch.int8)
    if layout == "a transposed view":
        a = a.T.contiguous().T
    if b_layout == "column-major":
        b = b.T.contiguous().T
    prod, a_rows, b_cols = _int_mm(a, 8, b, 8)
    assert torch.equal(prod, torch.full((3, 2), k * 2**14, dtype=torch.int64))
    assert torch.equal(a_rows, torch.full((3,), -128 * k, dtype=torch.int64))
    assert torch.equal(b_cols, torch.full((2,), -128 * k, dtype=torch.int64))


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("layout", ["a row-major", "a transposed view"])
@pytest.mark.parametrize("b_layout", ["row-major", "column-major"])
@pytest.mark.parametrize("k", [1, 7, 8, 9, 33, 1000])
def test_every_operand_layout_gives_the_exact_product_and_sums(
    layout, b_layout, k, chunk, monkeypatch
):
    """``_int_mm`` over its layouts (a row-major ``b`` is taken as it is on the CPU, a transposed
    ``a`` bordered by a copy) and reductions (k = 1, padded: the CPU kernel misreads some k = 1
    layouts; k not a multiple of 8), in one product or (``chunk`` 8) in chunks summed in int64:
    the product and both border sums equal int64 arithmetic, extreme codes included."""
    if chunk is not None:
        monkeypatch.setattr(int8, "chunk_length", lambda a_bits, b_bits: chunk)
    gen = torch.Generator().manual_seed(k)
    m, n = 19, 13
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8)
    a[0], b[:, 0] = -128, -128  # the largest products
    if layout == "a transposed view":
        a = a.T.contiguous().T
    if b_layout == "column-major":
        b = b.T.contiguous().T
    prod, a_rows, b_cols = _int_mm(a, 8, b, 8)
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    assert torch.equal(prod.to(torch.int64), a64 @ b64)
    assert torch.equal(a_rows.to(torch.int64), a64.sum(1))
    assert torch.equal(b_cols.to(torch.int64), b64.sum(0))


@pytest.mark.parametrize("k", [8, 64, 72, 1000])
@pytest.mark.parametrize("n", [13, 24, 64, 584])
def test_the_cuda_border_reaches_every_bordered_product(n, k, monkeypatch):
    """CUDA's border rule (the width a multiple of 16: ``int8._border``), forced on the CPU:
    every product that ``_int_mm`` (one product, padded, chunked) and ``_mm_row_sums`` send to
    ``int_mm`` is that wide, and the products and sums stay exact."""
    monkeypatch.setattr(int8, "_border", lambda b: 16 - b.shape[1] % 16)
    widths = []
    real = int8.int_mm

    def recording(a, b):
        widths.append(b.shape[1])
        return real(a, b)

    monkeypatch.setattr(int8, "int_mm", recording)
    gen = torch.Generator().manual_seed(n + k)
    a = torch.randint(-128, 128, (19, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).T  # column-major
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    for chunk in (None, 16):
        if chunk is not None:
            monkeypatch.setattr(int8, "chunk_length", lambda a_bits, b_bits, c=chunk: c)
        for left in (a, a.T.contiguous().T):  # one product; bordered (and chunked) copies
            prod, a_rows, b_cols = _int_mm(left, 8, b, 8)
            assert torch.equal(prod.to(torch.int64), a64 @ b64)
            assert torch.equal(a_rows.to(torch.int64), a64.sum(1))
            assert torch.equal(b_cols.to(torch.int64), b64.sum(0))
    prod, a_rows = int8._mm_row_sums(a, b.T)
    assert torch.equal(prod.to(torch.int64), a64 @ b64)
    assert torch.equal(a_rows.to(torch.int64), a64.sum(1))
    assert widths and all(width % 16 == 0 for width in widths), widths


def test_row_major_chunks_take_b_as_it_is(monkeypatch):
    """Past the chunk length a row-major ``b`` (the unfolded input codes of a long weight
    gradient) goes to the kernel chunk by chunk as views of itself, never transposed whole (a
    copy that cost more than the products: docs/performance.md); ``a``'s chunks are row-major
    copies bordered by the row of ones."""
    seen = []

    def recording(a, b):
        seen.append((a, b))
        return torch._int_mm(a, b)

    monkeypatch.setattr(int8, "int_mm", recording)
    monkeypatch.setattr(int8, "chunk_length", lambda a_bits, b_bits: 64)
    gen = torch.Generator().manual_seed(5)
    h = torch.randint(-128, 128, (300, 5), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (300, 7), generator=gen, dtype=torch.int8)
    prod, rows, cols = _int_mm(h.T, 8, b, 8)
    assert [tuple(b_part.shape) for _, b_part in seen] == [(60, 7)] * 5
    start = b.data_ptr()
    for i, (a_part, b_part) in enumerate(seen):
        assert b_part.data_ptr() == start + i * 60 * 7 and b_part.stride() == (7, 1)
        assert a_part.stride() == (60, 1) and bool((a_part[-1] == 1).all())
    h64, b64 = h.T.to(torch.int64), b.to(torch.int64)
    assert prod.dtype == rows.dtype == cols.dtype == torch.int64
    assert torch.equal(prod, h64 @ b64)
    assert torch.equal(rows, h64.sum(1)) and torch.equal(cols, b64.sum(0))


@pytest.mark.parametrize("layout", ["a row-major", "a transposed view"])
def test_row_major_chunks_at_the_real_chunk_length(layout):
    """Random codes just past ``chunk_length(8, 8)``: chunks long enough for ``_code_sum`` to sum
    each chunk's rows as a product with ones (the forced short chunks above sum them directly),
    against int64."""
    k, gen = chunk_length(8, 8) + 9, torch.Generator().manual_seed(6)
    a = torch.randint(-128, 128, (19, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, 13), generator=gen, dtype=torch.int8)
    if layout == "a transposed view":
        a = a.T.contiguous().T
    prod, rows, cols = _int_mm(a, 8, b, 8)
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    assert torch.equal(prod, a64 @ b64)
    assert torch.equal(rows, a64.sum(1)) and torch.equal(cols, b64.sum(0))


def test_row_major_chunks_sum_past_int32():
    """Row and column sums of codes at −128 over more rows than int32 holds (2^31 / 128 + 1000):
    the chunks' int32 sums add up in int64."""
    k = 2**31 // 128 + 1000
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((k, 2), -128, dtype=torch.int8)
    prod, rows, cols = _int_mm(a, 8, b, 8)
    assert torch.equal(prod, torch.full((2, 2), k * 2**14, dtype=torch.int64))
    assert torch.equal(rows, torch.full((2,), -128 * k, dtype=torch.int64))
    assert torch.equal(cols, torch.full((2,), -128 * k, dtype=torch.int64))


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


LAYERS = {
    "linear": (lambda: nn.Linear(33, 17), (40, 33)),
    "conv": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 8)),
}


def im2col_only(monkeypatch) -> None:
    """Run Conv2d on the im2col path (these tests count its ``_int_mm`` calls), as where the
    integer convolution kernels are not exact (:mod:`fqtorch.backends.int8_qconv`; it warns)."""
    monkeypatch.setattr(int8_qconv, "qconv_verdict", lambda: "im2col under test")


class TestShortReductions:
    @pytest.mark.parametrize("layer", sorted(LAYERS))
    def test_one_int_mm_per_gemm(self, layer, monkeypatch):
        """Below the chunk length every GEMM stays a single ``_int_mm`` call."""
        calls = []

        def counting(a, b):
            calls.append((a.shape, b.shape))
            return torch._int_mm(a, b)

        monkeypatch.setattr(int8, "int_mm", counting)
        im2col_only(monkeypatch)
        make, shape = LAYERS[layer]
        cfg = FQTConfig.preset(
            "psq4", backend="int8", weight_quantizer="ptq", fused=False
        )  # the eager path's GEMMs
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen, requires_grad=True)
        quantize_model(make(), cfg)(x).sum().backward()
        assert len(calls) == 3

    @pytest.mark.parametrize("layer", sorted(LAYERS))
    def test_forced_chunks_change_nothing(self, layer, monkeypatch):
        """Chunks of 8 (with a remainder: 33, 27 and 17 are not multiples of 8), int64 sums and
        float64 epilogues give the one-``_int_mm`` results."""
        make, shape = LAYERS[layer]
        gen = torch.Generator().manual_seed(1)
        base = make()
        with torch.no_grad():
            base.weight.add_(0.5 * base.weight.abs().max())
        x = torch.randn(shape, generator=gen) + 0.4
        g = torch.randn(base(x).shape, generator=gen)
        cfg = FQTConfig.preset("bhq4", backend="int8", weight_quantizer="ptq")
        whole = run(quantize_model(copy.deepcopy(base), cfg), x, g)
        monkeypatch.setattr(int8, "chunk_length", lambda a_bits, b_bits: 8)
        chunked = run(quantize_model(copy.deepcopy(base), cfg), x, g)
        for a, b in zip(whole, chunked, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    @pytest.mark.parametrize("rows,fan_in,fan_out", [(40, 1, 4), (40, 4, 1), (1, 4, 3)])
    def test_reductions_of_one(self, rows, fan_in, fan_out):
        """One input feature, one output feature, one row: the CPU ``_int_mm`` kernel gets
        k = 1 wrong, so the reduction is zero-padded."""
        gen = torch.Generator().manual_seed(3)
        base = nn.Linear(fan_in, fan_out)
        x, g = torch.randn(rows, fan_in, generator=gen), torch.randn(rows, fan_out, generator=gen)
        cfg = FQTConfig.preset("psq4", fused=False)
        results = [
            run(quantize_model(copy.deepcopy(base), cfg.replace(backend=b)), x, g)
            for b in ("simulate", "int8")
        ]
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    @pytest.mark.parametrize("layer", sorted(LAYERS))
    def test_backward_uses_the_real_bit_widths(self, layer, monkeypatch):
        """The codes saved by the forward keep their bit widths into the backward's chunking."""
        seen = []

        def recording(a, a_bits, b, b_bits):
            seen.append((a_bits, b_bits))
            return _int_mm(a, a_bits, b, b_bits)

        monkeypatch.setattr(int8, "_int_mm", recording)
        monkeypatch.setattr(int8_conv, "_int_mm", recording)
        im2col_only(monkeypatch)
        make, shape = LAYERS[layer]
        bits = {"input_bits": 7, "weight_bits": 6, "grad_bits": 4, "grad_weight_bits": 5}
        cfg = FQTConfig(backend="int8", grad_quantizer="psq", fused=False, **bits)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
        quantize_model(make(), cfg)(x).sum().backward()
        assert seen == [(7, 6), (4, 6), (5, 7)]  # output, grad_input, grad_weight


@pytest.mark.slow
class TestLongReductions:
    """Code products past int32: before chunking, the weight gradient of the first test came
    out as +1.6e6 instead of -27."""

    def test_linear_weight_gradient_over_2_18_rows(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(LONG, 8, generator=gen).relu()  # codes of zeros: -128
        grad = 0.01 * torch.randn(LONG, 4, generator=gen)
        grad[torch.randperm(LONG, generator=gen)[:20]] -= 5  # the other codes near the top
        layer = nn.Linear(8, 4)
        results = {}
        for backend in ("simulate", "int8"):
            plan = FQTPlan.from_config(FQTConfig.preset("bhq5", backend=backend, fused=False))
            xi = x.clone().requires_grad_(True)
            weight = layer.weight.detach().clone().requires_grad_(True)
            bias = layer.bias.detach().clone().requires_grad_(True)
            out = fqt_linear(xi, weight, bias, plan, torch.Generator().manual_seed(7))
            out.backward(grad)
            results[backend] = (weight.grad, bias.grad)
        # The same codes again: the backward encodes grad_output for grad_input, then for
        # grad_weight, from the generator.
        replay = torch.Generator().manual_seed(7)
        xq = plan.input.encode(x)
        plan.grad_output.encode(grad, replay)
        h = plan.grad_output_weight.encode(grad, replay)
        assert int32_overflows(h.codes.T, xq.codes)
        grad_weight, grad_bias = values64(h).T @ values64(xq), values64(h).sum(0)
        assert_exact(results["int8"][0], grad_weight)
        assert_exact(results["int8"][1], grad_bias)
        assert_float32_close(results["simulate"][0], grad_weight)
        assert_float32_close(results["simulate"][1], grad_bias)

    @pytest.mark.parametrize("codes", [(-128, -128), (127, -128), (-128, 127)])
    def test_compiled_linear_weight_gradient_at_the_int32_bound(self, codes):
        """The compiled path's one product ``C_hᵀ C_x`` (``C_hᵀ`` read column-major) over the
        longest reduction it takes, ``chunk_length(8, 8)`` rows of the largest codes: exact,
        where a wrapped int32 would flip the sign."""
        rows, gen = chunk_length(8, 8), torch.Generator().manual_seed(4)
        xq = get_quantizer("ptq", 8).encode(torch.randn(rows, 16, generator=gen) + 1, gen)
        hq = get_quantizer("per_column", 8).encode(torch.randn(rows, 24, generator=gen), gen)
        xq = dataclasses.replace(xq, codes=torch.full_like(xq.codes, codes[1]))
        hq = dataclasses.replace(hq, codes=torch.full_like(hq.codes, codes[0]))
        assert not int32_overflows(hq.codes.T, xq.codes)  # at the bound, not past it
        assert rows * abs(codes[0] * codes[1]) > 2**31 - 2**25  # within 1.6 % of it
        grad_weight, grad_bias = int8._grad_weight_fast(hq, xq, torch.float32)
        assert_exact(grad_weight, values64(hq).T @ values64(xq))
        assert_exact(grad_bias, values64(hq).sum(0))

    @pytest.mark.parametrize(
        ("shape", "k"),
        [((4, 2, 256, 256), 3), ((16, 2, 128, 128), 5)],
        ids=["3x3-per-tap", "5x5-im2col"],  # int8_qconv.stride1_taps_pay's two paths
    )
    def test_conv_weight_gradient_over_2_18_positions(self, shape, k):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(*shape, generator=gen).relu()  # N·H·W = 2^18
        grad = 0.01 * torch.randn(*shape, generator=gen)
        grad.view(-1)[torch.randperm(grad.numel(), generator=gen)[:20]] -= 5
        conv = nn.Conv2d(2, 2, k, padding=k // 2)
        ops = ConvOps(stride=(1, 1), padding=(k // 2, k // 2), dilation=(1, 1), groups=1)
        results = {}
        for backend in ("simulate", "int8"):
            cfg = FQTConfig.preset("bhq5", backend=backend, fused=False)  # the same draws
            plan = FQTPlan.from_config(cfg)
            weight = conv.weight.detach().clone().requires_grad_(True)
            bias = conv.bias.detach().clone().requires_grad_(True)
            out = fqt_conv(x, weight, bias, ops, plan, torch.Generator().manual_seed(7))
            out.backward(grad)
            results[backend] = (weight.grad, bias.grad)
        replay = torch.Generator().manual_seed(7)
        xq = plan.input.encode(x)
        h = plan.grad_output_weight.encode(ops.columns(grad), replay)  # no grad_input here
        h_codes = ops.uncolumns(h.codes.double(), grad)
        x_codes = xq.codes.double().reshape(x.shape)
        codes_product = ops.grad_weight(h_codes, x_codes, conv.weight.double())
        assert codes_product.abs().max() > 2**31 - 1
        h_values = ops.uncolumns(values64(h), grad)
        x_values = values64(xq).reshape(x.shape)
        grad_weight = ops.grad_weight(h_values, x_values, conv.weight.double())
        grad_bias = h_values.sum((0, 2, 3))
        assert_exact(results["int8"][0], grad_weight)
        assert_exact(results["int8"][1], grad_bias)
        assert_float32_close(results["simulate"][0], grad_weight)
        assert_float32_close(results["simulate"][1], grad_bias)

    @pytest.mark.parametrize("features", [(LONG, 4), (4, LONG)], ids=["in", "out"])
    def test_linear_forward_and_grad_input_over_2_18_features(self, features):
        """in_features = 2^18: the forward sums over it; out_features = 2^18: grad_input does.
        Both operands' codes sit near the top of their grids (the weight's zero point too)."""
        fan_in, fan_out = features
        gen = torch.Generator().manual_seed(2)
        x = spiked((24, fan_in), gen, 1.0, -5.0)
        weight = spiked((fan_out, fan_in), gen, 0.01, -0.05)
        bias = torch.randn(fan_out, generator=gen)
        grad = spiked((24, fan_out), gen, 1.0, -5.0)
        results = {}
        for backend in ("simulate", "int8"):
            cfg = FQTConfig(
                backend=backend,
                weight_quantizer="ptq",
                grad_quantizer="psq",
                grad_bits=8,
                fused=False,  # the same noise stream on both backends
            )
            xi = x.clone().requires_grad_(True)
            plan = FQTPlan.from_config(cfg)
            out = fqt_linear(xi, weight, bias, plan, torch.Generator().manual_seed(7))
            out.backward(grad)
            results[backend] = (out.detach(), xi.grad)
        xq, wq = plan.input.encode(x), plan.weight.encode(weight)
        g = plan.grad_output.encode(grad, torch.Generator().manual_seed(7))
        assert int32_overflows(xq.codes, wq.codes.T) or int32_overflows(g.codes, wq.codes)
        output = values64(xq) @ values64(wq).T + bias.double()
        grad_input = values64(g) @ values64(wq)
        for backend, check in (("int8", assert_exact), ("simulate", assert_float32_close)):
            check(results[backend][0], output)
            check(results[backend][1], grad_input)


def test_int_mm_reads_one_row_views_of_a_column():
    """A (1, k) view of a column has strides (1, 1) and passes ``is_contiguous()``; the CPU
    kernel misreads it (torch 2.13), so ``int_mm`` judges layouts by their strides."""
    gen = torch.Generator().manual_seed(5)
    column = torch.randint(-128, 128, (40, 1), dtype=torch.int8, generator=gen)
    other = torch.randint(-128, 128, (40, 12), dtype=torch.int8, generator=gen)
    expected = column.T.long() @ other.long()
    assert torch.equal(int8.int_mm(column.T, other).long(), expected)
    assert torch.equal(int8.int_mm(other.T, column).long(), expected.T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "shape,dim,layout",
    [((97, 13), 0, "row"), ((13, 97), 1, "row"), ((97, 13), 0, "col"), ((13, 97), 1, "col"),
     ((70, 7, 6), 0, "row"), ((5, 70, 6), 1, "row"), ((1, 90), 1, "row"), ((90, 1), 0, "row"),
     ((5, 7), 0, "row")],
)  # fmt: skip
def test_code_sums_are_exact(bits, shape, dim, layout):
    """``_code_sum`` (a product with ones on the CPU) equals int64 sums, extreme codes and
    transposed views included; shapes it does not take to the GEMM fall back to ``sum``."""
    from fqtorch.backends.int8 import _code_sum

    gen = torch.Generator().manual_seed(len(shape) + dim)
    low = -(2 ** (bits - 1))
    codes = torch.randint(low, -low, shape, generator=gen, dtype=torch.int8)
    codes.view(-1)[:3] = low
    if layout == "col":
        codes = codes.T.contiguous().T
    got = _code_sum(codes, dim, bits)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.int64), codes.to(torch.int64).sum(dim))


def test_float32_fit_sums_absolute_codes_exactly():
    """``fits_float32`` bounds Σ|w| per output channel: −128 codes count 128 (an int8 ``abs``
    would wrap them to −128), and the bound is tight at float32's 2^24."""
    from fqtorch.backends.int8_qconv import fits_float32

    w = torch.full((3, 16, 4, 4), -128, dtype=torch.int8)  # Σ|w| = 32768 = 2^15 per channel
    assert fits_float32(w, 10)  # 2^9 · 2^15 = 2^24
    assert not fits_float32(w, 11)
    w[:, :8] = 0  # 2^14 per channel: 2^10 · 2^14 = 2^24
    assert fits_float32(w, 11)
    w[2, 0, 0, 0] = 1  # one code past the bound in one channel
    assert not fits_float32(w, 11)


def test_code_sums_switch_to_int64_past_the_int32_bound():
    """At ``chunk_length(8, 1)`` codes of −128 the sum is the int32 minimum's neighbour, in
    int32; 64 more and it is past int32: int64, the right value (not a wrapped int32)."""
    from fqtorch.backends.int8 import _code_sum

    k = chunk_length(8, 1)
    codes = torch.full((k + 64, 2), -128, dtype=torch.int8)
    inside = _code_sum(codes[:k], 0, 8)
    assert inside.dtype == torch.int32 and inside.tolist() == [-128 * k] * 2
    past = _code_sum(codes, 0, 8)
    assert past.dtype == torch.int64 and past.tolist() == [-128 * (k + 64)] * 2
    assert _code_sum(codes[:k].T, -1, 8).tolist() == [-128 * k] * 2  # a negative dim


def test_no_product_reaches_the_kernel_with_a_single_term_reduction(monkeypatch):
    """The CPU kernel misreads some k = 1 layouts (torch 2.13): whatever the operands' layouts,
    ``_int_mm`` pads a one-term reduction before ``torch._int_mm`` sees it."""
    seen = []
    real = torch._int_mm

    def spy(a, b):
        seen.append(a.shape[1])
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", spy)
    a = torch.tensor([[3], [-128], [5]], dtype=torch.int8)
    for b in (torch.tensor([[7, -128]], dtype=torch.int8), torch.tensor([[7, -128]]).T.T):
        for left in (a, a.T.contiguous().T):
            prod, rows, cols = _int_mm(left, 8, b.to(torch.int8), 8)
            assert torch.equal(prod.long(), left.long() @ b.long())
            assert torch.equal(rows.long(), left.long().sum(1))
            assert torch.equal(cols.long(), b.long().sum(0))
    assert seen and 1 not in seen
