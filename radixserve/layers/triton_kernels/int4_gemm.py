"""Int4 weight-only matmuls (AWQ, GPTQ) for our layout (quantization/int4_packing.py):
qweight [K / 8, N] int32 with input row 8i + j in nibble j of word row i, zeros and
scales [groups, N] float, g_idx [K] the group of each input row.

`int4_gemm` (prefill, batches): each program owns a BLOCK_M x BLOCK_N tile of the
output and walks K, unpacking a [BLOCK_K, BLOCK_N] weight tile as (q - z) * s in the
activation dtype and feeding it to tl.dot. `int4_gemv` (decode, a few rows): no tensor
cores, each program owns BLOCK_N outputs of one row and one of SPLIT_K slices of K and
accumulates x[k] * w[k, :] in float32; splits write partial sums that are then added in
a fixed order. Each weight word is loaded once per row of x it serves (the eight rows
it packs read the same address, which the cache serves). g_idx is read per input row,
so act-order checkpoints need no reordering.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_tile(QW, Z, S, G, offs_k, offs_n, mask_k, mask_n, N):
    mask = mask_k[:, None] & mask_n[None, :]
    words = tl.load(QW + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=mask, other=0)
    q = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
    g = tl.load(G + offs_k, mask=mask_k, other=0)
    z = tl.load(Z + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (q.to(tl.float32) - z) * s


@triton.jit
def _int4_gemm_kernel(X, QW, Z, S, G, BIAS, OUT, M, N, K, stride_xm, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _dequant_tile(QW, Z, S, G, offs_k, offs_n, mask_k, mask_n, N)
        acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_gemv_kernel(X, QW, Z, S, G, PART, N, K, stride_xm, k_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(X + row * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        w = _dequant_tile(QW, Z, S, G, offs_k, offs_n, mask_k, mask_n, N)
        acc += tl.sum(x[:, None] * w, axis=0)
    tl.store(PART + (split * tl.num_programs(1) + row) * N + offs_n, acc, mask=mask_n)


def _check(x: torch.Tensor, qweight: torch.Tensor) -> tuple[int, int, int]:
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 8 != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} packs {qweight.shape[0] * 8} input "
                         f"rows, x has {k}")
    if x.stride(1) != 1 or not qweight.is_contiguous():
        raise ValueError("x needs contiguous rows and qweight must be contiguous")
    return m, n, k


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
              scales: torch.Tensor, g_idx: torch.Tensor, bias: torch.Tensor | None = None,
              block_m: int | None = None, block_n: int = 64, block_k: int = 64
              ) -> torch.Tensor:
    """x [M, K] @ dequant(qweight) [K, N] (+ bias) in x's dtype, through tl.dot."""
    m, n, k = _check(x, qweight)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_gemm_kernel[grid](x, qweight, zeros, scales, g_idx,
                            bias if bias is not None else out, out, m, n, k,
                            x.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
              scales: torch.Tensor, g_idx: torch.Tensor, bias: torch.Tensor | None = None,
              block_n: int = 64, block_k: int = 64, split_k: int | None = None
              ) -> torch.Tensor:
    """int4_gemm's product for few rows, without tensor cores; split_k slices of K run
    in parallel (default: enough programs to fill a large GPU at narrow N)."""
    m, n, k = _check(x, qweight)
    if split_k is None:
        split_k = max(1, min(k // (4 * block_k), 256 // triton.cdiv(n, block_n)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, block_n), m, split_k)
        _int4_gemv_kernel[grid](x, qweight, zeros, scales, g_idx, part, n, k, x.stride(0),
                                k_per_split, BLOCK_N=block_n, BLOCK_K=block_k)
    out = part.sum(0) if split_k > 1 else part[0]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
