"""Routing: which experts each token goes to, and with what weight.

Covers the families we serve:

* Qwen2/Qwen3-MoE and DeepSeek-V2 ("greedy"): softmax over all experts, top-k, and
  optionally renormalise the k weights to sum to one (`norm_topk_prob`).
* DeepSeek-V2 "group_limited_greedy": experts are split into `num_expert_group`
  groups; only the `topk_group` groups with the highest best-expert score compete.
* DeepSeek-V3 ("noaux_tc"): sigmoid scores; a per-expert `correction_bias` is added
  for the *choice* only (groups ranked by the sum of their two best biased scores),
  while the weights come from the unbiased scores.

All of it runs in float32 whatever the activation dtype, as the reference models do:
bf16 router logits flip near-tied choices.

`select_experts` is the reference; `route_experts`, which the models call, runs the
one-launch Triton kernel (topk_triton.py) on CUDA where it covers the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.layers.lazy_kernels import triton_kernel


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid
    renormalize: bool = False
    num_expert_group: int | None = None
    topk_group: int | None = None
    # How a group is ranked: "max" (V2: its best expert) or "top2_sum" (V3).
    group_score: str = "max"
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be softmax or sigmoid, got {self.scoring!r}")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score must be max or top2_sum, got {self.group_score!r}")


def route_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                  correction_bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts' result, by the fused kernel on CUDA where it covers `cfg`."""
    if router_logits.is_cuda:
        mod = triton_kernel("radixserve.layers.moe.topk_triton")
        if mod is not None and mod.fused_routing_covers(cfg, router_logits.shape[1]):
            return mod.fused_select_experts(router_logits, cfg, correction_bias)
    return select_experts(router_logits, cfg, correction_bias)


def select_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                   correction_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int32)."""
    logits = router_logits.float()
    scores = logits.softmax(-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_expert_group and cfg.num_expert_group > 1:
        choice = _mask_to_top_groups(choice, cfg)
    ids = torch.topk(choice, cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        # The epsilon only matters for sigmoid scores that all underflow.
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids.to(torch.int32)


def _mask_to_top_groups(choice: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    tokens, experts = choice.shape
    groups = choice.view(tokens, cfg.num_expert_group, experts // cfg.num_expert_group)
    if cfg.group_score == "max":
        group_scores = groups.max(-1).values
    else:
        group_scores = groups.topk(2, dim=-1).values.sum(-1)
    top = torch.topk(group_scores, cfg.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)
    return groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, experts)
