"""Roofline numbers measured in the same run: copy bandwidth and matmul throughput.

Decode at small batch is bound by memory (every weight read once per step, or for MoE
every expert its tokens route to), prefill by compute (about 2 × active params FLOP per
token plus attention); benchmarks report their result as a fraction of these, measured
on the same GPU in the same process.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.configs.model_config import ModelConfig
from radixserve.layers.moe import FusedMoE
from radixserve.models.deepseek_v2 import is_moe_layer
from radixserve.models.qwen2_moe import is_sparse_layer


def _time_cuda(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """{"copy_Bps": read+write bytes/s of a 2 GiB copy, "matmul_flops": bf16 8192³}."""
    if device.type != "cuda":
        raise ValueError("--floor needs a CUDA device")
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time_cuda(lambda: dst.copy_(src), 20)
    copy_bps = 2 * n / t
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t = _time_cuda(lambda: a @ b, 20)
    del a, b
    torch.cuda.empty_cache()  # a runner built next sizes its KV pool by what is free
    return {"copy_Bps": copy_bps, "matmul_flops": 2 * 8192 ** 3 / t}


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens route to when each token picks top_k
    distinct experts uniformly at random: E·(1 − (1 − k/E)^T). It is k at one token
    and tends to E as tokens grow (64 tokens of Qwen3-30B-A3B's top-8 of 128: ≈126)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_weight_bytes(model: nn.Module, mc: ModelConfig, batch_size: int = 1) -> float:
    """Bytes one decode step of `batch_size` tokens reads from weights.

    The input embedding is a lookup of a few rows, so it counts only when tied (then
    the LM head reads all of it). A layer's routed experts (FusedMoE) count only as far
    as the step reaches them, `expected_experts_hit` of their E under uniform routing;
    routers and shared experts are plain layers and always read in full. For a dense
    model this is every weight but the untied embedding, whatever the batch."""
    routed_share: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, FusedMoE):
            e = module.num_experts
            share = expected_experts_hit(e, mc.hf_config.num_experts_per_tok, batch_size) / e
            for p in module.parameters(recurse=False):
                routed_share[id(p)] = share
    seen: set[int] = set()
    total = 0.0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if "embed_tokens" in name and not mc.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size() * routed_share.get(id(p), 1.0)
    return total


def model_flops_per_token(mc: ModelConfig) -> float:
    """Matmul FLOPs per token (2 × the weights one token touches), attention scores
    left out. In an MoE layer a token touches the router, its top_k routed experts and
    the shared experts, not all E experts."""
    cfg = mc.hf_config
    mlp = sum(_mlp_weights_per_token(cfg, i) for i in range(mc.num_hidden_layers))
    attn = mc.num_hidden_layers * _attention_weights(mc)
    return 2.0 * (attn + mlp + mc.hidden_size * mc.vocab_size)


def _attention_weights(mc: ModelConfig) -> int:
    cfg, h, heads = mc.hf_config, mc.hidden_size, mc.num_attention_heads
    if mc.is_mla:
        # Prefill's form: q (optionally through its low rank), the latent down
        # projection, its per-head expansion into K and V, and o.
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        rank = getattr(cfg, "q_lora_rank", None)
        q = rank * (h + heads * qk) if rank else h * heads * qk
        kv = (h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
              + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        return q + kv + heads * cfg.v_head_dim * h
    q = heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim
    return h * (q + 2 * kv) + q * h


def _mlp_weights_per_token(cfg: PretrainedConfig, layer_id: int) -> int:
    h = cfg.hidden_size
    num_experts = _routed_experts(cfg, layer_id)
    if not num_experts:
        return 3 * h * cfg.intermediate_size
    inter = cfg.moe_intermediate_size
    # Qwen2-MoE: one shared expert of its own width behind a 1-wide sigmoid gate;
    # DeepSeek: n_shared_experts experts of the routed width, summed into one MLP.
    qwen_shared = getattr(cfg, "shared_expert_intermediate_size", None) or 0
    shared = qwen_shared + (getattr(cfg, "n_shared_experts", None) or 0) * inter
    router = h * num_experts + (h if qwen_shared else 0)
    return router + 3 * h * inter * cfg.num_experts_per_tok + 3 * h * shared


def _routed_experts(cfg: PretrainedConfig, layer_id: int) -> int:
    """E when layer `layer_id` is an MoE layer, else 0 (the models' own rules)."""
    if getattr(cfg, "n_routed_experts", None):
        return cfg.n_routed_experts if is_moe_layer(cfg, layer_id) else 0
    if getattr(cfg, "num_experts", None):
        return cfg.num_experts if is_sparse_layer(cfg, layer_id) else 0
    return 0
