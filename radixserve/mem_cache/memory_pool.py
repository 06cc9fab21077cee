"""KV memory: the request → token-slot table and the per-layer K/V pools.

Slot 0 of the KV pool is reserved and never handed out: padded positions (CUDA-graph
padding, dummy requests) write their K/V there, so they never touch a live slot.
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """`req_to_token[r, p]` is the KV slot of position p of the request in row r."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.device = device
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=device)
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
        self.req_to_token[idx, start:start + len(slots)] = slots.to(torch.int32)

    def write_many(self, rows: torch.Tensor, cols: torch.Tensor, slots: torch.Tensor) -> None:
        """req_to_token[rows[i], cols[i]] = slots[i], in one scatter."""
        dev = self.req_to_token.device
        self.req_to_token[rows.to(dev), cols.to(dev)] = slots.to(dev, torch.int32)

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
