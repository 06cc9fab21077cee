"""The interface of attention backends for multi-head latent attention (DeepSeek MLA).

The KV pool (MLATokenToKVPool) keeps per token only the latent c (kv_lora_rank) and the
shared rope key (qk_rope_head_dim). Per head, K = [c W_UK_h, k_rope] and V = c W_UV_h.
The two phases use the two equivalent forms:

* decode (absorbed): the model folds W_UK into the query, q_lat_h = q_nope_h W_UK_h^T,
  so scores are q_lat_h . c + q_rope_h . k_rope, read straight from the compressed
  cache; the output stays in latent space (softmax-weighted c) and the model applies
  W_UV after. One token per request makes this the cheap form: nothing is expanded.
* extend (expanded): many queries per request make the per-head form cheaper, so the
  backend expands the cached prefix rows and the new rows into per-head K and V with the
  model's `expand` callable and runs ordinary causal attention.

Both store this forward's latents at out_cache_loc first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.core.forward_batch import ForwardBatch
    from radixserve.layers.radix_attention import RadixAttention

# cache rows [N, kv_lora_rank + rope] -> (K [N, H, qk_head_dim], V [N, H, v_head_dim])
ExpandFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MLAAttnBackend(ABC):
    """`layer` is the model's RadixAttention in its expanded shape (num_heads = num_kv_heads
    = H per rank, head_dim = qk_head_dim, v_head_dim) carrying layer_id and scaling."""

    @abstractmethod
    def forward_mla_extend(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                           expand: ExpandFn, layer: "RadixAttention",
                           forward_batch: "ForwardBatch") -> torch.Tensor:
        """q [T, H, qk_head_dim]; latent [T, kv_lora_rank]; k_rope [T, rope] (rotated)
        -> [T, H, v_head_dim]."""

    @abstractmethod
    def forward_mla_decode(self, q_latent: torch.Tensor, q_rope: torch.Tensor,
                           latent: torch.Tensor, k_rope: torch.Tensor,
                           layer: "RadixAttention", forward_batch: "ForwardBatch"
                           ) -> torch.Tensor:
        """q_latent [B, H, kv_lora_rank]; q_rope [B, H, rope]; latent, k_rope of the new
        token -> attention output in latent space, [B, H, kv_lora_rank]."""
