"""One token's row of heads copied into a KV pool slot, for kernels that write the
pool themselves (attention/kv_write.py)."""

from __future__ import annotations

import triton
import triton.language as tl


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
