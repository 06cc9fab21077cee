"""The records a multimodal request carries from the tokenizer to the model.

A `MultimodalInputs` travels once per request inside TokenizedGenerateReqInput (its
pixel tensors are pickled with it), then lives on the Req; per-step messages never
carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Placeholder tokens of an item are keyed in the radix tree by PAD_BASE + (hash mod
# 2**61): far above any vocabulary, so they never equal a real token id, and below
# 2**63, so they still fit an int64 wherever keys become tensors.
PAD_BASE = 1 << 62
_PAD_MASK = (1 << 61) - 1


@dataclass
class MultimodalItem:
    """One image or video of a request, as the model's encoder takes it."""

    modality: str  # "image" | "video"
    hash: int  # digest of the raw bytes and the processor settings (non-negative)
    pixel_values: torch.Tensor  # [num_patches, patch_dim]: the processor's rows of this item
    grid_thw: tuple[int, int, int]  # patch grid before the spatial merge
    offset: int  # prompt index of the first placeholder token
    num_tokens: int  # placeholder tokens: t * h * w // merge_size**2
    second_per_grid_t: float = 1.0  # videos: seconds per temporal patch
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific processor outputs

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    @property
    def pad_value(self) -> int:
        return PAD_BASE + (self.hash & _PAD_MASK)


@dataclass
class MultimodalInputs:
    """Everything multimodal about one request."""

    items: list[MultimodalItem]  # in prompt order, non-overlapping
    prompt_len: int
    # M-RoPE models: the prompt's (t, h, w) positions [3, prompt_len] and
    # max(position) + 1 - prompt_len, the offset of every later token (HF's rope_deltas).
    mrope_positions: torch.Tensor | None = None
    rope_delta: int = 0
    _key: list[int] | None = field(default=None, repr=False)

    def key_ids(self, ids: list[int]) -> list[int]:
        """`ids` (a prefix of the prompt + output) as the radix cache keys it: each
        placeholder token replaced by its item's pad value, so that the same image and
        prompt give the same key and a different image never does."""
        if self._key is None:
            raise RuntimeError("MultimodalInputs.key_ids before bind_prompt")
        n = min(len(ids), self.prompt_len)
        return self._key[:n] + list(ids[n:]) if n < len(ids) else self._key[:n]

    def bind_prompt(self, ids: list[int]) -> None:
        """Fix the key of this request's prompt `ids` (called once the ids are final)."""
        key = list(ids)
        for item in self.items:
            key[item.offset:item.end] = [item.pad_value] * item.num_tokens
        self._key = key
        self.prompt_len = len(ids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_key"] = None  # rebuilt on the receiving side from the ids (bind_prompt)
        return state
