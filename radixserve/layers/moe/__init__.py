"""Mixture-of-experts layers: routing (topk.py) and the fused experts (fused_moe.py)."""

from radixserve.layers.moe.fused_moe import FusedMoE, fused_experts, fused_experts_reference
from radixserve.layers.moe.topk import RoutingConfig, route_experts, select_experts

__all__ = ["FusedMoE", "RoutingConfig", "fused_experts", "fused_experts_reference",
           "route_experts", "select_experts"]
