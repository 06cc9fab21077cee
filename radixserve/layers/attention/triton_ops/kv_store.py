"""KV store: write this forward's k and v into the pool at out_cache_loc.

One launch moves both k and v and casts to the pool's dtype on the way, where
`k_buffer[loc] = k.to(dtype)` takes two index_put launches (plus a cast kernel each
when dtypes differ). Decode runs this once per layer per step, so launches count.

Where a per-token kernel already holds the new k (the rotary kernels), it writes k and
v to the pool itself (layers/kv_write.py) and this launch is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait


@triton.jit
def _store_kv_kernel(K_Buf, V_Buf, Loc, K, V, num_tokens,
                     stride_kbt, stride_kbh, stride_vbt, stride_vbh,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    # int64: slot * row stride overflows int32 in pools of a few million tokens.
    slots = tl.load(Loc + offs_t, mask=t_mask, other=0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    th_mask = t_mask[:, None, None] & (offs_h < NUM_KV_HEADS)[None, :, None]
    k_mask = th_mask & (offs_d < HEAD_DIM)[None, None, :]
    v_mask = th_mask & (offs_dv < V_DIM)[None, None, :]
    t64 = offs_t.to(tl.int64)[:, None, None]
    h = offs_h[None, :, None]

    k = tl.load(K + t64 * stride_kt + h * stride_kh + offs_d[None, None, :], mask=k_mask)
    tl.store(K_Buf + slots[:, None, None] * stride_kbt + h * stride_kbh + offs_d[None, None, :],
             k.to(K_Buf.dtype.element_ty), mask=k_mask)
    v = tl.load(V + t64 * stride_vt + h * stride_vh + offs_dv[None, None, :], mask=v_mask)
    tl.store(V_Buf + slots[:, None, None] * stride_vbt + h * stride_vbh + offs_dv[None, None, :],
             v.to(V_Buf.dtype.element_ty), mask=v_mask)


def store_kv(k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """k_buffer[loc] = k; v_buffer[loc] = v, cast to the pool's dtype.

    k_buffer: [slots, Hkv, D]; v_buffer: [slots, Hkv, Dv]; loc: [T] slot indices;
    k: [T, Hkv, D]; v: [T, Hkv, Dv]. Last dims contiguous. loc repeats no slot except the
    reserved slot 0 that padded rows write to (any one of those writes wins).
    """
    num_tokens = loc.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim, v_dim = k.shape[1], k.shape[2], v.shape[2]
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(max(head_dim, v_dim))
    # About 4K elements of k per program: enough bytes in flight per program, and many
    # programs even for a decode batch of one token per request.
    block_t = max(1, min(16, 4096 // (block_h * block_d)))
    _store_kv_kernel[(triton.cdiv(num_tokens, block_t),)](
        k_buffer, v_buffer, loc, k, v, num_tokens,
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_T=block_t,
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_DV=triton.next_power_of_2(v_dim), num_warps=4, **pdl_kwargs(k))


def store_kv_reference(k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor) -> None:
    k_buffer[loc] = k.to(k_buffer.dtype)
    v_buffer[loc] = v.to(v_buffer.dtype)
