"""The int8 backend: same codes as simulate, same values to float tolerance, unbiased, 4× less
saved activation memory."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqtorch
from fqtorch import FQTConfig, quantize_model
from fqtorch.nn.functional import FQTPlan, fqt_linear
from fqtorch.quantizers.base import get_quantizer, has_random_transform
from tests.helpers import projection_z, warnings_as_errors, z_limit


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.slow
class TestAgainstSimulate:
    """Given the same generator state both backends draw the same codes, so outputs and all
    gradients agree to float32 rounding (relative 1e-5)."""

    @pytest.mark.parametrize(
        "preset,fused",
        [(p, False) for p in ("qat", "ptq4", "psq4", "bhq4", "bhq2", "psq8")]
        + [("ptq4", True), ("psq4", True), ("bhq4", True)],
    )
    @pytest.mark.parametrize("shape", [(40, 33), (3, 7, 33)])
    def test_same_values(self, preset, fused, shape):
        torch.manual_seed(0)
        base = nn.Linear(33, 17)
        x, g = torch.randn(*shape), torch.randn(*shape[:-1], 17)
        results = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig.preset(preset, backend=backend, fused=fused)
            results.append(run(quantize_model(copy.deepcopy(base), cfg), x, g))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    def test_rht_and_ptq_weight_branch(self):
        torch.manual_seed(1)
        base = nn.Linear(16, 8)
        x, g = torch.randn(37, 16), torch.randn(37, 8)
        cfg = FQTConfig(grad_quantizer="rht", grad_bits=4, grad_weight_quantizer="ptq", fused=False)
        a = run(quantize_model(copy.deepcopy(base), cfg), x, g)
        b = run(
            quantize_model(
                copy.deepcopy(base), cfg.replace(backend="int8", grad_weight_quantizer="ptq")
            ),
            x,
            g,
        )
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5 * float(u.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_unbiased_on_int8(fused):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    x, y = torch.randn(24, 12), torch.randint(0, 5, (24,))
    qat = quantize_model(copy.deepcopy(model), FQTConfig.preset("qat", backend="int8"))
    fqt = quantize_model(
        copy.deepcopy(model), FQTConfig.preset("bhq3", backend="int8", fused=fused)
    )

    def grad(m):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    target = grad(qat)
    samples = torch.stack([grad(fqt) for _ in range(400)])
    z = projection_z(samples, target)
    assert z.abs().max() < z_limit(z.numel())


def test_saves_int8_codes_for_backward():
    """Activation memory saved for backward drops about 4× against the simulate backend."""
    base = nn.Linear(256, 256)
    x = torch.randn(512, 256, requires_grad=True)

    def saved_bytes(backend: str) -> tuple[int, set]:
        layer = quantize_model(copy.deepcopy(base), FQTConfig.preset("psq4", backend=backend))
        sizes, dtypes = [], set()

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            dtypes.add(t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(sizes), dtypes

    simulate, _ = saved_bytes("simulate")
    int8, dtypes = saved_bytes("int8")
    assert torch.int8 in dtypes
    assert 3.5 < simulate / int8 < 4.5


class TestConfig:
    def test_needs_per_tensor_forward(self):
        with pytest.raises(ValueError, match="weight_quantizer with one scale per tensor"):
            FQTConfig(backend="int8", weight_quantizer="symmetric_per_row")
        with pytest.raises(ValueError, match="grad_weight_quantizer with one scale per tensor"):
            FQTConfig(backend="int8", grad_quantizer="bhq", grad_weight_quantizer="bhq")

    def test_gradient_scales_must_sit_off_the_summed_axis(self):
        # grad_input sums over grad_output's columns, grad_weight over its rows.
        with pytest.raises(ValueError, match="grad_quantizer with one scale per tensor or per row"):
            FQTConfig(backend="int8", grad_quantizer="per_column")
        with pytest.raises(ValueError, match="grad_weight_quantizer .* per column"):
            FQTConfig(
                backend="int8", grad_quantizer="psq", grad_weight_quantizer="symmetric_per_row"
            )

    @pytest.mark.parametrize(
        "grad_output,grad_output_weight", [("per_column", "per_column"), ("psq", "psq")]
    )
    def test_backend_refuses_a_hand_built_plan(self, grad_output, grad_output_weight):
        """A plan built without FQTConfig meets the same rule when its codes are used."""
        plan = FQTPlan(
            input=get_quantizer("ptq", rounding="nearest"),
            weight=get_quantizer("symmetric", rounding="nearest"),
            grad_output=get_quantizer(grad_output),
            grad_output_weight=get_quantizer(grad_output_weight),
            backend="int8",
        )
        weight = torch.randn(6, 6, requires_grad=True)  # square: a wrong broadcast would pass
        x = torch.randn(5, 6, requires_grad=True)
        out = fqt_linear(x, weight, None, plan, torch.Generator())
        with pytest.raises(ValueError, match="sums over"):
            out.backward(torch.randn(5, 6))

    def test_conv_falls_back_with_warning(self):
        cfg = FQTConfig.preset("psq4", backend="int8")
        grouped = quantize_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), cfg)
        with pytest.warns(RuntimeWarning, match="cannot run on integer GEMMs"):
            grouped(torch.randn(2, 4, 6, 6)).sum().backward()

    def test_padded_conv_runs_on_integers_whatever_the_input_grid(self):
        cfg = FQTConfig.preset("psq4", backend="int8")
        padded = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), cfg)
        with warnings_as_errors():  # no fallback: real zero need not be a code
            padded(torch.randn(2, 3, 6, 6) + 0.3).sum().backward()


FIELDS = ("input_quantizer", "weight_quantizer", "grad_quantizer", "grad_weight_quantizer")


def int8_combinations() -> tuple[list[dict], list[tuple[dict, str]]]:
    """Every assignment of the registered quantizers (and ``None`` for the two gradient fields)
    to the four fields, split into those ``FQTConfig(backend="int8")`` accepts and those it
    refuses (with the message): a newly registered quantizer joins one side or the other.
    Random transforms are left out of the forward fields: every backend refuses them there
    (tests/test_config.py)."""
    names = fqtorch.list_quantizers()
    accepted, refused = [], []
    forward = [n for n in names if not has_random_transform(n)]  # refused by every backend
    for combo in itertools.product(forward, forward, [None, *names], [None, *names]):
        fields = dict(zip(FIELDS, combo, strict=True))
        try:
            FQTConfig(backend="int8", **fields)
        except ValueError as error:
            refused.append((fields, str(error)))
        else:
            accepted.append(fields)
    return accepted, refused


ACCEPTED, REFUSED = int8_combinations()
LAYERS = {
    "linear": (lambda: nn.Linear(12, 6), (10, 12)),
    "conv": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 3, 7, 6)),
}


class TestEveryCombination:
    """Each quantizer combination the int8 config accepts gives simulate's values (outputs and
    all three gradients, Linear and a strided, padded Conv2d); each one it refuses is refused
    with a message naming the field at fault and what it expects."""

    def test_accepts_the_paper_presets_and_refuses_some(self):
        presets = [FQTConfig.preset(p) for p in ("qat", "ptq4", "psq4", "bhq4")]
        for cfg in presets:
            assert {f: getattr(cfg, f) for f in FIELDS} in ACCEPTED
        assert REFUSED

    @pytest.mark.parametrize("layer", sorted(LAYERS))
    @pytest.mark.parametrize(
        "fields", ACCEPTED, ids=["-".join(map(str, f.values())) for f in ACCEPTED]
    )
    def test_accepted_matches_simulate(self, fields, layer):
        make, shape = LAYERS[layer]
        gen = torch.Generator().manual_seed(3)
        base = make()
        with torch.no_grad():  # weights off-centre: the weight grid's zero point is far from 0
            base.weight.add_(0.5 * base.weight.abs().max())
        x = torch.randn(shape, generator=gen) + 0.4  # signed, shifted: the input's too
        bits = {"input_bits": 7, "weight_bits": 6, "grad_bits": 4, "grad_weight_bits": 5}
        g = None
        results = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig(backend=backend, fused=False, **bits, **fields)
            layer_q = quantize_model(copy.deepcopy(base), cfg)
            xi = x.clone().requires_grad_(True)
            out = layer_q(xi)
            g = torch.randn(out.shape, generator=gen) if g is None else g
            out.backward(g)
            results.append((out.detach(), xi.grad, layer_q.weight.grad, layer_q.bias.grad))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))

    def test_refused_name_the_field(self):
        def named(message: str) -> list[str]:
            return [f for f in FIELDS if re.search(rf"\b{f}\b", message)]

        repair = ACCEPTED[0]
        for fields, message in REFUSED:
            FQTConfig(**fields)  # the simulate backend takes every combination
            assert len(named(message)) == 1 and "needs" in message, message
            field = named(message)[0]
            assert f"got {fields[field]!r}" in message, message
            # Repairing that field clears this error: it was the one at fault.
            try:
                FQTConfig(backend="int8", **{**fields, field: repair[field]})
            except ValueError as error:
                assert field not in named(str(error))


CONVS = [
    (lambda: nn.Conv2d(3, 5, 3, padding=1), True),
    (lambda: nn.Conv2d(3, 5, 3, padding=1), False),
    (lambda: nn.Conv2d(3, 4, 3, stride=2), False),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)), True),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)), False),
    (lambda: nn.Conv2d(3, 4, 4, padding="same", bias=False), True),
    (lambda: nn.Conv2d(3, 4, 4, padding="same", bias=False), False),
]


class TestConvAgainstSimulate:
    """Conv2d on the int8 backend (integer convolutions where they are exact, else im2col +
    ``torch._int_mm``) agrees with simulate to float32 rounding, with zero padding exact both on
    post-ReLU inputs (real zero on the grid) and on signed, shifted ones (real zero between grid
    points: the tap-mask correction)."""

    @pytest.mark.parametrize("make,relu", CONVS)
    @pytest.mark.parametrize("preset", ["qat", "ptq4", "psq4", "bhq4", "psq4-fused"])
    def test_same_values(self, make, relu, preset):
        self.check(make, relu, preset)

    @pytest.mark.parametrize("make,relu", CONVS)
    @pytest.mark.parametrize("preset", ["qat", "ptq4", "psq4", "bhq4", "psq4-fused"])
    @pytest.mark.parametrize("weight_quantizer", ["symmetric", "ptq"])
    def test_same_values_on_im2col(self, make, relu, preset, weight_quantizer, monkeypatch):
        """The im2col path, as where the integer convolutions are refused, with symmetric and
        asymmetric weights (a weight zero point: the mask's count of real taps in the output)."""
        from fqtorch.backends import int8_qconv

        monkeypatch.setattr(int8_qconv, "qconv_verdict", lambda: "the probe failed (test)")
        with pytest.warns(RuntimeWarning, match="im2col"):
            self.check(make, relu, preset, weight_quantizer=weight_quantizer)

    @staticmethod
    def check(make, relu, preset, **fields):
        preset, fused = preset.removesuffix("-fused"), preset.endswith("-fused")
        torch.manual_seed(0)
        base = make()
        with torch.no_grad():  # weights all of one sign: the weight's zero point far from 0
            base.weight.abs_()
        x = torch.randn(5, base.in_channels, 9, 8)
        x = x.relu() if relu else x + 0.37  # shifted: real zero off the input grid
        g = None
        results = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig.preset(preset, backend=backend, fused=fused, **fields)
            layer = quantize_model(copy.deepcopy(base), cfg)
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            g = torch.randn_like(out) if g is None else g
            out.backward(g)
            grads = [p.grad for p in layer.parameters()]
            results.append((out.detach(), xi.grad, *grads))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_int8_matches_simulate(fused):
    torch.manual_seed(0)
    base = nn.Linear(64, 32).cuda()
    x, g = torch.randn(128, 64, device="cuda"), torch.randn(128, 32, device="cuda")
    cfg = FQTConfig.preset("bhq4", fused=fused)
    a = run(quantize_model(copy.deepcopy(base), cfg), x, g)
    b = run(quantize_model(copy.deepcopy(base), cfg.replace(backend="int8")), x, g)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4 * float(u.abs().max()))


@pytest.mark.cuda
def test_cuda_int8_linear_at_a_width_of_8_mod_16(monkeypatch):
    """72 output features over 65,536 tokens with k = 64: the forward's unbordered product at this
    width was refused by cuBLASLt on an NVIDIA H200 (``benchmarks/gpu_probe.py``), so the compiled
    path borders it to 80 columns (``int8._in_place_width``). ``grad_input`` here is
    (65536, 72) × (72, 64) in place, k = 72: a reduction of 8 mod 16 the first probe did not
    try."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    base = nn.Linear(64, 72).cuda()
    x, g = torch.randn(65536, 64, device="cuda"), torch.randn(65536, 72, device="cuda")
    cfg = FQTConfig.preset("psq5", weight_quantizer="ptq", fused=True)
    a = run(quantize_model(copy.deepcopy(base), cfg), x, g)
    b = run(quantize_model(copy.deepcopy(base), cfg.replace(backend="int8")), x, g)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4 * float(u.abs().max()))


def int8_and_simulate(make, x, cfg: FQTConfig, g=None, **run_options):
    """Output and every gradient of ``make()`` under ``cfg`` on the int8 and the simulate
    backend (same seed, so the same codes): ``{backend: (out, grad_input, *param_grads)}``."""
    torch.manual_seed(0)
    base = make()
    results = {}
    for backend in ("int8", "simulate"):
        layer = quantize_model(copy.deepcopy(base), cfg.replace(backend=backend))
        results[backend] = run_layer(layer, x, g, **run_options)
    return results


def run_layer(layer, x, g=None, autocast=False, memory_format=None):
    if memory_format is not None:
        layer = layer.to(memory_format=memory_format)
        x = x.to(memory_format=memory_format)
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(xi)
    out.backward(torch.ones_like(out) if g is None else g)
    return (out.detach(), xi.grad, *[p.grad for p in layer.parameters()])


def assert_all_close(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


class TestSettings:
    """The int8 backend under autocast, with ``check_finite``, on unbatched and channels-last
    input, and where it falls back (1-d convolutions)."""

    @pytest.mark.parametrize("layer", sorted(LAYERS))
    def test_autocast_leaves_integer_gemms_exact(self, layer):
        """Integer GEMMs do not round: under bf16 autocast the int8 backend gives its values
        without autocast (float32 for a float32 input), forward and backward."""
        make, shape = LAYERS[layer]
        torch.manual_seed(0)
        base = make()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) + 0.4
        cfg = FQTConfig.preset("psq4", backend="int8")
        plain, autocast = (
            run_layer(quantize_model(copy.deepcopy(base), cfg), x, autocast=enabled)
            for enabled in (False, True)
        )
        assert_all_close(autocast, plain)

    @pytest.mark.parametrize("layer", sorted(LAYERS))
    def test_check_finite(self, layer):
        """``check_finite=True`` changes nothing on finite gradients and raises, naming the
        layer, on a NaN; without it the NaN stays in its sample's rows of ``grad_input``."""
        make, shape = LAYERS[layer]
        torch.manual_seed(0)
        base = nn.Sequential(make())  # the layer's name: "0"
        x = torch.randn(shape)
        cfg = FQTConfig.preset("psq4", backend="int8")
        checked = quantize_model(copy.deepcopy(base), cfg.replace(check_finite=True))
        plain = quantize_model(copy.deepcopy(base), cfg)
        out = checked(x)
        g = torch.randn_like(out)
        for a, b in zip(run_layer(checked, x, g), run_layer(plain, x, g), strict=True):
            assert torch.equal(a, b)
        g[1] = math.nan
        with pytest.raises(FloatingPointError, match=r"FQT layer '0'"):
            run_layer(checked, x, g)
        grad_input = run_layer(plain, x, g)[1]
        assert torch.isnan(grad_input[1]).all()
        assert torch.isfinite(grad_input[torch.arange(len(x)) != 1]).all()

    @pytest.mark.parametrize("layout", ["channels_last", "unbatched"])
    def test_conv_layouts_match_simulate(self, layout):
        """Channels-last tensors and an unbatched (C, H, W) input run on integer GEMMs (no
        fallback warning) and give simulate's values, which are those of a contiguous batch."""
        make = lambda: nn.Conv2d(3, 4, 3, padding=1)  # noqa: E731
        x = torch.randn(1, 3, 7, 6) + 0.4
        cfg = FQTConfig.preset("bhq4")
        with warnings_as_errors():
            if layout == "channels_last":
                results = int8_and_simulate(make, x, cfg, memory_format=torch.channels_last)
            else:
                results = int8_and_simulate(make, x[0], cfg)
        assert_all_close(results["int8"], results["simulate"])
        out, grad_input, *grads = int8_and_simulate(make, x, cfg)["int8"]
        if layout == "unbatched":
            out, grad_input = out[0], grad_input[0]
        assert_all_close(results["int8"], (out, grad_input, *grads))

    @pytest.mark.parametrize("scale", [1.0, 1e-50, 1e50])
    @pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv2d"])
    def test_float64_runs_on_simulate_with_warning(self, conv, scale):
        """float64 operands fall back to simulate, said (the integer path quantized the gradient
        in float32, drawing other codes, and gave zeros at 1e-50 and NaN at 1e50)."""
        if conv:
            make = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).double()  # noqa: E731
            x = torch.randn(2, 3, 6, 6, dtype=torch.float64) * scale
        else:
            make = lambda: nn.Sequential(nn.Linear(8, 5)).double()  # noqa: E731
            x = torch.randn(6, 8, dtype=torch.float64) * scale
        cfg = FQTConfig.preset("psq8", fused=True)
        with pytest.warns(RuntimeWarning, match=r"FQT layer '0'.*not float64.*simulate backend"):
            results = int8_and_simulate(make, x, cfg)
        for a, b in zip(results["int8"], results["simulate"], strict=True):
            assert torch.equal(a, b) and torch.isfinite(a).all() and bool(a.abs().max() > 0)

    def test_conv1d_falls_back_with_warning(self):
        """A 1-d convolution has no integer path: it warns once per call, naming the layer and
        the simulate backend, and gives simulate's values exactly."""
        x = torch.randn(3, 2, 11)
        cfg = FQTConfig.preset("psq4")
        make = lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1))  # noqa: E731
        with pytest.warns(RuntimeWarning, match=r"FQT layer '0'.*1-d.*using the simulate backend"):
            results = int8_and_simulate(make, x, cfg)
        for a, b in zip(results["int8"], results["simulate"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "make,x_shape",
    [
        (lambda: nn.Linear(4096, 8, bias=False), (16, 4096)),
        (lambda: nn.Conv2d(64, 4, 3, padding=1, bias=False), (2, 64, 6, 6)),  # K = 576
    ],
    ids=["linear-K4096", "conv-K576"],
)
def test_one_signed_operands_cancel_exactly(make, x_shape, fused):
    """Codes at one end of the grid (one large input, the rest near 0) and all-positive weights:
    the zero-point term nearly cancels the integer product. The epilogue keeps the difference
    (float64 past short reductions): the forward is simulate's to float32 rounding. Rounding the
    product to float32 first was off by 2e-4 of the output at K = 4096 (docs/method.md §8)."""
    gen = torch.Generator().manual_seed(0)
    base = make()
    with torch.no_grad():
        base.weight.copy_(1.0 + torch.rand(base.weight.shape, generator=gen))
    x = 0.01 * torch.rand(x_shape, generator=gen)
    x.view(x.shape[0], -1)[:, 0] = 100.0
    outputs = []
    for backend in ("simulate", "int8"):
        config = FQTConfig.preset("qat", backend=backend, fused=fused)
        layer = quantize_model(copy.deepcopy(base), config)
        with torch.no_grad():
            outputs.append(layer(x).double())
    sim, got = outputs
    assert float((got - sim).abs().max() / sim.abs().max()) < 1e-6
