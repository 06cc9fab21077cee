"""ForwardBatch: everything one forward pass needs, as tensors. Models read only this."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from radixserve.core.req import Req
    from radixserve.layers.attention.base import AttentionBackend
    from radixserve.layers.attention.cascade import CascadePlan
    from radixserve.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill (or a prefill chunk), possibly on top of a cached prefix
    DECODE = auto()  # one new token per request
    MIXED = auto()  # one prefill chunk plus decodes, run as an extend of length 1 for those

    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_mixed(self) -> bool:
        return self == ForwardMode.MIXED


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    req_pool_indices: torch.Tensor  # [batch] int64: rows of req_to_token
    seq_lens: torch.Tensor  # [batch] int64: KV length after this forward (prefix + new)
    out_cache_loc: torch.Tensor  # [num_tokens] int64: KV slot for each new token
    seq_lens_cpu: list[int]
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "MHATokenToKVPool"
    attn_backend: "AttentionBackend"
    # Extend only (None for decode).
    extend_prefix_lens: torch.Tensor | None = None  # [batch]
    extend_seq_lens: torch.Tensor | None = None  # [batch]: new tokens per request
    extend_start_loc: torch.Tensor | None = None  # [batch]: offset in input_ids
    extend_prefix_lens_cpu: list[int] | None = None
    extend_seq_lens_cpu: list[int] | None = None
    # Which rows of the hidden states produce logits: the last token of each request,
    # plus every prompt position for requests that asked for prompt logprobs.
    logits_indices: torch.Tensor | None = None
    # Decode only, with a cascade (attention/cascade.py): the plan's host tensors and
    # its rows on the device (rows 5..8 of the block fill_decode_inputs writes).
    cascade_plan: "CascadePlan | None" = None
    cascade_inputs: torch.Tensor | None = None
    # Attention backends keep their per-batch metadata here.
    attn_metadata: Any = None
    # Extend forwards holding image/video placeholder tokens: the spans of the items
    # they run (multimodal/batch.py MultimodalBatch); None otherwise.
    mm: Any = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def fill_decode_inputs(host: torch.Tensor, reqs: list[Req], out_cache_loc: torch.Tensor,
                       plan: CascadePlan | None, rope_deltas: bool = False) -> None:
    """Write a decode batch's inputs into the first len(reqs) columns of `host`, an int64
    CPU tensor of at least 5 rows, one row each: input_ids, positions, req_pool_indices,
    seq_lens, out_cache_loc (host slots), then, where `host` has the rows, the cascade
    plan's four (zeros without a plan). The block goes to the device in one copy, and
    the ForwardBatch's decode tensors are its rows. `rope_deltas` (M-RoPE models): each
    position is offset by its request's rope_delta (the same on all three axes)."""
    h = host.numpy()
    bs = len(reqs)
    h[0, :bs] = [r.output_ids[-1] for r in reqs]
    h[1, :bs] = [r.kv_committed_len for r in reqs]
    h[2, :bs] = [r.req_pool_idx for r in reqs]
    h[3, :bs] = h[1, :bs] + 1
    if rope_deltas:
        h[1, :bs] += [r.rope_delta for r in reqs]
    h[4, :bs] = out_cache_loc.numpy()
    if host.shape[0] > 5:
        h[5:, :bs] = 0 if plan is None else plan.packed.numpy()
