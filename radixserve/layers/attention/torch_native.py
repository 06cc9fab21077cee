"""Reference attention in plain PyTorch: runs on CPU and CUDA, one request at a time.

Every fast kernel is tested against this. It reads each request's KV through
req_to_token (so paging and prefix reuse are exercised exactly as in the fast path)
and runs scaled-dot-product attention per request, which also makes results
independent of what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.attention.base import AttentionBackend
from radixserve.layers.radix_attention import RadixAttention


class TorchNativeAttnBackend(AttentionBackend):
    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        # Everything is read per request from plain Python lists; keep the row indices
        # on the host once instead of syncing per layer.
        forward_batch.attn_metadata = forward_batch.req_pool_indices.tolist()

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb = forward_batch
        q, out, k_buf, v_buf = _prepare(q, k, v, layer, fb, save_kv_cache)
        rows = fb.attn_metadata
        start = 0
        for i, row in enumerate(rows):
            ext = fb.extend_seq_lens_cpu[i]
            prefix = fb.extend_prefix_lens_cpu[i]
            seq_len = prefix + ext
            slots = fb.req_to_token_pool.req_to_token[row, :seq_len].to(torch.int64)
            out[start:start + ext] = _attend(q[start:start + ext], k_buf[slots], v_buf[slots],
                                             layer, prefix)
            start += ext
        return out.view(-1, layer.num_heads * layer.v_head_dim)

    def forward_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       layer: RadixAttention, forward_batch: ForwardBatch,
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb = forward_batch
        q, out, k_buf, v_buf = _prepare(q, k, v, layer, fb, save_kv_cache)
        for i, row in enumerate(fb.attn_metadata):
            seq_len = fb.seq_lens_cpu[i]
            slots = fb.req_to_token_pool.req_to_token[row, :seq_len].to(torch.int64)
            out[i:i + 1] = _attend(q[i:i + 1], k_buf[slots], v_buf[slots], layer, seq_len - 1)
        return out.view(-1, layer.num_heads * layer.v_head_dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
            prefix_len: int) -> torch.Tensor:
    """q: [ext, H, D]; k, v: [prefix + ext, Hkv, D]. Causal, offset by the prefix."""
    ext, total = q.shape[0], k.shape[0]
    # Query i sits at absolute position prefix_len + i and sees keys 0..prefix_len + i.
    mask = (torch.arange(total, device=q.device)[None, :]
            <= torch.arange(ext, device=q.device)[:, None] + prefix_len)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(q.dtype),
        v.transpose(0, 1).unsqueeze(0).to(q.dtype), attn_mask=mask, scale=layer.scaling,
        enable_gqa=layer.num_heads != layer.num_kv_heads)
    return o.squeeze(0).transpose(0, 1)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention,
             fb: ForwardBatch, save_kv_cache: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Store the new K/V (when asked) and return q as [T, H, D], an output buffer, and
    this layer's K and V pools."""
    pool = fb.token_to_kv_pool
    if save_kv_cache:
        pool.set_kv_buffer(layer.layer_id, fb.out_cache_loc,
                           k.view(-1, layer.num_kv_heads, layer.head_dim),
                           v.view(-1, layer.num_kv_heads, layer.v_head_dim))
    q = q.view(-1, layer.num_heads, layer.head_dim)
    out = q.new_empty(q.shape[0], layer.num_heads, layer.v_head_dim)
    return q, out, pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
