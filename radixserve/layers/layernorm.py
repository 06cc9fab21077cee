"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.layers.lazy_kernels import triton_kernel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With it: (norm(x + residual), x + residual).

        The CUDA path may update x and residual in place, so callers must not reuse
        them afterwards.
        """
        if x.is_cuda:
            name = "rmsnorm" if residual is None else "fused_add_rmsnorm"
            kernel = triton_kernel("radixserve.layers.triton_kernels", name)
            if kernel is not None:
                if residual is None:
                    return kernel(x, self.weight, self.variance_epsilon)
                return kernel(x, residual, self.weight, self.variance_epsilon)
        return self.forward_native(x, residual)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual (a model's first
        layer), (norm(x), x)."""
        if residual is None:
            return self(x), x
        return self(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        # Statistics in float32 whatever the activation dtype, as HF does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = self.weight * xf.to(dtype)
        return out if residual is None else (out, residual)

