"""FQTConfig: validated on construction, frozen, with the paper's defaults and presets."""

from __future__ import annotations

import dataclasses

import pytest

import fqtorch
from fqtorch import FQTConfig


class TestDefaults:
    """The defaults follow docs/method.md §2: 8-bit forward, QAT backward unless a gradient
    quantizer is named, and per-tensor (PTQ runs) or per-column (PSQ/BHQ runs) 8-bit weight
    branch."""

    def test_qat_by_default(self):
        cfg = FQTConfig()
        assert cfg.is_qat and cfg.input_bits == cfg.weight_bits == 8
        assert cfg.input_quantizer == "ptq" and cfg.weight_quantizer == "symmetric"

    @pytest.mark.parametrize(
        "grad,weight_branch", [("ptq", "ptq"), ("psq", "per_column"), ("bhq", "per_column")]
    )
    def test_weight_branch_default(self, grad, weight_branch):
        cfg = FQTConfig(grad_quantizer=grad, grad_bits=5)
        assert cfg.grad_weight_quantizer == weight_branch and cfg.grad_weight_bits == 8

    def test_frozen(self):
        with pytest.raises(dataclasses.FrozenInstanceError):
            FQTConfig().grad_bits = 4  # type: ignore[misc]

    def test_replace_rederives_weight_branch(self):
        cfg = FQTConfig.preset("bhq5").replace(grad_quantizer="ptq")
        assert cfg.grad_weight_quantizer == "ptq"


class TestPresets:
    @pytest.mark.parametrize("name", ["ptq4", "psq5", "bhq6", "bhq8", "ptq8"])
    def test_quantizer_presets(self, name):
        cfg = FQTConfig.preset(name)
        assert cfg.grad_quantizer == name[:3] and cfg.grad_bits == int(name[3:])

    def test_qat_and_exact(self):
        assert FQTConfig.preset("qat").is_qat
        exact = FQTConfig.preset("exact")
        assert exact.input_quantizer == exact.weight_quantizer == "identity" and exact.is_qat

    def test_overrides(self):
        assert FQTConfig.preset("bhq5", seed=3).seed == 3

    def test_unknown_preset_lists_known(self):
        with pytest.raises(ValueError, match="known presets: .*bhq5"):
            FQTConfig.preset("bhq9")

    def test_presets_all_build(self):
        for name in FQTConfig.presets():
            FQTConfig.preset(name)


class TestValidation:
    """Bad fields fail at construction with what was expected."""

    @pytest.mark.parametrize(
        "field", ["input_bits", "weight_bits", "grad_bits", "grad_weight_bits"]
    )
    @pytest.mark.parametrize("bits", [1, 9])
    def test_bits(self, field, bits):
        with pytest.raises(ValueError, match=f"{field} must be in 2..8"):
            FQTConfig(**{field: bits})

    def test_unknown_quantizer(self):
        with pytest.raises(ValueError, match="grad_quantizer='bhx' .*known quantizers: .*bhq"):
            FQTConfig(grad_quantizer="bhx")

    @pytest.mark.parametrize("field", ["input_quantizer", "weight_quantizer"])
    def test_random_transform_is_refused_in_the_forward(self, field):
        """RHT draws its signs on every call (from the global stream: the forward has no
        generator), so as a forward quantizer it made the forward random and unseeded."""
        with pytest.raises(ValueError, match=f"{field}='rht' draws random signs"):
            FQTConfig(**{field: "rht"})
        assert FQTConfig(grad_quantizer="rht", grad_weight_quantizer="rht").grad_quantizer == "rht"

    def test_only_random_transforms_are_refused_in_the_forward(self):
        from fqtorch.quantizers.base import has_random_transform

        assert [n for n in fqtorch.list_quantizers() if has_random_transform(n)] == ["rht"]
        for name in fqtorch.list_quantizers():
            if name != "rht":
                FQTConfig(input_quantizer=name, weight_quantizer=name)

    def test_unknown_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            FQTConfig(backend="fp4")

    def test_unknown_rounding(self):
        with pytest.raises(ValueError, match="grad_rounding"):
            FQTConfig(grad_rounding="down")

    def test_seed_type(self):
        with pytest.raises(TypeError, match="seed"):
            FQTConfig(seed="0")  # type: ignore[arg-type]

    def test_fused_type(self):
        with pytest.raises(TypeError, match="fused must be a bool"):
            FQTConfig(fused=1)  # type: ignore[arg-type]


def test_fused_reaches_every_quantizer():
    cfg = FQTConfig.preset("bhq4", fused=True)
    assert cfg.to_dict()["fused"] is True
    assert all(q.fused for q in cfg.build_quantizers().values())
    assert not any(q.fused for q in FQTConfig.preset("bhq4").build_quantizers().values())
