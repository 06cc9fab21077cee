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

`rmsnorm_gemv` does the same for the RMSNorm before qkv and gate/up: every program
first sums the squares of each whole row of h = x + residual (x and the residual are a
few KB, read again from L2 by each program), then normalises h as it loads it, with the
`rmsnorm` kernel's roundings. Program (0, 0) also writes h, the next residual, to a new
tensor. A decode layer then runs two fewer kernels.
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
def _load_h(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """h = x + residual, rounded to the residual's dtype as _rmsnorm_kernel rounds it;
    x alone without a residual."""
    h = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
    return h


@triton.jit
def _rows_rstd(X, Residual, NewResidual, M, K, stride_xm, stride_rm, eps, store_h,
               HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, NORM_BLOCK: tl.constexpr):
    """1 / rms of each row of h over all of K, as a [BLOCK_M] vector (0 past M). Each
    row is one sum over a NORM_BLOCK vector, as in _rmsnorm_kernel: on a GPU the two
    sums are the same where both kernels spread the row over as many warps (4 at
    513 <= K <= 1024, the GEMV's usual 4); elsewhere they may differ in the last bit.
    With store_h the program also writes h to NewResidual."""
    offs = tl.arange(0, NORM_BLOCK)
    mask = offs < K
    rows = tl.arange(0, BLOCK_M)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m in range(M):
        h = _load_h(X + m * stride_xm + offs, Residual + m * stride_rm + offs, mask,
                    HAS_RESIDUAL)
        if HAS_RESIDUAL:
            if store_h:
                tl.store(NewResidual + m * K + offs, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.where(rows == m, 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps), rstd)
    return rstd


@triton.jit
def _normed(h, rstd, w):
    """rmsnorm(h) * w with _rmsnorm_kernel's roundings (to h's dtype, twice)."""
    normed = (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)
    return (normed * w.to(tl.float32)).to(h.dtype)


@triton.jit
def _load_w(w_rows, k0, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of W's rows at columns k0..k0 + BLOCK_K."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        w = tl.load(w_rows + offs_k[None, :])
    else:
        w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
    return w


@triton.jit
def _accumulate(acc, w, k0, X, Residual, NormW, rstd, offs_m, m_mask, K, stride_xm, stride_rm,
                ACT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                USE_DOT: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc plus the W tile at k0 times the matching slice of the input (silu-and-mul'd
    or normalised as it loads, per ACT / NORM)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if USE_DOT:
        mk_mask = m_mask[None, :] & k_mask[:, None]
        if NORM:
            h = _load_h(X + offs_m[None, :] * stride_xm + offs_k[:, None],
                        Residual + offs_m[None, :] * stride_rm + offs_k[:, None],
                        mk_mask, HAS_RESIDUAL)
            x = _normed(h, rstd[None, :],
                        tl.load(NormW + offs_k, mask=k_mask, other=0.0)[:, None])
        else:
            x = _load_x(X, offs_m[None, :] * stride_xm + offs_k[:, None], mk_mask, K, ACT)
        acc = tl.dot(w, x.to(w.dtype), acc)
    else:
        # (An else, not an early return: Triton compiles what follows a return in a
        # constexpr branch, here with the other branch's shapes.)
        if NORM:
            h = _load_h(X + offs_k, Residual + offs_k, k_mask, HAS_RESIDUAL)
            x = _normed(h, rstd, tl.load(NormW + offs_k, mask=k_mask, other=0.0))
        else:
            x = _load_x(X, offs_k, k_mask, K, ACT)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return acc


@triton.jit
def _gemv_kernel(X, W, Bias, Out, Part, Residual, NormW, NewResidual, M, N, K, k_per_split,
                 stride_xm, stride_rm, stride_wn, stride_om, eps,
                 ACT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # Rows past N read row 0 (in bounds, discarded at the store), so W's loads need a
    # mask only along K, and none when K tiles evenly.
    w_rows = W + tl.where(n_mask, offs_n, 0).to(tl.int64)[:, None] * stride_wn
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # W is a constant no kernel writes, so its first tile (at the Qwen3 decode shapes
    # most programs have one or two) is loaded before waiting for the predecessor
    # (PDL): the weight stream, which is this kernel's whole cost, starts while the
    # kernel before it is still finishing. Everything else waits.
    w = _load_w(w_rows, k_lo, K, EVEN_K, BLOCK_K)
    pdl_wait(USE_PDL)
    rstd = 0.0
    if NORM:
        # Every program needs the whole rows for their rms; program (0, 0) alone stores
        # the new residual.
        rstd = _rows_rstd(X, Residual, NewResidual, M, K, stride_xm, stride_rm, eps,
                          (pid_n == 0) & (pid_k == 0), HAS_RESIDUAL, BLOCK_M, NORM_BLOCK)
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Every split holds at least one BLOCK_K step (see _launch), so the first is real.
    acc = _accumulate(acc, w, k_lo, X, Residual, NormW, rstd, offs_m, m_mask, K,
                      stride_xm, stride_rm, ACT, NORM, HAS_RESIDUAL, USE_DOT, BLOCK_K)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w = _load_w(w_rows, k0, K, EVEN_K, BLOCK_K)
        acc = _accumulate(acc, w, k0, X, Residual, NormW, rstd, offs_m, m_mask, K,
                          stride_xm, stride_rm, ACT, NORM, HAS_RESIDUAL, USE_DOT, BLOCK_K)
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
    most loads in flight. Where N <= 1,024 and K < 4,096 (the 0.6B model's o and down
    projections), 8-row tiles give fewer programs than an H100 has SMs: 4-row tiles up
    to K = 2,048, 8 warps per program above (the decode-bs1 step it saves is in
    docs/benchmarks.md). More rows: the tensor-core kernel with 64 x 256 tiles, four
    stages deep. Split-K only where N alone gives too few programs (the 0.6B model's o
    and down).
    """
    if m == 1:
        block_n, block_k = (4, 2048) if k >= 4096 else (8, 1024)
        num_warps = 4
        if n <= 1024 and k < 4096:
            block_n, num_warps = (4, 4) if k <= 2048 else (8, 8)
        return GemvConfig(block_n=block_n, block_k=min(block_k, max(16, triton.next_power_of_2(k))),
                          num_warps=num_warps, num_stages=2, use_dot=False)
    block_k = 128 if k <= 2048 else 256
    programs = triton.cdiv(n, 64)
    split_k = 1
    while programs * split_k < 64 and k // (2 * split_k) >= 2 * block_k:
        split_k *= 2
    return GemvConfig(block_n=64, block_k=block_k, split_k=split_k, num_warps=4, num_stages=4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, silu_and_mul_input: bool = False,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] (M <= 16, last dim contiguous); weight: [N, K] contiguous; bias: [N].
    Returns [M, N] in x's dtype, accumulated in fp32, in `out` when given (contiguous).
    With silu_and_mul_input, x is [M, 2K] = cat(gate, up) and the product is
    silu(gate) * up @ weight^T."""
    k = x.shape[1] // 2 if silu_and_mul_input else x.shape[1]
    _check(x, weight, k)
    if out is not None and (out.shape != (x.shape[0], weight.shape[0])
                            or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{x.shape[0]}, {weight.shape[0]}] "
                         f"{x.dtype}; got {tuple(out.shape)} {out.dtype}")
    return _launch(x, weight, bias, k, config, act=silu_and_mul_input, out=out)


@dataclass(frozen=True, slots=True)
class _NormInput:
    residual: torch.Tensor | None
    weight: torch.Tensor
    eps: float
    new_residual: torch.Tensor | None


def rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gemv(rmsnorm(h, norm_weight, eps), weight, bias) for h = x + residual (x alone
    when residual is None), bit for bit the rmsnorm / fused_add_rmsnorm kernel followed
    by gemv. Returns (out, h); h is a new tensor (x itself without a residual), since
    every program reads all of x and residual, so none may overwrite them."""
    m, k = x.shape
    _check(x, weight, k)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"the residual must match x {tuple(x.shape)} {x.dtype} with a "
                         f"contiguous last dim; got {tuple(residual.shape)} {residual.dtype}")
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be a contiguous [{k}]; got "
                         f"{tuple(norm_weight.shape)}")
    new_residual = (None if residual is None
                    else torch.empty(m, k, dtype=x.dtype, device=x.device))
    norm = _NormInput(residual, norm_weight, eps, new_residual)
    return _launch(x, weight, bias, k, config, norm=norm), (
        x if new_residual is None else new_residual)


def _check(x: torch.Tensor, weight: torch.Tensor, k: int) -> None:
    if (x.shape[0] > MAX_M or weight.shape[1] != k or x.stride(1) != 1
            or weight.stride(1) != 1):
        raise ValueError(f"gemv needs M <= {MAX_M} and last-dim-contiguous operands; got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
            config: GemvConfig | None, act: bool = False,
            norm: _NormInput | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    m, n = x.shape[0], weight.shape[0]
    if out is None:
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
    has_norm = norm is not None
    has_residual = has_norm and norm.residual is not None
    # Pointers that the constexprs leave unused point at x.
    residual = norm.residual if has_residual else x
    new_residual = norm.new_residual if has_residual else x
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
        x, weight, b, out, part, residual, norm.weight if has_norm else x, new_residual,
        m, n, k, k_per_split, x.stride(0), residual.stride(0), weight.stride(0),
        out.stride(0), norm.eps if has_norm else 0.0, ACT=act, NORM=has_norm,
        HAS_RESIDUAL=has_residual, HAS_BIAS=bias is not None, SPLIT=split_k > 1,
        USE_DOT=cfg.use_dot, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=MAX_M if cfg.use_dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NORM_BLOCK=triton.next_power_of_2(k) if has_norm else 1, num_warps=cfg.num_warps,
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
