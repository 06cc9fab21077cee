"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and routed experts
with shared experts.

Attention (see layers/attention/mla.py for the two compute forms): queries come from
q_proj, or through a low-rank q_a_proj -> RMSNorm -> q_b_proj; keys and values share
one compressed row per token, kv_a_proj_with_mqa -> [latent c (normalised) | rope key],
which is all the KV cache keeps; kv_b_proj expands c into each head's no-rope key and
value, and for decode its two halves are folded into the query (W_UK) and applied to the
latent output (W_UV) instead. RoPE covers only qk_rope_head_dim, in interleaved pairs
(V3 configs may say otherwise with rope_interleave), with YaRN scaling; YaRN's mscale
also multiplies the softmax scale.

MLP: the first `first_k_dense_replace` layers are dense; the others route each token
to top-k of n_routed_experts (V2: softmax, optionally group-limited; V3: sigmoid with a
score-correction bias and group-limited choice), scale by routed_scaling_factor, and add
the shared experts' output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.core.forward_batch import ForwardBatch
from radixserve.distributed.parallel_state import resolve_tp
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from radixserve.layers.moe import FusedMoE, RoutingConfig, route_experts
from radixserve.layers.moe.ep.ep_moe import make_fused_moe
from radixserve.layers.radix_attention import RadixAttention
from radixserve.layers.replicated_linear import ReplicatedLinear
from radixserve.layers.rotary_embedding import (RotaryEmbedding, get_rope, rope_params,
                                                yarn_mscale)
from radixserve.layers.vocab_embedding import VocabParallelEmbedding
from radixserve.models.llama import (LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP,
                                     LlamaModel, _checkpoint_names)
from radixserve.models.weight_utils import ShardId, load_by_checkpoint_names

# The reference's latent norms use RMSNorm's default epsilon, not config.rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def softmax_scale(config: PretrainedConfig) -> float:
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    _, scaling = rope_params(config)
    if scaling and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale *= m * m
    return scale


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int,
                 rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        _, tp_size = resolve_tp(None, None)
        self.num_heads = config.num_attention_heads // tp_size
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        heads = config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=_LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim)
        else:
            self.q_proj = ColumnParallelLinear(config.hidden_size, heads * qk_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(config.hidden_size,
                                                   self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=_LATENT_NORM_EPS)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank,
                                              heads * (self.nope_dim + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, config.hidden_size, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(self.num_heads, qk_dim, softmax_scale(config), self.num_heads,
                                   layer_id, v_head_dim=self.v_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        tokens = hidden.shape[0]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split(
            [self.nope_dim, self.rope_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden).split(
            [self.kv_lora_rank, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent.contiguous())
        q_rope, k_rope = self.rotary_emb(positions, q_rope.reshape(tokens, -1), k_rope)
        q_rope = q_rope.view(tokens, self.num_heads, self.rope_dim)
        backend = forward_batch.attn_backend
        if forward_batch.forward_mode.is_decode():
            w_uk, w_uv = self._absorbed_weights()
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            o = backend.forward_mla_decode(q_latent, q_rope, latent, k_rope, self.attn,
                                           forward_batch)
            out = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
        else:
            q = torch.cat([q_nope, q_rope], -1)
            out = backend.forward_mla_extend(q, latent, k_rope, self._expand, self.attn,
                                             forward_batch)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_dim))

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head W_UK [H, nope, rank] and W_UV [H, v, rank]: views of kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim,
                                       self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def _expand(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache rows [N, rank + rope] -> per-head K [N, H, nope + rope], V [N, H, v]."""
        n = rows.shape[0]
        latent, k_rope = rows.split([self.kv_lora_rank, self.rope_dim], -1)
        kv = self.kv_b_proj(latent).view(n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], -1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(n, self.num_heads, self.rope_dim)],
                      -1)
        return k, v


class DeepseekMoEGate(ReplicatedLinear):
    """Router logits in float32; V3 adds a per-expert score-correction bias (float32, as
    the reference keeps it)."""

    def __init__(self, config: PretrainedConfig, num_experts: int, with_bias: bool) -> None:
        super().__init__(config.hidden_size, num_experts, fp32_compute=True)
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            if with_bias else None)


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: PretrainedConfig, v3: bool, layer_id: int = 0) -> None:
        super().__init__()
        num_experts = config.n_routed_experts
        self.gate = DeepseekMoEGate(config, num_experts, with_bias=v3)
        # FusedMoE, or its expert-parallel form when EP / EPLB / the recorder is on.
        self.experts = make_fused_moe(num_experts, config.hidden_size,
                                      config.moe_intermediate_size, layer_id)
        self.routing = routing_config(config, v3)
        shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (LlamaMLP(config.hidden_size,
                                        config.moe_intermediate_size * shared)
                               if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_experts(self.gate(x), self.routing,
                                     self.gate.e_score_correction_bias)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def routing_config(config: PretrainedConfig, v3: bool) -> RoutingConfig:
    scoring = getattr(config, "scoring_func", None) or ("sigmoid" if v3 else "softmax")
    grouped = v3 or getattr(config, "topk_method", "greedy") == "group_limited_greedy"
    return RoutingConfig(
        top_k=config.num_experts_per_tok, scoring=scoring,
        renormalize=bool(getattr(config, "norm_topk_prob", False)),
        num_expert_group=getattr(config, "n_group", None) if grouped else None,
        topk_group=getattr(config, "topk_group", None) if grouped else None,
        group_score="top2_sum" if v3 else "max",
        routed_scaling_factor=float(getattr(config, "routed_scaling_factor", 1.0) or 1.0))


def is_moe_layer(config: PretrainedConfig, layer_id: int) -> bool:
    freq = getattr(config, "moe_layer_freq", 1) or 1
    return (bool(getattr(config, "n_routed_experts", None))
            and layer_id >= config.first_k_dense_replace and layer_id % freq == 0)


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer's forward (fused residual norms) with MLA and MoE."""

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 v3: bool) -> None:
        self_attn = DeepseekV2Attention(config, layer_id, rotary_emb)
        mlp = (DeepseekV2MoE(config, v3, layer_id) if is_moe_layer(config, layer_id)
               else LlamaMLP(config.hidden_size, config.intermediate_size))
        self._init_blocks(config, self_attn, mlp)


class DeepseekV2Model(LlamaModel):
    def __init__(self, config: PretrainedConfig, v3: bool) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        theta, scaling = rope_params(config)
        rope = config.qk_rope_head_dim
        # V2 rotates interleaved pairs; V3 says so in rope_interleave (default true).
        interleaved = not v3 or bool(getattr(config, "rope_interleave", True))
        rotary_emb = get_rope(rope, rope, config.max_position_embeddings, theta, scaling,
                              is_neox_style=not interleaved)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, i, rotary_emb, v3)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    v3 = False

    def build_model(self, config: PretrainedConfig) -> nn.Module:
        return DeepseekV2Model(config, self.v3)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        num_experts = getattr(self.config, "n_routed_experts", None) or 0
        num_layers = self.config.num_hidden_layers
        layer_re = re.compile(r"model\.layers\.(\d+)\.")

        def names(param: str) -> list[tuple[str, ShardId]]:
            return FusedMoE.checkpoint_names(param, num_experts) or _checkpoint_names(param)

        def skip(name: str) -> bool:
            # V3 checkpoints carry their multi-token-prediction layer past the last one.
            m = layer_re.match(name)
            return (name.endswith("rotary_emb.inv_freq")
                    or (m is not None and int(m[1]) >= num_layers)
                    or (self.tie_word_embeddings and name == "lm_head.weight"))

        load_by_checkpoint_names(self, weights, names, skip)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    v3 = True
