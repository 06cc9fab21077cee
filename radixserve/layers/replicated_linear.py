"""ReplicatedLinear: a projection every TP rank keeps whole.

For layers that are small and whose full output every rank needs: MoE router gates,
Qwen2-MoE's shared-expert gate, and MLA's down-projections to the latent spaces
(q_a_proj, kv_a_proj_with_mqa), whose outputs are shared by all heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReplicatedLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 fp32_compute: bool = False) -> None:
        """fp32_compute: take the product in float32 whatever the weight dtype (DeepSeek
        routers do, so near-tied experts are chosen as in the reference)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.fp32_compute = fp32_compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_compute:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        return F.linear(x, self.weight, self.bias)
