"""Writing one token's k and v into a KV pool slot from inside another per-token kernel
(the rotary kernels; layers/kv_write.py): the launch arguments and the stores they
share."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from radixserve.layers.kv_write import KVWrite


def kv_write_kernel_args(kv_write: KVWrite | None, k: torch.Tensor, v: torch.Tensor | None,
                         positions: torch.Tensor) -> dict[str, Any]:
    """The kernel arguments V, K_Buf, V_Buf, Loc, their strides, V_DIM, BLOCK_DV and
    STORE_KV. Without a write, the pointers are placeholders the kernel never reads."""
    if kv_write is None:
        return dict(V=k, K_Buf=k, V_Buf=k, Loc=positions, stride_v=0, stride_kbt=0,
                    stride_kbh=0, stride_vbt=0, stride_vbh=0, V_DIM=1, BLOCK_DV=1,
                    STORE_KV=False)
    k_buf, v_buf, loc = kv_write
    return dict(V=v, K_Buf=k_buf, V_Buf=v_buf, Loc=loc, stride_v=v.stride(0),
                stride_kbt=k_buf.stride(0), stride_kbh=k_buf.stride(1),
                stride_vbt=v_buf.stride(0), stride_vbh=v_buf.stride(1),
                V_DIM=v_buf.shape[2], BLOCK_DV=triton.next_power_of_2(v_buf.shape[2]),
                STORE_KV=True)


@triton.jit
def store_heads_to_pool(Dst, stride_dst_h, offs_h, first, second, y1, y2, mask):
    """A token's rotated heads, as the two halves y1 (dims `first`) and y2 (`second`),
    into its pool row Dst (heads stride_dst_h apart), in Dst's dtype."""
    dst = Dst + offs_h[:, None] * stride_dst_h
    tl.store(dst + first[None, :], y1.to(Dst.dtype.element_ty), mask=mask)
    tl.store(dst + second[None, :], y2.to(Dst.dtype.element_ty), mask=mask)


@triton.jit
def copy_row_to_pool(Src, stride_src, row, Buf, slot, stride_bt, stride_bh, num_heads,
                     DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Buf[slot] = Src[row] for one token: num_heads heads of DIM (contiguous in Src's
    row), cast to Buf's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_heads)[:, None] & (offs_d < DIM)[None, :]
    x = tl.load(Src + row * stride_src + offs_h[:, None] * DIM + offs_d[None, :], mask=mask)
    tl.store(Buf + slot * stride_bt + offs_h[:, None] * stride_bh + offs_d[None, :],
             x.to(Buf.dtype.element_ty), mask=mask)
