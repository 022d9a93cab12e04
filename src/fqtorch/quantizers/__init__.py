"""Quantizer families, each registered by name (``fqtorch.list_quantizers()``)."""

from . import formats, hadamard, householder, transforms, uniform
from .base import (
    MAX_BITS,
    MIN_BITS,
    ROUNDINGS,
    QuantizedTensor,
    Quantizer,
    RowTransform,
    get_quantizer,
    list_quantizers,
    register_quantizer,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "ROUNDINGS",
    "QuantizedTensor",
    "Quantizer",
    "RowTransform",
    "formats",
    "get_quantizer",
    "hadamard",
    "householder",
    "list_quantizers",
    "register_quantizer",
    "transforms",
    "uniform",
]
