"""FQT layers and their functional forms."""

from .functional import ConvOps, FQTPlan, LinearOps, fqt_conv, fqt_linear
from .modules import FQTConv1d, FQTConv2d, FQTLinear, FQTModule, layer_seed

__all__ = [
    "ConvOps",
    "FQTConv1d",
    "FQTConv2d",
    "FQTLinear",
    "FQTModule",
    "FQTPlan",
    "LinearOps",
    "fqt_conv",
    "fqt_linear",
    "layer_seed",
]
