"""Quantized linear layers: one QuantMethod per scheme (base.py), chosen from the
checkpoint's quantization_config and the --quantization flag (config.py), and given to
the linear layers as they are built (scope.py).

| module | scheme |
| --- | --- |
| unquantized.py | float weights (the default) |
| fp8.py, fp8_ops.py | FP8 W8A8: per-tensor / per-channel / block weight scales |
| compressed_tensors.py | compressed-tensors FP8 schemes, onto fp8.py |
| int4.py, int4_packing.py | AWQ and GPTQ int4 (W4A16), with act-order |
"""

from radixserve.layers.quantization.base import ParamLayout, QuantConfig, QuantMethod
from radixserve.layers.quantization.config import (QUANTIZATION_METHODS, config_from_checkpoint,
                                                   resolve_quant_config)
from radixserve.layers.quantization.scope import linear_method, quantization_scope

__all__ = ["QUANTIZATION_METHODS", "ParamLayout", "QuantConfig", "QuantMethod",
           "config_from_checkpoint", "linear_method", "quantization_scope",
           "resolve_quant_config"]
