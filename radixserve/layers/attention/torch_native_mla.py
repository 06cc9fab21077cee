"""Reference MLA attention in plain PyTorch, one request at a time (see mla.py).

Reads each request's compressed rows through req_to_token, as the fast path does, so
paging, radix-cache prefixes and chunked prefill are exercised exactly.
`mla_decode_reference` is what the Triton MLA decode kernel is tested against.
"""

from __future__ import annotations

import torch

from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.attention.mla import ExpandFn, MLAAttnBackend
from radixserve.layers.attention.torch_native import TorchNativeAttnBackend, _attend
from radixserve.layers.radix_attention import RadixAttention


class TorchNativeMLABackend(TorchNativeAttnBackend, MLAAttnBackend):
    def forward_mla_extend(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                           expand: ExpandFn, layer: RadixAttention,
                           forward_batch: ForwardBatch) -> torch.Tensor:
        fb = forward_batch
        pool = fb.token_to_kv_pool
        pool.set_mla_kv_buffer(layer.layer_id, fb.out_cache_loc, latent, k_rope)
        rows_buf = pool.get_key_buffer(layer.layer_id)[:, 0]
        out = q.new_empty(q.shape[0], layer.num_heads, layer.v_head_dim)
        start = 0
        for i, row in enumerate(fb.attn_metadata):
            ext, prefix = fb.extend_seq_lens_cpu[i], fb.extend_prefix_lens_cpu[i]
            slots = fb.req_to_token_pool.req_to_token[row, :prefix + ext].to(torch.int64)
            k, v = expand(rows_buf[slots].to(q.dtype))
            out[start:start + ext] = _attend(q[start:start + ext], k, v, layer, prefix)
            start += ext
        return out

    def forward_mla_decode(self, q_latent: torch.Tensor, q_rope: torch.Tensor,
                           latent: torch.Tensor, k_rope: torch.Tensor,
                           layer: RadixAttention, forward_batch: ForwardBatch
                           ) -> torch.Tensor:
        fb = forward_batch
        pool = fb.token_to_kv_pool
        pool.set_mla_kv_buffer(layer.layer_id, fb.out_cache_loc, latent, k_rope)
        return mla_decode_reference(q_latent, q_rope, pool.get_key_buffer(layer.layer_id),
                                    fb.req_to_token_pool.req_to_token, fb.req_pool_indices,
                                    fb.seq_lens, layer.scaling)


def mla_decode_reference(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_buffer: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Absorbed MLA decode, fp32, one request at a time.

    q_latent [B, H, R]; q_rope [B, H, P]; kv_buffer [slots, 1, R + P];
    req_to_token [rows, max_ctx]; req_pool_indices, seq_lens [B] -> [B, H, R].
    """
    rank = q_latent.shape[-1]
    outs = []
    for b, (row, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        rows = kv_buffer[req_to_token[row, :n].long(), 0].float()  # [n, R + P]
        c, k_rope = rows[:, :rank], rows[:, rank:]
        scores = q_latent[b].float() @ c.T + q_rope[b].float() @ k_rope.T  # [H, n]
        outs.append(torch.softmax(scores * sm_scale, -1) @ c)
    return torch.stack(outs).to(q_latent.dtype)
