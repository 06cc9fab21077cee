"""SiluAndMul: silu(gate) * up over the packed [.., 2 * d] gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.layers.lazy_kernels import triton_kernel


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = cat(gate, up): the Triton kernel on CUDA, PyTorch elsewhere."""
    if x.is_cuda:
        kernel = triton_kernel("radixserve.layers.triton_kernels", "silu_and_mul")
        if kernel is not None:
            return kernel(x)
    return SiluAndMul.forward_native(x)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    @staticmethod
    def forward_native(x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

