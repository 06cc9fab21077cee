"""Tiny random mixture-of-experts checkpoints (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3),
made with transformers like tests/model_factory.py's and sharing its SmolLM2 tokenizer.

Each config exercises the family's options: Qwen2-MoE a shared expert and a dense layer
(mlp_only_layers), Qwen3-MoE q/k norms and renormalised top-k, DeepSeek-V2 MLA without a
q low-rank, group-limited softmax routing and YaRN with mscale, DeepSeek-V3 the q
low-rank, sigmoid routing with a score-correction bias and interleaved-pair RoPE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.model_factory import _common, smollm2_tokenizer

MOE_ARCHS = ["qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3"]

_YARN = {"type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
         "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 256}


def _deepseek(**overrides) -> dict:
    return _common(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                   moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
                   rope_scaling=_YARN, **overrides)


def tiny_moe_config(arch: str):
    import transformers as tf

    if arch == "qwen2-moe":
        return tf.Qwen2MoeConfig(**_common(
            num_hidden_layers=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1]))
    if arch == "qwen3-moe":
        return tf.Qwen3MoeConfig(**_common(
            head_dim=32, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
            norm_topk_prob=True))
    if arch == "deepseek-v2":
        return tf.DeepseekV2Config(**_deepseek(
            q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=1.5))
    if arch == "deepseek-v3":
        return tf.DeepseekV3Config(**_deepseek(q_lora_rank=24, n_group=2, topk_group=1,
                                               norm_topk_prob=True, routed_scaling_factor=2.5))
    raise ValueError(arch)


def make_tiny_moe_checkpoint(arch: str, path: Path, seed: int = 0,
                             with_tokenizer: bool = True) -> Path:
    """Save a random float32 checkpoint; norms and V3's correction bias are random too,
    so a loader that skipped them would be caught."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.save_pretrained(path)
    if with_tokenizer:
        smollm2_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Import into a test module to run it on one intra-op thread: these models are so
    small that thread hand-offs dominate every op, and on a busy machine they cost up to
    50x (HF's grouped-mm experts most of all)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
