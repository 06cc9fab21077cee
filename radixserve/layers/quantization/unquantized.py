"""The float linear layer as a QuantMethod: one [N, K] weight in the serving dtype.

It keeps the fused decode paths of linear_dispatch (the GEMV with the norm or the
SiLU-and-mul folded in), so a model without quantization runs as before.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear_dispatch import linear, rmsnorm_linear
from radixserve.layers.quantization.base import WEIGHT_LAYOUT, QuantMethod, new_param


class UnquantizedLinearMethod(QuantMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       params_dtype: torch.dtype, full_input_size: int) -> None:
        new_param(layer, "weight", torch.empty(output_size, input_size, dtype=params_dtype),
                  WEIGHT_LAYOUT)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
              silu_and_mul_input: bool = False, out: torch.Tensor | None = None
              ) -> torch.Tensor:
        return linear(x, layer.weight, bias, silu_and_mul_input, out=out)

    def apply_normed(self, layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                     norm: RMSNorm, bias: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return rmsnorm_linear(x, residual, norm, layer.weight, bias)
