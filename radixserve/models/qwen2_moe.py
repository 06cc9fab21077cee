"""Qwen2-MoE, and the base of Qwen3-MoE.

Llama-shaped attention (q/k/v bias for Qwen2, per-head q/k RMSNorm for Qwen3); the MLP of
a sparse layer is a router (softmax top-k, optionally renormalised) over FusedMoE
experts, plus, in Qwen2-MoE, one shared expert scaled by sigmoid(shared_expert_gate(x)).
Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a
dense MLP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.configs.model_config import head_dim_of
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.moe import FusedMoE, RoutingConfig, route_experts
from radixserve.layers.moe.ep.ep_moe import make_fused_moe
from radixserve.layers.replicated_linear import ReplicatedLinear
from radixserve.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_params
from radixserve.layers.vocab_embedding import VocabParallelEmbedding
from radixserve.models.llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM,
                                     LlamaMLP, LlamaModel, _checkpoint_names)
from radixserve.models.weight_utils import ShardId, load_by_checkpoint_names


class Qwen2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, shared_expert: bool, layer_id: int = 0) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts)
        # FusedMoE, or its expert-parallel form when EP / EPLB / the recorder is on.
        self.experts = make_fused_moe(config.num_experts, config.hidden_size,
                                      config.moe_intermediate_size, layer_id)
        self.routing = RoutingConfig(top_k=config.num_experts_per_tok,
                                     renormalize=bool(config.norm_topk_prob))
        self.has_shared_expert = shared_expert
        if shared_expert:
            self.shared_expert = LlamaMLP(config.hidden_size,
                                          config.shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_experts(self.gate(x), self.routing)
        out = self.experts(x, weights, ids)
        if self.has_shared_expert:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def is_sparse_layer(config: PretrainedConfig, layer_id: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_id not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_id + 1) % step == 0)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer's forward (fused residual norms) with a sparse MLP."""

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: bool, shared_expert: bool) -> None:
        self_attn = LlamaAttention(config, layer_id, rotary_emb, qkv_bias, qk_norm)
        mlp = (Qwen2MoeSparseMoeBlock(config, shared_expert, layer_id)
               if is_sparse_layer(config, layer_id)
               else LlamaMLP(config.hidden_size, config.intermediate_size))
        self._init_blocks(config, self_attn, mlp)


class Qwen2MoeModel(LlamaModel):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool,
                 shared_expert: bool) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        theta, scaling = rope_params(config)
        head_dim = head_dim_of(config)
        rotary_emb = get_rope(head_dim, head_dim, config.max_position_embeddings, theta, scaling)
        self.layers = nn.ModuleList(
            Qwen2MoeDecoderLayer(config, i, rotary_emb, qkv_bias, qk_norm, shared_expert)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    qk_norm = False
    shared_expert = True

    def build_model(self, config: PretrainedConfig) -> nn.Module:
        return Qwen2MoeModel(config, self.qkv_bias(config), self.qk_norm, self.shared_expert)

    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        # transformers >= 5 states it; older Qwen2-MoE configs always had the bias.
        return bool(getattr(config, "qkv_bias", True))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        num_experts = self.config.num_experts

        def names(param: str) -> list[tuple[str, ShardId]]:
            return FusedMoE.checkpoint_names(param, num_experts) or _checkpoint_names(param)

        def skip(name: str) -> bool:
            return name.endswith("rotary_emb.inv_freq") or (
                self.tie_word_embeddings and name == "lm_head.weight")

        load_by_checkpoint_names(self, weights, names, skip)
