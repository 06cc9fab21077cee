"""Routing in one launch: router logits [T, E] -> (weights [T, k] float32, ids [T, k] int32).

`select_experts` (topk.py) is the reference: softmax or sigmoid, the correction bias,
the group mask, top-k, gather, renormalise and scale are six to ten small torch ops a
layer. Here each program holds the E logits of BLOCK_T tokens in registers and does all
of it, so a decode step's routing is one launch per MoE layer whatever the variant.

Same results as the reference, with two rules stated rather than inherited:

* Ties go to the lowest expert id (and, among groups, to the lowest group), the order
  `torch.sort(descending=True, stable=True)` gives. `torch.topk` leaves the order of
  tied values unspecified (on CPU it is neither ascending nor descending), so the ids
  are the reference's only where no two candidates tie at the k-th place.
* Softmax without a bias, ungrouped or grouped by each group's best expert, chooses on
  the logits: softmax is monotonic, so the experts are the same, and the choice cannot
  hinge on how exp rounds. The weights are still the softmax's.

Scores are float32 whatever the logits' dtype. On CUDA exp is libdevice's: tl.exp is
the approximate ex2 there, a few ulp off torch's expf, enough to reorder near-tied
experts where sigmoid scores plus a bias are compared. (The interpreter has no
libdevice; numpy's exp stands in.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from radixserve.layers.moe.topk import RoutingConfig
from radixserve.layers.triton_kernels.pdl import pdl_kwargs, pdl_launch_dependents, pdl_wait

# Past this the [BLOCK_T, E] register tiles of one program would spill.
MAX_EXPERTS = 1024
# Elements of one [BLOCK_T, BLOCK_E] tile: 16 float32 a thread at 4 warps.
_TILE = 2048


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _keep_top_groups(choice, cols, group_size, NUM_GROUPS: tl.constexpr,
                     TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """choice with every expert outside each token's TOPK_GROUP best groups at -inf.
    A group scores its best value, or with GROUP_TOP2 its two best (the best counted
    once, the second may equal it, as topk(2) counts them)."""
    group_of = cols // group_size
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        vals = tl.where((group_of == g)[None, :], choice, float("-inf"))
        best = tl.max(vals, 1)
        if GROUP_TOP2:
            first = tl.argmax(vals, 1, tie_break_left=True)
            rest = tl.where(cols[None, :] == first[:, None], float("-inf"), vals)
            best = best + tl.max(rest, 1)
        gscore = tl.where(gcols[None, :] == g, best[:, None], gscore)
    keep = tl.zeros_like(choice).to(tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        top = tl.argmax(gscore, 1, tie_break_left=True)
        keep = tl.where(group_of[None, :] == top[:, None], 1, keep)
        gscore = tl.where(gcols[None, :] == top[:, None], float("-inf"), gscore)
    return tl.where(keep != 0, choice, float("-inf"))


@triton.jit
def _routing_kernel(Logits, Bias, Weights, Ids, T, E, stride_t, group_size, scaling,
                    TOP_K: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CHOOSE_ON_LOGITS: tl.constexpr,
                    NUM_GROUPS: tl.constexpr, TOPK_GROUP: tl.constexpr,
                    GROUP_TOP2: tl.constexpr, PRECISE_EXP: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_mask = rows < T
    col_mask = cols < E
    pdl_wait(USE_PDL)
    # Rows past T read 0 (not -inf): a row of -inf would make the softmax NaN.
    logits = tl.load(Logits + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
    pdl_launch_dependents(USE_PDL)
    logits = tl.where(col_mask[None, :], logits, float("-inf"))
    if SIGMOID:
        scores = 1.0 / (1.0 + _exp(-logits, PRECISE_EXP))
    else:
        p = _exp(logits - tl.max(logits, 1)[:, None], PRECISE_EXP)
        scores = p / tl.sum(p, 1)[:, None]
    if CHOOSE_ON_LOGITS:
        choice = logits
    else:
        choice = scores
        if HAS_BIAS:
            choice = choice + bias[None, :]
        choice = tl.where(col_mask[None, :], choice, float("-inf"))
    if NUM_GROUPS > 1:
        choice = _keep_top_groups(choice, cols, group_size, NUM_GROUPS, TOPK_GROUP,
                                  GROUP_TOP2, BLOCK_T, BLOCK_G)

    kcols = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, 1, tie_break_left=True)
        hit = cols[None, :] == best[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), 1)
        top_w = tl.where(kcols[None, :] == j, w[:, None], top_w)
        top_i = tl.where(kcols[None, :] == j, best.to(tl.int32)[:, None], top_i)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORM:
        # The reference's epsilon, for sigmoid scores that all underflow.
        top_w = top_w / (tl.sum(top_w, 1)[:, None] + 1e-20)
    top_w = top_w * scaling
    offs = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    out_mask = row_mask[:, None] & (kcols < TOP_K)[None, :]
    tl.store(Weights + offs, top_w, mask=out_mask)
    tl.store(Ids + offs, top_i, mask=out_mask)


def fused_routing_covers(cfg: RoutingConfig, num_experts: int) -> bool:
    """Whether `fused_select_experts` computes this routing (else use select_experts).
    What it leaves out are configs the reference itself rejects or makes arbitrary:
    more groups to keep than exist, fewer candidates than k, top2 of 1-expert groups."""
    if num_experts > MAX_EXPERTS or not 1 <= cfg.top_k <= num_experts:
        return False
    groups = cfg.num_expert_group or 1
    if groups == 1:
        return True
    if num_experts % groups or not cfg.topk_group or cfg.topk_group > groups:
        return False
    group_size = num_experts // groups
    if cfg.group_score == "top2_sum" and group_size < 2:
        return False
    return cfg.top_k <= cfg.topk_group * group_size


def fused_select_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                         correction_bias: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts in one launch: router_logits [T, E] (any float dtype, last dim
    contiguous) -> (weights [T, k] float32, ids [T, k] int32)."""
    tokens, num_experts = router_logits.shape
    if not fused_routing_covers(cfg, num_experts):
        raise ValueError(f"the fused routing kernel does not cover {cfg} with "
                         f"{num_experts} experts; use select_experts")
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    dev = router_logits.device
    weights = torch.empty(tokens, cfg.top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(tokens, cfg.top_k, dtype=torch.int32, device=dev)
    if tokens == 0:
        return weights, ids
    groups = cfg.num_expert_group or 1
    has_bias = correction_bias is not None
    if has_bias and correction_bias.shape != (num_experts,):
        raise ValueError(f"correction_bias must be [{num_experts}]; got "
                         f"{tuple(correction_bias.shape)}")
    block_e = triton.next_power_of_2(num_experts)
    block_t = min(triton.next_power_of_2(tokens), max(1, _TILE // block_e))
    choose_on_logits = (cfg.scoring == "softmax" and not has_bias
                        and (groups == 1 or cfg.group_score == "max"))
    _routing_kernel[(triton.cdiv(tokens, block_t),)](
        router_logits, correction_bias.contiguous() if has_bias else router_logits,
        weights, ids, tokens, num_experts, router_logits.stride(0), num_experts // groups,
        float(cfg.routed_scaling_factor),
        TOP_K=cfg.top_k, SIGMOID=cfg.scoring == "sigmoid", RENORM=cfg.renormalize,
        HAS_BIAS=has_bias, CHOOSE_ON_LOGITS=choose_on_logits, NUM_GROUPS=groups,
        TOPK_GROUP=cfg.topk_group if groups > 1 else 1,
        GROUP_TOP2=cfg.group_score == "top2_sum", PRECISE_EXP=router_logits.is_cuda,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(groups),
        BLOCK_K=triton.next_power_of_2(cfg.top_k), num_warps=4,
        **pdl_kwargs(router_logits))
    return weights, ids
