"""SiluAndMul: silu(gate) * up over the packed [.., 2 * d] gate/up projection."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = cat(gate, up): the Triton kernel on CUDA, PyTorch elsewhere."""
    if x.is_cuda:
        kernel = _triton_silu_and_mul()
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


@functools.cache
def _triton_silu_and_mul() -> Callable[[torch.Tensor], torch.Tensor] | None:
    # Imported lazily (once) so CPU-only installs never import triton.
    try:
        from radixserve.layers.triton_kernels import silu_and_mul
    except ImportError:
        return None
    return silu_and_mul
