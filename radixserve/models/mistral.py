"""Mistral: the Llama architecture under another name.

A sliding window, where the config sets one, is honoured by capping the context
length at it (see configs/model_config.py), so full attention stays exact.
"""

from __future__ import annotations

from radixserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
