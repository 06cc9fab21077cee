"""SiLU-and-mul: the gated MLP's activation, silu(gate) * up, in one pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, inter, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    pdl_wait(USE_PDL)
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    out = gate * tl.sigmoid(gate) * up
    tl.store(Out + row * stride_o + offs, out.to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = cat(gate, up) (last dim contiguous) -> [T, I], computed in fp32."""
    inter = x.shape[-1] // 2
    out = torch.empty(x.shape[0], inter, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        block = min(4096, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x.shape[0], triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), inter, BLOCK=block,
            num_warps=min(8, max(1, block // 512)), **pdl_kwargs(x))
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
