"""Pooling: one vector per request from the hidden states of an extend batch.

The rows of `hidden` are the batch's new tokens, request after request. A pooled
request is complete in its batch for CLS and mean pooling (encoders run no prefix and
no chunks); last-token pooling needs only each request's final row, so a decoder may
reuse a cached prefix or prefill in chunks (the rows of a chunk that is not the last
are pooled too and then ignored by the scheduler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixserve.core.forward_batch import ForwardBatch


def pool_hidden(hidden: torch.Tensor, fb: ForwardBatch, method: str) -> torch.Tensor:
    """[batch, hidden] in float32: each request's last row, first row, or the mean."""
    lens = fb.extend_seq_lens_cpu
    if lens is None:
        raise ValueError("pooling needs an extend batch")
    starts = torch.tensor([0, *lens[:-1]], dtype=torch.int64).cumsum(0)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    if method == "last":
        return hidden[(starts + lens_t - 1).to(hidden.device)].float()
    if method == "cls":
        return hidden[starts.to(hidden.device)].float()
    if method == "mean":
        # Summed in float32: a bf16 running sum over hundreds of rows loses digits.
        owner = torch.repeat_interleave(torch.arange(len(lens)), lens_t).to(hidden.device)
        sums = torch.zeros(len(lens), hidden.shape[-1], dtype=torch.float32,
                           device=hidden.device).index_add_(0, owner, hidden.float())
        return sums / lens_t.to(hidden.device, torch.float32)[:, None]
    raise ValueError(f"unknown pooling method {method!r}")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)
