"""Model classes by the HF `architectures` name, imported only when asked for."""

from __future__ import annotations

import importlib

from torch import nn

from radixserve.configs.pooling_config import PoolingConfig

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
    # Models that answer with vectors (configs/pooling_config.py).
    "BertModel": "bert",
    "XLMRobertaModel": "bert",
    "LlamaForSequenceClassification": "pooled_decoder",
    "MistralForSequenceClassification": "pooled_decoder",
    "Qwen2ForSequenceClassification": "pooled_decoder",
    "Qwen3ForSequenceClassification": "pooled_decoder",
    "Qwen2ForRewardModel": "pooled_decoder",
}
# A decoder served as an embedder (--is-embedding, or a stack saved without its head)
# -> its class in pooled_decoder.
_EMBEDDERS = {
    "LlamaForCausalLM": "LlamaEmbeddingModel", "LlamaModel": "LlamaEmbeddingModel",
    "MistralForCausalLM": "MistralEmbeddingModel", "MistralModel": "MistralEmbeddingModel",
    "Qwen2ForCausalLM": "Qwen2EmbeddingModel", "Qwen2Model": "Qwen2EmbeddingModel",
    "Qwen3ForCausalLM": "Qwen3EmbeddingModel", "Qwen3Model": "Qwen3EmbeddingModel",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str, pooling: PoolingConfig | None = None
                    ) -> type[nn.Module]:
    """The class that serves `architecture`; with `pooling` (an embedding, classification
    or reward model), one that takes (config, pooling) and has a `pool` method."""
    if pooling is not None and pooling.task == "embed" and architecture in _EMBEDDERS:
        module = importlib.import_module("radixserve.models.pooled_decoder")
        return getattr(module, _EMBEDDERS[architecture])
    module = _MODELS.get(architecture)
    if module is None:
        raise ValueError(f"model architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    return getattr(importlib.import_module(f"radixserve.models.{module}"), architecture)
