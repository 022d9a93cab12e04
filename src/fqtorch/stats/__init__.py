"""The statistical framework as a measuring instrument (docs/method.md §3–4).

Pure estimators returning frozen dataclasses: :func:`qat_gradient`, :func:`sampling_variance`,
:func:`quantization_variance`, :func:`bias_test` / :func:`check_unbiased`,
:func:`grad_output_errors`, :func:`variance_profile`; :class:`VarianceMonitor` for training.
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
    measure_quantization,
    qat_gradient,
    quantization_variance,
    sampling_variance,
    variance_profile,
)
from .monitor import VarianceMonitor, VarianceRatio

__all__ = [
    "BiasError",
    "BiasReport",
    "GradOutputError",
    "GradientVariance",
    "LayerBias",
    "QuantizationReport",
    "VarianceMonitor",
    "VarianceProfile",
    "VarianceRatio",
    "bias_test",
    "check_unbiased",
    "exact_backward",
    "grad_output_errors",
    "measure_quantization",
    "qat_gradient",
    "quantization_variance",
    "sampling_variance",
    "variance_profile",
]
