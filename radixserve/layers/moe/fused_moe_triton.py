"""Fused MoE in Triton: every expert's GEMMs in one launch per projection.

1. `moe_align_block_size`: the T*k (token, slot) pairs are sorted by expert and each
   expert's run is padded to a multiple of BLOCK_M, so that one M-block of the grouped
   GEMM belongs to exactly one expert. Padding entries hold the sentinel T*k and are
   masked out. Only torch ops with static shapes, no host sync: it is capturable in a
   CUDA graph (sizes are the worst case, T*k + E*(BLOCK_M-1); blocks past the real end
   exit at once).
2. `_grouped_gemm_kernel`, gate/up: each program computes a BLOCK_M x BLOCK_N tile of
   both the gate and the up projection of its expert and stores silu(gate) * up, so the
   [T*k, 2I] intermediate is never written.
3. The same kernel, down projection, with the routing weight multiplied in.
4. Weighted combine: the k outputs of a token are summed (a deterministic sum, not
   atomics, so results do not depend on scheduling).

Experts that receive no token get no blocks at all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixserve.layers.attention.triton_ops.extend_attention import dot_precision
from radixserve.layers.moe.tuned_configs import MoEKernelConfig, get_moe_config


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P], block_expert [P / block_m], num_padded [1]).

    sorted_ids lists flat (token * k + slot) indices grouped by expert, each group
    padded with the sentinel T*k to a multiple of block_m; block_expert[b] is the expert
    of block b (clamped to a valid id past the end, where no program does any work).
    """
    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    dev = flat.device
    max_padded = n + num_experts * (block_m - 1)
    max_padded += -max_padded % block_m
    # scatter_add rather than bincount: bincount's output size needs a host sync.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    rank = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[expert_sorted]
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=dev)
    sorted_ids[(padded_end - padded)[expert_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = block_expert.clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, padded_end[-1:].to(torch.int32)


@triton.jit
def _grouped_gemm_kernel(A, B, C, Weights, Sorted_Ids, Block_Expert, Num_Padded,
                         N, K, num_valid,
                         stride_am, stride_be, stride_bn, stride_cm,
                         up_offset,
                         TOP_K: tl.constexpr, FUSE_SILU: tl.constexpr,
                         MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """C[id, n] = A[id // TOP_K] . B[expert, n]^T for the sorted ids of one M-block.

    With FUSE_SILU, B rows n and up_offset + n are the gate and up rows, and C gets
    silu(gate) * up. Last dims of A, B, C are contiguous.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(tl.num_programs(0), tl.cdiv(N, BLOCK_N))
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive M-blocks share each B tile while it is in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    if pid_m * BLOCK_M >= tl.load(Num_Padded):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(Sorted_Ids + offs_m)
    row_mask = ids < num_valid
    expert = tl.load(Block_Expert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = A + (ids // TOP_K).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_base = B + expert * stride_be + offs_k[:, None]
    b_ptrs = b_base + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FUSE_SILU:
        u_ptrs = b_base + (up_offset + offs_n).to(tl.int64)[None, :] * stride_bn
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if FUSE_SILU:
            u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc_up += tl.dot(a, u, input_precision=PRECISION)
            u_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if FUSE_SILU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_WEIGHT:
        w = tl.load(Weights + ids, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = C + ids.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weights: torch.Tensor,
            align: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n: int, top_k: int,
            fuse_silu: bool, mul_weight: bool, cfg: MoEKernelConfig) -> None:
    sorted_ids, block_expert, num_padded = align
    grid = (block_expert.shape[0] * triton.cdiv(n, cfg.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert, num_padded, n, a.shape[1],
        weights.numel(),
        a.stride(0), b.stride(0), b.stride(1), c.stride(0), n,
        TOP_K=top_k, FUSE_SILU=fuse_silu, MUL_WEIGHT=mul_weight, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        PRECISION=dot_precision(a.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         config: MoEKernelConfig | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I];
    topk_weights: [T, k] float32; topk_ids: [T, k] int. Returns [T, H] in x's dtype.
    """
    tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    if tokens == 0:
        return torch.zeros_like(x)
    cfg = config or get_moe_config(num_experts, inter, hidden, top_k, tokens, x.dtype,
                                   x.device)
    align = moe_align_block_size(topk_ids, num_experts, cfg.block_m)
    weights = topk_weights.float().contiguous().view(-1)
    act = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, act, weights, align, inter, top_k, True, False, cfg)
    out = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    _launch(act, w2, out, weights, align, hidden, 1, False, True, cfg)
    if top_k == 1:
        return out
    return out.view(tokens, top_k, hidden).sum(1)
