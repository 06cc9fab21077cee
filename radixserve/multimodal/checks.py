"""The scheduler's last-line check of a multimodal request that arrived over IPC."""

from __future__ import annotations

from typing import Any

import torch

from radixserve.multimodal.errors import MultimodalInputError
from radixserve.multimodal.inputs import MultimodalInputs, MultimodalItem


def check_mm_inputs(mm: Any, input_ids: list[int]) -> None:
    """Items in order, inside the prompt, with pixel rows and grids that agree;
    M-RoPE positions (when present) of the prompt's shape."""
    if not isinstance(mm, MultimodalInputs) or not isinstance(mm.items, list):
        raise MultimodalInputError("mm_inputs must be MultimodalInputs", "image_data")
    if mm.prompt_len != len(input_ids):
        raise MultimodalInputError("mm_inputs does not match the prompt's length", "image_data")
    end = 0
    for item in mm.items:
        if not isinstance(item, MultimodalItem) or item.offset < end \
                or item.num_tokens < 1 or item.end > len(input_ids):
            raise MultimodalInputError("mm_inputs items overlap or leave the prompt",
                                       "image_data")
        if not isinstance(item.pixel_values, torch.Tensor) or item.pixel_values.dim() != 2 \
                or len(item.grid_thw) != 3 \
                or item.pixel_values.shape[0] != item.grid_thw[0] * item.grid_thw[1] \
                * item.grid_thw[2]:
            raise MultimodalInputError("mm_inputs pixel rows do not match their grid",
                                       "image_data")
        end = item.end
    pos = mm.mrope_positions
    if pos is not None and (not isinstance(pos, torch.Tensor)
                            or tuple(pos.shape) != (3, len(input_ids))):
        raise MultimodalInputError("mm_inputs positions do not match the prompt", "image_data")
