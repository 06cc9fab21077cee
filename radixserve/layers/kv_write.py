"""Where a forward's new k and v go in the KV pool, for kernels that write them there
themselves (the rotary kernels, in place of the backend's `store_kv` launch)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KVWrite(NamedTuple):
    """Where a forward's new k/v go: one layer's pool buffers and the tokens' slots."""
    k_buffer: torch.Tensor  # [slots, Hkv, D]
    v_buffer: torch.Tensor  # [slots, Hkv, Dv]
    loc: torch.Tensor  # [T]


def check_kv_write(target: KVWrite, k: torch.Tensor, v: torch.Tensor | None,
                   num_kv_heads: int, head_dim: int) -> None:
    """What a kernel writing rows of k [T, Hkv * D] and v [T, Hkv * Dv] (views with
    contiguous heads) into `target` relies on."""
    k_buf, v_buf, loc = target
    if v is None or v.shape[0] != k.shape[0] or loc.shape[0] != k.shape[0]:
        raise ValueError("a KV write needs v and loc with one row per token of k")
    if (k_buf.shape[1:] != (num_kv_heads, head_dim) or v_buf.shape[1] != num_kv_heads
            or v.shape[1] != num_kv_heads * v_buf.shape[2]):
        raise ValueError(f"pool buffers {tuple(k_buf.shape)} / {tuple(v_buf.shape)} do not "
                         f"match {num_kv_heads} KV heads of k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_buf.stride(2) != 1 or v_buf.stride(2) != 1 or v.stride(1) != 1:
        raise ValueError("the pool buffers and v need a contiguous last dim")
