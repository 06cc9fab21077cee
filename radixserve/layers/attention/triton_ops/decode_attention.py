"""Decode attention: one new query token per request against its paged KV.

Split-KV flash-decoding in two launches:

* stage 1, grid (batch, kv-head blocks, max splits): each program takes every query
  head that shares one KV head (the GQA group, padded to 16 rows so it can be the M
  side of `tl.dot`), walks one slice of the request's tokens through `req_to_token`,
  and writes a partial output normalised by its own softmax sum plus that sum's
  log-sum-exp (base 2). Each K/V row is read once for the whole group.
* stage 2, grid (batch, heads): merges the partial results by their log-sum-exp.

Cascade (when requests share a cached prefix): a third launch before stage 1,
`_cascade_prefix`, attends each group's queries to the group's shared first kv_start
tokens together, reading that KV once per group instead of once per request; stage 1
then takes only each request's tokens from kv_start on, and stage 2 merges both sets
of partial results.

How many splits a request gets is computed inside both kernels from its seq_len, so
no per-batch metadata exists that could change between CUDA-graph capture and replay;
only the upper bound `max_kv_splits` is fixed per launch (it sizes the grid and the
scratch buffers, and depends only on the batch size).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.layers.attention.triton_ops.extend_attention import dot_precision
from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait

_LOG2E = 1.4426950408889634


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    block_n: int = 64  # tokens per inner step
    num_warps: int = 4
    num_stages: int = 2


def min_split_tokens(device: torch.device, programs: int | None = None) -> int:
    """A split never covers fewer tokens than this: below it, the merge costs more than
    the parallelism gains. The CPU interpreter runs only in tests, where a small value
    makes short sequences cross split boundaries.

    `programs` is the launch's (request, KV-head block) count. When it covers under a
    quarter of the GPU's SMs (batches of a few requests), splits of 256 tokens leave
    most SMs idle and each program streams its whole slice alone: 64-token splits
    (one step of the bf16 block) spread a short context over more SMs, and the extra
    partial results are few at such batch sizes (docs/benchmarks.md has the stage-1
    times at decode-bs1). Without `programs`: the large-batch bound.
    """
    if device.type != "cuda":
        return 16
    if programs is not None and 4 * programs <= num_sms(device):
        return 64
    return 256


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    return _num_sms(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_decode_config(dtype: torch.dtype, device: torch.device) -> DecodeConfig:
    if device.type != "cuda":
        return DecodeConfig(block_n=16)  # short test sequences still cross block boundaries
    if dtype == torch.float32:
        return DecodeConfig(block_n=32)  # twice the bytes per row: keep the stages small
    return DecodeConfig()


def choose_max_kv_splits(batch_size: int, num_kv_head_blocks: int, num_sms: int,
                         cap: int) -> int:
    """Splits per request so that the stage-1 grid covers the GPU about 4 times over.

    A power of two, so only a handful of stage-2 variants ever compile, and a function
    of the batch size alone, so a captured CUDA graph and its replays agree.
    """
    programs = batch_size * num_kv_head_blocks
    want = max(1, math.ceil(4 * num_sms / programs))
    return min(cap, 1 << (want - 1).bit_length())


def head_block_size(group: int) -> int:
    """Query heads per stage-1 program: the GQA group padded to a dot's minimum of 16."""
    return max(16, min(64, triton.next_power_of_2(group)))


@triton.jit
def _split_bounds(seq_len, MAX_SPLITS: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Tokens per split for one request, a whole number of BLOCK_N steps."""
    n_splits = tl.minimum(tl.cdiv(seq_len, MIN_SPLIT_TOKENS), MAX_SPLITS)
    return tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _own_tokens(Seq_Lens, Kv_Start, b, HAS_START: tl.constexpr, MAX_SPLITS: tl.constexpr,
                MIN_SPLIT_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Request b's tokens for stages 1 and 2: [kv_start, seq_len), cut into splits of
    split_len. With a cascade, the tokens before kv_start (its group's shared prefix)
    are `_cascade_prefix`'s."""
    seq_len = tl.load(Seq_Lens + b).to(tl.int32)
    if HAS_START:
        kv_start = tl.load(Kv_Start + b).to(tl.int32)
    else:
        kv_start = seq_len * 0  # a tensor either way, so both branches return alike
    length = seq_len - kv_start
    return seq_len, kv_start, length, _split_bounds(length, MAX_SPLITS, MIN_SPLIT_TOKENS,
                                                     BLOCK_N)


@triton.jit
def _attend_paged(q, K_Buf, V_Buf, Req_To_Token, row, start, end, kv_head, qk_scale,
                  stride_kt, stride_kh, stride_vt, stride_vh, stride_rt,
                  BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Online softmax of q's rows [BLOCK_M, D] over tokens [start, end) of one request
    row in req_to_token, for one KV head. Returns (unnormalised acc, max, sum), base 2."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < V_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # int64: slot * row stride overflows int32 in pools of a few million tokens.
        slots = tl.load(Req_To_Token + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_Buf + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_Buf + slots[:, None] * stride_vt + kv_head * stride_vh + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_stage1(Q, K_Buf, V_Buf, Req_To_Token, Req_Pool_Idx, Seq_Lens, Kv_Start, Mid_O,
                   Mid_Lse, qk_scale, stride_qb, stride_qh, stride_kt, stride_kh, stride_vt,
                   stride_vh, stride_rt, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr,
                   HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
                   MIN_SPLIT_TOKENS: tl.constexpr, PRECISION: tl.constexpr,
                   HAS_START: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    first = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H
    split = tl.program_id(2)
    pdl_wait(USE_PDL)

    seq_len, kv_start, length, split_len = _own_tokens(
        Seq_Lens, Kv_Start, b, HAS_START, MAX_SPLITS, MIN_SPLIT_TOKENS, BLOCK_N)
    if split * split_len >= length:
        return  # stage 2 recomputes the same bounds and skips this split
    start = kv_start + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + first + offs_h
    h_mask = first + offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < V_DIM

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    row = tl.load(Req_Pool_Idx + b).to(tl.int64)
    acc, m_i, l_i = _attend_paged(q, K_Buf, V_Buf, Req_To_Token, row, start, end, kv_head,
                                  qk_scale, stride_kt, stride_kh, stride_vt, stride_vh, stride_rt,
                                  BLOCK_H, HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION)
    pdl_launch_dependents(USE_PDL)

    out_ptr = Mid_O + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms
    tl.store(out_ptr + offs_dv[None, :], acc / l_i[:, None],
             mask=h_mask[:, None] & dv_mask[None, :])
    tl.store(Mid_Lse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i),
             mask=h_mask)


@triton.jit
def _cascade_prefix(Q, K_Buf, V_Buf, Req_To_Token, Req_Pool_Idx, Kv_Start, Perm, Tile_Start,
                    Tile_Count, Pre_O, Pre_Lse, qk_scale, stride_qb, stride_qh, stride_kt,
                    stride_kh, stride_vt, stride_vh, stride_rt, stride_pb, stride_ph, stride_ps,
                    stride_lb, stride_lh,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRE_SPLITS: tl.constexpr,
                    MIN_SPLIT_TOKENS: tl.constexpr, PRECISION: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """Grid (tiles, KV heads, prefix splits): one tile is up to a few requests of one
    cascade group; its rows are every (member, query head of this KV head) pair, so the
    group's shared prefix is read once for all of them."""
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    pdl_wait(USE_PDL)
    count = tl.load(Tile_Count + t).to(tl.int32)
    if count == 0:
        return  # padding past the batch's tiles
    first = tl.load(Tile_Start + t).to(tl.int32)
    lead = tl.load(Perm + first).to(tl.int64)
    prefix_len = tl.load(Kv_Start + lead).to(tl.int32)
    split_len = _split_bounds(prefix_len, PRE_SPLITS, MIN_SPLIT_TOKENS, BLOCK_N)
    start = split * split_len
    if start >= prefix_len:
        return
    end = tl.minimum(start + split_len, prefix_len)

    offs_m = tl.arange(0, BLOCK_M)
    member = offs_m // GROUP
    m_mask = member < count
    heads = kv_head * GROUP + offs_m % GROUP
    b = tl.load(Perm + first + member, mask=m_mask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # Every member's row holds the same tree-owned slots for the prefix.
    row = tl.load(Req_Pool_Idx + lead).to(tl.int64)
    acc, m_i, l_i = _attend_paged(q, K_Buf, V_Buf, Req_To_Token, row, start, end, kv_head,
                                  qk_scale, stride_kt, stride_kh, stride_vt, stride_vh, stride_rt,
                                  BLOCK_M, HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_N, PRECISION)
    pdl_launch_dependents(USE_PDL)
    tl.store(Pre_O + b[:, None] * stride_pb + heads[:, None] * stride_ph + split * stride_ps
             + offs_dv[None, :], acc / l_i[:, None],
             mask=m_mask[:, None] & (offs_dv[None, :] < V_DIM))
    tl.store(Pre_Lse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i),
             mask=m_mask)


@triton.jit
def _decode_stage2(Mid_O, Mid_Lse, Out, Seq_Lens, Kv_Start, Pre_O, Pre_Lse, stride_mb, stride_mh,
                   stride_ms, stride_lb, stride_lh, stride_ob, stride_oh, stride_pb, stride_ph,
                   stride_ps, stride_qb, stride_qh,
                   V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                   MAX_SPLITS: tl.constexpr, MIN_SPLIT_TOKENS: tl.constexpr,
                   HAS_START: tl.constexpr, PRE_SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    pdl_wait(USE_PDL)
    seq_len, kv_start, length, split_len = _own_tokens(
        Seq_Lens, Kv_Start, b, HAS_START, MAX_SPLITS, MIN_SPLIT_TOKENS, BLOCK_N)

    offs_s = tl.arange(0, MAX_SPLITS)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < V_DIM
    s_mask = offs_s * split_len < length  # split 0 is never empty, so the max is finite
    lse = tl.load(Mid_Lse + b * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))
    o = tl.load(Mid_O + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms
                + offs_dv[None, :], mask=s_mask[:, None] & dv_mask[None, :], other=0.0)
    pdl_launch_dependents(USE_PDL)
    if PRE_SPLITS > 0:
        # The shared-prefix partials of this request's cascade group (none when
        # kv_start is 0: a request outside every group).
        pre_split = _split_bounds(tl.maximum(kv_start, 1), PRE_SPLITS, MIN_SPLIT_TOKENS,
                                  BLOCK_N)
        offs_p = tl.arange(0, PRE_SPLITS)
        p_mask = offs_p * pre_split < kv_start
        pre_lse = tl.load(Pre_Lse + b * stride_qb + h * stride_qh + offs_p, mask=p_mask,
                          other=float("-inf"))
        pre_o = tl.load(Pre_O + b * stride_pb + h * stride_ph + offs_p[:, None] * stride_ps
                        + offs_dv[None, :], mask=p_mask[:, None] & dv_mask[None, :], other=0.0)
        m = tl.maximum(tl.max(lse, 0), tl.max(pre_lse, 0))
        w = tl.exp2(lse - m)
        pre_w = tl.exp2(pre_lse - m)
        out = ((tl.sum(w[:, None] * o, 0) + tl.sum(pre_w[:, None] * pre_o, 0))
               / (tl.sum(w, 0) + tl.sum(pre_w, 0)))
    else:
        w = tl.exp2(lse - tl.max(lse, 0))
        out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, out.to(Out.dtype.element_ty),
             mask=dv_mask)


def alloc_decode_scratch(batch_size: int, num_heads: int, v_head_dim: int, max_kv_splits: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs [B, H, S, Dv] and their log-sum-exps [B, H, S]."""
    return (torch.empty(batch_size, num_heads, max_kv_splits, v_head_dim, dtype=torch.float32,
                        device=device),
            torch.empty(batch_size, num_heads, max_kv_splits, dtype=torch.float32, device=device))


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor,
                 seq_lens: torch.Tensor, block_n: int, min_split: int,
                 cascade: "CascadeInputs | None" = None) -> None:
    """Stage 2: out[b, h] from the partial results of every split (and of the cascade
    prefix, if any). block_n and min_split must be the ones stage 1 cut splits with."""
    batch, num_heads, max_splits, v_dim = mid_o.shape
    kv_start, pre_o, pre_lse = seq_lens, mid_o, mid_lse  # unread without a cascade
    if cascade is not None:
        kv_start, pre_o, pre_lse = cascade.kv_start, cascade.pre_o, cascade.pre_lse
    _decode_stage2[(batch, num_heads)](
        mid_o, mid_lse, out, seq_lens, kv_start, pre_o, pre_lse, mid_o.stride(0),
        mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1), out.stride(0),
        out.stride(1), pre_o.stride(0), pre_o.stride(1), pre_o.stride(2), pre_lse.stride(0),
        pre_lse.stride(1), V_DIM=v_dim, BLOCK_DV=max(16, triton.next_power_of_2(v_dim)),
        BLOCK_N=block_n, MAX_SPLITS=max_splits, MIN_SPLIT_TOKENS=min_split,
        HAS_START=cascade is not None,
        PRE_SPLITS=0 if cascade is None else pre_lse.shape[2], num_warps=4, **pdl_kwargs(out))


def cascade_tile_size(group: int) -> int:
    """Requests per cascade tile: enough that the tile's rows (requests x GQA group)
    fill a 64-row dot, at most 32."""
    return min(32, max(1, 64 // group))


@dataclass(slots=True)
class CascadeInputs:
    """A decode batch's shared-prefix groups on the device (built by
    `attention.cascade.plan_cascade`), and the scratch for their partial results.

    Members of one group share the KV slots of their first kv_start tokens. Tiles cut
    each group into runs of at most `cascade_tile_size` members; a tile with count 0 is
    padding. Requests outside every group have kv_start 0.
    """
    perm: torch.Tensor  # [>= members] batch indices, each group's members contiguous
    kv_start: torch.Tensor  # [B] the request's shared prefix length
    tile_start: torch.Tensor  # [T] offset in perm of the tile's first member
    tile_count: torch.Tensor  # [T] members in the tile
    pre_o: torch.Tensor  # [B, H, PS, Dv] fp32: partial outputs over the prefix
    pre_lse: torch.Tensor  # [B, H, PS] fp32, PS a power of two


def decode_attention_fwd(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         out: torch.Tensor, req_to_token: torch.Tensor,
                         req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float,
                         mid_o: torch.Tensor, mid_lse: torch.Tensor,
                         config: DecodeConfig | None = None,
                         cascade: CascadeInputs | None = None) -> torch.Tensor:
    """out[b, h] = softmax(q[b, h] . K_b^T * sm_scale) V_b over the request's seq_len tokens.

    q: [B, H, D]; k_buffer: [slots, Hkv, D]; v_buffer: [slots, Hkv, Dv]; out: [B, H, Dv];
    req_to_token: [rows, max_ctx] int32; req_pool_indices, seq_lens: [B] (seq_len >= 1);
    mid_o, mid_lse: scratch from `alloc_decode_scratch`, whose split axis is the bound
    on splits per request. Last dims must be contiguous. With `cascade`, each group's
    shared prefix is attended once for all its members ("cascade" decoding) and merged
    with each member's own tokens by log-sum-exp; every kv_start must be < its seq_len.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, v_dim = k_buffer.shape[1], v_buffer.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    cfg = config or default_decode_config(q.dtype, q.device)
    group = num_heads // num_kv_heads
    block_h = head_block_size(group)
    head_blocks = triton.cdiv(group, block_h)
    max_splits = mid_lse.shape[2]
    if max_splits & (max_splits - 1):
        raise ValueError(f"max_kv_splits must be a power of two, got {max_splits}")
    min_split = min_split_tokens(q.device, batch * num_kv_heads * head_blocks)
    dims = dict(HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                BLOCK_DV=triton.next_power_of_2(v_dim), BLOCK_N=cfg.block_n,
                MIN_SPLIT_TOKENS=min_split, PRECISION=dot_precision(q.dtype))
    if cascade is not None:
        _launch_cascade_prefix(q, k_buffer, v_buffer, req_to_token, req_pool_indices,
                               sm_scale, cascade, cfg, dims)
    kv_start = seq_lens if cascade is None else cascade.kv_start  # unread without a cascade
    _decode_stage1[(batch, num_kv_heads * head_blocks, max_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kv_start, mid_o, mid_lse,
        sm_scale * _LOG2E, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, BLOCK_H=block_h, MAX_SPLITS=max_splits,
        HAS_START=cascade is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **dims, **pdl_kwargs(q))
    merge_splits(mid_o, mid_lse, out, seq_lens, cfg.block_n, min_split, cascade)
    return out


def _launch_cascade_prefix(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                           req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                           sm_scale: float, cascade: CascadeInputs, cfg: DecodeConfig,
                           dims: dict) -> None:
    num_heads, num_kv_heads = q.shape[1], k_buffer.shape[1]
    group = num_heads // num_kv_heads
    pre_o, pre_lse = cascade.pre_o, cascade.pre_lse
    pre_splits = pre_lse.shape[2]
    if pre_splits & (pre_splits - 1):
        raise ValueError(f"prefix splits must be a power of two, got {pre_splits}")
    block_m = max(16, triton.next_power_of_2(cascade_tile_size(group) * group))
    _cascade_prefix[(cascade.tile_count.shape[0], num_kv_heads, pre_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, cascade.kv_start, cascade.perm,
        cascade.tile_start, cascade.tile_count, pre_o, pre_lse, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        pre_o.stride(0), pre_o.stride(1), pre_o.stride(2), pre_lse.stride(0), pre_lse.stride(1),
        GROUP=group, BLOCK_M=block_m, PRE_SPLITS=pre_splits, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **dims, **pdl_kwargs(q))


def decode_attention_reference(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                               seq_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Plain PyTorch, fp32, one request at a time. Same arguments as the kernel."""
    group = q.shape[1] // k_buffer.shape[1]
    outs = []
    for b, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        slots = req_to_token[row, :n].long()
        k = k_buffer[slots].float().repeat_interleave(group, 1)  # [n, H, D]
        v = v_buffer[slots].float().repeat_interleave(group, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * sm_scale, -1)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(outs).to(q.dtype)
