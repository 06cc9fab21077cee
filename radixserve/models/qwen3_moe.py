"""Qwen3-MoE: Qwen2-MoE's sparse layers without the shared expert, and Qwen3's
attention (per-head q/k RMSNorm, no qkv bias)."""

from __future__ import annotations

from transformers import PretrainedConfig

from radixserve.models.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qk_norm = True
    shared_expert = False

    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))
