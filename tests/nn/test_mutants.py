"""Properties of the FQT layers that mutation testing (scripts/mutation.sh, docs/testing.md) found
unchecked: the functional form's explicit generator, the int8 fallbacks, ``to_float`` round trips,
transformers-style transposed linears, and the errors a bad input gets."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, quantize_model
from fqtorch.backends import int8
from fqtorch.nn import FQTConv2d, FQTLinear, FQTPlan, fqt_linear
from fqtorch.nn.modules import FQTTransposedLinear, layer_seed
from tests.helpers import warnings_as_errors

EXACT = FQTConfig(
    input_quantizer="identity",
    weight_quantizer="identity",
    grad_quantizer="identity",
    grad_weight_quantizer="identity",
)


def input_grad(out_fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    out_fn(x).backward(g)
    return x.grad


def saved_dtypes(out_fn, x: torch.Tensor) -> set[torch.dtype]:
    """The dtypes of what autograd keeps from a forward of ``out_fn(x)``."""
    dtypes = set()

    def pack(t):
        dtypes.add(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out_fn(x.requires_grad_(True))
    return dtypes


class TestFunctionalGenerator:
    """``fqt_linear(..., generator=g)`` draws its rounding noise from ``g`` alone."""

    def test_same_generator_state_same_gradient(self):
        plan = FQTPlan.from_config(FQTConfig.preset("psq2"))
        weight = torch.randn(6, 9)
        x, g = torch.randn(8, 9), torch.randn(8, 6)

        def grad(seed: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(seed)
            return input_grad(lambda t: fqt_linear(t, weight, None, plan, generator), x, g)

        first = grad(0)
        torch.rand(100)  # the global stream moves on; the explicit one does not care
        torch.testing.assert_close(grad(0), first, rtol=0, atol=0)
        assert not torch.equal(grad(1), first)


class TestFallbacks:
    """Where the integer kernels cannot run, the layer says so once and runs simulate."""

    def test_linear_shape_without_int_mm_falls_back_to_simulate(self, monkeypatch):
        monkeypatch.setattr(int8, "int_mm_supported", lambda *args: False)
        base = nn.Linear(9, 5)
        x, g = torch.randn(7, 9), torch.randn(7, 5)
        layers = [
            quantize_model(
                copy.deepcopy(base), FQTConfig.preset("psq4", backend=backend, fused=False)
            )
            for backend in ("simulate", "int8")
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = [input_grad(layer, x, g) for layer in layers]
        ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(ours) == 1
        assert "(7, 9) x (5, 9)" in str(ours[0].message) and "simulate" in str(ours[0].message)
        # attributed to the caller's code (this file), not to fqtorch's or torch's modules
        assert ours[0].filename == __file__
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)

    def test_int8_conv_runs_on_integers_and_matches_simulate(self):
        base = nn.Conv2d(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 6, 5)
        g = torch.randn(2, 4, 6, 5)
        grads = []
        for backend in ("simulate", "int8"):
            cfg = FQTConfig.preset("psq4", backend=backend, fused=False)
            layer = quantize_model(copy.deepcopy(base), cfg)
            with warnings_as_errors():  # no fallback to simulate
                grads.append(input_grad(layer, x, g))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("functional", [False, True])
    def test_int8_config_reaches_the_plan(self, functional):
        """An int8 config runs the integer path (it keeps int8 codes for the backward), whether
        through a layer or through ``fqt_linear`` with ``FQTPlan.from_config``."""
        cfg = FQTConfig.preset("psq4", backend="int8")
        base = nn.Linear(9, 5)
        if functional:
            plan = FQTPlan.from_config(cfg)
            assert plan.backend == "int8"

            def layer(t):
                return fqt_linear(t, base.weight, base.bias, plan, torch.Generator())

        else:
            layer = quantize_model(base, cfg)
        assert torch.int8 in saved_dtypes(layer, torch.randn(4, 9))


class TestToFloat:
    """``to_float()`` gives back a float layer that behaves as the source did."""

    @pytest.mark.parametrize(
        "make,shape",
        [
            (lambda: nn.Linear(5, 3), (4, 5)),
            (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), (2, 2, 7, 7)),
        ],
    )
    def test_round_trip_keeps_attributes_and_outputs(self, make, shape):
        source = make()
        x = torch.randn(*shape)
        expected = source(x)
        attrs = {k: v for k, v in vars(source).items() if not k.startswith("_")}
        back = quantize_model(copy.deepcopy(source), FQTConfig.preset("bhq4")).to_float()
        assert type(back) is type(source)
        assert {k: v for k, v in vars(back).items() if not k.startswith("_")} == attrs
        torch.testing.assert_close(back(x), expected)


class TestObservers:
    def test_observer_sees_the_gradient_the_quantizers_see(self):
        layer = FQTLinear(nn.Linear(6, 4), FQTConfig.preset("psq4"))
        x, g = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
        seen = []
        with layer.observe_grad_output(seen.append):
            input_grad(layer, x, g)
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], g.reshape(6, 4))


class TestNames:
    def test_layer_seeds_are_63_bit_and_differ_by_name_and_seed(self):
        """Seeds stay in ``[0, 2**63)`` (what ``torch.Generator.manual_seed`` and checkpoints
        expect) and differ between layers and between runs."""
        seeds = [layer_seed(seed, f"layers.{i}") for seed in range(4) for i in range(64)]
        assert all(0 <= s < 2**63 for s in seeds)
        assert len(set(seeds)) == len(seeds)
        assert max(seeds) >= 2**62  # all 63 bits are used, not a narrower hash

    def test_attribute_clash_is_one_clear_error(self):
        class Odd(nn.Linear):
            def __init__(self) -> None:
                super().__init__(3, 2)
                self.plan = "mine"  # an FQT layer's own attribute

        with pytest.raises(TypeError, match=r"cannot convert .*Odd to FQTLinear.*\['plan'\]"):
            FQTLinear(Odd(), EXACT)

    def test_layer_built_directly_draws_the_noise_of_a_converted_root(self):
        """A layer built without a name is the root of its model: it draws the same noise as
        ``quantize_model`` gives a bare layer (whose qualified name is empty)."""
        cfg = FQTConfig.preset("psq2", seed=3)
        base = nn.Linear(6, 4)
        x, g = torch.randn(5, 6), torch.randn(5, 4)
        direct = input_grad(FQTLinear(copy.deepcopy(base), cfg), x, g)
        converted = input_grad(quantize_model(copy.deepcopy(base), cfg), x, g)
        torch.testing.assert_close(direct, converted, rtol=0, atol=0)

    def test_conv_error_names_the_layer_class(self):
        layer = FQTConv2d(nn.Conv2d(2, 3, 3), EXACT, name="blocks.0")
        with pytest.raises(ValueError, match=r"^FQTConv2d 'blocks.0' expects input of 4 dims"):
            layer(torch.randn(2, 3))


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` layout (GPT-2): weight ``(nx, nf)``, ``out = x @ weight + bias``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class TestTransposedLinear:
    def test_exact_plan_is_the_float_layer(self):
        source = Conv1D(nf=4, nx=6)
        layer = FQTTransposedLinear(copy.deepcopy(source), EXACT)
        x, g = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
        for module in (source, layer):
            module.zero_grad()
        grads = [input_grad(module, x, g) for module in (source, layer)]
        torch.testing.assert_close(grads[1], grads[0])
        torch.testing.assert_close(layer(x), source(x))
        torch.testing.assert_close(layer.weight.grad, source.weight.grad)
        torch.testing.assert_close(layer.bias.grad, source.bias.grad)

    def test_quantized_forward_quantizes_output_features_as_rows(self):
        """The weight quantizer sees ``weight.T`` (rows = output features), as for Linear."""
        source = Conv1D(nf=4, nx=6)
        cfg = FQTConfig.preset("psq4", weight_quantizer="symmetric_per_row", weight_bits=2)
        layer = FQTTransposedLinear(copy.deepcopy(source), cfg)
        linear = nn.Linear(6, 4)
        with torch.no_grad():
            linear.weight.copy_(source.weight.T)
            linear.bias.copy_(source.bias)
        reference = FQTLinear(linear, cfg)
        x = torch.randn(5, 6)
        torch.testing.assert_close(layer(x), reference(x))

    @pytest.mark.parametrize(
        "source",
        [nn.Identity(), Conv1D(nf=4, nx=6)],
        ids=["no weight", "bad layout"],
    )
    def test_refuses_other_layers_by_name(self, source):
        if isinstance(source, Conv1D):
            source.nx = 5  # the weight no longer has the (nx, nf) layout
        with pytest.raises(TypeError, match=f"got {type(source).__name__}$"):
            FQTTransposedLinear(source, EXACT)

    def test_wrong_input_width_is_one_clear_line(self):
        layer = FQTTransposedLinear(Conv1D(nf=4, nx=6), EXACT, name="h.0.attn")
        with pytest.raises(ValueError, match=r"'h.0.attn' expects .*\(\*, 6\), got \(2, 5\)$"):
            layer(torch.randn(2, 5))

    def test_bias_reaches_the_output(self):
        source = Conv1D(nf=4, nx=6)
        layer = FQTTransposedLinear(copy.deepcopy(source), EXACT)
        x = torch.randn(3, 6)
        without_bias = F.linear(x, source.weight.T)
        torch.testing.assert_close(layer(x) - without_bias, source.bias.expand(3, 4))


def test_linear_output_on_a_batch_of_rows_is_not_a_view():
    """FSDP2 warns, and an in-place op after the layer would drop its pre-backward hook, when a
    module returns a view; a reshape to the same shape returns one."""
    layer = FQTLinear(nn.Linear(6, 3), FQTConfig.preset("bhq5"), name="fc")
    assert not layer(torch.randn(4, 6))._is_view()
    assert layer(torch.randn(2, 4, 6)).shape == (2, 4, 3)


@pytest.mark.parametrize(
    "fqt_type,source,expected",
    [
        (FQTLinear, nn.Conv2d(2, 3, 1), "nn.Linear"),
        (FQTConv2d, nn.Linear(2, 3), "nn.Conv2d"),
        (FQTConv2d, nn.Conv1d(2, 3, 1), "nn.Conv2d"),
    ],
)
def test_an_fqt_layer_refuses_another_float_type(fqt_type, source, expected):
    with pytest.raises(TypeError, match=f"{fqt_type.__name__} converts an {expected}, got"):
        fqt_type(source, FQTConfig.preset("bhq5"), name="x")


def test_attention_refuses_another_float_type():
    from fqtorch.nn.attention import FQTMultiheadAttention

    with pytest.raises(TypeError, match="converts an nn.MultiheadAttention, got Linear"):
        FQTMultiheadAttention(nn.Linear(4, 4), FQTConfig.preset("bhq5"))


def test_a_warning_with_no_user_frame_names_the_outermost_one():
    """On a thread whose every Python frame is fqtorch's (autograd's worker threads call
    backward functions with no user frame below), a warning names the outermost frame, not
    ``sys:1``."""
    import _thread
    import os
    import time

    import fqtorch
    from fqtorch.quantizers.callers import user_stacklevel

    inside = os.path.join(os.path.dirname(fqtorch.__file__), "a_module.py")
    source = (
        "import warnings\n"
        "def run(said):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        warnings.warn('note', RuntimeWarning, stacklevel=user_stacklevel())\n"
        "    said.extend(caught)\n"
    )
    namespace = {"user_stacklevel": user_stacklevel}
    exec(compile(source, inside, "exec"), namespace)
    said: list = []
    _thread.start_new_thread(namespace["run"], (said,))
    for _ in range(500):
        if said:
            break
        time.sleep(0.01)
    assert len(said) == 1 and said[0].filename == inside, said
