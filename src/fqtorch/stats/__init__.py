"""The statistical framework as a measuring instrument (docs/method.md §3–4).

Pure estimators returning frozen dataclasses: :func:`qat_gradient`, :func:`sampling_variance`,
:func:`quantization_variance`, :func:`bias_test` / :func:`check_unbiased`,
:func:`grad_output_errors`, :func:`variance_profile`; :class:`VarianceMonitor` for training;
:func:`plan_precision` chooses per-layer gradient bits within a variance budget.
"""

from .estimators import (
    BiasError,
    BiasReport,
    GradientVariance,
    GradOutputError,
    LayerBias,
    QuantizationReport,
    VarianceProfile,
    bias_test,
    check_unbiased,
    exact_backward,
    grad_output_errors,
    kept_random_streams,
    measure_quantization,
    qat_gradient,
    quantization_variance,
    sampling_variance,
    variance_profile,
)
from .monitor import VarianceMonitor, VarianceRatio
from .plan import LayerPlan, PrecisionController, PrecisionPlan, load_plan, plan_precision

__all__ = [
    "BiasError",
    "BiasReport",
    "GradOutputError",
    "GradientVariance",
    "LayerBias",
    "LayerPlan",
    "PrecisionController",
    "PrecisionPlan",
    "QuantizationReport",
    "VarianceMonitor",
    "VarianceProfile",
    "VarianceRatio",
    "bias_test",
    "check_unbiased",
    "exact_backward",
    "grad_output_errors",
    "kept_random_streams",
    "load_plan",
    "measure_quantization",
    "plan_precision",
    "qat_gradient",
    "quantization_variance",
    "sampling_variance",
    "variance_profile",
]
