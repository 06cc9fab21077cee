"""Llama-shaped decoders that answer with a vector instead of tokens.

* `<Family>EmbeddingModel`: the decoder stack served with --is-embedding (or saved
  without a head, e.g. `Qwen3Model`); the last token's final hidden state,
  L2-normalised (Qwen3-Embedding's pooling).
* `<Family>ForSequenceClassification`: transformers' classifier, a bias-free linear
  `score` head on the last token; the scores are returned as they are.
* `Qwen2ForRewardModel`: Qwen2.5-Math-RM's head, Linear -> ReLU -> Linear, on the last
  token.

The stack is `LlamaModel` as the generating families build it (their qkv bias and q/k
norm), so attention, the KV pool and the prefix cache work as for generation. Under
tensor parallelism the stack's output is whole on every rank, so the heads are plain
replicated layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.configs.pooling_config import PoolingConfig
from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.pooler import l2_normalize, pool_hidden
from radixserve.models.llama import (_IGNORED_SUFFIXES, LlamaForCausalLM, LlamaModel,
                                     _checkpoint_names)
from radixserve.models.mistral import MistralForCausalLM
from radixserve.models.qwen2 import Qwen2ForCausalLM
from radixserve.models.qwen3 import Qwen3ForCausalLM
from radixserve.models.weight_utils import load_by_checkpoint_names


class _PooledDecoder(nn.Module):
    """The decoder stack of `family` (whose qkv bias and q/k norm it takes) under
    `model.`, as in the checkpoints; subclasses add the head."""

    family: type[LlamaForCausalLM] = LlamaForCausalLM
    # Checkpoint tensors of the generating head, which a pooled model does not use.
    _unused = ("lm_head.weight",)

    def __init__(self, config: PretrainedConfig, pooling: PoolingConfig) -> None:
        super().__init__()
        self.config = config
        self.pooling = pooling
        self.model = LlamaModel(config, self.family.qkv_bias(config), self.family.qk_norm)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        return self.model(input_ids, positions, forward_batch)

    def pool(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """HF-named tensors; a stack saved on its own (`Qwen3Model`: `layers.0...`) has
        no `model.` prefix, a causal LM's (`model.layers.0...`) does."""
        def named() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name in self._unused or name.endswith(_IGNORED_SUFFIXES):
                    continue
                own = name.startswith("model.") or not _in_stack(name)
                yield (name if own else f"model.{name}"), tensor

        load_by_checkpoint_names(self, named(), _checkpoint_names)


def _in_stack(name: str) -> bool:
    return name.startswith(("embed_tokens.", "layers.", "norm."))


class _EmbeddingModel(_PooledDecoder):
    def pool(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        pooled = pool_hidden(hidden, forward_batch, self.pooling.method)
        return l2_normalize(pooled) if self.pooling.normalize else pooled


class _SequenceClassification(_PooledDecoder):
    def __init__(self, config: PretrainedConfig, pooling: PoolingConfig) -> None:
        super().__init__(config, pooling)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def pool(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        last = pool_hidden(hidden, forward_batch, "last").to(hidden.dtype)
        return self.score(last).float()


class LlamaEmbeddingModel(_EmbeddingModel):
    family = LlamaForCausalLM


class MistralEmbeddingModel(_EmbeddingModel):
    family = MistralForCausalLM


class Qwen2EmbeddingModel(_EmbeddingModel):
    family = Qwen2ForCausalLM


class Qwen3EmbeddingModel(_EmbeddingModel):
    family = Qwen3ForCausalLM


class LlamaForSequenceClassification(_SequenceClassification):
    family = LlamaForCausalLM


class MistralForSequenceClassification(_SequenceClassification):
    family = MistralForCausalLM


class Qwen2ForSequenceClassification(_SequenceClassification):
    family = Qwen2ForCausalLM


class Qwen3ForSequenceClassification(_SequenceClassification):
    family = Qwen3ForCausalLM


class Qwen2ForRewardModel(_PooledDecoder):
    family = Qwen2ForCausalLM

    def __init__(self, config: PretrainedConfig, pooling: PoolingConfig) -> None:
        super().__init__(config, pooling)
        h = config.hidden_size
        # One reward value (configs/pooling_config.py says so to the API too).
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def pool(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        last = pool_hidden(hidden, forward_batch, "last").to(hidden.dtype)
        return self.score(last).float()
