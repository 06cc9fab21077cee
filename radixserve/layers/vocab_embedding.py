"""Token embedding and LM head, with the vocabulary split across TP ranks.

Each rank holds ceil(vocab / tp_size) rows; the last rank's tail past the real
vocabulary is zero padding, and logits are cut back to `num_embeddings`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.distributed.parallel_state import get_tp_group, resolve_tp
from radixserve.layers.linear import check_weight_shape
from radixserve.layers.linear_dispatch import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int | None = None,
                 tp_size: int | None = None) -> None:
        super().__init__()
        tp_rank, tp_size = resolve_tp(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.rows_per_partition = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.rows_per_partition
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.rows_per_partition, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                      shard_id: str | int | None = None) -> None:
        check_weight_shape(loaded_weight, (self.num_embeddings, self.embedding_dim))
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        # Ids owned by other ranks look up row 0 and are zeroed; the all-reduce then
        # sums exactly one real row per token.
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding(torch.where(mine, input_ids - self.vocab_start, 0), self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """hidden [n, d] -> float32 logits [n, num_embeddings] (also used when tied),
        written into `out` when given (one conversion copy either way)."""
        logits = linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        logits = logits[:, :self.num_embeddings]
        return logits.float() if out is None else out.copy_(logits)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection: same layout as the embedding, used only for logits."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead produces logits: call compute_logits(hidden)")
