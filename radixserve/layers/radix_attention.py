"""The attention layer models call; the backend in the ForwardBatch does the work."""

from __future__ import annotations

import torch
from torch import nn

from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.kv_write import KVWrite


class RadixAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scaling: float, num_kv_heads: int,
                 layer_id: int, v_head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id

    def kv_write_target(self, forward_batch: ForwardBatch) -> KVWrite | None:
        """Where this layer's new k/v go, if the backend lets a kernel before it write
        them (then call forward with save_kv_cache=False); None otherwise."""
        return forward_batch.attn_backend.kv_write_target(self, forward_batch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch, save_kv_cache: bool = True) -> torch.Tensor:
        ready = forward_batch.token_to_kv_pool.layer_ready
        if ready is not None:  # HiCache: this layer's KV may still be on its way from host
            ready(self.layer_id)
        return forward_batch.attn_backend.forward(q, k, v, self, forward_batch, save_kv_cache)
