"""M-RoPE positions: the (t, h, w) position of every prompt token, as HF's
`get_rope_index` computes them, and the delta that later tokens are offset by.

Text tokens count up on all three axes together. The placeholder tokens of an image
(or video) take start + (frame index * time interval, row, column) over the merged
patch grid, where start is the position after the preceding text; text after the
item resumes at start + max(merged rows, merged columns).
"""

from __future__ import annotations

import torch

from radixserve.multimodal.inputs import MultimodalItem


def qwen2_5_vl_rope_index(prompt_len: int, items: list[MultimodalItem],
                          spatial_merge_size: int, tokens_per_second: float
                          ) -> tuple[torch.Tensor, int]:
    """([3, prompt_len] int64 positions, rope delta) for a Qwen2-VL / Qwen2.5-VL prompt
    whose placeholder runs are `items` (sorted by offset)."""
    parts: list[torch.Tensor] = []
    pos = 0  # the next text position
    cursor = 0  # the next prompt index
    for item in items:
        if item.offset > cursor:
            parts.append(_text(pos, item.offset - cursor))
            pos += item.offset - cursor
        interval = 1.0
        if item.modality == "video":
            # float32 as HF's tensors, so that the truncation below rounds the same way
            interval = torch.tensor(item.second_per_grid_t, dtype=torch.float32) * tokens_per_second
        parts.append(grid_positions(pos, item.grid_thw, spatial_merge_size, interval))
        t, h, w = item.grid_thw
        pos += max(h, w) // spatial_merge_size
        cursor = item.end
    if cursor < prompt_len:
        parts.append(_text(pos, prompt_len - cursor))
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64)
    delta = int(positions.max()) + 1 - prompt_len if prompt_len else 0
    return positions, delta


def _text(start: int, n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) + start).view(1, -1).expand(3, -1)


def grid_positions(start: int, grid_thw: tuple[int, int, int], spatial_merge_size: int,
                   time_interval: float | torch.Tensor = 1.0) -> torch.Tensor:
    """[3, t * h/m * w/m] positions of one item's placeholder tokens, in the encoder's
    output order (frame-major, then rows, then columns of merged patches)."""
    t, h, w = grid_thw
    gh, gw = h // spatial_merge_size, w // spatial_merge_size
    pt = (torch.arange(t) * time_interval).long()
    ph = torch.arange(gh) + start
    pw = torch.arange(gw) + start
    tt, hh, ww = torch.meshgrid(pt, ph, pw, indexing="ij")
    out = torch.stack([tt, hh, ww]).reshape(3, -1).to(torch.int64)
    out[0] += start
    return out
