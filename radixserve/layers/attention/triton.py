"""The Triton attention backend: the default on CUDA.

Extend (and MIXED) batches run `extend_attention_fwd`; decode batches run the split-KV
`decode_attention_fwd`, as a cascade when the batch carries a plan of requests that
share a cached prefix (attention/cascade.py). New k/v go into the pool through one
`store_kv` launch, unless the rotary kernel before attention wrote them
(`kv_write_target`).

CUDA graphs: `init_cuda_graph_state` preallocates the decode scratch for the largest
batch. Capture points the metadata at the batch's own request rows and seq_lens; the
graph runner replays with those same buffers, filled in place, so a replay copies
nothing (other tensors given at replay are copied into the captured ones). The graph's
pointers and shapes never change. The split bound depends only on the batch
size, so it is the same at capture and replay. The runner passes the padded batch to
both hooks (padded rows: any valid request row, seq_len
`get_cuda_graph_seq_len_fill_value()`, out_cache_loc slot 0). A cascade graph is
captured apart from the plain one of the same size, with a grid of one tile per
request (empty tiles return at once) and kv_start 0 in padded rows.

q, k, v and the KV pool must share one dtype (bf16, fp16 or fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from radixserve.core.forward_batch import ForwardBatch
from radixserve.envs import envs
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.attention.cascade import KV_START, PERM, TILE_COUNT, TILE_START
from radixserve.layers.attention.triton_ops.decode_attention import (
    CascadeInputs, alloc_decode_scratch, cascade_tile_size, choose_max_kv_splits,
    decode_attention_fwd, head_block_size, min_split_tokens, num_sms)
from radixserve.layers.attention.triton_ops.extend_attention import extend_attention_fwd
from radixserve.layers.attention.triton_ops.kv_store import store_kv
from radixserve.layers.kv_write import KVWrite
from radixserve.layers.radix_attention import RadixAttention


# RADIXSERVE_DISABLE_ROPE_KV_WRITE=1 keeps the KV store a launch of its own (A/B timing).
FUSE_KV_WRITE = not envs.RADIXSERVE_DISABLE_ROPE_KV_WRITE.get()


@dataclass(slots=True)
class DecodeMetadata:
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    mid_o: torch.Tensor  # [B, H, S, Dv] fp32 scratch, S = the split bound
    mid_lse: torch.Tensor  # [B, H, S] fp32
    cascade: CascadeInputs | None = None
    cascade_rows: torch.Tensor | None = None  # [4, B]: what `cascade` views (graphs only)


@dataclass(slots=True)
class ExtendMetadata:
    req_pool_indices: torch.Tensor  # [B]
    prefix_lens: torch.Tensor  # [B]
    extend_lens: torch.Tensor  # [B]
    extend_start_loc: torch.Tensor  # [B]
    max_extend_len: int


class TritonAttnBackend(AttentionBackend):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: str | torch.device, max_context_len: int,
                 v_head_dim: int | None = None, max_kv_splits: int = 16) -> None:
        """num_heads / num_kv_heads: per tensor-parallel rank. max_kv_splits: the most
        slices one request's KV is cut into in decode (a power of two)."""
        if max_kv_splits < 1 or max_kv_splits & (max_kv_splits - 1):
            raise ValueError(f"max_kv_splits must be a power of two, got {max_kv_splits}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.device = torch.device(device)
        # More splits than a full-length request can fill would only grow the scratch.
        useful = -(-max_context_len // min_split_tokens(self.device))
        self.max_kv_splits = min(max_kv_splits, triton.next_power_of_2(useful))
        group = num_heads // num_kv_heads
        self._kv_head_blocks = num_kv_heads * -(-group // head_block_size(group))
        self.cascade_tile_size = cascade_tile_size(group)
        # The CPU interpreter has no SMs; any small count keeps the heuristic defined.
        self._num_sms = num_sms(self.device) if self.device.type == "cuda" else 8
        self._graph_bufs: dict[str, torch.Tensor] | None = None
        self._captured: dict[tuple[int, bool], DecodeMetadata] = {}  # (batch size, cascade)

    def splits_for(self, batch_size: int) -> int:
        """The bound on KV splits per request in a decode batch of this size."""
        return choose_max_kv_splits(batch_size, self._kv_head_blocks, self._num_sms,
                                    self.max_kv_splits)

    def prefix_splits_for(self, num_tiles: int, max_prefix: int | None = None) -> int:
        """The bound on splits of a cascade group's prefix (see `splits_for`); without
        max_prefix (a CUDA graph's, fixed at capture) only the tile count decides."""
        cap = self.max_kv_splits
        if max_prefix is not None:
            cap = min(cap, triton.next_power_of_2(-(-max_prefix // min_split_tokens(self.device))))
        return choose_max_kv_splits(num_tiles, self.num_kv_heads, self._num_sms, cap)

    def _cascade_inputs(self, rows: torch.Tensor, num_tiles: int, pre_splits: int,
                        pre_o: torch.Tensor, pre_lse: torch.Tensor) -> CascadeInputs:
        return CascadeInputs(rows[PERM], rows[KV_START], rows[TILE_START, :num_tiles],
                             rows[TILE_COUNT, :num_tiles], pre_o, pre_lse)

    # --- per-batch metadata -------------------------------------------------------

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            mid_o, mid_lse = alloc_decode_scratch(fb.batch_size, self.num_heads, self.v_head_dim,
                                                  self.splits_for(fb.batch_size), self.device)
            cascade = None
            if fb.cascade_plan is not None:
                plan = fb.cascade_plan
                splits = self.prefix_splits_for(plan.num_tiles, plan.max_prefix)
                cascade = self._cascade_inputs(fb.cascade_inputs, plan.num_tiles, splits,
                                               *alloc_decode_scratch(
                                                   fb.batch_size, self.num_heads,
                                                   self.v_head_dim, splits, self.device))
            fb.attn_metadata = DecodeMetadata(fb.req_pool_indices, fb.seq_lens, mid_o, mid_lse,
                                              cascade)
            return
        start_loc = fb.extend_start_loc
        if start_loc is None:
            start_loc = torch.cumsum(fb.extend_seq_lens, 0) - fb.extend_seq_lens
        fb.attn_metadata = ExtendMetadata(
            fb.req_pool_indices, fb.extend_prefix_lens, fb.extend_seq_lens, start_loc,
            max(fb.extend_seq_lens_cpu, default=0))

    # --- forward ------------------------------------------------------------------

    def _store(self, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
               fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.v_head_dim)
        pool = fb.token_to_kv_pool
        store_kv(pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id),
                 fb.out_cache_loc, k, v)
        return k, v

    def kv_write_target(self, layer: RadixAttention, forward_batch: ForwardBatch
                        ) -> KVWrite | None:
        # The pool slots `_store` would write, in the layout it writes.
        fb = forward_batch
        if not FUSE_KV_WRITE or fb.out_cache_loc is None:
            return None
        pool = fb.token_to_kv_pool
        return KVWrite(pool.get_key_buffer(layer.layer_id),
                       pool.get_value_buffer(layer.layer_id), fb.out_cache_loc)

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        if save_kv_cache:
            k, v = self._store(k, v, layer, fb)
        else:
            k = k.view(-1, layer.num_kv_heads, layer.head_dim)
            v = v.view(-1, layer.num_kv_heads, layer.v_head_dim)
        q = q.view(-1, layer.num_heads, layer.head_dim)
        out = q.new_empty(q.shape[0], layer.num_heads, layer.v_head_dim)
        pool = fb.token_to_kv_pool
        extend_attention_fwd(q, k, v, out, pool.get_key_buffer(layer.layer_id),
                             pool.get_value_buffer(layer.layer_id),
                             fb.req_to_token_pool.req_to_token, md.req_pool_indices,
                             md.prefix_lens, md.extend_lens, md.extend_start_loc,
                             md.max_extend_len, layer.scaling)
        return out.view(-1, layer.num_heads * layer.v_head_dim)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        if save_kv_cache:
            self._store(k, v, layer, fb)
        q = q.view(-1, layer.num_heads, layer.head_dim)
        out = q.new_empty(q.shape[0], layer.num_heads, layer.v_head_dim)
        pool = fb.token_to_kv_pool
        decode_attention_fwd(q, pool.get_key_buffer(layer.layer_id),
                             pool.get_value_buffer(layer.layer_id),
                             out, fb.req_to_token_pool.req_to_token, md.req_pool_indices,
                             md.seq_lens, layer.scaling, md.mid_o, md.mid_lse,
                             cascade=md.cascade)
        return out.view(-1, layer.num_heads * layer.v_head_dim)

    # --- CUDA graphs (decode) -----------------------------------------------------

    def init_cuda_graph_state(self, max_bs: int) -> None:
        # One flat scratch sized for the batch size needing the most (batch x splits);
        # each captured size views a prefix of it. The same for cascade prefixes.
        rows = max(bs * self.splits_for(bs) for bs in range(1, max_bs + 1))
        pre_rows = max(bs * self.prefix_splits_for(bs) for bs in range(1, max_bs + 1))
        h, dv, dev = self.num_heads, self.v_head_dim, self.device
        self._graph_bufs = {
            "mid_o": torch.empty(rows * h * dv, dtype=torch.float32, device=dev),
            "mid_lse": torch.empty(rows * h, dtype=torch.float32, device=dev),
            "pre_o": torch.empty(pre_rows * h * dv, dtype=torch.float32, device=dev),
            "pre_lse": torch.empty(pre_rows * h, dtype=torch.float32, device=dev),
        }

    def _graph_scratch(self, bs: int, splits: int, prefix: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph_bufs is None:
            raise RuntimeError("call init_cuda_graph_state before capturing")
        h, dv = self.num_heads, self.v_head_dim
        o = self._graph_bufs[f"{prefix}_o"][:bs * h * splits * dv]
        lse = self._graph_bufs[f"{prefix}_lse"][:bs * h * splits]
        return o.view(bs, h, splits, dv), lse.view(bs, h, splits)

    def _graph_metadata(self, bs: int, fb: ForwardBatch) -> DecodeMetadata:
        # The graph runner's batch is made of its own fixed buffers, the same at capture
        # and replay: the kernels read them in place, with no copy per replay.
        cascade = None
        if fb.cascade_inputs is not None:
            # Every tile slot is in the grid (a batch of bs requests has at most bs
            # tiles); the empty ones return at once.
            splits = self.prefix_splits_for(bs)
            cascade = self._cascade_inputs(fb.cascade_inputs, bs, splits,
                                           *self._graph_scratch(bs, splits, "pre"))
        return DecodeMetadata(fb.req_pool_indices, fb.seq_lens,
                              *self._graph_scratch(bs, self.splits_for(bs), "mid"), cascade,
                              fb.cascade_inputs)

    def init_forward_metadata_capture_cuda_graph(self, forward_batch: ForwardBatch) -> None:
        fb = forward_batch
        if not fb.forward_mode.is_decode():
            raise NotImplementedError("the triton backend captures decode batches only")
        key = (fb.batch_size, fb.cascade_inputs is not None)
        fb.attn_metadata = self._captured[key] = self._graph_metadata(fb.batch_size, fb)

    def init_forward_metadata_replay_cuda_graph(self, forward_batch: ForwardBatch) -> None:
        fb = forward_batch
        md = self._captured[(fb.batch_size, fb.cascade_inputs is not None)]
        # The graph runner replays with the very tensors it captured with (filled in
        # place): nothing to copy. Any other caller's tensors are copied into them.
        pairs = [(md.req_pool_indices, fb.req_pool_indices), (md.seq_lens, fb.seq_lens)]
        if md.cascade_rows is not None:
            pairs.append((md.cascade_rows, fb.cascade_inputs))
        for captured, live in pairs:
            if live.data_ptr() != captured.data_ptr():
                captured.copy_(live)
        fb.attn_metadata = md
