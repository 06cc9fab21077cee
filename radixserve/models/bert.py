"""BERT and XLM-RoBERTa encoders, served as embedders (sentence-transformers style).

Post-norm layers: self-attention over the whole request (bidirectional, the torch SDPA
reference in layers/attention/bidirectional.py), then a GELU MLP, each followed by a
residual add and LayerNorm. The modules carry transformers' names, so checkpoints load
name for name. The pooled output is the CLS row or the mean of the rows (the
checkpoint's `1_Pooling/config.json`, configs/pooling_config.py), L2-normalised;
BERT's own `pooler` head (a tanh layer) is not what sentence-transformers pools, and
is skipped.

Requests run whole in one forward (the scheduler turns the prefix cache and chunked
prefill off for bidirectional models), so the KV pool is not read or written.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from radixserve.configs.pooling_config import PoolingConfig
from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.attention.bidirectional import bidirectional_attention
from radixserve.layers.pooler import l2_normalize, pool_hidden
from radixserve.models.weight_utils import load_by_checkpoint_names

# Prefixes of the encoder inside a task model's checkpoint (BertForMaskedLM: bert.*).
_STACK_PREFIXES = ("bert.", "roberta.")
# Task heads and BERT's tanh pooler: not part of the sentence embedding.
_UNUSED_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.")


class BertEmbeddings(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # One segment: token type 0 everywhere, as transformers assumes without ids.
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = (h // self.num_heads) ** -0.5
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        return bidirectional_attention(self.query(x), self.key(x), self.value(x), seq_lens,
                                       self.num_heads, self.scale)


class BertAddNorm(nn.Module):
    """dense, then LayerNorm over the residual sum (BertSelfOutput / BertOutput)."""

    def __init__(self, in_size: int, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertAddNorm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        return self.output(self.self(x, seq_lens), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertAddNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = self.attention(x, seq_lens)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    # transformers numbers positions from 0 (BERT) or past the padding index (XLM-R).
    position_offset_from_padding = False

    def __init__(self, config: PretrainedConfig, pooling: PoolingConfig) -> None:
        super().__init__()
        self.config = config
        self.pooling = pooling
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        pad = int(getattr(config, "pad_token_id", 0) or 0)
        self.position_offset = pad + 1 if self.position_offset_from_padding else 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        seq_lens = forward_batch.extend_seq_lens_cpu
        if seq_lens is None or any(forward_batch.extend_prefix_lens_cpu or ()):
            raise ValueError("an encoder runs whole requests: no decode, no cached prefix")
        x = self.embeddings(input_ids, positions + self.position_offset)
        for layer in self.encoder.layer:
            x = layer(x, seq_lens)
        return x

    def pool(self, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        pooled = pool_hidden(hidden, forward_batch, self.pooling.method)
        return l2_normalize(pooled) if self.pooling.normalize else pooled

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def named() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for prefix in _STACK_PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                if name.startswith(_UNUSED_PREFIXES) or name.endswith("position_ids"):
                    continue
                yield name, tensor

        load_by_checkpoint_names(self, named(), lambda name: [(name, None)])


class XLMRobertaModel(BertModel):
    position_offset_from_padding = True
