"""The Triton MLA backend: the default for DeepSeek models on CUDA (see mla.py).

Decode runs `mla_decode_fwd` over the compressed cache. Its split bound, scratch buffers
and CUDA-graph hooks are TritonAttnBackend's, set up for one KV head of
kv_lora_rank + rope elements whose "value" is the latent (kv_lora_rank).

Extend gathers the cached prefix rows of the batch (one gather per layer, indices built
once per batch), expands them and the new rows with the model's `expand`, and runs
`extend_attention_fwd` with the expanded prefix as its "KV buffer", addressed through a
per-batch table in place of req_to_token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.attention.mla import ExpandFn, MLAAttnBackend
from radixserve.layers.attention.triton import ExtendMetadata, TritonAttnBackend
from radixserve.layers.attention.triton_ops.extend_attention import extend_attention_fwd
from radixserve.layers.attention.triton_ops.kv_store import store_kv
from radixserve.layers.attention.triton_ops.mla_decode import MLA_BLOCK_H, mla_decode_fwd
from radixserve.layers.radix_attention import RadixAttention


@dataclass(slots=True)
class MLAExtendMetadata:
    base: ExtendMetadata
    prefix_slots: torch.Tensor  # [P]: KV slots of every request's prefix, back to back
    prefix_table: torch.Tensor  # [B, max_prefix] int32: request b's j-th row in that list
    rows: torch.Tensor  # [B]: arange, the rows of prefix_table


class TritonMLABackend(TritonAttnBackend, MLAAttnBackend):
    def __init__(self, num_heads: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 device: str | torch.device, max_context_len: int) -> None:
        """num_heads: per tensor-parallel rank."""
        super().__init__(num_heads, 1, kv_lora_rank + qk_rope_head_dim, device,
                         max_context_len, v_head_dim=kv_lora_rank)
        # The decode kernel takes MLA_BLOCK_H heads per program, not the GQA group.
        self._kv_head_blocks = triton.cdiv(num_heads, MLA_BLOCK_H)
        self.kv_lora_rank = kv_lora_rank

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        super().init_forward_metadata(forward_batch)
        fb = forward_batch
        if fb.forward_mode.is_decode():
            return
        prefix_lens = fb.extend_prefix_lens_cpu
        max_prefix = max(prefix_lens, default=0)
        dev = self.device
        cols = torch.arange(max_prefix, device=dev)
        lens = fb.extend_prefix_lens.to(dev)
        mask = cols[None, :] < lens[:, None]
        table = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, :max_prefix]
        starts = torch.cumsum(lens, 0) - lens
        # With no prefix anywhere, the reserved padding slot stands in, so that the
        # kernel never gets an empty buffer (it reads no prefix row either way).
        prefix_slots = table[mask].to(torch.int64) if max_prefix else torch.zeros(
            1, dtype=torch.int64, device=dev)
        fb.attn_metadata = MLAExtendMetadata(
            fb.attn_metadata, prefix_slots,
            (starts[:, None] + cols[None, :]).to(torch.int32),
            torch.arange(fb.batch_size, device=dev))

    def forward_mla_extend(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                           expand: ExpandFn, layer: RadixAttention,
                           forward_batch: ForwardBatch) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        rows_buf = self._store(latent, k_rope, layer, fb)
        k_new, v_new = expand(torch.cat([latent, k_rope], -1))
        k_pre, v_pre = expand(rows_buf[md.prefix_slots])
        out = q.new_empty(q.shape[0], layer.num_heads, layer.v_head_dim)
        ext = md.base
        extend_attention_fwd(q, k_new, v_new, out, k_pre, v_pre, md.prefix_table, md.rows,
                             ext.prefix_lens, ext.extend_lens, ext.extend_start_loc,
                             ext.max_extend_len, layer.scaling)
        return out

    def forward_mla_decode(self, q_latent: torch.Tensor, q_rope: torch.Tensor,
                           latent: torch.Tensor, k_rope: torch.Tensor,
                           layer: RadixAttention, forward_batch: ForwardBatch
                           ) -> torch.Tensor:
        fb, md = forward_batch, forward_batch.attn_metadata
        rows_buf = self._store(latent, k_rope, layer, fb)
        out = q_latent.new_empty(q_latent.shape)
        mla_decode_fwd(q_latent, q_rope, rows_buf.unsqueeze(1), out,
                       fb.req_to_token_pool.req_to_token, md.req_pool_indices, md.seq_lens,
                       layer.scaling, md.mid_o, md.mid_lse)
        return out

    def _store(self, latent: torch.Tensor, k_rope: torch.Tensor, layer: RadixAttention,
               fb: ForwardBatch) -> torch.Tensor:
        """Write this forward's rows (one launch for both parts); return the layer's
        rows as [slots, kv_lora_rank + rope]."""
        buf = fb.token_to_kv_pool.get_key_buffer(layer.layer_id)
        r = self.kv_lora_rank
        store_kv(buf[..., :r], buf[..., r:], fb.out_cache_loc, latent.unsqueeze(1),
                 k_rope.unsqueeze(1))
        return buf[:, 0]
