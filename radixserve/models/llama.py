"""Llama, and the base of the Llama-shaped families (Mistral, Qwen2, Qwen3).

Per layer: RMSNorm -> packed QKV -> (q/k norm) -> RoPE -> RadixAttention -> o_proj,
then RMSNorm (fused with the residual add) -> packed gate/up -> SiluAndMul -> down.
At decode sizes each RMSNorm (and add) runs inside the GEMV of the projection after it.
The families differ only in a qkv bias and a per-head q/k RMSNorm, which the
subclasses switch on through `qkv_bias` and `qk_norm`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.configs.model_config import head_dim_of
from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.layernorm import RMSNorm
from radixserve.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                      RowParallelLinear)
from radixserve.layers.radix_attention import RadixAttention
from radixserve.layers.rotary_embedding import RotaryEmbedding, get_rope, rope_params
from radixserve.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from radixserve.models.weight_utils import load_by_checkpoint_names

# Our packed parameter <- the checkpoint's separate projections, with the shard id.
_PACKED = {
    "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
    "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
}
# Checkpoint tensors that carry nothing we need (old HF files saved RoPE's buffer).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2,
                                                       bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU-and-mul runs inside the down projection's GEMV at decode sizes.
        return self.down_proj(self.gate_up_proj(x), silu_and_mul_input=True)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) for h = x + residual, the norm in gate/up's GEMV."""
        gate_up, residual = self.gate_up_proj.forward_normed(x, residual, norm)
        return self.down_proj(gate_up, silu_and_mul_input=True), residual


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim,
                                          config.num_attention_heads, num_kv_heads, bias=qkv_bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim,
                                        config.hidden_size, bias=_o_bias(config))
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(self.qkv_proj.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   self.qkv_proj.num_kv_heads, layer_id)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, norm: RMSNorm, forward_batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(h), and h, for h = hidden + residual (hidden without one);
        the add and the norm run in the qkv projection (its GEMV at decode sizes)."""
        qkv, residual = self.qkv_proj.forward_normed(hidden, residual, norm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # q, k, v stay strided views of the qkv output: the kernels and the backends
        # read rows by stride, so no copies are made.
        # The rotary kernel writes k and v into the KV pool where the backend allows it,
        # saving the backend's store launch (one per layer per decode step).
        kv_write = self.attn.kv_write_target(forward_batch)
        if self.qk_norm:
            q, k, stored = self.rotary_emb.forward_with_qk_norm(
                positions, q, k, self.q_norm, self.k_norm, v, kv_write)
        else:
            q, k, stored = self.rotary_emb.forward_and_store(positions, q, k, v, kv_write)
        out = self.attn(q, k, v, forward_batch, save_kv_cache=not stored)
        return self.o_proj(out), residual


def _o_bias(config: PretrainedConfig) -> bool:
    # Llama/Qwen3 `attention_bias` covers o_proj too; Qwen2's fixed qkv bias does not.
    return bool(getattr(config, "attention_bias", False))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, qk_norm: bool) -> None:
        self._init_blocks(config,
                          LlamaAttention(config, layer_id, rotary_emb, qkv_bias, qk_norm),
                          LlamaMLP(config.hidden_size, config.intermediate_size,
                                   bias=bool(getattr(config, "mlp_bias", False))))

    def _init_blocks(self, config: PretrainedConfig, self_attn: nn.Module, mlp: nn.Module
                     ) -> None:
        """Set up the module with its two sub-blocks and the norms before each; subclasses
        (MLA, MoE) build their own sub-blocks and reuse this and `forward`."""
        nn.Module.__init__(self)
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, forward_batch: ForwardBatch
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add of each sub-block is fused into the next norm, and the norm
        # into the projection that reads it where a sub-block starts with one (Llama's
        # attention and MLP; not MLA, nor a MoE block, which reads it several times).
        if isinstance(self.self_attn, LlamaAttention):
            hidden, residual = self.self_attn(positions, hidden, residual,
                                              self.input_layernorm, forward_batch)
        else:
            hidden, residual = self.input_layernorm.add_norm(hidden, residual)
            hidden = self.self_attn(positions, hidden, forward_batch)
        if isinstance(self.mlp, LlamaMLP):
            return self.mlp.forward_normed(hidden, residual, self.post_attention_layernorm)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers (it is 64 MiB at Llama 3.1's 128k positions).
        theta, scaling = rope_params(config)
        head_dim = head_dim_of(config)
        rotary_emb = get_rope(head_dim, head_dim, config.max_position_embeddings, theta, scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, qkv_bias, qk_norm)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch, input_embeds: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`input_embeds`: the token embeddings when the caller made them (vision-language
        models put the vision tower's outputs at the placeholder rows)."""
        hidden = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    qk_norm = False

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def build_model(self, config: PretrainedConfig) -> nn.Module:
        """The decoder stack; architectures that share Llama's head override only this."""
        return LlamaModel(config, self.qkv_bias(config), self.qk_norm)

    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden]."""
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden, out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; raise naming every missing, unexpected or mis-shaped one."""
        load_by_checkpoint_names(
            self, weights, _checkpoint_names,
            skip=lambda name: name.endswith(_IGNORED_SUFFIXES) or (
                self.tie_word_embeddings and name == "lm_head.weight"))


def _checkpoint_names(param_name: str) -> list[tuple[str, str | int | None]]:
    """The HF tensor names (with shard ids) that fill one of our parameters."""
    for packed, parts in _PACKED.items():
        if f".{packed}." in param_name:
            return [(param_name.replace(packed, hf), shard) for hf, shard in parts]
    return [(param_name, None)]

