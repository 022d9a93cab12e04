"""FQT layers: exact fallback, QAT equivalence, unbiased FQT gradients, reproducible noise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fqtorch
from fqtorch import FQTConfig, get_quantizer, quantize_model
from fqtorch.nn import FQTConv2d, FQTLinear, FQTPlan, fqt_linear, layer_seed
from fqtorch.nn.functional import ConvOps, fqt_conv
from fqtorch.quantizers import Quantizer
from tests.helpers import projection_z, t_as_z, z_limit

EXACT = FQTConfig(
    input_quantizer="identity",
    weight_quantizer="identity",
    grad_quantizer="identity",
    grad_weight_quantizer="identity",
)

CONVS = [
    lambda: nn.Conv2d(3, 5, 3),
    lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),
    lambda: nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1), groups=3),
    lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(3, 4, 4, padding="same"),  # even kernel: asymmetric padding
    lambda: nn.Conv2d(3, 4, 5, padding="same", dilation=2, padding_mode="circular"),
    lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="replicate"),
    lambda: nn.Conv2d(3, 4, 1, padding="valid"),
    lambda: nn.Conv1d(3, 4, 5, stride=2, padding=1),
    lambda: nn.Conv1d(3, 4, 4, padding="same"),
]


def conv_input(layer: nn.Module, n: int = 3) -> torch.Tensor:
    spatial = (11,) if isinstance(layer, nn.Conv1d) else (9, 7)
    return torch.randn(n, layer.in_channels, *spatial)


def grads_of(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor | None = None):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.backward(torch.ones_like(out) if grad_out is None else grad_out)
    grads = [p.grad.clone() for p in module.parameters()]
    return out.detach(), x.grad, grads


def assert_same(a, b):
    """Bit for bit (README: the exact preset gives the float layer's outputs and gradients):
    a bias gradient summed in another order than ATen's differs in the last bits."""
    out_a, gx_a, gp_a = a
    out_b, gx_b, gp_b = b
    assert torch.equal(out_a, out_b)
    assert torch.equal(gx_a, gx_b)
    for u, v in zip(gp_a, gp_b, strict=True):
        assert torch.equal(u, v), (u - v).abs().max()


class TestExactFallback:
    """With every quantizer ``identity``, FQT layers equal the float layers in output and in
    all gradients, on odd shapes, strides, dilation, groups and every padding mode."""

    @pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (5,)])
    @pytest.mark.parametrize("bias", [True, False])
    def test_linear(self, shape, bias):
        ref = nn.Linear(5, 11, bias=bias)
        fqt = FQTLinear(copy.deepcopy(ref), EXACT)
        x = torch.randn(*shape)
        g = torch.randn(*shape[:-1], 11)
        assert_same(grads_of(ref, x, g), grads_of(fqt, x, g))

    @pytest.mark.parametrize("make", CONVS)
    def test_conv(self, make):
        ref = make()
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        x = conv_input(ref)
        out = ref(x)
        g = torch.randn_like(out)
        assert_same(grads_of(ref, x, g), grads_of(fqt, x, g))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize(
        "make",
        [lambda: nn.Linear(64, 32), lambda: nn.Conv2d(3, 4, 3, padding=1)],
        ids=["linear", "conv"],
    )
    def test_half_precision_model(self, make, dtype):
        """A bf16 / fp16 model (no autocast): the backward runs in the model's dtype, as the
        float layer's does (it ran in float32 and rounded: bf16 Conv2d input gradients
        differed by 1.6e-2)."""
        ref = make().to(dtype)
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        x = (conv_input(ref) if isinstance(ref, nn.Conv2d) else torch.randn(16, 64)).to(dtype)
        out = ref(x)
        g = torch.randn_like(out)
        assert_same(grads_of(ref, x, g), grads_of(fqt, x, g))

    def test_unbatched_conv(self):
        ref = nn.Conv2d(3, 4, 3, padding=1)
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        x = torch.randn(3, 6, 6)
        assert_same(grads_of(ref, x), grads_of(fqt, x))

    def test_gradcheck_float64(self):
        plan = FQTPlan.from_config(EXACT)
        x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w, b: fqt_linear(x, w, b, plan), (x, w, b))
        conv = FQTConv2d(nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1).double(), EXACT)
        xc = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(conv, (xc,))


def fake_quant_ste(x: torch.Tensor, quantizer) -> torch.Tensor:
    return x + (quantizer(x.detach()) - x).detach()


def test_conv_bias_gradient_is_accurate_at_a_long_reduction():
    """A Conv2d's bias gradient from a quantized gradient sums N·H·W = 2^18 positions per
    channel to float32 rounding of the whole sum (it was ATen's CPU convolution backward, which
    sums in order in float32: 1.3e-4 of its size off here, 2.7e-3 on other data). Unquantized
    (exact, QAT) it stays ATen's, bit for bit with the float layer."""
    torch.manual_seed(0)
    cfg = FQTConfig.preset("psq8").replace(grad_rounding="nearest")  # Q(g) computed again below
    layer = quantize_model(nn.Sequential(nn.Conv2d(2, 8, 3, padding=1)), cfg)
    x = torch.relu(torch.randn(4, 2, 256, 256))
    g = torch.randn(4, 8, 256, 256) + 3.0  # one-signed: the sum grows with the length
    layer(x).backward(g)
    columns = layer[0].plan.grad_output_weight(g.movedim(1, -1).reshape(-1, 8))
    exact = columns.double().sum(0)
    error = (layer[0].bias.grad.double() - exact).abs().max() / exact.abs().max()
    assert float(error) < 1e-6, float(error)


class TestQATEquivalence:
    """``grad_quantizer=None`` gives exactly the autograd gradient of the fake-quantized forward
    with straight-through rounding."""

    def test_linear(self):
        cfg = FQTConfig.preset("qat")
        ref = nn.Linear(6, 4)
        fqt = FQTLinear(copy.deepcopy(ref), cfg)
        qi, qw = (
            get_quantizer("ptq", 8, rounding="nearest"),
            get_quantizer("symmetric", 8, rounding="nearest"),
        )

        class FakeQuant(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = ref

            def forward(self, x):
                return F.linear(fake_quant_ste(x, qi), fake_quant_ste(ref.weight, qw), ref.bias)

        x = torch.randn(9, 6)
        g = torch.randn(9, 4)
        assert_same(grads_of(FakeQuant(), x, g), grads_of(fqt, x, g))

    def test_conv(self):
        cfg = FQTConfig.preset("qat", weight_quantizer="symmetric_per_row", input_bits=5)
        ref = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        fqt = FQTConv2d(copy.deepcopy(ref), cfg)
        qi = get_quantizer("ptq", 5, rounding="nearest")
        qw = get_quantizer("symmetric_per_row", 8, rounding="nearest")

        class FakeQuant(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = ref

            def forward(self, x):
                w = fake_quant_ste(ref.weight, qw)
                return F.conv2d(fake_quant_ste(x, qi), w, ref.bias, 2, 1)

        x = torch.randn(2, 3, 8, 8)
        g = torch.randn(2, 4, 4, 4)
        assert_same(grads_of(FakeQuant(), x, g), grads_of(fqt, x, g))


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def net_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.slow
class TestUnbiasedNetworkGradient:
    """docs/method.md §3: on a fixed batch, the mean FQT gradient equals the QAT gradient; the
    test is a z-test with standard errors measured from the draws, and it catches a biased
    quantizer."""

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls):
        torch.manual_seed(0)
        net = SmallNet()
        x, y = torch.randn(12, 2, 6, 6), torch.randint(0, 5, (12,))
        qat = net_gradient(quantize_model(copy.deepcopy(net), FQTConfig.preset("qat")), x, y)
        return net, x, y, qat

    def sample(self, setup, cfg, count):
        net, x, y, _ = setup
        model = quantize_model(copy.deepcopy(net), cfg)
        return torch.stack([net_gradient(model, x, y) for _ in range(count)])

    @pytest.mark.parametrize("preset", ["ptq4", "psq4", "bhq4", "bhq2"])
    def test_fqt_mean_is_qat(self, setup, preset):
        samples = self.sample(setup, FQTConfig.preset(preset, seed=3), 400)
        z = projection_z(samples, setup[3])
        assert z.abs().max() < z_limit(z.numel()), z
        assert (samples.std(0) > 0).any()  # the gradient really was noisy

    def test_nearest_rounding_is_caught(self, setup):
        cfg = FQTConfig.preset("psq2", grad_rounding="nearest", grad_weight_bits=2)
        z = projection_z(self.sample(setup, cfg, 20), setup[3])
        assert z.abs().max() > z_limit(z.numel())


class Recording(Quantizer):
    """``inner``, remembering the generator state each draw starts from."""

    def __init__(self, inner: Quantizer) -> None:
        super().__init__(inner.bits, rounding=inner.rounding, fused=inner.fused)
        self.inner, self.state = inner, None

    def encode(self, x, generator=None):
        self.state = generator.get_state()
        return self.inner.encode(x, generator)

    def variance_bound(self, x):
        return self.inner.variance_bound(x)


class Replaying(Recording):
    """``inner``, drawing again from the state ``recording`` last started from: both backward
    branches reusing one draw, the bug :class:`TestBranchIndependence` must catch."""

    def __init__(self, inner: Quantizer, recording: Recording) -> None:
        super().__init__(inner)
        self.recording = recording

    def encode(self, x, generator=None):
        generator.set_state(self.recording.state)
        return self.inner.encode(x, generator)


def branch_plan(backend: str, shared: bool) -> FQTPlan:
    """8-bit nearest forward; 4-bit PSQ for ``grad_input``, 4-bit per-column for
    ``grad_weight``, with their own draws or (``shared``) the same uniforms."""
    grad_input_q, grad_weight_q = get_quantizer("psq", 4), get_quantizer("per_column", 4)
    if shared:
        grad_input_q = Recording(grad_input_q)
        grad_weight_q = Replaying(grad_weight_q, grad_input_q)
    return FQTPlan(
        input=get_quantizer("ptq", 8, rounding="nearest"),
        weight=get_quantizer("symmetric", 8, rounding="nearest"),
        grad_output=grad_input_q,
        grad_output_weight=grad_weight_q,
        backend=backend,
    )


def branch_sums(backend: str, layer: str, shared: bool, draws: int) -> tuple[torch.Tensor, ...]:
    """Per backward pass of one forward, the sums of the ``grad_input`` and ``grad_weight``
    errors against QAT. Inputs and weights are positive, so each sum weighs every rounding
    error of its branch's ``Q(grad_output)`` positively."""
    g = torch.Generator().manual_seed(0)
    if layer == "linear":
        x, w = torch.rand(48, 16, generator=g) + 0.5, torch.rand(12, 16, generator=g) + 0.5
        grad_output = torch.randn(48, 12, generator=g)

        def forward(plan, generator):
            return fqt_linear(x, w, None, plan, generator)
    else:
        x, w = torch.rand(4, 3, 7, 6, generator=g) + 0.5, torch.rand(5, 3, 3, 3, generator=g) + 0.5
        grad_output = torch.randn(4, 5, 7, 6, generator=g)
        ops = ConvOps((1, 1), (1, 1), (1, 1), 1)

        def forward(plan, generator):
            return fqt_conv(x, w, None, ops, plan, generator)

    x.requires_grad_(True)
    w.requires_grad_(True)
    plan = branch_plan(backend, shared)
    qat = torch.autograd.grad(forward(plan.exact_backward(), None), [x, w], grad_output)
    out = forward(plan, torch.Generator().manual_seed(1))
    sums = []
    for _ in range(draws):
        grads = torch.autograd.grad(out, [x, w], grad_output, retain_graph=True)
        sums.append([float((a - b).double().sum()) for a, b in zip(grads, qat, strict=True)])
    return tuple(torch.tensor(sums, dtype=torch.float64).T)


class TestBranchIndependence:
    """docs/method.md §2: ``grad_output`` is quantized twice, independently. The two branches'
    errors are then uncorrelated: ``E[S_in · S_w] = 0`` for the sums ``S`` of the
    ``grad_input`` and ``grad_weight`` errors (equivalently ``Var(S_in + S_w) = Var S_in +
    Var S_w``), tested with the standard error measured from the draws. Reusing one draw for both
    makes each rounding error of one branch move with one of the other (both rise with the shared
    uniform): a correlation of about 1/2, caught as well, even where the two branches lay the
    same uniforms out on different entries (a convolution's columns are (N·H·W, C))."""

    LIMIT = z_limit(8)  # every case below, both sides

    @staticmethod
    def correlation_z(backend: str, layer: str, shared: bool) -> float:
        s_in, s_w = branch_sums(backend, layer, shared, draws=200)
        product = s_in * s_w
        t = product.mean() / (product.std() / math.sqrt(product.numel()))
        return float(t_as_z(t, product.numel()))

    @pytest.mark.parametrize("backend", ["simulate", "int8"])
    @pytest.mark.parametrize("layer", ["linear", "conv2d"])
    def test_branch_errors_uncorrelated(self, backend, layer):
        assert abs(self.correlation_z(backend, layer, shared=False)) < self.LIMIT

    @pytest.mark.parametrize("backend", ["simulate", "int8"])
    @pytest.mark.parametrize("layer", ["linear", "conv2d"])
    def test_shared_draws_are_caught(self, backend, layer):
        assert self.correlation_z(backend, layer, shared=True) > self.LIMIT


class TestNoise:
    """Each layer owns a generator seeded from the config seed and its name: the same seed gives
    the same gradients, while layers and successive steps draw different noise."""

    def test_same_seed_same_gradients(self):
        net = SmallNet()
        x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
        a = quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq4", seed=7))
        b = quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq4", seed=7))
        assert torch.equal(net_gradient(a, x, y), net_gradient(b, x, y))
        c = quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq4", seed=8))
        assert not torch.equal(net_gradient(a, x, y), net_gradient(c, x, y))

    def test_steps_and_layers_differ(self):
        layer = nn.Linear(8, 8)
        a = FQTLinear(layer, FQTConfig.preset("psq4"), name="a")
        b = FQTLinear(layer, FQTConfig.preset("psq4"), name="b")
        x, g = torch.randn(16, 8), torch.randn(16, 8)
        g1, g2, g3 = (grads_of(m, x, g)[2][0] for m in (a, a, b))
        assert not torch.equal(g1, g2)
        assert not torch.equal(g1, g3)

    def test_generator_state_roundtrip(self):
        model = quantize_model(SmallNet(), FQTConfig.preset("psq4"))
        x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
        net_gradient(model, x, y)
        states = fqtorch.generator_states(model)
        assert set(states) == {"conv", "fc1", "fc2"}
        first = net_gradient(model, x, y)
        fqtorch.load_generator_states(model, states)
        assert torch.equal(first, net_gradient(model, x, y))
        with pytest.raises(KeyError, match="not FQT layers"):
            fqtorch.load_generator_states(model, {"nope": states["fc1"]})

    def test_generator_states_restore_layers_that_had_not_drawn(self):
        """A layer absent from the saved states had not drawn: loading restarts its stream
        (it kept the stream it had drawn from since, silently, before)."""
        model = quantize_model(SmallNet(), FQTConfig.preset("psq4"))
        x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
        fresh = net_gradient(model, x, y)
        states = fqtorch.generator_states(model)
        del states["fc2"]  # as if fc2 had not drawn when they were saved
        fqtorch.load_generator_states(model, {})
        assert fqtorch.generator_states(model) == {}
        assert torch.equal(fresh, net_gradient(model, x, y))
        fqtorch.load_generator_states(model, states)
        assert set(fqtorch.generator_states(model)) == {"conv", "fc1"}

    def test_reseed_changes_stream(self):
        model = quantize_model(SmallNet(), FQTConfig.preset("psq4"))
        x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
        fqtorch.reseed(model, 1)
        a = net_gradient(model, x, y)
        fqtorch.reseed(model, 2)
        b = net_gradient(model, x, y)
        fqtorch.reseed(model, 1)
        assert torch.equal(a, net_gradient(model, x, y)) and not torch.equal(a, b)


def plan_reference(layer: FQTLinear, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype):
    """A Linear layer's output and gradients computed by hand from its plan (docs/method.md §2,
    §9): the forward GEMM in ``dtype`` on the quantized operands; the backward GEMMs in float32
    on those same operands, ``Q(grad_output)`` drawn from a fresh generator of the layer's seed,
    the ``grad_input`` branch first."""
    plan = layer.plan
    gen = torch.Generator().manual_seed(layer_seed(layer.config.seed, layer.name))
    x_q = plan.input(x.detach()).to(dtype)
    w_q = plan.weight(layer.weight.detach()).to(dtype)
    out = F.linear(x_q, w_q, layer.bias.detach().to(dtype))
    grad_input = plan.grad_output(g.float(), gen) @ w_q.float()
    grad_columns = plan.grad_output_weight(g.float(), gen)
    return out, grad_input, grad_columns.T @ x_q.float(), grad_columns.sum(0)


class TestDtypesAndLayouts:
    """float32, bfloat16 (cast and autocast), channels-last, a single sample: each compared with
    what the plan gives computed another way."""

    def test_bfloat16_layer_is_the_plan(self):
        """A bf16 layer: bf16 forward on the quantized operands; float32 backward GEMMs on the
        same operands, rounded to bf16 only as the gradients' dtype."""
        layer = FQTLinear(nn.Linear(6, 5), FQTConfig.preset("psq4", seed=2), name="fc")
        layer = layer.to(torch.bfloat16)
        x = torch.randn(9, 6).to(torch.bfloat16).requires_grad_(True)
        g = torch.randn(9, 5).to(torch.bfloat16)
        out = layer(x)
        out.backward(g)
        expected = plan_reference(layer, x, g, torch.bfloat16)
        got = (out, x.grad, layer.weight.grad, layer.bias.grad)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))

    def test_autocast_layer_is_the_plan(self):
        """Under bf16 autocast: the forward GEMM in bf16, the output float32 for a float32
        input, the backward GEMMs in float32 on the forward's (bf16) quantized operands."""
        layer = FQTLinear(nn.Linear(6, 5), FQTConfig.preset("psq4", seed=2), name="fc")
        x = torch.randn(9, 6, requires_grad=True)
        g = torch.randn(9, 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.backward(g)
        expected = plan_reference(layer, x, g, torch.bfloat16)
        got = (out, x.grad, layer.weight.grad, layer.bias.grad)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b.float())

    def test_a_float64_layer_under_autocast_stays_float64(self):
        """Autocast leaves float64 tensors alone (not an eligible dtype), so the exact preset's
        float64 layer gives the float layer's float64 values under it (it ran the product in
        bf16: off by 2.8e-3)."""
        torch.manual_seed(0)
        base = nn.Linear(6, 5).double()
        layer = FQTLinear(copy.deepcopy(base), FQTConfig.preset("exact"), name="fc")
        x = torch.randn(9, 6, dtype=torch.float64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, expected = layer(x), base(x)
        assert got.dtype == torch.float64 and torch.equal(got, expected)

    def test_a_block_format_input_near_float16_s_top_stays_finite(self):
        """NVFP4 rounds 64550 (finite in float16) up to 67584: under float16 autocast the cast
        saturates at 65504 instead of making the output infinite where the float layer's is
        finite."""
        torch.manual_seed(0)
        layer = quantize_model(nn.Linear(16, 4), FQTConfig.preset("nvfp4_sr"))
        x = torch.randn(8, 16)
        x[0, 0] = 64550.0
        assert layer.plan.input(x).max() > torch.finfo(torch.float16).max  # the case at hand
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(layer(x)).all()
        # only finite values saturate: an infinity or NaN must reach the run's checks
        from fqtorch.backends.simulate import _saturated

        t = torch.tensor([7e4, -7e4, math.inf, -math.inf, math.nan, 1.5])
        got = _saturated(t, torch.float16)
        assert got[:4].tolist() == [65504.0, -65504.0, math.inf, -math.inf]
        assert got[4].isnan() and got[5] == 1.5 and got.dtype == torch.float16

    def test_bfloat16_model(self):
        """A bf16 model gives the float32 model's values to bf16 precision: its activations and
        the gradients between layers are rounded to bf16, which moves a few codes by a step."""
        net = SmallNet()
        x = torch.randn(4, 2, 6, 6)
        models = [quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq5")) for _ in range(2)]
        models[0].to(torch.bfloat16)
        results = []
        for model, dtype in zip(models, (torch.bfloat16, torch.float32), strict=True):
            out = model(x.to(dtype))
            assert out.dtype == dtype
            out.float().logsumexp(-1).mean().backward()
            results.append((out.detach().float(), [p.grad for p in model.parameters()]))
        (out_bf16, grads_bf16), (out_fp32, grads_fp32) = results
        torch.testing.assert_close(out_bf16, out_fp32, rtol=0.05, atol=0.05)
        for bf16, fp32 in zip(grads_bf16, grads_fp32, strict=True):
            assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()
            assert (bf16.float() - fp32).norm() < 0.25 * fp32.norm()

    def test_autocast(self):
        model = quantize_model(SmallNet(), FQTConfig.preset("psq5"))
        x = torch.randn(4, 2, 6, 6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            bf16_out = model.conv(x.to(torch.bfloat16))
        assert bf16_out.dtype == torch.bfloat16  # bf16 activations stay bf16, as autocast does
        # float32 activations stay float32 (their gradients are not rounded between layers); the
        # GEMMs themselves ran in bf16, so the output is the float32 run's to bf16 precision
        assert out.dtype == torch.float32
        reference = model(x)
        assert not torch.equal(out, reference)
        torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
        out.sum().backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())

    def test_channels_last(self):
        conv = nn.Conv2d(3, 6, 3, padding=1)
        a = FQTConv2d(conv, FQTConfig.preset("bhq4", seed=1), name="c")
        b = FQTConv2d(copy.deepcopy(conv), FQTConfig.preset("bhq4", seed=1), name="c")
        x = torch.randn(4, 3, 8, 8)
        ga = grads_of(a, x)
        gb = grads_of(
            b.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        )
        # the same codes and noise; the NHWC convolution sums in another order (float rounding)
        for got, expected in zip((gb[0], gb[1], *gb[2]), (ga[0], ga[1], *ga[2]), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # and the output stays channels-last, as the float layer's does: the layers after it
        # would run NCHW otherwise (the quantized input came back NCHW)
        with torch.no_grad():
            out = b(x.to(memory_format=torch.channels_last))
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        # as ATen decides it: a channels-last weight with an NCHW input, and a 1-channel input
        # (contiguous either way: its strides say which), as after model.to(channels_last)
        for c_in, input_too in ((3, False), (1, True), (1, False)):
            float_conv = nn.Conv2d(c_in, 6, 3, padding=1).to(memory_format=torch.channels_last)
            layer = FQTConv2d(copy.deepcopy(float_conv), FQTConfig.preset("bhq4"), name="c")
            xi = torch.randn(4, c_in, 8, 8)
            if input_too:
                xi = xi.to(memory_format=torch.channels_last)
            with torch.no_grad():
                assert float_conv(xi).stride() == layer(xi).stride() == (384, 1, 48, 6)

    @pytest.mark.parametrize("n", [1, 2])
    def test_tiny_batches(self, n):
        """One or two samples: BHQ on at most two rows is PSQ (the same gradients from the
        same seed), and the FQT gradient's mean is the QAT gradient."""
        net = SmallNet()
        x, y = torch.randn(n, 2, 6, 6), torch.randint(0, 5, (n,))
        bhq = quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq4"))
        psq = quantize_model(copy.deepcopy(net), FQTConfig.preset("psq4"))
        assert torch.equal(net_gradient(bhq, x, y), net_gradient(psq, x, y))
        qat = net_gradient(quantize_model(copy.deepcopy(net), FQTConfig.preset("qat")), x, y)
        samples = torch.stack([net_gradient(bhq, x, y) for _ in range(200)])
        assert torch.isfinite(samples).all() and (samples.std(0) > 0).any()
        z = projection_z(samples, qat)
        assert z.abs().max() < z_limit(2 * z.numel()), z

    def test_input_without_grad_skips_activation_branch(self):
        """No ``grad_input`` to compute: its quantizer draws nothing, so the weight branch takes
        the first draw of the layer's generator."""
        layer = FQTLinear(nn.Linear(4, 3), FQTConfig.preset("psq4"), name="fc")
        x, g = torch.randn(5, 4), torch.randn(5, 3)
        layer(x).backward(g)
        gen = torch.Generator().manual_seed(layer_seed(0, "fc"))
        grad_columns = layer.plan.grad_output_weight(g, gen)
        assert torch.equal(layer.weight.grad, grad_columns.T @ layer.plan.input(x))
        assert torch.equal(layer.bias.grad, grad_columns.sum(0))


class TestNonFiniteGradients:
    """Documented policy: by default NaN/Inf in ``grad_output`` propagates as NaN (never finite
    garbage); with ``check_finite=True`` the layer raises and names itself."""

    def test_propagates_as_nan(self):
        layer = FQTLinear(nn.Linear(4, 3), FQTConfig.preset("psq4"), name="head")
        x = torch.randn(5, 4, requires_grad=True)
        g = torch.randn(5, 3)
        g[1, 1] = float("inf")
        layer(x).backward(g)
        assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[0]).all()
        assert torch.isnan(layer.weight.grad).any()

    def test_raises_when_checked(self):
        layer = FQTLinear(nn.Linear(4, 3), FQTConfig.preset("psq4", check_finite=True), name="head")
        g = torch.full((5, 3), float("nan"))
        with pytest.raises(FloatingPointError, match="'head'"):
            layer(torch.randn(5, 4)).backward(g)

    def test_wrong_input_shape(self):
        layer = FQTLinear(nn.Linear(4, 3), FQTConfig(), name="fc")
        with pytest.raises(ValueError, match=r"\(\*, 4\)"):
            layer(torch.randn(2, 5))
        conv = FQTConv2d(nn.Conv2d(3, 4, 3), FQTConfig(), name="c")
        with pytest.raises(ValueError, match="3 input channels"):
            conv(torch.randn(2, 2, 5, 5))


def compare_with_cpu_plan(device: str) -> None:
    """On ``device``, the CPU's QAT gradient (to float32 rounding: the forward quantization is
    deterministic), and FQT gradients whose mean is that CPU QAT gradient (a device draws
    other noise than the CPU, so only the mean can be compared)."""
    net = SmallNet()
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 5, (8,))
    qat_cpu = net_gradient(quantize_model(copy.deepcopy(net), FQTConfig.preset("qat")), x, y)
    x_dev, y_dev = x.to(device), y.to(device)
    qat = quantize_model(copy.deepcopy(net), FQTConfig.preset("qat")).to(device)
    qat_dev = net_gradient(qat, x_dev, y_dev)
    assert qat_dev.device.type == device
    scale = float(qat_cpu.abs().max())
    torch.testing.assert_close(qat_dev.cpu(), qat_cpu, rtol=1e-4, atol=1e-5 * scale)
    model = quantize_model(copy.deepcopy(net), FQTConfig.preset("bhq4")).to(device)
    samples = torch.stack([net_gradient(model, x_dev, y_dev).cpu() for _ in range(200)])
    assert torch.isfinite(samples).all() and (samples.std(0) > 0).any()
    z = projection_z(samples, qat_cpu)
    assert z.abs().max() < z_limit(z.numel()), z


@pytest.mark.cuda
def test_cuda_layer_matches_cpu_plan(monkeypatch):
    # TF32 would round the float32 GEMM operands to 10-bit mantissas (docs/method.md §9).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare_with_cpu_plan("cuda")


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(4, 3), (0, 4)),
        (lambda: nn.Linear(4, 3), (2, 0, 4)),
        (lambda: nn.Conv1d(2, 3, 3, padding=1), (0, 2, 5)),
        (lambda: nn.Conv2d(2, 3, 3, stride=2), (0, 2, 6, 6)),
        (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (0, 2, 6, 6)),
    ],
)
@pytest.mark.parametrize("backend", ["simulate", "int8"])
def test_an_empty_batch_runs_like_the_float_layer(make, shape, backend):
    """nn.Linear and nn.Conv take an empty batch; so do their FQT layers (it failed reshaping
    the empty gradient into quantizer rows): an empty output, zero weight gradients."""
    base = make()
    fqt = quantize_model(
        nn.Sequential(copy.deepcopy(base)), FQTConfig.preset("bhq5", backend=backend)
    )
    x = torch.zeros(shape, requires_grad=True)
    out, ref = fqt(x), base(x)
    assert out.shape == ref.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert not fqt[0].weight.grad.any()


def test_an_empty_batch_under_autocast_keeps_the_input_dtype():
    """Under autocast the FQT layers return the input's dtype (float32 for float32
    activations); an empty batch too, not autocast's bf16."""
    fqt = quantize_model(
        nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (3, 1, 1)), nn.Conv2d(3, 2, 1)),
        FQTConfig.preset("bhq5"),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fqt(torch.randn(2, 4)).dtype == torch.float32
        assert fqt(torch.randn(0, 4)).dtype == torch.float32


def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of a gradient penalty (WGAN-GP, R1): a second derivative."""
    x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    params = list(model.parameters())
    grads = torch.autograd.grad(dx.pow(2).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


@pytest.mark.parametrize(
    "preset,backend", [("qat", "simulate"), ("psq4", "simulate"), ("psq4", "int8")]
)
def test_second_derivatives_through_quantized_gemms_are_refused(preset, backend):
    """They were silently wrong (saved codes cut off from autograd): one clear error instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    model = quantize_model(model, FQTConfig.preset(preset, backend=backend))
    with pytest.raises(RuntimeError, match=r"FQT layer '2': a second derivative .* not defined"):
        _penalty_grads(model, torch.randn(5, 6))


@pytest.mark.parametrize("case", ["even-kernel-same-padding", "bf16-autocast", "switched"])
def test_second_derivatives_through_operands_the_layer_made_are_refused(case):
    """Where the exact preset's saved operands are not the ones that came in (padded or cast
    inside the layer), or the forward was quantized and the config switched to exact before the
    backward, the second derivative was silently wrong (their cross terms missing)."""
    torch.manual_seed(0)
    if case == "even-kernel-same-padding":
        model = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), nn.Tanh(), nn.Conv2d(4, 1, 1))
        x = torch.randn(2, 3, 6, 6)
    else:
        model, x = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)), torch.randn(5, 6)
    preset = "psq8" if case == "switched" else "exact"
    model = quantize_model(model, FQTConfig.preset(preset))
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16-autocast"):
        out = model(x).float().sum()
    if case == "switched":
        for layer in fqtorch.fqt_modules(model).values():
            layer.config = FQTConfig.preset("exact")
    with pytest.raises(RuntimeError, match="a second derivative .* cast \\(autocast\\) or padded"):
        torch.autograd.grad(out, x, create_graph=True)


def test_second_derivatives_of_the_exact_preset_are_the_float_model_s():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 6)
    model = quantize_model(copy.deepcopy(base), FQTConfig.preset("exact"))
    for got, expected in zip(_penalty_grads(model, x), _penalty_grads(base, x), strict=True):
        torch.testing.assert_close(got, expected)


def test_assigning_a_layer_config_rebuilds_its_quantizers():
    """``layer.config = ...`` was accepted and silently did nothing (the plan stayed)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = quantize_model(copy.deepcopy(base), FQTConfig.preset("ptq2", seed=1))
    x, g = torch.randn(8, 6), torch.randn(8, 4)
    layer.config = FQTConfig.preset("exact")
    assert layer.plan.exact
    assert_same(grads_of(layer, x, g), grads_of(base, x, g))
    layer.config = FQTConfig.preset("psq4", seed=1)
    first = grads_of(layer, x, g)
    layer.config = FQTConfig.preset("psq4", seed=2)  # a new seed restarts the stream from it
    twin = quantize_model(copy.deepcopy(base), FQTConfig.preset("psq4", seed=2))
    expected = grads_of(twin, x, g)
    assert_same(grads_of(layer, x, g), expected)
    assert not torch.equal(first[1], expected[1])
    with pytest.raises(TypeError, match="config must be an FQTConfig"):
        layer.config = {"grad_bits": 4}


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Linear(8, 4), (2, 8)),
        (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6)),
        (lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), (2, 5, 8)),
    ],
    ids=["linear", "conv2d", "encoder-layer"],
)
def test_meta_tensors_infer_shapes_as_the_float_model_does(make, shape):
    """A forward on the meta device (shape inference) has no values to quantize; it failed
    inside autocast's device lookup."""
    base = make()
    model = quantize_model(nn.Sequential(copy.deepcopy(base)), FQTConfig.preset("psq4"))
    x = torch.ones(shape, device="meta")
    got, expected = model.to("meta")(x), base.to("meta")(x)
    assert got.is_meta and (got.shape, got.dtype) == (expected.shape, expected.dtype)


def test_attention_config_assignment_reaches_out_proj():
    mha = quantize_model(nn.MultiheadAttention(8, 2), FQTConfig.preset("psq4"))
    mha.config = FQTConfig.preset("exact")
    assert mha.plan.exact and mha.out_proj.plan.exact
    mha.out_proj.config = FQTConfig.preset("bhq5")  # its own, afterwards
    assert mha.out_proj.config.grad_quantizer == "bhq" and mha.plan.exact


def test_meta_tensors_with_attention_products():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = quantize_model(layer, FQTConfig.preset("psq4", attention_products=True))
    out = model.to("meta")(torch.ones(2, 5, 8, device="meta"))
    assert out.is_meta and out.shape == (2, 5, 8)


def test_an_adopted_attribute_may_not_shadow_the_fqt_layer_s_methods():
    """A source attribute named like an FQT layer's method (``generator``) shadowed it: the
    backward then called a torch.Generator (TypeError deep inside autograd)."""
    source = nn.Linear(4, 3)
    source.generator = torch.Generator()
    with pytest.raises(TypeError, match=r"attributes \['generator'\] clash with the FQT layer"):
        FQTLinear(source, FQTConfig.preset("psq4"))


def test_layers_pickled_before_config_became_a_property_load():
    import pickle

    layer = quantize_model(nn.Linear(4, 3), FQTConfig.preset("psq4"))
    state = layer.__dict__
    state["config"] = state.pop("_config")  # as a whole-module pickle from before kept it
    loaded = pickle.loads(pickle.dumps(layer))
    assert loaded.config == FQTConfig.preset("psq4")
    assert "_config" in vars(loaded) and "config" not in vars(loaded)
