"""The embedding merge: the vision encoder's outputs for the placeholder rows of a
forward, each item encoded at most once (cached by hash; items missing from the cache
are encoded together in one call, across the requests of the batch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from radixserve.multimodal.batch import MultimodalBatch
from radixserve.multimodal.inputs import MultimodalItem

Encoder = Callable[[list[MultimodalItem]], list[torch.Tensor]]


def multimodal_embeddings(mm: MultimodalBatch, encode: Encoder
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [n] int64, embeds [n, D]) for every placeholder row of the forward, on the
    encoder's device. `encode(items)` returns, per item, [item.num_tokens, D] rows in
    the item's token order (D is the model's choice: it may pack extra features)."""
    found: dict[int, torch.Tensor] = {}
    missing: dict[int, MultimodalItem] = {}
    for span in mm.spans:
        key = span.item.hash
        if key in found or key in missing:
            continue
        cached = mm.cache.get(key)
        if cached is not None:
            found[key] = cached
        else:
            missing[key] = span.item
    if missing:
        items = list(missing.values())
        outputs = encode(items)
        for item, out in zip(items, outputs, strict=True):
            if out.shape[0] != item.num_tokens:
                raise RuntimeError(f"the encoder gave {out.shape[0]} rows for an item of "
                                   f"{item.num_tokens} placeholder tokens")
            found[item.hash] = out
            mm.cache.put(item.hash, out)
    pieces = [found[s.item.hash][s.item_start:s.item_end] for s in mm.spans]
    embeds = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    rows = torch.cat([torch.arange(s.row, s.row + s.item_end - s.item_start)
                      for s in mm.spans]).to(embeds.device, non_blocking=True)
    return rows, embeds
