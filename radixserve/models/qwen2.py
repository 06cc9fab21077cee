"""Qwen2: Llama with a bias on the q, k and v projections (not on o_proj)."""

from __future__ import annotations

from transformers import PretrainedConfig

from radixserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return True
