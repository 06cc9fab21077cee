"""Skinny matrix product for decode: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 16.

At small M a linear layer is a pass over its weight: bytes, not FLOPs, set the time,
so the kernel's only jobs are to read W exactly once, with 16-byte loads that run along
K (W keeps nn.Linear's [N, K] layout, rows contiguous), and to keep enough of those
loads in flight to saturate memory. Each program owns BLOCK_N rows of W and one of
SPLIT_K slices of K. With SPLIT_K == 1 it writes the output directly; otherwise the
slices write fp32 partial sums to a scratch [SPLIT_K, M, N] and a second small kernel
adds them in a fixed order (no atomics: the result is deterministic).

Two inner products: the tensor-core one (x padded to 16 rows, W tile as the left
operand so the tile's N side fills the MMA's M side) for any M, and a plain FMA one for
M == 1 that keeps a [BLOCK_N, BLOCK_K] fp32 accumulator and reduces it once at the end.
Both accumulate in fp32.

With `silu_and_mul_input`, x is a gated MLP's packed [M, 2K] = cat(gate, up) and the
kernel multiplies silu(gate) * up (in fp32, rounded to x's dtype, as the separate
`silu_and_mul` kernel rounds) as it loads it: the down projection of a decode step then
costs one kernel instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait

MAX_M = 16


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True  # False: the FMA kernel, M == 1 only


@triton.jit
def _load_x(X, offs, mask, K, ACT: tl.constexpr):
    """x at offs; with ACT, silu(gate) * up from the packed [.., 2K] gate/up rows."""
    if ACT:
        gate = tl.load(X + offs, mask=mask, other=0.0)
        up = tl.load(X + K + offs, mask=mask, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        return (g * tl.sigmoid(g) * up).to(gate.dtype)
    return tl.load(X + offs, mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(X, W, Bias, Out, Part, M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
                 ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 USE_DOT: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pdl_wait(USE_PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # Rows past N read row 0 (in bounds, discarded at the store), so W's loads need a
    # mask only along K, and none when K tiles evenly.
    w_rows = W + tl.where(n_mask, offs_n, 0).to(tl.int64)[:, None] * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :])
        else:
            w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
        if USE_DOT:
            x = _load_x(X, offs_m[None, :] * stride_xm + offs_k[:, None],
                        m_mask[None, :] & (offs_k < K)[:, None], K, ACT)
            acc = tl.dot(w, x.to(w.dtype), acc)
        else:
            x = _load_x(X, offs_k, offs_k < K, K, ACT)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    pdl_launch_dependents(USE_PDL)
    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=1)[:, None]
    nm_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        part = Part + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(part, out, mask=nm_mask)
    else:
        if HAS_BIAS:
            out += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(Out + offs_m[None, :] * stride_om + offs_n[:, None],
                 out.to(Out.dtype.element_ty), mask=nm_mask)


@triton.jit
def _splitk_reduce_kernel(Part, Bias, Out, M, N, stride_om, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    pdl_wait(USE_PDL)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: the same sum on every run
        total += tl.load(Part + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        total += tl.load(Bias + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + (offs // N) * stride_om + n, total.to(Out.dtype.element_ty), mask=mask)


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """A launch shape for [m, k] x [n, k]^T, tuned on an H100 at the Qwen3 shapes
    (tests/gpu/bench_gemv.py --sweep).

    One row: the FMA kernel with thin, long tiles won at every shape (4 x 2048 at
    K >= 4096, 8 x 1024 below): many programs, each streaming 16 KB per step, keep the
    most loads in flight. More rows: the tensor-core kernel with 64 x 256 tiles, four
    stages deep. Split-K only where N alone gives too few programs (the 0.6B model's o
    and down).
    """
    if m == 1:
        block_n, block_k = (4, 2048) if k >= 4096 else (8, 1024)
        return GemvConfig(block_n=block_n, block_k=min(block_k, max(16, triton.next_power_of_2(k))),
                          num_warps=4, num_stages=2, use_dot=False)
    block_k = 128 if k <= 2048 else 256
    programs = triton.cdiv(n, 64)
    split_k = 1
    while programs * split_k < 64 and k // (2 * split_k) >= 2 * block_k:
        split_k *= 2
    return GemvConfig(block_n=64, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, silu_and_mul_input: bool = False) -> torch.Tensor:
    """x: [M, K] (M <= 16, last dim contiguous); weight: [N, K] contiguous; bias: [N].
    Returns [M, N] in x's dtype, accumulated in fp32. With silu_and_mul_input, x is
    [M, 2K] = cat(gate, up) and the product is silu(gate) * up @ weight^T."""
    m, k = x.shape
    if silu_and_mul_input:
        k //= 2
    n = weight.shape[0]
    if m > MAX_M or weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv needs M <= {MAX_M} and last-dim-contiguous operands; got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or default_config(m, n, k)
    if not cfg.use_dot and m != 1:
        raise ValueError("the FMA kernel handles M == 1 only")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    part = (torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
            if split_k > 1 else out)
    b = bias if bias is not None else out
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
        x, weight, b, out, part, m, n, k, k_per_split, x.stride(0), weight.stride(0),
        out.stride(0), ACT=silu_and_mul_input, HAS_BIAS=bias is not None, SPLIT=split_k > 1, USE_DOT=cfg.use_dot,
        EVEN_K=k % cfg.block_k == 0, BLOCK_M=MAX_M if cfg.use_dot else 1,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_kwargs(x))
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, b, out, m, n, out.stride(0), SPLIT_K=split_k, HAS_BIAS=bias is not None,
            BLOCK=block, num_warps=4, **pdl_kwargs(x))
    return out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 accumulation of the same product, rounded once to x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
