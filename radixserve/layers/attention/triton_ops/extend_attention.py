"""Extend (prefill) attention: new tokens attend to a cached prefix and causally to each other.

One program owns BLOCK_M new tokens of one query head of one request and runs an
online softmax with fp32 accumulation over two key ranges:

* the cached prefix, gathered slot by slot through `req_to_token` (pages may be
  anywhere in the pool);
* the request's new keys, read straight from the contiguous k/v of this forward. Key
  blocks wholly before the query block need no mask; only the blocks on the diagonal
  apply the causal one.

GQA: the program reads the KV head `head // group`; repeated heads never exist in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products: tf32 would break fp32 parity with HF."""
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True, slots=True)
class ExtendConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3


def default_extend_config(head_dim: int, dtype: torch.dtype, device: torch.device
                          ) -> ExtendConfig:
    if device.type != "cuda":
        # The CPU interpreter runs these only in tests: small blocks cross block
        # boundaries with short sequences.
        return ExtendConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # fp32 is for parity checks, not speed: tiles that twice the bytes still fit in
        # shared memory.
        return ExtendConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return ExtendConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return ExtendConfig()
    # Larger heads: halve the tiles so q, k, v and the accumulator stay in registers.
    return ExtendConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)


@triton.jit
def _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one block of base-2 logits and its values into the running (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(Q, K_Ext, V_Ext, Out, K_Buf, V_Buf, Req_To_Token, Req_Pool_Idx,
                   Prefix_Lens, Ext_Lens, Ext_Start, qk_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_ot, stride_oh, stride_kbt, stride_kbh, stride_vbt, stride_vbh,
                   stride_rt,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # Last query blocks first: they have the most keys, so the long programs start early.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    ext_len = tl.load(Ext_Lens + b).to(tl.int32)
    if m_block * BLOCK_M >= ext_len:
        return
    kv_head = head // GROUP
    prefix_len = tl.load(Prefix_Lens + b).to(tl.int32)
    ext_start = tl.load(Ext_Start + b).to(tl.int64)
    row = tl.load(Req_Pool_Idx + b).to(tl.int64)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < V_DIM
    q = tl.load(Q + (ext_start + offs_m)[:, None] * stride_qt + head * stride_qh
                + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # 1. Cached prefix: visible to every new token.
    for n0 in range(0, prefix_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < prefix_len
        # int64: slot * row stride overflows int32 in pools of a few million tokens.
        slots = tl.load(Req_To_Token + row * stride_rt + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_Buf + slots[:, None] * stride_kbt + kv_head * stride_kbh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(V_Buf + slots[:, None] * stride_vbt + kv_head * stride_vbh + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    # 2. New keys before this query block: all visible, all in bounds (BLOCK_M is a
    # multiple of BLOCK_N), so no mask at all.
    k_ext = K_Ext + ext_start * stride_kt + kv_head * stride_kh
    v_ext = V_Ext + ext_start * stride_vt + kv_head * stride_vh
    for n0 in range(0, m_block * BLOCK_M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_ext + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ext + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=dv_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    # 3. The diagonal: causal mask.
    diag_end = tl.minimum(ext_len, (m_block + 1) * BLOCK_M)
    for n0 in range(m_block * BLOCK_M, diag_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < ext_len
        k = tl.load(k_ext + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_ext + offs_n[:, None] * stride_vt + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (offs_n[None, :] <= offs_m[:, None]) & n_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PRECISION)

    # Rows past ext_len saw only masked keys of their own; they are not stored.
    out = acc / l_i[:, None]
    tl.store(Out + (ext_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def extend_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                         extend_start_loc: torch.Tensor, max_extend_len: int, sm_scale: float,
                         config: ExtendConfig | None = None) -> torch.Tensor:
    """Causal attention of the new tokens over (cached prefix + new tokens), per request.

    q: [T, H, D]; k: [T, Hkv, D]; v: [T, Hkv, Dv] (this forward's new tokens, requests
    back to back from extend_start_loc); out: [T, H, Dv]; k_buffer/v_buffer: the pool,
    [slots, Hkv, D|Dv]; req_to_token: [rows, max_ctx] int32, whose first prefix_lens[b]
    entries of row req_pool_indices[b] hold the prefix. max_extend_len: max(extend_lens),
    known on the host. Last dims must be contiguous.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, v_dim = k.shape[1], v.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    cfg = config or default_extend_config(head_dim, q.dtype, q.device)
    if cfg.block_m % cfg.block_n:
        raise ValueError("block_m must be a multiple of block_n")
    batch = extend_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    grid = (triton.cdiv(max_extend_len, cfg.block_m), num_heads, batch)
    _extend_kernel[grid](
        q, k, v, out, k_buffer, v_buffer, req_to_token, req_pool_indices, prefix_lens,
        extend_lens, extend_start_loc, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, V_DIM=v_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=triton.next_power_of_2(v_dim),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def extend_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                               req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                               prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                               sm_scale: float) -> torch.Tensor:
    """Plain PyTorch, fp32, one request at a time. Same arguments as the kernel, no `out`."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for row, prefix, ext in zip(req_pool_indices.tolist(), prefix_lens.tolist(),
                                extend_lens.tolist()):
        slots = req_to_token[row, :prefix].long()
        keys = torch.cat([k_buffer[slots].float(), k[start:start + ext].float()])
        vals = torch.cat([v_buffer[slots].float(), v[start:start + ext].float()])
        keys, vals = keys.repeat_interleave(group, 1), vals.repeat_interleave(group, 1)
        logits = torch.einsum("mhd,nhd->hmn", q[start:start + ext].float(), keys) * sm_scale
        # New token i sits at position prefix + i and sees keys 0..prefix + i.
        visible = (torch.arange(prefix + ext, device=q.device)[None, :]
                   <= torch.arange(ext, device=q.device)[:, None] + prefix)
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        outs.append(torch.einsum("hmn,nhd->mhd", p, vals))
        start += ext
    return torch.cat(outs).to(q.dtype)
