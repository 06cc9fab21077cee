"""Experts for a few tokens: two GEMV kernels over the (token, slot) pairs, no sorting.

At decode a step routes T*k pairs, a few dozen, and the grouped GEMM's machinery
(sort and pad the pairs by expert, M tiles of mostly padding, a combine) costs more
than the weights it reads. Here the routing stays in [T, k] order:

1. `_gate_up_kernel`, one program per (pair, tile of BLOCK_I rows of I): reads the
   pair's expert id, streams the matching gate and up rows of w13 against the token's
   x (fp32 FMA, one reduction at the end) and stores silu(gate) * up, rounded to x's
   dtype as the grouped kernel stores it, into act [T*k, I].
2. `_down_kernel`, one program per (token, tile of BLOCK_H rows of H): one flat loop
   over the k slots and the I steps (flat so the pipeliner prefetches across slots)
   adds w2[expert] rows times act * routing weight into one fp32 accumulator, and
   writes the token's output rows once: the k slots are summed in a fixed order inside
   the program, with no atomics and no combine launch.

The pair index is the fastest grid axis of both kernels, so the programs for one tile
of every pair run side by side and pairs that share an expert find its rows in L2.
No host sync and every shape depends only on T: the path is capturable in a CUDA graph.

Enough programs at T = 1 come from narrow tiles rather than split-K: gate/up tiles
shrink to as little as one row of I (a TP-sliced I of 96 still makes hundreds of
programs), and down tiles to four rows of H, each program streaming a few KB per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait

# Elements of the gate + up tiles per step, and of the down kernel's accumulator:
# 16 KB of bf16 weights a step, 64 fp32 registers a thread at 4 warps.
_STEP_ELEMS = 8192
# Programs per SM aimed for at T = 1, to keep enough loads in flight.
_PROGRAMS_PER_SM = 4


@dataclass(frozen=True, slots=True)
class SmallBatchConfig:
    block_i: int  # gate/up: rows of I per program
    block_k: int  # gate/up: columns of H per step
    block_h: int  # down: rows of H per program
    block_di: int  # down: columns of I per step
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _gate_up_kernel(X, W13, Ids, Act, I, H, stride_xt, stride_we, stride_wn,
                    TOP_K: tl.constexpr, EVEN_H: tl.constexpr, BLOCK_I: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pair = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < I
    # Rows past I read row 0 (in bounds, dropped at the store): W's loads need a mask
    # only along H, and none when H tiles evenly.
    rows = tl.where(i_mask, offs_i, 0).to(tl.int64)
    pdl_wait(USE_PDL)
    expert = tl.load(Ids + pair).to(tl.int64)
    x_row = X + (pair // TOP_K).to(tl.int64) * stride_xt
    gate_rows = W13 + expert * stride_we + rows[:, None] * stride_wn
    up_rows = gate_rows + I * stride_wn
    acc_g = tl.zeros([BLOCK_I, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_H:
            x = tl.load(x_row + offs_k)
            g = tl.load(gate_rows + offs_k[None, :])
            u = tl.load(up_rows + offs_k[None, :])
        else:
            k_mask = offs_k < H
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0)
            g = tl.load(gate_rows + offs_k[None, :], mask=k_mask[None, :], other=0.0)
            u = tl.load(up_rows + offs_k[None, :], mask=k_mask[None, :], other=0.0)
        xf = x.to(tl.float32)[None, :]
        acc_g += g.to(tl.float32) * xf
        acc_u += u.to(tl.float32) * xf
    pdl_launch_dependents(USE_PDL)
    gate = tl.sum(acc_g, 1)
    act = gate * tl.sigmoid(gate) * tl.sum(acc_u, 1)
    tl.store(Act + pair.to(tl.int64) * I + offs_i, act.to(Act.dtype.element_ty), mask=i_mask)


@triton.jit
def _down_kernel(Act, W2, Ids, Weights, Out, H, I, stride_we, stride_wh, stride_ot,
                 TOP_K: tl.constexpr, EVEN_I: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_I: tl.constexpr, USE_PDL: tl.constexpr):
    token = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    rows = tl.where(h_mask, offs_h, 0).to(tl.int64)[:, None] * stride_wh
    pdl_wait(USE_PDL)
    acc = tl.zeros([BLOCK_H, BLOCK_I], dtype=tl.float32)
    steps_i = tl.cdiv(I, BLOCK_I)
    for step in range(TOP_K * steps_i):
        slot = step // steps_i
        offs_i = (step - slot * steps_i) * BLOCK_I + tl.arange(0, BLOCK_I)
        pair = token * TOP_K + slot
        expert = tl.load(Ids + pair).to(tl.int64)
        route_w = tl.load(Weights + pair)
        w_ptrs = W2 + expert * stride_we + rows + offs_i[None, :]
        a_ptrs = Act + pair.to(tl.int64) * I + offs_i
        if EVEN_I:
            w = tl.load(w_ptrs)
            a = tl.load(a_ptrs)
        else:
            i_mask = offs_i < I
            w = tl.load(w_ptrs, mask=i_mask[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=i_mask, other=0.0)
        acc += w.to(tl.float32) * (a.to(tl.float32) * route_w)[None, :]
    pdl_launch_dependents(USE_PDL)
    out = tl.sum(acc, 1)
    tl.store(Out + token.to(tl.int64) * stride_ot + offs_h, out.to(Out.dtype.element_ty),
             mask=h_mask)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_small_config(tokens: int, top_k: int, hidden: int, inter: int,
                         device: torch.device) -> SmallBatchConfig:
    """Tiles that give each kernel about _PROGRAMS_PER_SM programs an SM at this T:
    the widest tiles (fewest re-reads of x and act) that still reach that count."""
    if device.type != "cuda":
        # The CPU interpreter runs only in tests: small tiles so that tiny shapes still
        # span several tiles and steps.
        return SmallBatchConfig(block_i=4, block_k=16, block_h=4, block_di=16,
                                num_warps=1, num_stages=1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = _PROGRAMS_PER_SM * _sm_count(index)
    block_i = 16
    while block_i > 1 and tokens * top_k * triton.cdiv(inter, block_i) < target:
        block_i //= 2
    block_h = 32
    while block_h > 4 and tokens * triton.cdiv(hidden, block_h) < target:
        block_h //= 2
    return SmallBatchConfig(
        block_i=block_i,
        block_k=min(triton.next_power_of_2(hidden), _STEP_ELEMS // (2 * block_i)),
        block_h=block_h,
        block_di=min(triton.next_power_of_2(inter), _STEP_ELEMS // block_h))


def small_batch_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        config: SmallBatchConfig | None = None) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]), the same arguments and
    result as `fused_experts_triton`: x [T, H]; w13 [E, 2I, H] (gate rows then up rows);
    w2 [E, H, I]; topk_weights [T, k] float32; topk_ids [T, k] int. Returns [T, H] in
    x's dtype."""
    tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    if (w13.shape[2] != hidden or w2.shape[1:] != (hidden, inter) or x.stride(1) != 1
            or w13.stride(2) != 1 or w2.stride(2) != 1):
        raise ValueError(f"small_batch_experts needs x [T, H], w13 [E, 2I, H], w2 [E, H, I] "
                         f"with contiguous last dims; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    cfg = config or default_small_config(tokens, top_k, hidden, inter, x.device)
    ids = topk_ids.contiguous()
    weights = topk_weights.float().contiguous()
    act = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    pdl = pdl_kwargs(x)
    _gate_up_kernel[(tokens * top_k, triton.cdiv(inter, cfg.block_i))](
        x, w13, ids, act, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        TOP_K=top_k, EVEN_H=hidden % cfg.block_k == 0, BLOCK_I=cfg.block_i,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    _down_kernel[(tokens, triton.cdiv(hidden, cfg.block_h))](
        act, w2, ids, weights, out, hidden, inter, w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, EVEN_I=inter % cfg.block_di == 0, BLOCK_H=cfg.block_h,
        BLOCK_I=cfg.block_di, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    return out
