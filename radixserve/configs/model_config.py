"""ModelConfig: what the engine needs to know about a model, read once at startup.

It wraps the HF `PretrainedConfig` (from `config.json`, or built from GGUF metadata)
and adds what lives elsewhere: EOS ids and default sampling values from
`generation_config.json`, the serving dtype and the context length.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from radixserve.configs.load_config import LoadConfig
from radixserve.configs.pooling_config import PoolingConfig, pooling_config_for

logger = logging.getLogger(__name__)

# generation_config.json key -> SamplingParams field. Only keys the file states are
# used: GenerationConfig's own fallbacks (top_k=50, ...) are not the model's choice.
_GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


@dataclass
class ModelConfig:
    model_path: str
    hf_config: PretrainedConfig
    dtype: torch.dtype
    context_len: int
    eos_token_ids: set[int] = field(default_factory=set)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # How an embedding, classification or reward model pools its hidden states; None
    # for a model that generates.
    pooling: PoolingConfig | None = None

    @classmethod
    def from_load_config(cls, load: LoadConfig) -> "ModelConfig":
        path = str(load.model_path)
        hf_config = load_hf_config(path, load.is_gguf, load.trust_remote_code)
        gen = _read_generation_config(path)
        archs = getattr(hf_config, "architectures", None) or []
        pooling = (pooling_config_for(path, text_config_of(hf_config), archs[0],
                                      load.is_embedding) if archs else None)
        return cls(
            model_path=path,
            hf_config=hf_config,
            dtype=load.torch_dtype,
            context_len=_context_len(text_config_of(hf_config), load.context_length,
                                     hf_config.architectures),
            pooling=pooling,
            eos_token_ids=_as_id_set(getattr(hf_config, "eos_token_id", None))
            | _as_id_set(getattr(text_config_of(hf_config), "eos_token_id", None))
            | _as_id_set(gen.get("eos_token_id")),
            generation_defaults={ours: gen[theirs] for theirs, ours in _GENERATION_KEYS.items()
                                 if gen.get(theirs) is not None},
        )

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ValueError(f"{self.model_path}: config has no `architectures` entry")
        return archs[0]

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config: `text_config` of a vision-language model, the
        config itself otherwise."""
        return text_config_of(self.hf_config)

    @property
    def num_hidden_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return head_dim_of(self.text_config)

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3): the KV cache keeps a latent."""
        return bool(getattr(self.hf_config, "kv_lora_rank", None))

    @property
    def kv_lora_rank(self) -> int:
        return self.hf_config.kv_lora_rank

    @property
    def qk_rope_head_dim(self) -> int:
        return self.hf_config.qk_rope_head_dim

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))


def text_config_of(config: PretrainedConfig) -> PretrainedConfig:
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def head_dim_of(config: PretrainedConfig) -> int:
    """Explicit `head_dim` when the config has one (Qwen3 decouples it from hidden size)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def load_hf_config(model_path: str, is_gguf: bool, trust_remote_code: bool = False
                   ) -> PretrainedConfig:
    if is_gguf or model_path.endswith(".gguf"):
        from radixserve.configs.gguf_config import load_gguf_config, resolve_gguf_file

        return load_gguf_config(resolve_gguf_file(model_path))
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ValueError(f"{model_path}: no config.json (expected an HF model folder or a "
                         f".gguf file)")
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _read_generation_config(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _context_len(config: PretrainedConfig, override: int | None,
                 architectures: list[str] | None = None) -> int:
    if override is not None:
        return override
    length = getattr(config, "max_position_embeddings", None) or 2048
    if "XLMRobertaModel" in (architectures or []):
        # Its positions start after the padding index (transformers' numbering).
        length -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    window = getattr(config, "sliding_window", None)
    if "MistralForCausalLM" in (architectures or []) and window and window < length:
        # Our attention is full (no window): capping the context at the window keeps
        # results exact instead of silently attending past it.
        logger.info("Mistral sliding window %d: context length capped to it", window)
        length = window
    return length


def _as_id_set(ids: int | list[int] | None) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    return {int(i) for i in ids}
