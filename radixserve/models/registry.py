"""Model classes by the HF `architectures` name, imported only when asked for."""

from __future__ import annotations

import importlib

from torch import nn

# architecture name -> module under radixserve.models
_MODELS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v2",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    module = _MODELS.get(architecture)
    if module is None:
        raise ValueError(f"model architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    return getattr(importlib.import_module(f"radixserve.models.{module}"), architecture)
