"""fqtorch: fully quantized training for PyTorch.

An FQT gradient is an unbiased random estimator of the QAT gradient (Chen et al., NeurIPS 2020):
gradient quantization only adds variance, which fqtorch measures and reduces.

    cfg = fqtorch.FQTConfig(grad_bits=5, grad_quantizer="bhq", seed=0)
    fqtorch.quantize_model(model, cfg)
"""

from .config import FQTConfig
from .convert import (
    ConversionSummary,
    LayerConversion,
    conversion_summary,
    dequantize_model,
    fqt_modules,
    generator_states,
    load_generator_states,
    quantize_model,
    register_layer,
    registered_layers,
    reseed,
    same_streams,
    unregister_layer,
)
from .quantizers import (
    QuantizedTensor,
    Quantizer,
    get_quantizer,
    list_quantizers,
    register_quantizer,
)
from .quantizers.callers import FQTWarning

__version__ = "0.1.0"

__all__ = [
    "ConversionSummary",
    "FQTConfig",
    "FQTWarning",
    "LayerConversion",
    "QuantizedTensor",
    "Quantizer",
    "__version__",
    "conversion_summary",
    "dequantize_model",
    "fqt_modules",
    "generator_states",
    "get_quantizer",
    "list_quantizers",
    "load_generator_states",
    "quantize_model",
    "register_layer",
    "register_quantizer",
    "registered_layers",
    "reseed",
    "same_streams",
    "unregister_layer",
]
