"""The multimodal part of one forward: which placeholder tokens of which items it runs
(a chunk boundary may cut an item), and the M-RoPE positions of its tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixserve.multimodal.cache import EmbeddingCache
from radixserve.multimodal.inputs import MultimodalInputs, MultimodalItem


@dataclass
class MultimodalSpan:
    item: MultimodalItem
    item_start: int  # the item's first placeholder token in this forward (0-based)
    item_end: int  # one past its last one here
    row: int  # row of item_start in the forward's flat token dimension

    @property
    def completes_item(self) -> bool:
        return self.item_end == self.item.num_tokens


@dataclass
class MultimodalBatch:
    """ForwardBatch.mm: set when an extend forward holds placeholder tokens."""

    spans: list[MultimodalSpan]
    cache: EmbeddingCache


def multimodal_batch(mms: list[MultimodalInputs | None], prefix_lens: list[int],
                     ext_lens: list[int], cache: EmbeddingCache) -> MultimodalBatch | None:
    """The spans of an extend batch whose request i computes positions
    [prefix_lens[i], prefix_lens[i] + ext_lens[i]) (mms[i] None for a text request)."""
    spans: list[MultimodalSpan] = []
    row = 0
    for mm, p, e in zip(mms, prefix_lens, ext_lens):
        if mm is not None:
            for item in mm.items:
                lo, hi = max(item.offset, p), min(item.end, p + e)
                if lo < hi:
                    spans.append(MultimodalSpan(item, lo - item.offset, hi - item.offset,
                                                row + lo - p))
        row += e
    return MultimodalBatch(spans, cache) if spans else None


def mrope_positions(mms: list[MultimodalInputs | None], prefix_lens: list[int],
                    ext_lens: list[int]) -> torch.Tensor | None:
    """[3, T] positions of an extend batch, or None when every request is text (the
    1-D positions are then right on all three axes). Prompt tokens take their M-RoPE
    positions; tokens past the prompt (outputs prefilled again after a retraction, the
    decode rows of a mixed batch) are position + rope_delta on every axis."""
    if all(mm is None or mm.mrope_positions is None for mm in mms):
        return None
    parts: list[torch.Tensor] = []
    for mm, p, e in zip(mms, prefix_lens, ext_lens):
        if mm is None or mm.mrope_positions is None:
            parts.append(torch.arange(p, p + e).view(1, -1).expand(3, -1))
            continue
        n = max(0, min(p + e, mm.prompt_len) - p)
        if n:
            parts.append(mm.mrope_positions[:, p:p + n])
        if n < e:
            start = p + n
            parts.append((torch.arange(start, p + e) + mm.rope_delta).view(1, -1).expand(3, -1))
    return torch.cat(parts, dim=1)
