"""Tiny random Qwen2.5-VL checkpoints (transformers builds and saves them), with the
SmolLM2 tokenizer plus the vision special tokens, a Qwen-style chat template that
renders image/video parts, and a small-pixel image processor; and PIL test images."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Few patches per image keep CPU runs short: 4 to 64 merged tokens per image.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 64


@functools.lru_cache(maxsize=1)
def vl_tokenizer():
    from model_factory import smollm2_tokenizer

    import copy

    tok = copy.deepcopy(smollm2_tokenizer())  # the shared one stays as it is
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def token_ids() -> dict[str, int]:
    tok = vl_tokenizer()
    return dict(zip(("vision_start", "vision_end", "image", "video"),
                    tok.convert_tokens_to_ids(VISION_TOKENS)))


def tiny_qwen2_5_vl_config(vocab_size: int, ids: dict[str, int], **text_overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    text.update(text_overrides)
    vision = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=64,
                  out_hidden_size=64, patch_size=14, spatial_merge_size=2, window_size=56,
                  temporal_patch_size=2, tokens_per_second=2, in_channels=3,
                  hidden_act="silu", fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=ids["image"], video_token_id=ids["video"],
                            vision_start_token_id=ids["vision_start"],
                            vision_end_token_id=ids["vision_end"],
                            tie_word_embeddings=False)


def make_qwen2_5_vl(path: Path, seed: int = 0) -> Path:
    """Save a random float32 Qwen2.5-VL (weights, config, tokenizer, image processor)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    tok = vl_tokenizer()
    config = tiny_qwen2_5_vl_config(len(tok), token_ids())
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # random norms and biases too: a loader that skipped one fails
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") \
                    or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(path)
    return path


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (gradients plus noise), so resizing changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * (3 + c) + y * (5 - c)) % 256 for c in range(3)], -1)
    noise = rng.integers(0, 64, size=(height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))
