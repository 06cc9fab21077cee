"""RMSNorm and fused residual-add + RMSNorm, one program per row.

Rounding follows HF Llama: normalise in fp32, round to the input dtype, then multiply
by the weight, so bf16 outputs match HF's bit for bit as often as possible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait


@triton.jit
def _rmsnorm_kernel(X, Residual, Out, W, stride_x, stride_r, stride_o, eps, hidden,
                    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    pdl_wait(USE_PDL)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        # The sum is rounded to the residual's dtype before it is normalised, as in HF.
        x = (x.to(tl.float32) + tl.load(Residual + row * stride_r + offs, mask=mask,
                                        other=0.0).to(tl.float32)).to(Residual.dtype.element_ty)
        tl.store(Residual + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    tl.store(Out + row * stride_o + offs, (normed * w).to(Out.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor,
            weight: torch.Tensor, eps: float) -> None:
    hidden = x.shape[-1]
    block = triton.next_power_of_2(hidden)
    res = x if residual is None else residual
    _rmsnorm_kernel[(x.shape[0],)](
        x, res, out, weight, x.stride(0), res.stride(0), out.stride(0), eps, hidden,
        ADD_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)), **pdl_kwargs(x))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hidden] (last dim contiguous); returns a new [T, hidden] in x's dtype."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        _launch(x, None, out, weight, eps)
    return out


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; x = rmsnorm(residual). In place on both; returns (x, residual)."""
    if x.shape[0]:
        _launch(x, residual, x, weight, eps)
    return x, residual


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: returns (normed, new residual)."""
    total = (x.float() + residual.float()).to(residual.dtype)
    return rmsnorm_reference(total, weight, eps), total
