"""Bidirectional (encoder) attention: every token of a request sees every other.

The reference path, torch's scaled_dot_product_attention per request, on CPU and GPU
alike. Encoders keep no KV cache: a request runs whole in one forward (no cached
prefix, no chunks), so the keys and values are the forward's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            seq_lens: list[int], num_heads: int, scale: float
                            ) -> torch.Tensor:
    """q, k, v: [tokens, heads * head_dim], the requests' rows one after another;
    returns the same shape."""
    head_dim = q.shape[-1] // num_heads
    out = torch.empty_like(q)
    start = 0
    for n in seq_lens:
        rows = slice(start, start + n)
        qs, ks, vs = (t[rows].view(n, num_heads, head_dim).transpose(0, 1).unsqueeze(0)
                      for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[rows] = o.squeeze(0).transpose(0, 1).reshape(n, num_heads * head_dim)
        start += n
    return out
