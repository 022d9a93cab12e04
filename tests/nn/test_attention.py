"""FQTMultiheadAttention: nn.MultiheadAttention's results with quantization off, FQT GEMMs for its
projections (and, as an option, its attention products) with quantization on, and an unbiased
FQT gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fqtorch import FQTConfig, dequantize_model, fqt_modules, quantize_model, stats
from fqtorch.nn import FQTLinear, FQTMultiheadAttention

EXACT = FQTConfig.preset("exact")
E, HEADS, L, S, N = 8, 2, 5, 7, 3


def inputs(kind: str, batch_first: bool, kdim: int = E, vdim: int = E, batched: bool = True):
    """query, key, value as leaf tensors; ``kind`` keeps torch's identities: ``self`` (q is k is
    v), ``kv`` (k is v) or ``distinct``."""
    g = torch.Generator().manual_seed(1)

    def make(length: int, dim: int) -> torch.Tensor:
        shape = (N, length, dim) if batch_first else (length, N, dim)
        shape = shape if batched else (length, dim)
        return torch.randn(shape, generator=g).requires_grad_()

    query = make(L, E)
    if kind == "self":
        return query, query, query
    key = make(S, kdim)
    return (query, key, key) if kind == "kv" else (query, key, make(S, vdim))


def run(module, query, key, value, **kwargs):
    """Output, attention weights, and the gradients of the inputs and parameters."""
    tensors = list(dict.fromkeys([query, key, value]))  # each leaf once
    for t in tensors:
        t.grad = None
    module.zero_grad(set_to_none=True)
    output, weights = module(query, key, value, **kwargs)
    g = torch.Generator().manual_seed(2)
    output.backward(torch.randn(output.shape, generator=g))
    grads = [t.grad.clone() for t in tensors]
    grads += [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    return output.detach(), None if weights is None else weights.detach(), grads


def assert_same(a, b, exact: bool = True):
    """Outputs, weights and gradients equal (bit for bit when ``exact``; else to float32 rounding:
    16 ulps of each tensor's largest entry, since a different summation order errs by a few ulps
    of the sum's terms, not of a near-zero result)."""
    flat_a = [a[0], a[1], *a[2]]
    flat_b = [b[0], b[1], *b[2]]
    for x, y in zip(flat_a, flat_b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        elif exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            scale = float(y.abs().max()) if y.numel() else 0.0
            atol = 16 * torch.finfo(torch.float32).eps * scale
            torch.testing.assert_close(x, y, rtol=1e-5, atol=max(atol, 1e-6))


def causal(length: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(length)


def masks(case: str, batch_first: bool, kind: str) -> dict:
    src = L if kind == "self" else S
    g = torch.Generator().manual_seed(3)
    padding = torch.zeros(N, src, dtype=torch.bool)
    padding[0, -2:] = True  # the first sample's last two keys are padding
    if case == "none":
        return {}
    if case == "bool_2d":
        return {"attn_mask": torch.rand(L, src, generator=g) > 0.7}
    if case == "float_3d":
        return {"attn_mask": torch.randn(N * HEADS, L, src, generator=g)}
    if case == "padding":
        return {"key_padding_mask": padding}
    if case == "both":
        return {"attn_mask": torch.rand(L, src, generator=g) > 0.7, "key_padding_mask": padding}
    if case == "causal":
        return {"attn_mask": causal(L), "is_causal": True}
    if case == "causal_padding":  # a bool mask, the type of key_padding_mask
        return {"attn_mask": causal(L) != 0, "is_causal": True, "key_padding_mask": padding}
    raise AssertionError(case)


EXACT_CASES = [
    # (constructor kwargs, input kind, mask case, call kwargs)
    (dict(), "self", "none", dict()),
    (dict(batch_first=True), "self", "none", dict()),
    (dict(), "self", "none", dict(need_weights=False)),
    (dict(batch_first=True), "self", "bool_2d", dict(need_weights=False)),
    (dict(), "kv", "float_3d", dict()),
    (dict(batch_first=True), "distinct", "padding", dict(need_weights=False)),
    (dict(), "distinct", "both", dict(average_attn_weights=False)),
    (dict(batch_first=True), "self", "causal", dict(need_weights=False)),
    (dict(), "self", "causal", dict()),
    (dict(batch_first=True), "self", "causal_padding", dict(need_weights=False)),
    (dict(bias=False), "kv", "padding", dict()),
    (dict(bias=False, batch_first=True), "self", "none", dict(need_weights=False)),
    (dict(kdim=6, vdim=4), "distinct", "none", dict()),
    (dict(kdim=6, vdim=4, batch_first=True), "distinct", "padding", dict(need_weights=False)),
    (dict(add_bias_kv=True), "self", "bool_2d", dict()),
    (dict(add_zero_attn=True, batch_first=True), "kv", "padding", dict(need_weights=False)),
    (dict(add_bias_kv=True, add_zero_attn=True), "distinct", "both", dict()),
]


def build(seed: int = 0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, HEADS, **kwargs)
    with torch.no_grad():  # non-zero biases, so that they are tested too
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha


class TestExact:
    """With identity quantizers (preset "exact") the FQT layer is nn.MultiheadAttention: same
    outputs, weights and gradients, bit for bit, on every path of its forward."""

    @pytest.mark.parametrize(("ctor", "kind", "mask", "call"), EXACT_CASES)
    def test_matches_torch(self, ctor, kind, mask, call):
        ref = build(**ctor)
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        assert isinstance(fqt, FQTMultiheadAttention)
        batch_first = ctor.get("batch_first", False)
        x = inputs(kind, batch_first, ctor.get("kdim", E), ctor.get("vdim", E))
        kwargs = {**masks(mask, batch_first, kind), **call}
        assert_same(run(fqt, *x, **kwargs), run(ref, *x, **kwargs))

    @pytest.mark.parametrize("need_weights", [True, False])
    def test_unbatched(self, need_weights):
        ref = build()
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        x = inputs("self", False, batched=False)
        assert_same(
            run(fqt, *x, need_weights=need_weights), run(ref, *x, need_weights=need_weights)
        )

    def test_dropout_in_eval(self):
        ref = build(dropout=0.5).eval()
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        assert not fqt.training and not fqt.out_proj.training
        x = inputs("self", True)
        assert_same(run(fqt, *x), run(ref, *x))

    def test_dropout_in_training_uses_the_global_rng(self):
        ref = build(dropout=0.5)
        fqt = quantize_model(copy.deepcopy(ref), EXACT)
        x = inputs("kv", False)
        torch.manual_seed(5)
        a = run(fqt, *x)
        torch.manual_seed(5)
        assert_same(a, run(ref, *x))

    @pytest.mark.parametrize("need_weights", [True, False])
    @pytest.mark.parametrize("mask", ["none", "both", "causal"])
    def test_attention_products_match_to_rounding(self, need_weights, mask):
        """The explicit softmax path of attention_products=True replaces torch's fused kernels,
        so it agrees to float rounding, not bit for bit."""
        ref = build(batch_first=True)
        fqt = quantize_model(copy.deepcopy(ref), EXACT.replace(attention_products=True))
        x = inputs("self", True)
        kwargs = {**masks(mask, True, "self"), "need_weights": need_weights}
        assert_same(run(fqt, *x, **kwargs), run(ref, *x, **kwargs), exact=False)

    @pytest.mark.parametrize("ctor", [dict(add_bias_kv=True), dict(add_zero_attn=True)])
    def test_causal_products_mask_the_extra_keys_as_torch(self, ctor):
        """With is_causal and no weights torch drops attn_mask and lets SDPA apply a top-left
        causal mask over the keys bias_k / the zero key extend: the extra key stays masked."""
        ref = build(batch_first=True, **ctor)
        fqt = quantize_model(copy.deepcopy(ref), EXACT.replace(attention_products=True))
        x = inputs("self", True)
        kwargs = {**masks("causal", True, "self"), "need_weights": False}
        assert_same(run(fqt, *x, **kwargs), run(ref, *x, **kwargs), exact=False)


def fully_masked(case: str) -> dict:
    """Masks under which some query of the first sample may attend to no key: a fully padded
    sample, or left padding (2 keys) with a causal mask (its first two queries)."""
    padding = torch.zeros(N, L, dtype=torch.bool)
    if case == "padded_sample":
        padding[0] = True
        return {"key_padding_mask": padding}
    padding[0, :2] = True
    return {"key_padding_mask": padding, "attn_mask": causal(L) != 0, "is_causal": True}


class TestFullyMaskedQueries:
    """NaN policy (module docstring): a query that may attend to nothing gets zero attention
    (as SDPA gives) on the products path, so one such query does not turn the whole batch NaN
    through the per-tensor quantizers."""

    @pytest.mark.parametrize("case", ["padded_sample", "left_padding_causal"])
    @pytest.mark.parametrize("need_weights", [True, False])
    def test_products_give_zero_attention_and_leave_the_batch_finite(self, case, need_weights):
        ref = build(batch_first=True)
        fqt = quantize_model(copy.deepcopy(ref), FQTConfig.preset("psq4", attention_products=True))
        x = inputs("self", True)
        output, weights, grads = run(fqt, *x, need_weights=need_weights, **fully_masked(case))
        assert output.isfinite().all()
        assert all(g is None or g.isfinite().all() for g in grads)
        if need_weights:  # torch: NaN rows; here: zero rows
            rows = weights.sum(-1)
            assert rows.isfinite().all() and (rows == 0).any()

    @pytest.mark.parametrize("case", ["padded_sample", "left_padding_causal"])
    def test_exact_products_match_torch_without_weights(self, case):
        ref = build(batch_first=True)
        fqt = quantize_model(copy.deepcopy(ref), EXACT.replace(attention_products=True))
        x = inputs("self", True)
        kwargs = {**fully_masked(case), "need_weights": False}
        assert_same(run(fqt, *x, **kwargs), run(ref, *x, **kwargs), exact=False)

    def test_float_products_with_weights_spread_torch_nan_through_out_proj(self):
        """Documented limit: with need_weights=True and the products in float, torch's NaN rows
        (a fully padded sample) reach out_proj, whose per-tensor input scale turns every row
        NaN; torch has NaN in that sample only."""
        ref = build(batch_first=True)
        fqt = quantize_model(copy.deepcopy(ref), FQTConfig.preset("psq4"))
        x = inputs("self", True)
        kwargs = fully_masked("padded_sample")
        torch_output = ref(*x, **kwargs)[0]
        output = fqt(*x, **kwargs)[0]
        assert torch_output[0].isnan().all() and torch_output[1:].isfinite().all()
        assert output.isnan().all()
        assert fqt(*x, need_weights=False, **kwargs)[0][1:].isfinite().all()


class TestLayer:
    def test_parameters_state_dict_and_dequantize(self):
        ref = build(add_bias_kv=True)
        params = dict(ref.named_parameters())
        keys = list(ref.state_dict())
        model = nn.Sequential()
        model.add_module("attn", ref)
        quantize_model(model, FQTConfig.preset("bhq5"))
        fqt = model.attn
        assert isinstance(fqt, FQTMultiheadAttention) and isinstance(fqt, nn.MultiheadAttention)
        assert isinstance(fqt.out_proj, FQTLinear) and fqt.out_proj.name == "attn.out_proj"
        assert list(fqt.state_dict()) == keys
        assert all(p is params[n] for n, p in fqt.named_parameters())
        assert set(fqt_modules(model)) == {"attn", "attn.out_proj"}
        assert "grad_output=bhq(5, stochastic)" in repr(fqt)
        dequantize_model(model)
        assert type(model.attn) is nn.MultiheadAttention
        assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert all(p is params[n] for n, p in model.attn.named_parameters())
        assert list(model.attn.state_dict()) == keys

    @pytest.mark.parametrize(("products", "gemms"), [(False, 1), (True, 3)])
    def test_attention_products_are_fqt_gemms(self, products, gemms):
        """Without the option the layer's backward quantizes one gradient (the packed input
        projection); with it, also the score and value products' (out_proj has its own)."""
        cfg = FQTConfig.preset("psq4", attention_products=products)
        fqt = quantize_model(build(), cfg)
        seen = []
        with fqt.observe_grad_output(seen.append):
            run(fqt, *inputs("self", False), need_weights=False)
        assert len(seen) == gemms

    def test_quantized_forward(self):
        """4-bit forward operands change the output; the products' quantizers change it more."""
        ref = build()
        x = inputs("self", False)
        float_out = run(ref, *x)[0]
        cfg = FQTConfig(input_bits=4, weight_bits=4)
        projections = run(quantize_model(copy.deepcopy(ref), cfg), *x)[0]
        products = cfg.replace(attention_products=True)
        everything = run(quantize_model(copy.deepcopy(ref), products), *x)[0]
        assert not torch.allclose(projections, float_out, atol=1e-3)
        assert not torch.allclose(everything, projections, atol=1e-3)

    def test_bad_inputs(self):
        fqt = quantize_model(build(kdim=6, vdim=4), EXACT)
        q, k, v = inputs("distinct", False, 6, 4)
        with pytest.raises(ValueError, match="keys of 6 and values of 4 features"):
            fqt(q, v, v)
        with pytest.raises(ValueError, match="queries of 8 features"):
            fqt(k[..., :4].repeat(1, 1, 3)[..., :7], k, v)
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            fqt(q, k, v, is_causal=True)

    def test_int8_backend(self):
        cfg = FQTConfig.preset("psq4", backend="int8", attention_products=True)
        with pytest.warns(RuntimeWarning, match="simulate backend"):
            fqt = quantize_model(build(batch_first=True), cfg)
        output, _, grads = run(fqt, *inputs("self", True))
        assert torch.isfinite(output).all() and all(torch.isfinite(g).all() for g in grads)


class Encoder(nn.Module):
    """A token classifier on one nn.TransformerEncoderLayer (the stats' (inputs, targets) API)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x, src_mask=causal(x.shape[1]), is_causal=True))


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def token_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, E, generator=g), torch.randint(0, 3, (4, 6), generator=g)


class TestTransformer:
    def test_every_matrix_product_is_fqt(self):
        torch.manual_seed(0)
        model = nn.Transformer(E, HEADS, 2, 1, 16, dropout=0.0, batch_first=True)
        quantize_model(model, FQTConfig.preset("bhq5"))
        # encoder layer: self_attn (+ out_proj), linear1, linear2; decoder layer: two attentions
        assert len(fqt_modules(model)) == 2 * 4 + 6
        assert not any(type(m) is nn.Linear for m in model.modules())
        src, tgt = torch.randn(2, 5, E), torch.randn(2, 4, E)
        model(src, tgt, tgt_mask=causal(4)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())

    def test_fast_paths_run_the_fqt_layers(self):
        """In eval mode under no_grad, nn.TransformerEncoderLayer's fused path would run float
        GEMMs on the FQT layers' weights, and nn.TransformerEncoder would hand them nested
        tensors: the FQT layers still run (their output differs from the float layer's)."""
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True)
        ref = nn.TransformerEncoder(layer, 2).eval()
        model = quantize_model(copy.deepcopy(ref), FQTConfig(input_bits=4, weight_bits=4))
        assert not model.use_nested_tensor
        x = torch.randn(3, 5, E)
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[0, -2:] = True
        with torch.no_grad():
            fast = model(x, src_key_padding_mask=padding)
            float_out = ref(x, src_key_padding_mask=padding)
        slow = model(x, src_key_padding_mask=padding)  # grad enabled: no fast path anywhere
        torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
        assert not torch.allclose(fast[1:], float_out[1:], atol=1e-3)

    def test_exact_encoder_matches_torch_in_eval(self):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True)
        ref = nn.TransformerEncoder(layer, 2).eval()
        model = quantize_model(copy.deepcopy(ref), EXACT)
        x = torch.randn(3, 5, E)
        padding = torch.zeros(3, 5, dtype=torch.bool)
        padding[0, -2:] = True
        with torch.no_grad():  # the float model takes its fused, nested-tensor path
            expected = ref(x, src_key_padding_mask=padding)
            got = model(x, src_key_padding_mask=padding)
        # nested-tensor outputs are 0 at padded positions; compare the rest
        keep = ~padding
        torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("products", [False, True])
    def test_fqt_gradient_is_unbiased(self, products):
        cfg = FQTConfig.preset("psq4", attention_products=products)
        model = quantize_model(Encoder(), cfg)
        report = stats.check_unbiased(model, token_loss, token_batch(0), samples=24)
        assert report.passed, report.summary()
        assert {layer.name for layer in report.layers} >= {"layer.self_attn", "layer.linear1"}

    def test_biased_rounding_is_caught_in_the_attention(self):
        """The same check fails for nearest rounding (biased), naming the attention layer."""
        cfg = FQTConfig.preset("psq4", attention_products=True, grad_rounding="nearest")
        model = quantize_model(Encoder(), cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = stats.bias_test(model, token_loss, token_batch(0), samples=8)
        assert "layer.self_attn" in report.failing()
