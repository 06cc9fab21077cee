"""The attention backend interface. `torch_native` is the reference; `triton` is fast."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from radixserve.core.forward_batch import ForwardBatch
    from radixserve.layers.kv_write import KVWrite
    from radixserve.layers.radix_attention import RadixAttention


class AttentionBackend(ABC):
    """q: [num_tokens, heads * head_dim]; k, v: [num_tokens, kv_heads * head_dim].

    The backend stores the new k/v at `forward_batch.out_cache_loc` (unless told not
    to) and attends over each request's whole KV, read through req_to_token.
    Returns [num_tokens, heads * v_head_dim].
    """

    # Backends that decode shared prefixes once per group (see attention/cascade.py)
    # set this to the requests per cascade tile; None: plain decode only.
    cascade_tile_size: int | None = None

    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        """Build per-batch metadata once, before the layers run."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: "RadixAttention", forward_batch: "ForwardBatch",
                save_kv_cache: bool = True) -> torch.Tensor:
        if forward_batch.forward_mode.is_decode():
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def kv_write_target(self, layer: "RadixAttention", forward_batch: "ForwardBatch"
                        ) -> "KVWrite | None":
        """Where this forward's new k/v go, for a kernel before attention that can write
        them itself (the rotary kernels); None: the backend stores them. The caller
        that writes them passes save_kv_cache=False to `forward`."""
        return None

    @abstractmethod
    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True) -> torch.Tensor: ...

    # --- CUDA graphs (decode). Backends that support graphs override these. --------

    def init_cuda_graph_state(self, max_bs: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def init_forward_metadata_capture_cuda_graph(self, forward_batch: "ForwardBatch") -> None:
        raise NotImplementedError

    def init_forward_metadata_replay_cuda_graph(self, forward_batch: "ForwardBatch") -> None:
        raise NotImplementedError

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        """seq_len given to padded (dummy) rows of a captured batch."""
        return 1
