"""FQT layers and their functional forms."""

from .attention import BatchedMatmulOps, FQTMultiheadAttention, fqt_bmm
from .functional import ConvOps, FQTPlan, LinearOps, fqt_conv, fqt_linear
from .modules import (
    FQTConv1d,
    FQTConv2d,
    FQTLinear,
    FQTModule,
    FQTTransposedLinear,
    layer_seed,
)

__all__ = [
    "BatchedMatmulOps",
    "ConvOps",
    "FQTConv1d",
    "FQTConv2d",
    "FQTLinear",
    "FQTModule",
    "FQTMultiheadAttention",
    "FQTPlan",
    "FQTTransposedLinear",
    "LinearOps",
    "fqt_bmm",
    "fqt_conv",
    "fqt_linear",
    "layer_seed",
]
