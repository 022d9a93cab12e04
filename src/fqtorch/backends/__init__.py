"""How a quantized GEMM is executed: ``simulate`` (float, in ``fqtorch.nn.functional``) and
``int8`` (``torch._int_mm`` on the integer codes: :mod:`fqtorch.backends.int8` for Linear,
:mod:`fqtorch.backends.int8_conv` for Conv2d via im2col)."""
