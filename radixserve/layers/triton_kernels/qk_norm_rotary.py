"""Qwen3's per-head RMSNorm of q and k, then RoPE, in one in-place pass.

Unfused, a decode layer runs three small kernels here (q norm, k norm, rotary), each a
few microseconds of launch and latency for a few KB of data; this one does all three
per token. The rounding steps are those of the unfused kernels (rmsnorm.py then
rotary.py): normalise in fp32, round, scale by the weight, round, rotate in fp32, round;
only the order of the fp32 sum of squares differs. Requires rot_dim == head_dim (every
head dim rotates), which is what Qwen3 uses.

With `kv_write`, the same program also writes the finished k row and the v row into
the KV pool at the token's slot (what `store_kv` does), so the attention backend skips
its store: one launch fewer per layer again, and k is stored from registers instead of
being read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.kv_write import KVWrite, check_kv_write
from radixserve.layers.triton_kernels.kv_row import (
    copy_row_to_pool, kv_write_kernel_args, store_heads_to_pool)
from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait
from radixserve.layers.triton_kernels.rmsnorm import rmsnorm_reference
from radixserve.layers.triton_kernels.rotary import apply_rotary_reference


@triton.jit
def _norm_rotate_heads(X, stride_x, row, num_heads, Wt, eps, cos, sin, head_dim, Dst,
                       stride_dst_h, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                       BLOCK_H: tl.constexpr, STORE: tl.constexpr):
    """Normalise and rotate one token's heads of X in place; with STORE, also write them
    to Dst (the token's pool row, heads stride_dst_h apart) in Dst's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, HALF)
    mask = (offs_h < num_heads)[:, None]
    if IS_NEOX:
        first, second = offs_r, offs_r + HALF
    else:
        first, second = 2 * offs_r, 2 * offs_r + 1
    base = X + row * stride_x + offs_h[:, None] * head_dim
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1f * x1f, 1) + tl.sum(x2f * x2f, 1)) / head_dim + eps)
    w1 = tl.load(Wt + first).to(tl.float32)[None, :]
    w2 = tl.load(Wt + second).to(tl.float32)[None, :]
    n1 = ((x1f * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    n2 = ((x2f * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    y1 = (n1 * cos - n2 * sin).to(dtype)
    y2 = (n2 * cos + n1 * sin).to(dtype)
    tl.store(base + first[None, :], y1, mask=mask)
    tl.store(base + second[None, :], y2, mask=mask)
    if STORE:
        store_heads_to_pool(Dst, stride_dst_h, offs_h, first, second, y1, y2, mask)


@triton.jit
def _qk_norm_rotary_kernel(Q, K, Positions, Cache, Q_W, K_W, V, K_Buf, V_Buf, Loc, stride_q,
                           stride_k, stride_c, stride_v, stride_kbt, stride_kbh, stride_vbt,
                           stride_vbh, num_q_heads, num_k_heads, head_dim, eps,
                           HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr,
                           BLOCK_HK: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                           STORE_KV: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = row  # the pool row; read only with STORE_KV
    if STORE_KV:
        # out_cache_loc is a graph input, written before the first kernel of the step.
        slot = tl.load(Loc + row).to(tl.int64)
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)  # one short program per token: nothing to overlap inside
    pos = tl.load(Positions + row).to(tl.int64)
    offs_r = tl.arange(0, HALF)
    cos = tl.load(Cache + pos * stride_c + offs_r).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * stride_c + HALF + offs_r).to(tl.float32)[None, :]
    _norm_rotate_heads(Q, stride_q, row, num_q_heads, Q_W, eps, cos, sin, head_dim, Q, 0,
                       HALF, IS_NEOX, BLOCK_HQ, False)
    _norm_rotate_heads(K, stride_k, row, num_k_heads, K_W, eps, cos, sin, head_dim,
                       K_Buf + slot * stride_kbt, stride_kbh, HALF, IS_NEOX, BLOCK_HK, STORE_KV)
    if STORE_KV:
        copy_row_to_pool(V, stride_v, row, V_Buf, slot, stride_vbt, stride_vbh, num_k_heads,
                         V_DIM, BLOCK_HK, BLOCK_DV)


def qk_norm_rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, q_weight: torch.Tensor,
                    k_weight: torch.Tensor, eps: float, is_neox: bool,
                    kv_write: KVWrite | None = None, v: torch.Tensor | None = None) -> None:
    """RMSNorm each head of q [T, H * D] and k [T, Hkv * D] (row strides may be any),
    then rotate them, in place. D = cos_sin_cache.shape[-1], a power of two.

    With kv_write (and v [T, Hkv * Dv]), also store the finished k and v at the pool
    slots kv_write.loc, as `store_kv` would."""
    head_dim = cos_sin_cache.shape[-1]
    if head_dim & (head_dim - 1) or q.shape[-1] % head_dim or k.shape[-1] % head_dim:
        raise ValueError(f"head_dim {head_dim} must be a power of two dividing q and k")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dim")
    num_q_heads, num_k_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    if kv_write is not None:
        check_kv_write(kv_write, k, v, num_k_heads, head_dim)
    if q.shape[0] == 0:
        return
    block_hq = triton.next_power_of_2(num_q_heads)
    _qk_norm_rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache, q_weight, k_weight, stride_q=q.stride(0),
        stride_k=k.stride(0), stride_c=cos_sin_cache.stride(0), num_q_heads=num_q_heads,
        num_k_heads=num_k_heads, head_dim=head_dim, eps=eps, HALF=head_dim // 2,
        IS_NEOX=is_neox, BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(num_k_heads),
        num_warps=min(8, max(1, block_hq * head_dim // 512)),
        **kv_write_kernel_args(kv_write, k, v, positions), **pdl_kwargs(q))


def qk_norm_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                             cos_sin_cache: torch.Tensor, q_weight: torch.Tensor,
                             k_weight: torch.Tensor, eps: float, is_neox: bool
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: the unfused kernels' references, one after the other."""
    head_dim = cos_sin_cache.shape[-1]
    qn = rmsnorm_reference(q.reshape(-1, head_dim), q_weight, eps).view(q.shape)
    kn = rmsnorm_reference(k.reshape(-1, head_dim), k_weight, eps).view(k.shape)
    return apply_rotary_reference(qn, kn, positions, cos_sin_cache, is_neox, head_dim)
