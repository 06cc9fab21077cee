"""MLA decode over the compressed cache (absorbed form; see layers/attention/mla.py).

Split-KV like decode_attention.py, stage 1 grid (batch, head blocks, max splits): one
program takes BLOCK_H query heads of one request and walks one slice of its tokens
through req_to_token. Each cache row is [latent c | rope key]; the c tile is loaded
once per step and used twice, as the key (q_lat . c) and as the value (p . c), which is
the point of MLA: all heads share one row of kv_lora_rank + rope elements per token.
Stage 2 (the log-sum-exp merge of the splits) is decode_attention's.

The reference is `mla_decode_reference` in layers/attention/torch_native_mla.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.attention.triton_ops.decode_attention import (
    _LOG2E, _split_bounds, merge_splits, min_split_tokens)
from radixserve.layers.attention.triton_ops.extend_attention import dot_precision

# Query heads per program. Sixteen is tl.dot's minimum M; more would multiply the
# [BLOCK_H, kv_lora_rank] fp32 accumulator, already 32 KiB at rank 512.
MLA_BLOCK_H = 16


def mla_block_n(dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per inner step: a [BLOCK_N, 512] bf16 latent tile is 32 KiB of shared
    memory; fp32 rows are twice that. The CPU interpreter uses small blocks so that short
    test sequences cross block boundaries."""
    if device.type != "cuda":
        return 8
    return 16 if dtype == torch.float32 else 32


@triton.jit
def _mla_decode_stage1(Q_Lat, Q_Rope, KV_Buf, Req_To_Token, Req_Pool_Idx, Seq_Lens,
                       Mid_O, Mid_Lse, qk_scale, num_heads,
                       stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_kvt,
                       stride_rt, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                       RANK: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       MAX_SPLITS: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr,
                       PRECISION: tl.constexpr):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(Seq_Lens + b).to(tl.int32)
    split_len = _split_bounds(seq_len, MAX_SPLITS, MIN_SPLIT_TOKENS, BLOCK_N)
    start = split * split_len
    if start >= seq_len:
        return  # stage 2 recomputes the same bounds and skips this split
    end = tl.minimum(start + split_len, seq_len)

    h_mask = heads < num_heads
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    r_mask = offs_r < RANK
    p_mask = offs_p < ROPE
    q_lat = tl.load(Q_Lat + b * stride_qlb + heads[:, None] * stride_qlh + offs_r[None, :],
                    mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q_rope = tl.load(Q_Rope + b * stride_qrb + heads[:, None] * stride_qrh + offs_p[None, :],
                     mask=h_mask[:, None] & p_mask[None, :], other=0.0)
    row = tl.load(Req_Pool_Idx + b).to(tl.int64)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # int64: slot * row stride overflows int32 in pools of a few million tokens.
        slots = tl.load(Req_To_Token + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
        rows = KV_Buf + slots[:, None] * stride_kvt
        c = tl.load(rows + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        k_rope = tl.load(rows + RANK + offs_p[None, :], mask=n_mask[:, None] & p_mask[None, :],
                         other=0.0)
        qk = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        qk += tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new

    out_ptr = Mid_O + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms
    tl.store(out_ptr + offs_r[None, :], acc / l_i[:, None],
             mask=h_mask[:, None] & r_mask[None, :])
    tl.store(Mid_Lse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i),
             mask=h_mask)


def mla_decode_fwd(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_buffer: torch.Tensor,
                   out: torch.Tensor, req_to_token: torch.Tensor,
                   req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
                   mid_o: torch.Tensor, mid_lse: torch.Tensor) -> torch.Tensor:
    """out[b, h] = softmax((q_lat . c + q_rope . k_rope) * sm_scale) c over the request's
    tokens.

    q_latent [B, H, R]; q_rope [B, H, P]; kv_buffer [slots, 1, R + P]; out [B, H, R];
    req_to_token [rows, max_ctx] int32; req_pool_indices, seq_lens [B] (seq_len >= 1);
    mid_o [B, H, S, R], mid_lse [B, H, S]: fp32 scratch whose split axis S (a power of
    two) bounds the splits per request. Last dims must be contiguous.
    """
    batch, num_heads, rank = q_latent.shape
    rope = q_rope.shape[2]
    if kv_buffer.shape[2] != rank + rope:
        raise ValueError(f"cache rows have {kv_buffer.shape[2]} elements, expected "
                         f"kv_lora_rank {rank} + rope {rope}")
    max_splits = mid_lse.shape[2]
    if max_splits & (max_splits - 1):
        raise ValueError(f"max_kv_splits must be a power of two, got {max_splits}")
    block_n = mla_block_n(q_latent.dtype, q_latent.device)
    const = dict(BLOCK_N=block_n, MAX_SPLITS=max_splits,
                 MIN_SPLIT_TOKENS=min_split_tokens(q_latent.device))
    # tl.dot needs K >= 16, so small test shapes are padded (masked) up to it.
    block_r = max(16, triton.next_power_of_2(rank))
    _mla_decode_stage1[(batch, triton.cdiv(num_heads, MLA_BLOCK_H), max_splits)](
        q_latent, q_rope, kv_buffer, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        sm_scale * _LOG2E, num_heads, q_latent.stride(0), q_latent.stride(1),
        q_rope.stride(0), q_rope.stride(1), kv_buffer.stride(0), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        RANK=rank, ROPE=rope, BLOCK_R=block_r, BLOCK_P=max(16, triton.next_power_of_2(rope)),
        BLOCK_H=MLA_BLOCK_H, PRECISION=dot_precision(q_latent.dtype), num_warps=4,
        num_stages=2, **const)
    merge_splits(mid_o, mid_lse, out, seq_lens, block_n, const["MIN_SPLIT_TOKENS"])
    return out
