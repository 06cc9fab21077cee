"""Bidirectional attention over packed variable-length sequences (vision towers: one
sequence per image frame or per attention window).

Sequences of equal length are gathered into one batch and run through PyTorch's SDPA
(flash / memory-efficient kernels on CUDA), so a tower's hundreds of windows cost a
handful of calls and no padding mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens: list[int], scale: float) -> torch.Tensor:
    """q, k, v: [N, heads, head_dim]; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1].
    Returns [N, heads, head_dim]."""
    by_len: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            by_len.setdefault(end - start, []).append(start)
    if len(by_len) == 1 and len(next(iter(by_len.values()))) == 1:
        return _sdpa(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale)[0]
    out = torch.empty_like(q)
    for length, starts in by_len.items():
        idx = (torch.tensor(starts, device=q.device).view(-1, 1)
               + torch.arange(length, device=q.device).view(1, -1)).view(-1)
        b = len(starts)
        o = _sdpa(q[idx].view(b, length, *q.shape[1:]), k[idx].view(b, length, *k.shape[1:]),
                  v[idx].view(b, length, *v.shape[1:]), scale)
        out[idx] = o.reshape(b * length, *q.shape[1:])
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, L, H, D] in and out."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       scale=scale)
    return o.transpose(1, 2)
