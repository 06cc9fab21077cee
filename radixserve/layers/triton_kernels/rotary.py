"""Rotary position embedding applied in place to q and k.

The cache layout, shared with layers/rotary_embedding.py (which builds it, llama3 and
other scalings included):

    cos_sin_cache: [max_position, rot_dim], any float dtype (fp32 recommended);
    cos_sin_cache[p, :rot_dim // 2] = cos(p * inv_freq)
    cos_sin_cache[p, rot_dim // 2:] = sin(p * inv_freq)

with inv_freq of length rot_dim // 2. Only the first rot_dim dims of each head rotate
(rot_dim <= head_dim, even); the rest pass through. Frequency i rotates the pair
(i, i + rot_dim // 2) when is_neox (GPT-NeoX / Llama / Qwen, HF's rotate_half), or the
pair (2i, 2i + 1) otherwise (GPT-J, interleaved):

    x1' = x1 * cos_i - x2 * sin_i
    x2' = x2 * cos_i + x1 * sin_i

computed in fp32 and rounded once to q's dtype.

With `kv_write` (rot_dim == head_dim only), each program also writes its token's rotated
k and its v into the KV pool, so the attention backend's `store_kv` launch is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.kv_write import KVWrite, check_kv_write
from radixserve.layers.triton_kernels.kv_row import (
    copy_row_to_pool, kv_write_kernel_args, store_heads_to_pool)
from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait


@triton.jit
def _rotate_heads(X, stride_x, row, num_heads, cos, sin, head_dim, Dst, stride_dst_h,
                  HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_R: tl.constexpr, STORE: tl.constexpr):
    """Rotate one token's heads of X in place; with STORE (rot_dim == head_dim), also
    write them to Dst (the token's pool row, heads stride_dst_h apart)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h < num_heads)[:, None] & (offs_r < HALF)[None, :]
    if IS_NEOX:
        first, second = offs_r, offs_r + HALF
    else:
        first, second = 2 * offs_r, 2 * offs_r + 1
    base = X + row * stride_x + offs_h[:, None] * head_dim
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    y1 = (x1f * cos - x2f * sin).to(x1.dtype)
    y2 = (x2f * cos + x1f * sin).to(x1.dtype)
    tl.store(base + first[None, :], y1, mask=mask)
    tl.store(base + second[None, :], y2, mask=mask)
    if STORE:
        store_heads_to_pool(Dst, stride_dst_h, offs_h, first, second, y1, y2, mask)


@triton.jit
def _rotary_kernel(Q, K, Positions, Cache, V, K_Buf, V_Buf, Loc, stride_q, stride_k, stride_c,
                   stride_v, stride_kbt, stride_kbh, stride_vbt, stride_vbh, num_q_heads,
                   num_k_heads, head_dim, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
                   V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, STORE_KV: tl.constexpr,
                   USE_PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = row  # the pool row; read only with STORE_KV
    if STORE_KV:
        # out_cache_loc is a graph input, written before the first kernel of the step.
        slot = tl.load(Loc + row).to(tl.int64)
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    pos = tl.load(Positions + row).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos = tl.load(Cache + pos * stride_c + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * stride_c + HALF + offs_r, mask=r_mask,
                  other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, stride_q, row, num_q_heads, cos, sin, head_dim, Q, 0, HALF, IS_NEOX,
                  BLOCK_HQ, BLOCK_R, False)
    _rotate_heads(K, stride_k, row, num_k_heads, cos, sin, head_dim, K_Buf + slot * stride_kbt,
                  stride_kbh, HALF, IS_NEOX, BLOCK_HK, BLOCK_R, STORE_KV)
    if STORE_KV:
        copy_row_to_pool(V, stride_v, row, V_Buf, slot, stride_vbt, stride_vbh, num_k_heads,
                         V_DIM, BLOCK_HK, BLOCK_DV)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor, head_dim: int) -> None:
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > head_dim:
        raise ValueError(f"rot_dim {rot_dim} must be even and at most head_dim {head_dim}")
    if q.shape[-1] % head_dim or k.shape[-1] % head_dim:
        raise ValueError(f"q/k widths {q.shape[-1]}/{k.shape[-1]} are not multiples of {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dim")
    if positions.shape[0] != q.shape[0] or k.shape[0] != q.shape[0]:
        raise ValueError("q, k and positions must have the same number of tokens")


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor, is_neox: bool, head_dim: int | None = None,
                  kv_write: KVWrite | None = None, v: torch.Tensor | None = None) -> None:
    """Rotate q [T, H * D] and k [T, Hkv * D] in place (row strides may be any, e.g. views
    of a fused qkv output). positions: [T] ints. head_dim defaults to rot_dim.

    With kv_write (and v [T, Hkv * Dv]; rot_dim == head_dim), also store the rotated k
    and v at the pool slots kv_write.loc, as `store_kv` would."""
    head_dim = head_dim or cos_sin_cache.shape[-1]
    _check(q, k, positions, cos_sin_cache, head_dim)
    if kv_write is not None:
        if cos_sin_cache.shape[-1] != head_dim:
            raise ValueError("the fused KV write needs rot_dim == head_dim")
        check_kv_write(kv_write, k, v, k.shape[-1] // head_dim, head_dim)
    if q.shape[0] == 0:
        return
    half = cos_sin_cache.shape[-1] // 2
    num_q_heads, num_k_heads = q.shape[-1] // head_dim, k.shape[-1] // head_dim
    block_hq = triton.next_power_of_2(num_q_heads)
    _rotary_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache, stride_q=q.stride(0), stride_k=k.stride(0),
        stride_c=cos_sin_cache.stride(0), num_q_heads=num_q_heads, num_k_heads=num_k_heads,
        head_dim=head_dim, HALF=half, IS_NEOX=is_neox, BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(num_k_heads), BLOCK_R=triton.next_power_of_2(half),
        num_warps=min(8, max(1, block_hq * triton.next_power_of_2(half) // 256)),
        **kv_write_kernel_args(kv_write, k, v, positions), **pdl_kwargs(q))


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, is_neox: bool,
                           head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Out of place: returns the rotated (q, k)."""
    head_dim = head_dim or cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rot/2] each

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.reshape(x.shape[0], -1, head_dim).float()
        rot = heads[..., :cos_sin_cache.shape[-1]]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        c, s = cos[:, None, :], sin[:, None, :]
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        rotated = torch.cat([y1, y2], -1) if is_neox else torch.stack([y1, y2], -1).flatten(-2)
        out = torch.cat([rotated, heads[..., rot.shape[-1]:]], -1)
        return out.to(x.dtype).reshape(x.shape)

    return rotate(q), rotate(k)
