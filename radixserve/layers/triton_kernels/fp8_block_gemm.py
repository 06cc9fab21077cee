"""FP8 W8A8 with block scales (DeepSeek-V3, Qwen3-FP8): the activation quantizer and
the matmul, beside their torch references in layers/quantization/fp8_ops.py.

`per_token_group_quant_fp8` gives each row of x one scale per `group` columns (one
program per row and group); with group = K it is the per-token quantizer.
`w8a8_block_matmul` computes out[M, N] = sum over k-blocks of
(x_q[:, kb] @ w_q[:, kb].T) * x_scale[:, kb] * w_scale[n // bn, kb]: each program owns
a BLOCK_M x BLOCK_N tile and walks K one scale block (BLOCK_K = bk) at a time, so each
step's partial product takes exactly one activation scale per row and one weight scale
per column; at decode sizes K is also split across programs (the partial sums are
added after), so that a narrow layer keeps enough weight loads in flight.
torch._scaled_mm has no block-scale mode, hence this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# constexpr: a compiled kernel may read a global only if it is one (the interpreter
# does not check).
FP8_MAX = tl.constexpr(448.0)
MIN_SCALE = tl.constexpr(1e-12)


@triton.jit
def _group_quant_kernel(X, XQ, XS, K, stride_x, stride_q, groups, GROUP: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < GROUP) & (offs < K)
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(XQ + row * stride_q + offs, q.to(XQ.dtype.element_ty), mask=mask)
    tl.store(XS + row * groups + g, scale)


def per_token_group_quant_fp8(x: torch.Tensor, group: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q [M, K] float8_e4m3fn, scale [M, ceil(K / group)] float32) for x [M, K]."""
    m, k = x.shape
    groups = triton.cdiv(k, group)
    x_q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(min(group, k))
        _group_quant_kernel[(m, groups)](x, x_q, scale, k, x.stride(0), x_q.stride(0), groups,
                                         GROUP=group, BLOCK=block)
    return x_q, scale


@triton.jit
def _block_matmul_kernel(A, B, C, AS, BS, BIAS, M, N, K, stride_am, stride_bn, stride_cm,
                         stride_asm, stride_bsn, kb_per_split, BN_SCALE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_s_ptr = AS + offs_m * stride_asm
    b_s_ptr = BS + (offs_n // BN_SCALE) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_start = split * kb_per_split
    kb_end = tl.minimum(kb_start + kb_per_split, tl.cdiv(K, BLOCK_K))
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(B + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        a_s = tl.load(a_s_ptr + kb, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptr + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    # With a split of K, C is the float32 [splits, M, N] partial sums.
    c = C + split * M * stride_cm
    tl.store(c + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# Programs a split of K aims for at decode sizes, so that a narrow layer still spreads
# its weight reads over every SM of a large GPU.
_TARGET_PROGRAMS = 256
# The smallest K step of an FP8 tl.dot that compiles for the GPU (the interpreter would
# take 16).
MIN_BLOCK_K = 32


def w8a8_block_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                      w_scale: torch.Tensor, block: tuple[int, int],
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      split_k: int | None = None) -> torch.Tensor:
    """x_q [M, K] with x_scale [M, ceil(K / bk)] times w_q [N, K] with w_scale
    [ceil(N / bn), ceil(K / bk)]: [M, N] in out_dtype. bk must be a power of two >= 32
    (it is the kernel's K step, and an FP8 tl.dot needs K >= 32 on the GPU). split_k: slices of K run by separate programs, whose
    float32 partial sums are then added in a fixed order (default: one slice from 17
    rows on, else enough to reach about _TARGET_PROGRAMS programs)."""
    bn, bk = block
    m, k = x_q.shape
    n = w_q.shape[0]
    if bk < MIN_BLOCK_K or bk & (bk - 1):
        raise ValueError(f"block K size {bk} must be a power of two >= {MIN_BLOCK_K}")
    if x_q.stride(1) != 1 or w_q.stride(1) != 1:
        raise ValueError("x_q and w_q need contiguous rows")
    if m == 0:
        return torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 16 or n <= 64 else 128
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, bk)
    if split_k is None:
        split_k = 1 if m > 16 else max(1, min(k_blocks // 2, _TARGET_PROGRAMS // tiles))
    kb_per_split = triton.cdiv(k_blocks, split_k)
    split_k = triton.cdiv(k_blocks, kb_per_split)
    out = (torch.empty(m, n, dtype=out_dtype, device=x_q.device) if split_k == 1 else
           torch.empty(split_k, m, n, dtype=torch.float32, device=x_q.device))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _block_matmul_kernel[grid](
        x_q, w_q, out, x_scale, w_scale, bias if bias is not None else out, m, n, k,
        x_q.stride(0), w_q.stride(0), n, x_scale.stride(0), w_scale.stride(0), kb_per_split,
        BN_SCALE=bn, HAS_BIAS=bias is not None and split_k == 1, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=bk, num_warps=4, num_stages=3)
    if split_k == 1:
        return out
    result = out.sum(0)
    if bias is not None:
        result += bias.float()
    return result.to(out_dtype)
