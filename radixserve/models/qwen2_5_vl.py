"""Qwen2.5-VL (and Qwen2-VL's layout of it): the vision tower (qwen2_5_vl_vision.py),
whose merged patch tokens replace the image / video placeholder embeddings, in front
of the Qwen2 language model (llama.py) with M-RoPE positions.

The placeholder rows of a forward and their encoder outputs come from
`forward_batch.mm` through multimodal/embed.py (encoded once per item, cached by hash,
batched across the requests of a prefill); decode steps are the plain language model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from radixserve.core.forward_batch import ForwardBatch
from radixserve.layers.vocab_embedding import ParallelLMHead
from radixserve.models.llama import LlamaModel, _checkpoint_names
from radixserve.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer
from radixserve.models.vl_weights import normalize_vl_name
from radixserve.models.weight_utils import load_by_checkpoint_names
from radixserve.multimodal.embed import multimodal_embeddings
from radixserve.multimodal.inputs import MultimodalItem

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    # The model runner gives [3, T] positions to forwards holding multimodal requests.
    uses_mrope = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        text = config.get_text_config()
        self.visual = Qwen2_5_VisionTransformer(config.vision_config)
        self.model = LlamaModel(text, qkv_bias=True, qk_norm=False)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)

    def encode_multimodal(self, items: list[MultimodalItem]) -> list[torch.Tensor]:
        """The merged vision tokens of each item, [item.num_tokens, hidden] (images and
        videos alike: a video's temporal patches are frames of the same tower)."""
        device = self.model.embed_tokens.weight.device
        pixels = torch.cat([it.pixel_values for it in items]).to(device, non_blocking=True)
        out = self.visual(pixels, [it.grid_thw for it in items])
        return list(out.split([it.num_tokens for it in items]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        embeds = None
        if forward_batch.mm is not None:
            embeds = self.model.embed_tokens(input_ids)
            rows, vision = multimodal_embeddings(forward_batch.mm, self.encode_multimodal)
            embeds[rows] = vision.to(embeds.dtype)
        return self.model(input_ids, positions, forward_batch, input_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden, out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        named = ((normalize_vl_name(name), tensor) for name, tensor in weights)
        load_by_checkpoint_names(
            self, named, _vl_checkpoint_names,
            skip=lambda name: name.endswith(_IGNORED_SUFFIXES) or (
                self.tie_word_embeddings and name == "lm_head.weight"))


def _vl_checkpoint_names(param_name: str) -> list[tuple[str, str | int | None]]:
    if param_name.startswith("visual."):
        return [(param_name, None)]
    return _checkpoint_names(param_name)
