"""KV memory: the request → token-slot table and the per-layer K/V pools.

Slot 0 of the KV pool is reserved and never handed out: padded positions (CUDA-graph
padding, dummy requests) write their K/V there, so they never touch a live slot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from radixserve.device_utils import to_device_async

# Set on a KV pool by HiCache while a load-back from host memory is in flight: the
# attention layer calls it with its layer id before reading the pool, so that the
# layer's copy has landed (mem_cache/hicache/transfer.py).
LayerReady = Callable[[int], None]


class ReqToTokenPool:
    """`req_to_token[r, p]` is the KV slot of position p of the request in row r."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.device = device
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=device)
        # A host copy that the scheduler and the radix cache read: reading the device
        # table would wait for every batch in flight.
        self.req_to_token_cpu = (self.req_to_token if self.req_to_token.device.type == "cpu"
                                 else torch.zeros((size, max_context_len), dtype=torch.int32))
        self.free_slots: list[int] = list(range(size))

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self) -> int | None:
        if not self.free_slots:
            return None
        return self.free_slots.pop()

    def free(self, idx: int) -> None:
        if idx in self.free_slots:
            raise RuntimeError(f"request slot {idx} freed twice")
        self.free_slots.append(idx)

    def write(self, idx: int, start: int, slots: torch.Tensor) -> None:
        """Record that positions [start, start + len(slots)) of row idx live in `slots`."""
        self.req_to_token[idx, start:start + len(slots)] = self._to_device(slots)
        if self.req_to_token_cpu is not self.req_to_token:
            self.req_to_token_cpu[idx, start:start + len(slots)] = slots.to(torch.int32)

    def write_many(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """req_to_token[rows[i], cols[i]] = slots[i], in one scatter (and one copy)."""
        if self.req_to_token_cpu is self.req_to_token:
            self.req_to_token[rows, cols] = slots.to(torch.int32)
            return
        self.req_to_token_cpu[rows, cols] = slots.to(torch.int32)
        packed = to_device_async(torch.stack([rows.to(torch.int64), cols.to(torch.int64),
                                              slots.to(torch.int64)]), self.req_to_token.device)
        self.req_to_token[packed[0], packed[1]] = packed[2].to(torch.int32)

    def read(self, idx: int, n: int) -> torch.Tensor:
        """Slots of positions [0, n) of row idx, as int64 on the host."""
        return self.req_to_token_cpu[idx, :n].to(torch.int64)

    def _to_device(self, t: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        # Queued, not waited for: the scheduler writes rows while a batch is in flight.
        return to_device_async(t.to(dtype), self.req_to_token.device)

    def clear(self) -> None:
        self.free_slots = list(range(self.size))


class MHATokenToKVPool:
    """K and V of every layer: `k_buffer[layer]` has shape [size + 1, kv_heads, head_dim]."""

    def __init__(self, size: int, dtype: torch.dtype, num_kv_heads: int, head_dim: int,
                 num_layers: int, device: str | torch.device, v_head_dim: int | None = None) -> None:
        self.size = size
        self.dtype = dtype
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.num_layers = num_layers
        self.device = device
        self.k_buffer = [torch.zeros((size + 1, num_kv_heads, head_dim), dtype=dtype, device=device)
                         for _ in range(num_layers)]
        self.v_buffer = [torch.zeros((size + 1, num_kv_heads, self.v_head_dim), dtype=dtype,
                                     device=device) for _ in range(num_layers)]
        self.layer_ready: LayerReady | None = None

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """k, v: [num_tokens, kv_heads, head_dim]; loc: [num_tokens] slot indices."""
        self.k_buffer[layer_id][loc] = k.to(self.dtype)
        self.v_buffer[layer_id][loc] = v.to(self.dtype)

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, num_kv_heads: int, head_dim: int, num_layers: int,
                        v_head_dim: int | None = None) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return elem * num_kv_heads * (head_dim + (v_head_dim or head_dim)) * num_layers


class MLATokenToKVPool:
    """Multi-head latent attention's compressed cache: per token and layer one row of
    kv_lora_rank (the normalised latent c, which serves as both K's no-rope part and V
    after absorption) + qk_rope_head_dim (the shared, rotated rope key).
    `kv_buffer[layer]` has shape [size + 1, 1, kv_lora_rank + rope_dim]."""

    def __init__(self, size: int, dtype: torch.dtype, kv_lora_rank: int, qk_rope_head_dim: int,
                 num_layers: int, device: str | torch.device) -> None:
        self.size = size
        self.dtype = dtype
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.num_layers = num_layers
        self.device = device
        self.kv_buffer = [torch.zeros((size + 1, 1, kv_lora_rank + qk_rope_head_dim),
                                      dtype=dtype, device=device) for _ in range(num_layers)]
        self.layer_ready: LayerReady | None = None

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        """The latent part of the same rows (a strided view: V is not stored twice)."""
        return self.kv_buffer[layer_id][..., :self.kv_lora_rank]

    def set_mla_kv_buffer(self, layer_id: int, loc: torch.Tensor, latent: torch.Tensor,
                          k_rope: torch.Tensor) -> None:
        """latent: [T, kv_lora_rank]; k_rope: [T, rope_dim]; loc: [T] slot indices."""
        buf = self.kv_buffer[layer_id]
        buf[loc, 0, :self.kv_lora_rank] = latent.to(self.dtype)
        buf[loc, 0, self.kv_lora_rank:] = k_rope.to(self.dtype)

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, kv_lora_rank: int, qk_rope_head_dim: int,
                        num_layers: int) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return elem * (kv_lora_rank + qk_rope_head_dim) * num_layers
